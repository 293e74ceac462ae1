"""How good are the digits models? One table, one run: real digits, the teacher (deterministic DDIM
at 49 network calls and more, and ancestral sampling), and the one-step student.

Columns (all from the shipped digits classifier, utils/evaluate/digit_classifier.py, trained on real digits):
  FD          Frechet distance of classifier features against the 360 held-out real digits: the
              mean over --seeds of the FD of each seed's samples (1,437 by default)
  /floor      FD over the real-vs-real floor (the 1,437 training digits against the same 360)
  range       the smallest and largest FD of one seed: with 1,437 samples the same model scores
              3.7 to 6.5, so compare models on the mean of several seeds, never on one
  confident   share of images given one class with probability > 0.999 (held-out real: 79%)
  classes     smallest and largest share of images per predicted class (balanced: 10% each)
  NN median   median distance from an image to its nearest training digit (pixels in [-1, 1])
  < p5 real   share of images nearer to the training set than the closest 5% of held-out real
              digits are (about 5% if the model does not copy; far more if it memorises)

Every model row uses the same noise (seed, index), so teacher and student draw the "same" digits;
the last lines give the student's FD over its teacher's (per seed and of the means) and say where
they differ (class agreement; FD with the student's worst samples replaced). The other columns
pool the samples of all seeds. Ancestral sampling (1,000 calls a sample) runs on the first seed
only.

    python bench/digits_quality.py                                   # shipped teacher and student
    python bench/digits_quality.py --teacher RUN/teacher --student RUN --steps 100 200
    python bench/digits_quality.py --teacher RUN/teacher_run/last --no_student --ancestral 0
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.configs import SamplerConfig, get_config  # noqa: E402
from models.diffusion import ddim_plan, run_solver  # noqa: E402
from models.weights import load_unet  # noqa: E402
from utils.evaluate import digit_classifier as dc  # noqa: E402
from models.diffusion import student_fn  # noqa: E402
from utils.evaluate.sampling import default_teacher, load_student, sample_batches  # noqa: E402

CFG = get_config("digits")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="teacher weights (default: the shipped teacher)")
    p.add_argument("--student", default=None, help="student weights or run (default: shipped)")
    p.add_argument("--no_student", action="store_true", help="teacher rows only")
    p.add_argument("--n", type=int, default=1437,
                   help="samples per row (default 1,437: as many as the real training digits, so "
                        "the FDs compare with the real-vs-real floor)")
    p.add_argument("--steps", type=int, nargs="*", default=[200],
                   help="extra deterministic DDIM step counts besides the sampler's own")
    p.add_argument("--skip_type", default=None, choices=["quadratic", "uniform"],
                   help="timestep spacing of the extra DDIM rows (default: the sampler's)")
    p.add_argument("--ancestral", type=int, default=1000,
                   help="steps of ancestral sampling (DDPM, eta = 1); 0 to skip")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="noise seeds, one set of --n samples each; FDs are averaged over them "
                        "(default: 0 1 2 3)")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def plan_sampler(model, plan, xla: bool):
    """seed -> (z -> x0 through the DDIM loop of `plan`), compiled once for all seeds; stochastic
    plans get a fresh seed each batch."""
    fn = tf.function(lambda z, s: run_solver(lambda x, t: model(x, t), z, plan, s),
                     jit_compile=xla)

    def for_seed(seed: int):
        batch_no = iter(range(1 << 30))
        return lambda z: fn(z, tf.constant([seed, 100_000 * next(batch_no)], tf.int32))
    return for_seed


def draw(sample, n: int, seed: int) -> np.ndarray:
    batch = math.ceil(n / math.ceil(n / 512))  # equal batches: one compilation
    return np.concatenate([b for _, b in sample_batches(sample, CFG, np.arange(n), batch, seed)])


class Table:
    """Scores image sets against the real digits and prints one row each."""

    def __init__(self) -> None:
        self.train = dc.real_digits_uint8("train")
        self.held_out = dc.real_digits_uint8("test")
        self.floor = dc.digits_fd(self.train, "test")
        self.p5 = np.percentile(dc.nearest_distances(self.held_out, self.train), 5)
        print(f"{'images':38s} {'FD':>6s} {'/floor':>6s} {'range':>13s} {'confident':>9s} "
              f"{'classes':>11s} {'NN median':>9s} {'< p5 real':>9s} {'time':>7s}")

    def row(self, name: str, sets: list[np.ndarray], seconds: float | None = None,
            fd: bool = True, nn: bool = True) -> list[float]:
        """One row for the image sets of one source (one per seed); returns their FDs."""
        images = np.concatenate(sets)
        probs = dc.class_probabilities(images)
        shares = dc.class_shares(probs)
        fds = [dc.digits_fd(x, "test") for x in sets] if fd else []
        if fds:
            mean = float(np.mean(fds))
            spread = f"{min(fds):5.2f}-{max(fds):5.2f}" if len(fds) > 1 else "-"
            fd_text = f"{mean:6.2f} {mean / self.floor:5.2f}x {spread:>13s}"
        else:
            fd_text = f"{'-':>6s} {'-':>6s} {'-':>13s}"
        if nn:
            d = dc.nearest_distances(images, self.train)
            nn_text = f"{np.median(d):9.2f} {np.mean(d < self.p5):9.1%}"
        else:
            nn_text = f"{'-':>9s} {'-':>9s}"
        t = f"{seconds:6.0f}s" if seconds is not None else ""
        print(f"{name:38s} {fd_text} {dc.confident_share(probs):9.1%} "
              f"{shares.min():5.1%}-{shares.max():5.1%} {nn_text} {t:>7s}", flush=True)
        return fds


def student_over_teacher(student_fds: list[float], teacher_fds: list[float]) -> None:
    """The student's FD over its teacher's on the same noise: per seed, and of the means."""
    per_seed = ", ".join(f"{s / t:.2f}" for s, t in zip(student_fds, teacher_fds))
    print(f"# student FD / teacher DDIM FD: {np.mean(student_fds) / np.mean(teacher_fds):.3f}x "
          f"of the means (per seed: {per_seed})")


def where_the_student_differs(teacher: list[np.ndarray], student: list[np.ndarray]) -> None:
    """Student against teacher on the same noise: class agreement, and the FD when the student's
    samples farthest from the teacher's are replaced by the teacher's (is the gap a tail?)."""
    errs = [np.abs(t.astype(float) - s.astype(float)).mean(axis=(1, 2, 3)) / 127.5
            for t, s in zip(teacher, student)]  # per seed, per image
    err = np.concatenate(errs)
    same = (dc.class_probabilities(np.concatenate(teacher)).argmax(1) ==
            dc.class_probabilities(np.concatenate(student)).argmax(1))
    print(f"# student vs teacher DDIM: same class {same.mean():.1%}; mean absolute error per pixel "
          f"{err[same].mean():.3f} there, {err[~same].mean():.3f} where the class differs")
    fds = []
    for share in (0.01, 0.05, 0.10):
        per_seed = []
        for ts, ss, e in zip(teacher, student, errs):
            replaced = np.argsort(-e)[:int(share * len(e))]
            mixed = ss.copy()
            mixed[replaced] = ts[replaced]
            per_seed.append(dc.digits_fd(mixed, "test"))
        fds.append(f"{share:.0%}: {np.mean(per_seed):.2f}")
    print(f"# student FD with its samples farthest from the teacher's replaced by the teacher's: "
          f"{', '.join(fds)}")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    table = Table()
    table.row(f"real: training digits ({len(table.train)})", [table.train], nn=False)
    table.row(f"real: held-out digits ({len(table.held_out)})", [table.held_out], fd=False)
    teacher, weights = load_unet(args.teacher or default_teacher(CFG), CFG)
    print(f"# teacher: {weights.describe()}")
    smp = CFG.sampler
    plans = [(f"teacher DDIM {ddim_plan(smp).n_calls} calls", ddim_plan(smp), args.seeds)]
    for steps in args.steps:
        extra = SamplerConfig(steps=steps, skip_type=args.skip_type or smp.skip_type)
        plans.append((f"teacher DDIM {ddim_plan(extra).n_calls} calls ({extra.skip_type})",
                      ddim_plan(extra), args.seeds))
    if args.ancestral:
        plan = ddim_plan(SamplerConfig(steps=args.ancestral, skip_type="uniform"), eta=1.0)
        plans.append((f"teacher ancestral {plan.n_calls} steps (seed {args.seeds[0]})", plan,
                      args.seeds[:1]))
    teacher_sets, teacher_fds = None, None  # DDIM at the dataset's own steps, per seed
    for name, plan, seeds in plans:
        sampler = plan_sampler(teacher, plan, args.xla)
        sets, seconds = timed(lambda: [draw(sampler(s), args.n, s) for s in seeds])
        fds = table.row(name, sets, seconds)
        if teacher_sets is None:
            teacher_sets, teacher_fds = sets, fds
    if not args.no_student:
        student, weights = load_student(args.student, CFG)
        print(f"# student: {weights.describe()}")
        sample = student_fn(student, args.xla)
        sets, seconds = timed(lambda: [draw(sample, args.n, s) for s in args.seeds])
        student_over_teacher(table.row("student (1 call)", sets, seconds), teacher_fds)
        where_the_student_differs(teacher_sets, sets)
    noise = [np.random.default_rng(s).integers(0, 256, (args.n, 8, 8, 1), dtype=np.uint8)
             for s in args.seeds]
    table.row("uniform noise (for scale)", noise)


if __name__ == "__main__":
    main()
