"""Student training-step speed: our Trainer against a plain Keras `model.fit` of the same thing.

For each config and XLA setting, in one run, on the same random (z, y) batches and from the same
randomised weights:

  ours  utils/train/loop.Trainer on OneDeviceStrategy("/cpu:0"), the loss of utils/train/distill.py
        (student_loss, summed and divided by the global batch), Adam with the config's betas/epsilon and
        linear warmup, plus the EMA update every step; `steps` calls of trainer.train_step((x, y)) per
        round, each synchronised with float(loss) as run_loop does.
  fit   keras.Model wrapping the student (z -> z - unet(z, 999), utils' student_sample), compiled with
        Adam (same betas/epsilon, constant lr), a custom loss (per-image sum of |y - x0| for l1 or
        (y - x0)^2 for l2, summed over the batch and divided by it) and jit_compile passed explicitly
        (Keras 3's default "auto" would pick XLA here), no EMA; one warm-up fit of 1 step, then per
        round one fit of `steps` steps (steps_per_epoch, shuffle off, no validation), timed from the
        first batch's start to the last batch's end (callbacks), so fit's per-call set-up (data
        adapter, callbacks) is left out; the whole call is shown too.
  bf16  ours again with UNet(..., compute_dtype="bfloat16") (float32 weights), same XLA setting
        (--no-bf16 skips it).

All are built and warmed up first; then `rounds` rounds time `steps` steps of each in turn
(interleaved, so a change of load hits all alike) and each setting's best round counts. Reported:
pairs/s of each, the ratios ours/fit (>= 1: our loop, EMA included, costs nothing over fit) and ours
bf16/f32, and the warm-up seconds (XLA compilation of a training step takes tens of seconds even for
tiny: use --xla on or off rather than both when time is short). Ratios come from the same run, so they
survive a noisy machine better than the absolute figures.

    python bench/train_step.py                        # tiny and digits, batch 32, XLA off and on
    python bench/train_step.py --datasets cifar10 --steps 3 --batch 32 --rounds 1 --xla on
    python bench/train_step.py --datasets tiny --steps 2 --rounds 1 --xla off     # smoke test
    TF_ENABLE_ONEDNN_OPTS=1 python bench/train_step.py --datasets digits --xla off --no-bf16 --onednn_amp
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.forward import randomise  # noqa: E402
from models.configs import DatasetConfig, get_config  # noqa: E402
from models.diffusion import student_loss, student_sample  # noqa: E402
from models.unet import UNet, official_variables  # noqa: E402
from utils.train.loop import Trainer  # noqa: E402


class Student(keras.Model):
    """The student as a one-input Keras model: z -> z - unet(z, t=999)."""

    def __init__(self, unet: UNet, **kwargs):
        super().__init__(**kwargs)
        self.unet = unet

    def call(self, z):
        return student_sample(self.unet, z)


def batch_loss(kind: str) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """Keras loss: per-image sum of |y - x0| ("l1") or (y - x0)^2 ("l2"), divided by the batch."""
    def loss(y_true, y_pred):
        diff = y_true - y_pred
        per_image = tf.reduce_sum(tf.abs(diff) if kind == "l1" else tf.square(diff), axis=[1, 2, 3])
        return tf.reduce_sum(per_image) / tf.cast(tf.shape(per_image)[0], per_image.dtype)
    return loss


def random_data(cfg: DatasetConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n pairs: z ~ N(0, I), y uniform in [-1, 1] (dequantised targets), float32."""
    rng = np.random.default_rng(0)
    shape = (n, *cfg.network.image_shape)
    return (rng.standard_normal(shape).astype(np.float32),
            rng.uniform(-1.0, 1.0, shape).astype(np.float32))


Timer = Callable[[], float]
"""Runs the timed steps once; returns seconds per step."""


def ours_timer(cfg: DatasetConfig, source: UNet, data: list, xla: bool, dtype: str,
               savedir: str) -> tuple[Timer, float]:
    """Trainer.train_step over every batch of `data`, and the seconds of its warm-up step."""
    t = cfg.train
    trainer = Trainer(tf.distribute.OneDeviceStrategy("/cpu:0"),
                      lambda: UNet(cfg.network, compute_dtype=dtype), t.optim,
                      lambda model, x, y, step: student_loss(model, x, y, t.loss), savedir,
                      global_batch=int(data[0][0].shape[0]), xla=xla)
    trainer.init_from(source)
    start = time.perf_counter()
    float(trainer.train_step(data[0]))  # warm-up: tracing, XLA compilation

    def run() -> float:
        start = time.perf_counter()
        for batch in data:
            float(trainer.train_step(batch))  # synchronised, as run_loop does
        return (time.perf_counter() - start) / len(data)
    return run, time.perf_counter() - start


class _StepClock(keras.callbacks.Callback):
    """From the first batch's start to the last batch's end of a fit call."""

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.end = time.perf_counter()


