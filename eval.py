"""Evaluate a Denoising Student: settings and sizes (`info`).

    python eval.py info cifar10
"""
from __future__ import annotations

import argparse

from utils.cli import quiet_tensorflow, run

quiet_tensorflow()

from models.configs import CONFIGS, get_config  # noqa: E402


def _dataset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", choices=list(CONFIGS),
                   help=f"one of: {', '.join(CONFIGS)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="print a dataset's settings, parameter count and sampler cost")
    _dataset_arg(p)
    return parser


def cmd_info(args: argparse.Namespace) -> None:
    from models.diffusion import ddim_plan, timestep_sequence
    from models.unet import UNet, count_parameters

    cfg = get_config(args.dataset)
    net, smp, pairs, tr = cfg.network, cfg.sampler, cfg.pairs, cfg.train
    plan = ddim_plan(smp)
    print(f"dataset: {cfg.name}" + (f" ({cfg.description})" if cfg.description else ""))
    print(f"resolution: {net.resolution}x{net.resolution}x{net.in_ch}")
    print(f"network: ch={net.ch} ch_mult={net.ch_mult} num_res_blocks={net.num_res_blocks} "
          f"attn_resolutions={net.attn_resolutions} gn_eps={net.gn_eps:g}")
    print(f"parameters: {count_parameters(UNet(net)):,}")
    print(f"teacher: {cfg.teacher}")
    print(f"teacher sampler: DDIM eta={smp.eta:g}, {smp.steps} {smp.skip_type} steps "
          f"(t up to {max(timestep_sequence(smp))}), network calls: {plan.n_calls}")
    print(f"student: 1 network call at t=999 (speed-up in calls: {plan.n_calls}x)")
    print(f"pairs: {pairs.n_examples:,} train in shards of {pairs.shard_size:,}, {pairs.n_test:,} test")
    print(f"training: batch {tr.batch_size}, loss {tr.loss}, lr {tr.lr:g} (warmup {tr.warmup_steps}), "
          f"adam betas ({tr.beta_1:g}, {tr.beta_2:g}) eps {tr.epsilon:g}, ema {tr.ema_decay:g}, "
          f"epochs {tr.epochs}")


COMMANDS = {"info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    run(main)
