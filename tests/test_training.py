"""Stage 2, the student: loss against the original's formula in NumPy, Adam against its closed
form, gradient accumulation, replica-count invariance (of the pairs, too) and SIGKILL-and-resume
(one run: two replicas killed, then resumed on one), and learning on the tiny config (multi-worker
training: tests/test_pairs.py, after the workers' pair generation)."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from models.configs import CONFIGS, NetworkConfig, OptimConfig
from models.diffusion import student_loss
from models.unet import UNet, official_variables
from models.weights import load_unet, read_converted
from tests.conftest import PAIRS
from tests.helpers import ROOT, run_main
from tests.reference.official import numpy_forward, official_variable_shapes, random_params
from utils.train.loop import Trainer

TINY = CONFIGS["tiny"]
NET = TINY.network
PARAMS = random_params(official_variable_shapes(NET.ch, NET.ch_mult, NET.num_res_blocks,
                                                NET.attn_resolutions, NET.resolution), seed=3)


# The gradient-accumulation test needs some network, not the tiny one: a one-level U-Net without
# attention traces in a fraction of the time.
MICRO = NetworkConfig(resolution=8, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                      dropout=0.0)
MICRO_PARAMS = random_params(official_variable_shapes(MICRO.ch, MICRO.ch_mult, MICRO.num_res_blocks,
                                                      MICRO.attn_resolutions, MICRO.resolution),
                             seed=3)


def model_with(net, params):
    model = UNet(net)
    for name, var in official_variables(model).items():
        var.assign(params[name])
    return model


def tiny_model():
    return model_with(NET, PARAMS)


@pytest.mark.parametrize("kind", ["l1", "l2", "pseudo_huber"])
def test_loss_is_the_originals_formula(kind):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, *NET.image_shape)).astype(np.float32)
    y = rng.uniform(-1, 1, (4, *NET.image_shape)).astype(np.float32)
    eps = numpy_forward(PARAMS, z, np.full(4, 999), ch=NET.ch, ch_mult=NET.ch_mult,
                        num_res_blocks=NET.num_res_blocks, attn_resolutions=NET.attn_resolutions,
                        groups=NET.gn_groups)
    diff = y - (z - eps)
    per_image = (np.abs(diff) if kind == "l1" else diff ** 2).sum(axis=(1, 2, 3))
    if kind == "pseudo_huber":  # Song & Dhariwal 2023: sqrt(||d||^2 + c^2) - c, c = 0.00054 sqrt(d)
        c = 0.00054 * np.sqrt(diff[0].size)
        per_image = np.sqrt(per_image + c * c) - c
    global_batch = 8  # the original divides the per-image sums by the global batch
    ours = float(tf.reduce_sum(student_loss(tiny_model(), z, y, kind))) / global_batch
    assert ours == pytest.approx(per_image.sum() / global_batch, rel=1e-5)


def one_update(batch, accum, tmp):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    # Adam's first step is lr * g / (|g| + eps): with a tiny eps it turns rounding noise in near-zero
    # gradients (biases followed by GroupNorm) into +-lr; eps = 1 keeps the update proportional to g.
    opt = OptimConfig(lr=1.0, warmup_steps=1, beta_1=0.9, beta_2=0.98, epsilon=1.0, ema_decay=0.5)
    trainer = Trainer(strategy, lambda: UNet(MICRO), opt,
                      lambda m, x, y, step: student_loss(m, x, y, "l2"), str(tmp),
                      global_batch=batch, grad_accum=accum)
    trainer.init_from(model_with(MICRO, MICRO_PARAMS))
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((batch, *MICRO.image_shape)), tf.float32)
    y = tf.constant(rng.uniform(-1, 1, (batch, *MICRO.image_shape)), tf.float32)
    loss = trainer.train_step((x, y))
    return float(loss), {k: v.numpy() for k, v in official_variables(trainer.model).items()}, \
        {k: v.numpy() for k, v in official_variables(trainer.ema).items()}


def test_several_steps_per_call_give_bit_identical_weights_and_losses(tmp_path):
    """train_steps (n updates in one compiled call, reading the iterator in the graph) against n
    calls of one update each on the same batches (as --steps_per_call 1 runs): the same weights,
    EMA and losses, bit for bit."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    opt = OptimConfig(lr=1e-2, warmup_steps=2, beta_1=0.9, beta_2=0.98, ema_decay=0.5)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 4, *MICRO.image_shape)).astype(np.float32)
    y = rng.uniform(-1, 1, (5, 4, *MICRO.image_shape)).astype(np.float32)
    results = []
    for per_call in (1, 5):
        trainer = Trainer(strategy, lambda: UNet(MICRO), opt,
                          lambda m, a, b, step: student_loss(m, a, b, "l1"),
                          str(tmp_path / str(per_call)), global_batch=4)
        trainer.init_from(model_with(MICRO, MICRO_PARAMS))
        it = iter(tf.data.Dataset.from_tensor_slices((x, y)))
        losses = [float(trainer.train_steps(it, per_call)) for _ in range(5 // per_call)]
        results.append((sum(losses), {k: v.numpy() for k, v in official_variables(trainer.model).items()},
                        {k: v.numpy() for k, v in official_variables(trainer.ema).items()},
                        trainer.step))
    (l1, w1, e1, s1), (l5, w5, e5, s5) = results
    assert s1 == s5 == 5 and l5 == pytest.approx(l1, rel=1e-6)
    for k in w1:
        assert w1[k].tobytes() == w5[k].tobytes() and e1[k].tobytes() == e5[k].tobytes(), k
    assert not np.allclose(w1["conv_in/W"], MICRO_PARAMS["conv_in/W"])


def test_adam_follows_the_closed_form_in_and_out_of_a_graph():
    """FusedAdam (Keras Adam's variables, TensorFlow's fused kernel) against Adam written out in
    NumPy (Kingma & Ba, Algorithm 1 with the bias corrections folded into the step size) over four
    steps of changing gradients, eagerly and in a compiled function."""
    from utils.train.optim import FusedAdam
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-3
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 5))
    grads = rng.standard_normal((4, 3, 5))
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    for compiled in (False, True):
        var = tf.Variable(w0, dtype=tf.float32)
        opt = FusedAdam(lr, beta_1=b1, beta_2=b2, epsilon=eps)
        opt.build([var])
        apply = lambda g: opt.apply_gradients([(g, var)])  # noqa: E731
        apply = tf.function(apply) if compiled else apply
        for g in grads:
            apply(tf.constant(g, tf.float32))
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
        assert int(opt.iterations.numpy()) == 4 and not np.allclose(w, w0)
    with pytest.raises(ValueError, match="amsgrad"):  # a variant the fused kernel does not have
        FusedAdam(lr, amsgrad=True)


