"""Stage 0, for datasets without a pretrained teacher: a standard DDPM (epsilon prediction, Ho et
al. 2020) trained on real images with the same skeleton as the student (Adam with warmup, EMA,
checkpoints that resume, TensorBoard, progress).

    SAVEDIR/teacher_run/   its checkpoints, logs and DDIM sample grids
    SAVEDIR/teacher/       the EMA teacher in our checkpoint format (what stage 1 uses)
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from models.configs import CKPT_EVERY, DatasetConfig
from models.diffusion import alpha_bars, ddim_plan, ddim_sample, ddpm_loss
from models.unet import UNet
from models.weights import META_FILE, save_converted
from utils import fileio
from utils.cli import UserError
from utils.images import make_grid, save_png, to_uint8
from utils.strategy import worker_info
from utils.train.loop import Logger, OptimConfig, Trainer, distributed_batches, run_loop

TEACHER_DIR, TEACHER_RUN = "teacher", "teacher_run"


def teacher_batches(images: np.ndarray, batch: int, epoch: int, seed: int, start: int,
                    part: tuple[int, int], num_timesteps: int):
    """(x0, eps, t) batches of one epoch: a seeded shuffle of the images, and noise and timesteps
    drawn from (seed, epoch, step), so the stream is the same for any number of replicas."""
    worker, n_workers = part
    per_worker = batch // n_workers
    order = np.random.default_rng([seed, epoch]).permutation(len(images))
    for step in range(start, len(images) // batch):
        rng = np.random.default_rng([seed, epoch, step])
        idx = order[step * batch:(step + 1) * batch]
        eps = rng.standard_normal(images[idx].shape).astype(np.float32)
        t = rng.integers(0, num_timesteps, batch).astype(np.int32)
        sl = slice(worker * per_worker, (worker + 1) * per_worker)
        yield images[idx][sl], eps[sl], t[sl]


def trained_teacher(savedir: str) -> str | None:
    path = os.path.join(savedir, TEACHER_DIR)
    return path if fileio.exists(os.path.join(path, META_FILE)) else None


def train_teacher(cfg: DatasetConfig, images: np.ndarray, strategy: tf.distribute.Strategy,
                  savedir: str, seed: int = 0, steps: int | None = None, xla: bool = True,
                  progress: bool = True, source: str = "", ckpt_every: int | None = None,
                  command: str | None = None) -> str:
    """Train (or resume training) the teacher; returns the folder of its exported EMA weights.
    Checkpoints (with a DDIM sample grid) come every `ckpt_every` steps; by default ten times a
    run, at most CKPT_EVERY steps apart."""
    tt = cfg.teacher_train
    chief = worker_info()[0] == 0
    source = source or "DDPM teacher trained by training.py"
    provenance = {"dataset": cfg.name, "ema": True, "source": source, "command": command}
    run_dir = os.path.join(savedir, TEACHER_RUN)
    total = steps or tt.steps
    replicas = strategy.num_replicas_in_sync
    opt = OptimConfig(tt.lr, tt.warmup_steps, tt.beta_1, tt.beta_2, tt.epsilon, tt.ema_decay,
                      tt.batch_size, decay_steps=total if tt.lr_decay == "cosine" else 0)
    abar = tf.constant(alpha_bars(cfg.sampler), tf.float32)
    trainer = Trainer(strategy, lambda: UNet(cfg.network), opt,
                      lambda m, x0, eps, t, step: ddpm_loss(m, x0, eps, t, abar), run_dir, xla=xla)
    trainer.restore()
    per_epoch = len(images) // tt.batch_size
    if per_epoch == 0:
        raise UserError(f"{len(images)} images are fewer than one batch of {tt.batch_size}")
    shape = images.shape[1:]
    per_replica = tt.batch_size // replicas
    specs = (tf.TensorSpec((per_replica, *shape), tf.float32),
             tf.TensorSpec((per_replica, *shape), tf.float32),
             tf.TensorSpec((per_replica,), tf.int32))
    logger = Logger(run_dir, enabled=chief)
    plan = ddim_plan(cfg.sampler)
    noise = tf.random.stateless_normal([64, *shape], seed=[seed, 4321])
    sample = tf.function(lambda z: ddim_sample(lambda x, t: trainer.ema(x, t), z, plan))

    def checkpoint(step: int) -> None:
        if not chief:
            return
        grid = make_grid(to_uint8(sample(noise).numpy()))
        fileio.makedirs(os.path.join(run_dir, "samples"))
        save_png(os.path.join(run_dir, "samples", f"step_{step:07d}.png"), grid)
        logger.image(step, "teacher_ddim_samples", grid)
        save_converted(trainer.ema, os.path.join(run_dir, "last"),
                       {**provenance, "step": step},
                       replace=True)

    def epoch_data(epoch: int, start: int):
        return distributed_batches(
            strategy, lambda w, n: teacher_batches(images, tt.batch_size, epoch, seed, start, (w, n),
                                                   cfg.sampler.num_timesteps), specs)
    step = run_loop(trainer, total_steps=total, steps_per_epoch=per_epoch, epoch_data=epoch_data,
                    ckpt_every=ckpt_every or min(max(total // 10, 1), CKPT_EVERY),
                    on_checkpoint=checkpoint, logger=logger,
                    desc=f"teacher ({cfg.name})", progress=progress and chief,
                    ckpt_at_epoch_end=False)  # small data sets make epochs of a few steps
    out = os.path.join(savedir, TEACHER_DIR)
    if chief:
        save_converted(trainer.ema, out, {**provenance, "step": step}, replace=True)
    return out
