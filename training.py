"""Distil a diffusion teacher into a one-step Denoising Student.

    python training.py cifar10 ./ckpt                    # the pairs into ./datasets/cifar10, then the student
    python training.py cifar10 ./ckpt --generate_only    # stage 1 only: the teacher's pairs
    python training.py cifar10 ./ckpt --teacher teachers/ddpm-cifar10-32
    python training.py digits ./ckpt                     # distil the shipped digits teacher (CPU)
    python training.py digits ./ckpt --teacher_dataset digits   # train the teacher too

Stage 0 (--teacher_dataset, or a dataset with neither a pretrained nor a shipped teacher) trains a
DDPM teacher on real images into SAVEDIR/teacher. Stage 1 writes the teacher's (X_T, F_teacher(X_T))
pairs to --datadir (default ./datasets/DATASET) and never regenerates what is complete; stage 2
trains the student on them under the chosen tf.distribute strategy. Everything resumes where it
stopped when run again with the same command.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from models.configs import (CKPT_EVERY, CONFIGS, STEPS_PER_CALL, DatasetConfig, OptimConfig,
                            TrainConfig, get_config, real_images_source)
from utils.cli import (Parser, add_flags, add_solver_flags, existing_dir, nonempty, output_dir,
                       overridden, positive_int, run, seed_int, weights_path, writable_dir)


def build_parser() -> argparse.ArgumentParser:
    # TensorFlow's modules: imported once run() has quietened it
    from models.diffusion import LOSSES, solver_flags
    from models.weights import DEFAULT_TEACHER_DIRS
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="DATASET", choices=list(CONFIGS),
                   help=f"one of: {', '.join(CONFIGS)}")
    p.add_argument("savedir", metavar="SAVEDIR", type=output_dir,
                   help="run directory (checkpoints, logs, samples)")
    g = p.add_argument_group("teacher and pairs (stage 1)")
    g.add_argument("--datadir", default=None, type=output_dir,
                   help="pair-set folder (default ./datasets/DATASET)")
    g.add_argument("--teacher", default=None, type=weights_path,
                   help="teacher weights: a converted folder, an official DDPM checkpoint, the DDIM "
                        ".pth or the original model_tf2_DATASET.h5 (default: looked up in "
                        f"{', '.join(DEFAULT_TEACHER_DIRS)})")
    g.add_argument("--teacher_dataset", default=None, type=nonempty,
                   help="train the teacher (stage 0) on this image set: 'digits' or a prepared "
                        "tensorflow-datasets name (default: only for datasets without a teacher)")
    g.add_argument("--teacher_steps", type=positive_int,
                   help="teacher training steps (default: per dataset)")
    g.add_argument("--data_dir", default=None, type=existing_dir,
                   help="tensorflow-datasets data_dir")
    g.add_argument("--raw_teacher", action="store_true",
                   help="use the teacher's raw weights instead of its EMA weights")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the pair noise and of training")
    g.add_argument("--n_examples", type=positive_int, help="training pairs (default: per dataset)")
    g.add_argument("--shard_size", type=positive_int,
                   help="pairs per shard file (default: per dataset)")
    g.add_argument("--n_test", type=positive_int, help="held-out pairs (default: per dataset)")
    g.add_argument("--use_fewer_lsun_examples", action="store_true",
                   help="LSUN: 204,800 pairs instead of 1,024,000")
    g.add_argument("--compact", action="store_true",
                   help="store no X (recomputed from the seed when read): a third of the disk")
    g.add_argument("--gen_batch_size", type=positive_int,
                   help="teacher batch for generation (default: per dataset, else twice the "
                        "training batch)")
    add_solver_flags(g, **solver_flags())
    g.add_argument("--generate_only", action="store_true", help="stop after stage 1")
    g.add_argument("--no_generate", action="store_true",
                   help="never generate: fail if the pair set is missing or incomplete")
    d = p.add_argument_group("devices")
    d.add_argument("--tpu", default=None, type=nonempty,
                   help="TPU name or address: use TPUStrategy")
    d.add_argument("--devices", nargs="*", default=None, type=nonempty,
                   help="GPU devices for MirroredStrategy")
    d.add_argument("--cpu_replicas", type=positive_int, default=1,
                   help="split the CPU into N logical replicas (for trying multi-replica code)")
    d.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the teacher loop and the training step with XLA")
    d.add_argument("--steps_per_call", type=positive_int, default=STEPS_PER_CALL,
                   help="optimizer steps per compiled call: the host waits for the devices once "
                        "per call; calls stop short at checkpoints and epoch ends, so the weights "
                        f"are the same for any value (default {STEPS_PER_CALL}; raise it where "
                        "steps are short against the host round trip: TPUs, fast GPUs; "
                        "docs/performance.md)")
    d.add_argument("--no_progress", action="store_true", help="no progress bars")
    t = p.add_argument_group("student training (stage 2; defaults: the paper's, per dataset)")
    add_flags(t, TrainConfig, choices={"loss": tuple(LOSSES)})  # --batch_size --loss --epochs
    add_flags(t, OptimConfig)  # --lr --warmup_steps --ema_decay --beta_1 --beta_2 ...
    t.add_argument("--grad_accum", type=positive_int, default=1,
                   help="accumulate K micro-batches of batch_size/K per update (same update as "
                        "one step at the full batch, in 1/K of the memory)")
    t.add_argument("--ckpt_every", type=positive_int, default=None,
                   help=f"steps between checkpoints (student: default {CKPT_EVERY}, and at each "
                        f"epoch end; teacher: default a tenth of its steps, at most {CKPT_EVERY})")
    t.add_argument("--n_eval", type=positive_int, default=None,
                   help="held-out pairs scored at each checkpoint (default: all)")
    t.add_argument("--bf16", action="store_true",
                   help="bfloat16 arithmetic (the paper used float32) for the teacher's pairs "
                        "(oneDNN's mixed precision on a CPU, the compute dtype on a GPU or TPU; "
                        "recorded in the pair set's manifest) and the student's training (its "
                        "compute dtype)")
    return p


def resolve_teacher(args: argparse.Namespace, cfg: DatasetConfig, strategy=None) -> str:
    """--teacher; else with --teacher_dataset a teacher trained in SAVEDIR (stage 0, trained now if
    not there yet); else the teacher shipped in models/pretrained (digits); else stage 0 for a
    dataset with teacher-training settings; else the official weights in the default folders."""
    from models.weights import find_teacher, shipped
    from utils.train.teacher import trained_teacher
    if args.teacher:
        return args.teacher
    if args.teacher_dataset or (cfg.teacher_train and not shipped(cfg, "teacher")):
        return trained_teacher(args.savedir) or stage_teacher(args, cfg, strategy)
    return find_teacher(cfg)


def stage_teacher(args: argparse.Namespace, cfg: DatasetConfig, strategy) -> str:
    """Stage 0: train a DDPM teacher on real images (resumes if interrupted)."""
    from data.datasets import real_images
    from utils.errors import UserError
    from utils.train.teacher import train_teacher
    if strategy is None:
        raise UserError(f"no trained teacher in {args.savedir}")
    name = args.teacher_dataset or cfg.name
    images = real_images(real_images_source(name), cfg.network.image_shape, "train", args.data_dir)
    writable_dir(args.savedir, "SAVEDIR")
    print(f"teacher: training a DDPM on {len(images):,} {name} images")
    return train_teacher(cfg, images, strategy, args.savedir, seed=args.seed,
                         steps=args.teacher_steps, xla=args.xla, progress=not args.no_progress,
                         source=f"DDPM teacher trained on {name}", command=args.command,
                         ckpt_every=args.ckpt_every, steps_per_call=args.steps_per_call)


def stage_pairs(args: argparse.Namespace, cfg: DatasetConfig, strategy, teacher_path: str) -> str:
    """Make sure the pair set is complete (generating what is missing); returns its folder."""
    from data.pairs import Generation, ensure_pairs, settings_for
    settings = settings_for(cfg, seed=args.seed, n_examples=args.n_examples,
                            shard_size=args.shard_size, n_test=args.n_test, compact=args.compact,
                            fewer=args.use_fewer_lsun_examples, sampler=sampler_of(args, cfg))
    gen_batch = (args.gen_batch_size or cfg.pairs.gen_batch_size
                 or 2 * student_settings(args, cfg).train.batch_size)
    run = Generation(gen_batch, xla=args.xla, bf16=args.bf16, raw_teacher=args.raw_teacher,
                     progress=not args.no_progress, no_generate=args.no_generate,
                     check_sampler=bool(args.solver or args.solver_steps or args.solver_spacing))
    return ensure_pairs(pair_folder(args, cfg), cfg, settings, teacher_path, strategy, run)


def sampler_of(args: argparse.Namespace, cfg: DatasetConfig):
    """The teacher's sampler: the dataset's DDIM, or the solver, steps and spacing asked for."""
    from models.diffusion import choose_sampler
    return choose_sampler(cfg.sampler, args.solver, args.solver_steps, args.solver_spacing)


def pair_folder(args: argparse.Namespace, cfg: DatasetConfig) -> str:
    return args.datadir or os.path.join("./datasets", cfg.name)


def student_settings(args: argparse.Namespace, cfg: DatasetConfig):
    """The paper's per-dataset values, overridden by flags; written to SAVEDIR/config.json."""
    from utils.train.distill import StudentSettings
    train = overridden(args, cfg.train)
    return StudentSettings(
        dataset=cfg.name, train=dataclasses.replace(train, optim=overridden(args, train.optim)),
        seed=args.seed, grad_accum=args.grad_accum, bf16=args.bf16, xla=args.xla,
        ckpt_every=args.ckpt_every or CKPT_EVERY, n_eval=args.n_eval,
        steps_per_call=args.steps_per_call)


