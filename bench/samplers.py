"""The teacher's solvers, measured: how many network calls does DPM-Solver++(2M) need to give the
pairs DDIM gives, and what does a student distilled from its pairs score?

Parts (--parts, default all):
  quality   on the shipped digits teacher, for DDIM (the dataset's quadratic spacing) at 10 to 100
            calls and DPM-Solver++(2M) (linspace and quadratic) at 5 to 30 calls: the digits FD and
            confident share of the samples (bench/digits_quality.py's classifier and protocol: the
            mean over --seeds of 1,437 samples each), samples/s, and the RMSE in uint8 levels to
            the exact solution of the same ODE over the same interval (DDIM over every timestep
            from the sampler's first one: 801 or 1,000 calls), on the first seed's first 512
  cifar10   pairs/s of the full-size cifar10 network (random weights) for each sampler, one batch
  students  `training.py digits` on DDIM pairs and on DPM-Solver++ pairs (each generated with
            --generate_only, timed back to back), then a student per pair set (the dataset's l1)
            and per loss on the DDIM pairs (l2, pseudo_huber), each scored as above

    python bench/samplers.py                         # everything (the students take an hour)
    python bench/samplers.py --parts quality cifar10
    python bench/samplers.py --parts students --workdir /tmp/samplers --dpmpp_steps 16

Run it with nothing else on the machine: the times are only comparable within one run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import quiet_tensorflow  # noqa: E402

quiet_tensorflow()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.digits_quality import CFG, Table, draw, plan_sampler  # noqa: E402
from models.configs import get_config  # noqa: E402
from models.diffusion import SOLVERS, choose_sampler, describe_sampler, solver_plan  # noqa: E402
from models.unet import UNet  # noqa: E402
from models.weights import load_unet  # noqa: E402
from utils.evaluate.sampling import default_teacher, load_student, noise_for  # noqa: E402
from utils.evaluate.speed import best_seconds  # noqa: E402
from models.diffusion import student_fn, teacher_fn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DDIM_CALLS = (10, 20, 50, 100)  # quadratic steps: 50 steps are DDIM-49, the dataset's sampler
DPMPP_CALLS = (5, 8, 10, 12, 16, 20, 30)
RMSE_N = 512  # samples of the first seed compared with the exact solution


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["quality", "cifar10", "students"],
                   choices=["quality", "cifar10", "students"])
    p.add_argument("--n", type=int, default=1437, help="samples per seed (quality)")
    p.add_argument("--ddim_steps", type=int, nargs="*", default=list(DDIM_CALLS),
                   help="DDIM rows (quality): quadratic steps (50 = DDIM-49, the dataset's)")
    p.add_argument("--dpmpp_steps_rows", type=int, nargs="*", default=list(DPMPP_CALLS),
                   help="DPM-Solver++(2M) rows (quality): calls")
    p.add_argument("--spacings", nargs="+", default=["linspace", "quadratic"],
                   choices=["linspace", "quadratic"], help="DPM-Solver++ rows' spacings")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--cifar10_batch", type=int, default=16)
    p.add_argument("--dpmpp_steps", type=int, default=16, help="the students' DPM-Solver++ calls")
    p.add_argument("--workdir", default="/tmp/bench_samplers", help="pair sets and student runs")
    return p.parse_args(argv)


def quality(seeds: list[int], n: int, ddim: list[int], dpmpp: list[int], spacings: list[str]
            ) -> None:
    table = Table()
    teacher, weights = load_unet(default_teacher(CFG), CFG)
    print(f"# teacher: {weights.describe()}")
    rows = [choose_sampler(CFG.sampler, "ddim", s) for s in ddim]
    rows += [choose_sampler(CFG.sampler, "dpmpp_2m", s, sp) for sp in spacings for s in dpmpp]
    exact = {}
    for sampler in rows:
        plan = solver_plan(sampler)
        first = int(plan.t[0])
        if first not in exact:  # DDIM over every timestep from `first`: the reference solution
            ref = choose_sampler(CFG.sampler, "ddim", 1000, "uniform")
            ref_plan = solver_plan(ref)
            keep = ref_plan.t <= first
            ref_plan = ref_plan.__class__(ref_plan.t[keep], ref_plan.c_x[keep],
                                          ref_plan.c_eps[keep], ref_plan.sigma[keep])
            exact[first] = draw_float(teacher, ref_plan, RMSE_N, seeds[0])
        start = time.perf_counter()
        sets = [draw(plan_sampler(teacher, plan, True)(s), n, s) for s in seeds]
        seconds = time.perf_counter() - start
        rmse = np.sqrt(np.mean((draw_float(teacher, plan, RMSE_N, seeds[0]) - exact[first]) ** 2))
        name = f"{SOLVERS[sampler.solver][0]} {sampler.skip_type} {plan.n_calls} calls"
        table.row(name[:38], sets, seconds, nn=False)
        print(f"#   {plan.n_calls} calls from t = {first}: RMSE to the exact solution "
              f"{rmse * 127.5:.2f} uint8 levels; {n * len(seeds) / seconds:,.0f} samples/s")


def draw_float(model, plan, n: int, seed: int) -> np.ndarray:
    """The solver's float outputs (before uint8) of samples 0..n-1 of `seed`."""
    from models.diffusion import run_solver
    fn = tf.function(lambda z: run_solver(lambda x, t: model(x, t), z, plan), jit_compile=True)
    return np.concatenate([fn(noise_for(np.arange(i, min(i + 512, n)), CFG, seed)).numpy()
                           for i in range(0, n, 512)])


