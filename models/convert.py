"""Convert a teacher or student checkpoint once into our format (tf.train.Checkpoint + weights.json).

    python -m models.convert --dataset cifar10 diffusion_cifar10_model/model.ckpt-790000 teachers/cifar10
    python -m models.convert --dataset celeba celeba/ckpt.pth teachers/celeba
    python -m models.convert --dataset cifar10 denoising_student_models/cifar10_ema_model.h5 students/cifar10

SOURCE may be an official DDPM TF1 checkpoint (prefix or folder), the DDIM CelebA ckpt.pth, one
of the original repository's Keras h5 files (model_tf2_*.h5 teachers, *_ema_model.h5 students),
or a diffusers UNet2DModel or pipeline folder (the hub's google/ddpm-*).
"""
from __future__ import annotations

import argparse
import sys

from models.configs import CONFIGS, get_config
from utils.cli import Parser, output_dir, run, weights_path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m models.convert", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", type=weights_path,
                   help="checkpoint file or folder to convert")
    p.add_argument("out_dir", metavar="OUT_DIR", type=output_dir,
                   help="new folder for the converted checkpoint")
    g = p.add_argument_group("conversion")
    g.add_argument("--dataset", required=True, choices=list(CONFIGS), metavar="DATASET",
                   help=f"the dataset the weights are for (its image shape, and its network where "
                        f"the file records none): {', '.join(CONFIGS)}")
    g.add_argument("--raw", action="store_true",
                   help="use the raw training weights instead of the EMA weights (TF1 and .pth only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.weights import load_unet, write_weights  # TensorFlow: after run() quietened it
    cfg = get_config(args.dataset)
    model, weights = load_unet(args.source, cfg, ema=not args.raw)
    print(f"read {weights.describe()}")
    write_weights("converted", args.out_dir, model, {
        "dataset": cfg.name, "source": weights.source, "source_format": weights.format,
        "sha256": weights.sha256, "step": weights.step, "ema": weights.ema})
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:])