def stage_student(args: argparse.Namespace, cfg: DatasetConfig, strategy, folder: str,
                  teacher_path: str) -> None:
    from utils.train.distill import train_student
    writable_dir(args.savedir, "SAVEDIR")
    settings = student_settings(args, cfg)
    train_student(cfg, settings, strategy, folder, teacher_path, args.savedir,
                  raw_teacher=args.raw_teacher, progress=not args.no_progress,
                  command=args.command)


# Folder-valued flags, recorded by role: their values name folders of the machine that trained.
SYMBOLIC_FLAGS = {"--datadir": "DATADIR", "--data_dir": "DATA_DIR", "--teacher": "TEACHER"}
REPO = os.path.dirname(os.path.abspath(__file__))


def recorded_command(argv: list[str], savedir: str) -> str:
    """The command as typed with its folders symbolic (SAVEDIR, DATADIR, DATA_DIR, TEACHER):
    weights.json says how its weights were made without naming a folder of the machine that made
    them. A teacher inside this repository (the shipped one) keeps its repository-relative path."""
    out, flag = ["python", "training.py"], None
    for a in argv:
        name, eq, value = a.partition("=")
        if a.startswith("--") and eq and name in SYMBOLIC_FLAGS:
            out.append(f"{name}={_portable(name, value)}")
        elif flag:
            out.append(_portable(flag, a))
        else:
            out.append("SAVEDIR" if a == savedir else a)
        flag = a if a in SYMBOLIC_FLAGS else None
    return shlex.join(out)


