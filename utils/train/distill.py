"""Stage 2: the student loop. The teacher's U-Net, initialised from its weights and called at
t = 999, regresses onto the stored pairs; the EMA weights are scored on the held-out pairs at each
checkpoint and the best are exported for evaluation (as the original did).

    SAVEDIR/checkpoints/   training state (model, EMA, Adam, position, best loss): resume from here
    SAVEDIR/best/          EMA weights with the lowest held-out loss: what eval.py loads
    SAVEDIR/last/          EMA weights at the last checkpoint
    SAVEDIR/samples/       a grid of EMA samples at each checkpoint
    SAVEDIR/logs/          TensorBoard events and scalars.jsonl
    SAVEDIR/config.json    the resolved settings
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile

import tensorflow as tf

from data.shards import batches, dequantise_targets, heldout_batches, open_pair_set, steps_per_epoch
from models.configs import DatasetConfig
from models.diffusion import student_loss, student_sample
from models.unet import UNet
from models.weights import load_unet, save_converted
from utils import fileio
from utils.cli import UserError
from utils.images import make_grid, save_png, to_uint8
from utils.strategy import worker_info
from utils.train.loop import (Logger, OptimConfig, Trainer, distributed_batches, run_loop,
                              save_run_config)

MUST_MATCH_ON_RESUME = ("dataset", "batch_size", "grad_accum", "loss", "seed", "bf16")
N_SAMPLES = 64


def heldout_scorer(model: UNet, pairs, kind: str, limit: int | None, batch: int = 256):
    """A function returning the mean per-image loss of `model` (as a student) on the held-out pairs."""
    per_image = tf.function(lambda z, y: student_loss(model, z, dequantise_targets(y), kind),
                            reduce_retracing=True)

    def score() -> float:
        total, n = 0.0, 0
        for x, y in heldout_batches(pairs, batch, limit):
            total += float(tf.reduce_sum(per_image(x, y)))
            n += len(x)
        return total / max(n, 1)
    return score


def train_student(cfg: DatasetConfig, s: dict, strategy: tf.distribute.Strategy, datadir: str,
                  teacher_path: str, savedir: str, raw_teacher: bool = False,
                  progress: bool = True, command: str | None = None) -> dict:
    worker, n_workers = worker_info()
    chief = worker == 0
    shape = (cfg.network.resolution, cfg.network.resolution, cfg.network.in_ch)
    pairs = open_pair_set(datadir, shape)
    if chief:
        save_run_config(savedir, {**s, "datadir": os.path.abspath(datadir) if fileio.is_local(
                                      datadir) else datadir,
                                  "teacher": teacher_path}, MUST_MATCH_ON_RESUME)
    teacher, weights = load_unet(teacher_path, cfg, ema=not raw_teacher)
    net = teacher.cfg  # the teacher's network, GroupNorm epsilon included
    global_batch, accum = s["batch_size"], s["grad_accum"]
    replicas = strategy.num_replicas_in_sync  # the Trainer checks that the batch splits evenly
    per_epoch = steps_per_epoch(pairs, global_batch)
    if per_epoch == 0:
        raise UserError(f"{pairs.n_train} training pairs are fewer than one batch of {global_batch}")
    total = int(math.ceil(s["epochs"] * per_epoch))
    opt = OptimConfig(s["lr"], s["warmup_steps"], s["beta_1"], s["beta_2"], s["epsilon"],
                      s["ema_decay"], global_batch, accum,
                      decay_steps=total if s["lr_decay"] == "cosine" else 0)
    trainer = Trainer(
        strategy, lambda: UNet(net, compute_dtype="bfloat16" if s["bf16"] else "float32"), opt,
        lambda model, x, y, step: student_loss(model, x, y, s["loss"]),
        savedir if chief else os.path.join(tempfile.gettempdir(), f"worker{worker}-{os.getpid()}"),
        xla=s["xla"])
    resumed = trainer.restore()
    if not resumed:
        trainer.init_from(teacher)
    del teacher
    logger = Logger(savedir, enabled=chief)
    noise = tf.random.stateless_normal([N_SAMPLES, *shape], seed=[s["seed"], 12345])
    sample = tf.function(lambda z: student_sample(trainer.ema, z))
    score_heldout = heldout_scorer(trainer.ema, pairs, s["loss"], s["n_eval"])
    if chief:
        print(f"student: {weights.describe()}; {pairs.n_train:,} pairs, {per_epoch} steps/epoch, "
              f"{total} steps, {replicas} replica(s)" + (", resumed" if resumed else ""))

    def checkpoint(step: int) -> None:
        """Score the EMA weights on the held-out pairs; export them (last, and best so far)."""
        loss = score_heldout()
        grid = make_grid(to_uint8(sample(noise).numpy()))
        if not chief:
            return
        # Portable provenance: what the weights are and the command, not this machine's folders.
        meta = {"dataset": cfg.name, "source": f"Denoising Student distilled from {weights.source}",
                "command": command, "step": step, "ema": True, "heldout_loss": loss,
                "teacher": weights.source, "teacher_step": weights.step,
                "teacher_sha256": weights.sha256}
        save_converted(trainer.ema, os.path.join(savedir, "last"), meta, replace=True)
        if loss < float(trainer.best_heldout.numpy()):
            trainer.best_heldout.assign(loss)
            save_converted(trainer.ema, os.path.join(savedir, "best"), meta, replace=True)
        fileio.makedirs(os.path.join(savedir, "samples"))
        save_png(os.path.join(savedir, "samples", f"step_{step:07d}.png"), grid)
        logger.scalars(step, heldout_loss=loss, best_heldout_loss=float(trainer.best_heldout.numpy()))
        logger.image(step, "ema_samples", grid)

    if not resumed:
        checkpoint(0)  # the teacher-initialised student's held-out loss: the baseline
        trainer.manager.save(checkpoint_number=0)
    per_replica = global_batch // replicas
    specs = (tf.TensorSpec((per_replica, *shape), tf.float32),
             tf.TensorSpec((per_replica, *shape), tf.uint8))
    to_float = lambda x, y: (x, dequantise_targets(y))  # noqa: E731

    def epoch_data(epoch: int, start: int):
        return distributed_batches(
            strategy, lambda w, n: batches(pairs, global_batch, epoch, s["seed"], start, (w, n)),
            specs, to_float)
    step = run_loop(trainer, total_steps=total, steps_per_epoch=per_epoch, epoch_data=epoch_data,
                    ckpt_every=s["ckpt_every"], on_checkpoint=checkpoint, logger=logger,
                    desc=f"student ({cfg.name})", progress=progress and chief)
    if chief and fileio.isdir(os.path.join(savedir, "best")):
        print(f"best held-out loss {float(trainer.best_heldout.numpy()):.6g}: "
              f"{os.path.join(savedir, 'best')}")
    if not chief:
        shutil.rmtree(trainer.savedir, ignore_errors=True)
    return {"steps": step, "best_heldout": float(trainer.best_heldout.numpy())}