@pytest.mark.parametrize("decay_steps", [0, 50])
def test_learning_rate_schedule_is_warmup_then_constant_or_cosine(decay_steps):
    """Against the closed forms: lr (s+1)/W during the warmup, then lr, or with decay_steps D
    lr (1 + cos(pi (s+1-W)/(D-W)))/2, reaching 0 at D and staying there."""
    from utils.train.optim import LinearWarmup
    lr, warmup = 1e-3, 10
    schedule = LinearWarmup(lr, warmup, decay_steps)
    for s in [0, 4, 9, 10, 20, 30, 49, 60]:
        want = lr * min(1.0, (s + 1) / warmup)
        if decay_steps and s + 1 > warmup:
            done = min((s + 1 - warmup) / (decay_steps - warmup), 1.0)
            want = lr * 0.5 * (1 + np.cos(np.pi * done))
        assert float(schedule(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), s


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    # two micro-batches of 4: the accumulated update is the sum of two gradients
    loss1, w1, e1 = one_update(8, 1, tmp_path / "a")
    loss2, w2, e2 = one_update(8, 2, tmp_path / "b")
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    moved = 0
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=2e-6, err_msg=k)
        np.testing.assert_allclose(e2[k], 0.5 * MICRO_PARAMS[k] + 0.5 * w1[k], atol=2e-6,
                                   err_msg=k)
        moved += not np.allclose(w1[k], MICRO_PARAMS[k])
    assert moved > len(w1) // 2  # the update really changed the weights