def fit_timer(cfg: DatasetConfig, source: UNet, z: np.ndarray, y: np.ndarray, batch: int,
              xla: bool) -> tuple[Timer, Timer, float]:
    """model.fit over len(z) // batch steps: seconds per step counting the steps only, and the whole
    call; and the seconds of the warm-up fit (1 step). The two timers read the same fit call."""
    t, opt = cfg.train, cfg.train.optim
    unet = UNet(cfg.network)
    for name, var in official_variables(unet).items():
        var.assign(official_variables(source)[name])
    model = Student(unet)
    model.compile(optimizer=keras.optimizers.Adam(opt.lr, beta_1=opt.beta_1, beta_2=opt.beta_2,
                                                  epsilon=opt.epsilon),
                  loss=batch_loss(t.loss), jit_compile=xla)
    steps, clock, last = len(z) // batch, _StepClock(), {}
    start = time.perf_counter()
    model.fit(z[:batch], y[:batch], batch_size=batch, epochs=1, steps_per_epoch=1, shuffle=False,
              verbose=0)  # warm-up: tracing, XLA compilation, optimizer variables
    warm = time.perf_counter() - start

    def run() -> float:
        start = time.perf_counter()
        model.fit(z, y, batch_size=batch, epochs=1, steps_per_epoch=steps, shuffle=False,
                  verbose=0, callbacks=[clock])
        last["call"] = (time.perf_counter() - start) / steps
        return (clock.end - clock.start) / steps
    return run, lambda: last["call"], warm


def measure(cfg: DatasetConfig, batch: int, steps: int, rounds: int, xla: bool,
            with_bf16: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Best seconds per step of each setting ("ours", "fit", "call": fit's whole call, "bf16"),
    and warm-up seconds of each."""
    source = UNet(cfg.network)
    randomise(source)
    z, y = random_data(cfg, batch * steps)
    data = [(tf.constant(z[i:i + batch]), tf.constant(y[i:i + batch]))
            for i in range(0, len(z), batch)]
    timers, warm = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        timers["ours"], warm["ours"] = ours_timer(cfg, source, data, xla, "float32", f"{tmp}/f32")
        timers["fit"], timers["call"], warm["fit"] = fit_timer(cfg, source, z, y, batch, xla)
        if with_bf16:
            timers["bf16"], warm["bf16"] = ours_timer(cfg, source, data, xla, "bfloat16",
                                                      f"{tmp}/bf16")
        best = {key: np.inf for key in timers}
        for _ in range(rounds):  # interleaved, so a change of load hits every setting alike
            for key, timer in timers.items():
                best[key] = min(best[key], timer())
    return best, warm


def bench(dataset: str, batch: int, steps: int, rounds: int, xla: bool, with_bf16: bool) -> None:
    cfg = get_config(dataset)
    s, warm = measure(cfg, batch, steps, rounds, xla, with_bf16)
    line = (f"{dataset:8s} batch {batch:3d}, {steps} steps x {rounds} rounds, loss {cfg.train.loss}, "
            f"xla {'on ' if xla else 'off'} (fit: jit_compile={xla}, Adam constant lr, no EMA): "
            f"ours {batch / s['ours']:8.1f} pairs/s | fit {batch / s['fit']:8.1f} pairs/s "
            f"(whole call {batch / s['call']:.1f}) | ours/fit speed {s['fit'] / s['ours']:5.2f}x | ")
    if with_bf16:
        line += (f"ours bf16 {batch / s['bf16']:8.1f} pairs/s, "
                 f"bf16/f32 speed {s['ours'] / s['bf16']:5.2f}x | ")
    print(line + "warm-up s: " + ", ".join(f"{k} {v:.1f}" for k, v in warm.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["tiny", "digits"])
    p.add_argument("--batch", type=int, default=32, help="global batch (pairs per step)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="timing rounds, the settings interleaved (the best round counts)")
    p.add_argument("--xla", choices=["both", "on", "off"], default="both",
                   help="XLA for our step and for fit (jit_compile); both: measure each")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our step with bfloat16 compute (one more compilation)")
    p.add_argument("--onednn_amp", action="store_true",
                   help="run every setting under oneDNN's bfloat16 graph rewrite (--bf16's CPU path "
                        "for sampling; start with TF_ENABLE_ONEDNN_OPTS=1), to compare against a run "
                        "without it; plain graphs only (--xla off)")
    args = p.parse_args()
    if args.onednn_amp:
        from utils.precision import ONEDNN, enable_bf16
        assert enable_bf16(accelerator=False) == ONEDNN, "start with TF_ENABLE_ONEDNN_OPTS=1"
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"devices: {[d.name for d in tf.config.list_logical_devices()]}")
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.xla]
    for dataset in args.datasets:
        for xla in modes:
            bench(dataset, args.batch, args.steps, args.rounds, xla, args.bf16)


if __name__ == "__main__":
    main()
