"""bfloat16 against float32 on this machine, in one run: speed, drift, and what it does to samples.

Each setting runs in a fresh process (oneDNN is switched on when TensorFlow starts, and the graph
rewrite is process-wide), on the same noise:

  float32         the default: what eval.py and training.py run without --bf16
  bf16 onednn     --bf16 on a CPU: oneDNN's auto_mixed_precision_onednn_bfloat16 rewrite of the
                  float32 graph (TF_ENABLE_ONEDNN_OPTS=1; no XLA: the rewrite skips XLA clusters)
  bf16 dtype      the compute-dtype path (GPU/TPU's --bf16, and the CPU's when oneDNN is off)
  float32 onednn  float32 with oneDNN on, to separate oneDNN's own kernels from the bfloat16

Parts (--parts):
  forward  cifar10 U-Net (random weights: the cost depends on the architecture only), img/s of the
           student's one call at each --batches, as ratios to float32; and the drift of its uint8
           pixels (share more than one level off, largest difference) at the largest batch
  digits   the shipped digits student, 1,437 samples per seed (--seeds): digits-classifier FD
           against the held-out digits and the confident share, float32 vs bf16 onednn
  pairs    the shipped digits teacher's DDIM pairs (49 calls, the pair noise of seed 0, 1,437):
           FD of the teacher's images and the largest pixel difference, float32 vs bf16 onednn

    python bench/bf16.py                                   # everything (about 10 minutes here)
    python bench/bf16.py --parts forward --batches 1 64
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils.cli import keep_freed_memory, quiet_tensorflow  # noqa: E402

SETTINGS = {  # name: (TF_ENABLE_ONEDNN_OPTS, bf16 path)
    "float32": ("0", None),
    "float32 onednn": ("1", None),
    "bf16 onednn": ("1", "onednn"),
    "bf16 dtype": ("0", "compute_dtype"),
}
N_DIGITS = 1437  # as bench/digits_quality.py: one set the size of the training digits


# -- the child: one setting, results into an .npz --------------------------------------------------

def child(part: str, setting: str, out: str, args: argparse.Namespace) -> None:
    keep_freed_memory()
    quiet_tensorflow()
    import numpy as np
    import tensorflow as tf

    from models.configs import get_config
    from models.diffusion import teacher_fn, student_fn
    from utils import precision
    path = SETTINGS[setting][1]
    if path == "onednn":
        assert precision.enable_bf16(accelerator=False, say=lambda _: None) == precision.ONEDNN, \
            "oneDNN is off: TF_ENABLE_ONEDNN_OPTS"
    dtype = "bfloat16" if path == "compute_dtype" else "float32"
    xla = path != "onednn" and args.xla
    results = {}
    if part == "forward":
        from bench.forward import randomise
        from models.unet import UNet
        from utils.evaluate.sampling import noise_for
        cfg = get_config("cifar10")
        model = UNet(cfg.network, compute_dtype=dtype)
        randomise(model)
        fn = student_fn(model, xla)
        for batch in args.batches:
            z = noise_for(np.arange(batch), cfg, 0)
            fn(z).numpy()
            best = min(_seconds(lambda: fn(z).numpy()) for _ in range(args.repeats))
            results[f"img_per_s_{batch}"] = batch / best
        results["x0"] = fn(noise_for(np.arange(max(args.batches)), cfg, 0)).numpy()
    elif part == "digits":
        from utils.evaluate.sampling import load_student, sample_batches
        cfg = get_config("digits")
        model, _ = load_student(None, cfg, compute_dtype=dtype)
        fn = student_fn(model, xla)
        for seed in args.seeds:
            results[f"seed_{seed}"] = np.concatenate(
                [b for _, b in sample_batches(fn, cfg, np.arange(N_DIGITS), 512, seed)])
    elif part == "pairs":
        from data.shards import TRAIN
        from models.diffusion import example_noise
        from models.weights import load_unet
        from utils.evaluate.sampling import default_teacher
        from utils.images import to_uint8
        cfg = get_config("digits")
        teacher, _ = load_unet(default_teacher(cfg), cfg, compute_dtype=dtype)
        fn = teacher_fn(teacher, cfg.sampler, xla)
        x = example_noise(tf.range(N_DIGITS), 0, TRAIN, cfg.network.image_shape)
        start = time.perf_counter()
        results["y"] = to_uint8(np.concatenate([fn(x[i:i + 512]).numpy()
                                                for i in range(0, N_DIGITS, 512)]))
        results["seconds"] = time.perf_counter() - start
    np.savez(out, **results)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_child(part: str, setting: str, args: argparse.Namespace, tmp: str):
    import numpy as np
    out = os.path.join(tmp, f"{part}-{setting.replace(' ', '_')}.npz")
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": SETTINGS[setting][0], "PYTHONPATH": ROOT}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, setting, out,
           "--batches", *map(str, args.batches), "--seeds", *map(str, args.seeds),
           "--repeats", str(args.repeats), "--xla" if args.xla else "--no-xla"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    with np.load(out) as data:
        return {k: data[k] for k in data.files}, time.perf_counter() - start


# -- the parent: default float32 process, the metrics -----------------------------------------------

def pixel_drift(a, b) -> str:
    import numpy as np
    d = np.abs(a.astype(int) - b.astype(int))
    return f"largest {d.max()} levels, {(d > 1).mean():.2%} of pixels more than one level off"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["forward", "digits", "pairs"],
                   choices=["forward", "digits", "pairs"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--repeats", type=int, default=3, help="timed calls (the best counts)")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                   help="XLA for the settings that can use it (as eval.py's default)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args)
    quiet_tensorflow()
    import numpy as np

    from utils.evaluate import digit_classifier as dc
    from utils.images import to_uint8
    from utils.precision import cpu_has_bf16
    units = cpu_has_bf16()
    print(f"CPU bfloat16 units (avx512_bf16 / amx_bf16): {units}; float32 XLA: {args.xla}")
    with tempfile.TemporaryDirectory() as tmp:
        if "forward" in args.parts:
            res = {s: run_child("forward", s, args, tmp)[0] for s in SETTINGS}
            base = res["float32"]
            for b in args.batches:
                row = ", ".join(f"{s} {res[s][f'img_per_s_{b}']:.2f} img/s "
                                f"({res[s][f'img_per_s_{b}'] / base[f'img_per_s_{b}']:.2f}x)"
                                for s in SETTINGS)
                print(f"cifar10 student, batch {b}: {row}")
            ref = to_uint8(base["x0"])
            for s in ("float32 onednn", "bf16 onednn", "bf16 dtype"):
                print(f"cifar10 drift, {s} vs float32 (batch {max(args.batches)}): "
                      f"{pixel_drift(to_uint8(res[s]['x0']), ref)}")
        if "digits" in args.parts:
            res = {s: run_child("digits", s, args, tmp)[0] for s in ("float32", "bf16 onednn")}
            for s, r in res.items():
                fds = [dc.digits_fd(r[f"seed_{k}"], "test") for k in args.seeds]
                conf = dc.confident_share(dc.class_probabilities(
                    np.concatenate([r[f"seed_{k}"] for k in args.seeds])))
                print(f"digits student, {s}: FD {sum(fds) / len(fds):.3f} (seeds "
                      f"{', '.join(f'{f:.2f}' for f in fds)}), confident {conf:.1%}")
            a = np.concatenate([res["float32"][f"seed_{k}"] for k in args.seeds])
            b = np.concatenate([res["bf16 onednn"][f"seed_{k}"] for k in args.seeds])
            print(f"digits student pixels, bf16 onednn vs float32: {pixel_drift(b, a)}")
        if "pairs" in args.parts:
            res = {s: run_child("pairs", s, args, tmp)[0] for s in ("float32", "bf16 onednn")}
            for s, r in res.items():
                print(f"digits teacher pairs (DDIM 49 calls, {N_DIGITS}), {s}: FD of the teacher's "
                      f"images {dc.digits_fd(r['y'], 'test'):.3f} ({float(r['seconds']):.1f} s)")
            print(f"digits teacher pairs, bf16 onednn vs float32: "
                  f"{pixel_drift(res['bf16 onednn']['y'], res['float32']['y'])}")


if __name__ == "__main__":
    main()