def train_args(teacher, pairs, savedir, *extra):
    # the session's teacher and pairs (tests/conftest.py); PAIRS holds --no-xla: XLA compile time
    # would dominate these short runs
    return ["training.py", "tiny", str(savedir), "--teacher", teacher, "--datadir", pairs, *PAIRS,
            "--batch_size", "32", "--ckpt_every", "2", "--n_eval", "32", "--no_generate", *extra]


def weights_of(folder):
    return read_converted(str(folder)).params


REFERENCE = ["--epochs", "0.5"]  # 4 steps of 32; checkpoints at steps 0, 2 and 4


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_teacher, tiny_pairs):
    """One replica, uninterrupted, built in this process (no process under test): what the
    two-replica run and the killed-and-resumed run must both end with."""
    from tests.conftest import run_training, shared

    def build(folder):
        run_training(train_args(tiny_teacher, tiny_pairs, folder / "run", *REFERENCE)[1:])
    return shared(tmp_path_factory, "reference_run", build) / "run"


@pytest.mark.slow
def test_two_replicas_killed_and_resumed_on_one_end_with_the_same_pairs_and_weights(
        tiny_teacher, tiny_pairs, reference_run, tmp_path, capsys):
    """Two logical CPU replicas (a fresh process: set before TensorFlow makes its devices) generate
    the session's pair set again and train on it, and are killed with SIGKILL after their step-2
    checkpoint; the run is then resumed in this process on one replica. The pairs, the step-2
    weights and the final weights are those of one uninterrupted replica (reference_run)."""
    pairs, run = tmp_path / "pairs", tmp_path / "run"
    args = train_args(tiny_teacher, str(pairs), run, *REFERENCE)
    args.remove("--no_generate")
    ckpts, deadline = run / "checkpoints", time.time() + 600
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, *args, "--cpu_replicas", "2", "--steps_per_call", "1"],
                                cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "PYTHONPATH": ROOT})
        # killed once the checkpoint state names ckpt-2 (written after ckpt-2's files are complete)
        while proc.poll() is None and time.time() < deadline and not (
                (tf.train.latest_checkpoint(str(ckpts)) or "").endswith("ckpt-2")):
            time.sleep(0.05)
        alive = proc.poll() is None
        proc.kill()
        proc.wait()
    assert alive, (tmp_path / "stderr").read_text()[-3000:]
    assert tf.train.latest_checkpoint(str(ckpts)).endswith("ckpt-2")  # not the deadline
    assert not any(f.startswith("ckpt-4.") for f in os.listdir(ckpts))  # killed mid-run
    # the pairs of two replicas are those of one
    names = sorted(f for f in os.listdir(tiny_pairs) if f.endswith(".npy"))
    assert sorted(f for f in os.listdir(pairs) if f.endswith(".npy")) == names
    for name in names:
        a, b = (np.load(os.path.join(d, name)) for d in (pairs, tiny_pairs))
        if name.startswith("x_"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:  # other batch shapes may round a .5 differently: at most one level, rarely
            diff = np.abs(a.astype(int) - b.astype(int))
            print(f"{name}: {int((diff > 0).sum())} of {diff.size} values differ by one level")
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, name
    # so are their weights after 2 steps
    a_ck, b_ck = (tf.train.load_checkpoint(str(d / "checkpoints" / "ckpt-2"))
                  for d in (reference_run, run))
    worst = max(float(np.abs(a_ck.get_tensor(k) - b_ck.get_tensor(k)).max())
                for k in a_ck.get_variable_to_shape_map() if k.startswith("model/"))
    print(f"1 vs 2 replicas after 2 steps: max weight difference {worst:.2e}")
    assert worst < 1e-4
    # resumed from what the killed process left on disk (in this process: the run, not the
    # process, is under test now), on one replica: checkpoints do not depend on the strategy
    code, out, err = run_main("training", args[1:], capsys)
    assert code == 0, err
    assert "resumed" in out
    for part in ("last", "best"):
        a, b = weights_of(reference_run / part), weights_of(run / part)
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-4, err_msg=f"{part} {k}")
    a_ck, b_ck = (tf.train.load_checkpoint(str(d / "checkpoints")) for d in (reference_run, run))
    for key in a_ck.get_variable_to_shape_map():
        if key.startswith("model/"):
            np.testing.assert_allclose(b_ck.get_tensor(key), a_ck.get_tensor(key), atol=1e-4)