def _portable(flag: str, value: str) -> str:
    inside = os.path.relpath(os.path.realpath(value), REPO)
    if flag == "--teacher" and "://" not in value and not inside.startswith(os.pardir):
        return inside
    return SYMBOLIC_FLAGS[flag]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command = recorded_command(argv, args.savedir)
    cfg = get_config(args.dataset)
    from utils.strategy import make_strategy

    # every flag was checked by its argparse type; what remains needs the data or the devices
    sampler_of(args, cfg)  # a sampler that cannot be, refused before anything starts
    if args.no_generate:  # fail on a missing pair set before any teacher work
        from data.shards import open_pair_set
        open_pair_set(pair_folder(args, cfg), cfg.network.image_shape)
    strategy = make_strategy(args.tpu, args.devices, args.cpu_replicas)
    if not args.generate_only:  # as the student's trainer will need, but before any work
        from utils.train.loop import check_batch_split
        s = student_settings(args, cfg)
        check_batch_split(s.train.batch_size, strategy.num_replicas_in_sync, s.grad_accum)
    teacher_path = resolve_teacher(args, cfg, strategy)
    folder = stage_pairs(args, cfg, strategy, teacher_path)
    print(f"pairs: complete in {folder}")
    if not args.generate_only:
        stage_student(args, cfg, strategy, folder, teacher_path)
    return 0


if __name__ == "__main__":
    run(main)