def cifar10(batch: int) -> None:
    cfg = get_config("cifar10")
    model = UNet(cfg.network)
    z = noise_for(np.arange(batch), cfg, 0)
    print(f"# cifar10 network (random weights), batch {batch}, XLA; pairs/s")
    base = None
    for sampler in (cfg.sampler, choose_sampler(cfg.sampler, "dpmpp_2m", 16),
                    choose_sampler(cfg.sampler, "dpmpp_2m", 24),
                    choose_sampler(cfg.sampler, "dpmpp_2m", 32, "quadratic")):
        s = best_seconds(teacher_fn(model, sampler, True), z, 1)
        base = base or s
        print(f"{describe_sampler(sampler):70s} {batch / s:8.2f} pairs/s ({base / s:.2f}x DDIM)",
              flush=True)
    s = best_seconds(student_fn(model, True), z, 3)
    print(f"{'student (1 call)':70s} {batch / s:8.2f} img/s")


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "training.py", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def students(seeds: list[int], n: int, workdir: str, dpmpp_steps: int) -> None:
    pairs = {"ddim": [], "dpmpp": ["--solver", "dpmpp_2m", "--solver_steps", str(dpmpp_steps)]}
    for name, flags in pairs.items():
        folder = os.path.join(workdir, f"pairs_{name}")
        seconds = run(["digits", os.path.join(workdir, "unused"), "--datadir", folder,
                       "--generate_only", "--no_progress", *flags])
        print(f"# pairs {name}: training.py digits --generate_only {' '.join(flags)}: "
              f"{seconds:.0f} s (0 s if the set was already complete)", flush=True)
    runs = [("ddim", "l1"), ("dpmpp", "l1"), ("ddim", "l2"), ("ddim", "pseudo_huber")]
    table = Table()
    for pair_set, loss in runs:
        savedir = os.path.join(workdir, f"student_{pair_set}_{loss}")
        seconds = run(["digits", savedir, "--datadir", os.path.join(workdir, f"pairs_{pair_set}"),
                       "--no_generate", "--loss", loss, "--no_progress", *pairs[pair_set]])
        model, _ = load_student(savedir, CFG)
        sample = student_fn(model, True)
        table.row(f"student: {pair_set} pairs, {loss}", [draw(sample, n, s) for s in seeds],
                  seconds, nn=False)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "quality" in args.parts:
        quality(args.seeds, args.n, args.ddim_steps, args.dpmpp_steps_rows, args.spacings)
    if "cifar10" in args.parts:
        cifar10(args.cifar10_batch)
    if "students" in args.parts:
        students(args.seeds, args.n, args.workdir, args.dpmpp_steps)


if __name__ == "__main__":
    main()