def test_heldout_loss_falls_steadily_below_its_initial_value(tiny_student):
    # The session student (tests/conftest.py): 3 epochs of 8 steps, lr 2e-3 cosine, EMA decay 0.5.
    # A random-weight teacher makes a hard, chaotic target for 256 pairs; the digits end-to-end test
    # (a trained teacher) shows the large drop. Here: a clear fall at every epoch (6% in all when
    # measured).
    log = [json.loads(line) for line in open(os.path.join(tiny_student, "logs", "scalars.jsonl"))]
    held = [e["heldout_loss"] for e in log if "heldout_loss" in e]
    print(f"held-out L1 per image: {held[0]:.1f} at init -> {min(held):.1f} after {log[-1]['step']} steps")
    assert log[-1]["step"] == 24 and len(held) == 4  # step 0, then each epoch end
    assert min(held) < 0.95 * held[0] and all(a > b for a, b in zip(held, held[1:]))
    model, w = load_unet(os.path.join(tiny_student, "best"), TINY)
    assert w.dataset == "tiny" and w.ema
    meta = json.load(open(os.path.join(tiny_student, "best", "weights.json")))
    assert meta["heldout_loss_kind"] == "l1" and meta["heldout_loss"] == pytest.approx(min(held))


def test_teacher_stream_is_its_definition_for_any_hosts_replicas_and_resume():
    """Stage 0's data (utils.train.teacher.teacher_dataset): each epoch the images in a stateless
    shuffle keyed by (seed, epoch), eps and t keyed by (seed, epoch, step), restated here from that
    definition; any split over hosts and replicas, and a resume mid-epoch, give the same stream."""
    from utils.train.teacher import TEACHER_KEY, teacher_dataset
    images = np.random.default_rng(5).uniform(-1, 1, (20, 4, 4, 1)).astype(np.float32)
    seed, batch, steps = 7, 4, 5  # 5 steps an epoch

    def reference(epoch, step):
        fold = lambda key, data: tf.random.experimental.stateless_fold_in(  # noqa: E731
            key, tf.constant(data, tf.int64))  # int64 data: an int32 hashes otherwise
        key = fold(tf.constant([seed, TEACHER_KEY], tf.int64), epoch)
        order = tf.random.experimental.stateless_shuffle(tf.range(20, dtype=tf.int64), seed=key)
        k = fold(key, step + 1)
        eps = tf.random.stateless_normal([batch, 4, 4, 1], seed=k).numpy()
        t = tf.random.stateless_uniform([batch], seed=k[::-1], maxval=1000, dtype=tf.int32).numpy()
        return images[order[step * batch:(step + 1) * batch].numpy()], eps, t

    def stream(epoch, start, hosts, local, n):
        """n global batches, the hosts' per-replica parts put back together."""
        parts = [list(teacher_dataset(images, batch, seed, 1000, epoch=epoch, start=start,
                                      part=(h, hosts), local_replicas=local).take(n * local))
                 for h in range(hosts)]
        return [[np.concatenate([p[s * local + r][i].numpy() for p in parts for r in range(local)])
                 for i in range(3)] for s in range(n)]
    want = [reference(0, s) for s in range(steps)] + [reference(1, 0)]
    for hosts, local in ((1, 1), (2, 1), (1, 2), (2, 2)):
        got = stream(0, 0, hosts, local, steps + 1)  # into the next epoch
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                np.testing.assert_array_equal(a, b, err_msg=f"{hosts} hosts x {local}")
    resumed = stream(0, 3, 1, 1, 3)  # from step 3 of epoch 0: steps 3, 4, then epoch 1
    for g, w in zip(resumed, want[3:]):
        for a, b in zip(g, w):
            np.testing.assert_array_equal(a, b)
