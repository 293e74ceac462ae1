"""Stage 0, for datasets without a pretrained teacher: a standard DDPM (epsilon prediction, Ho et
al. 2020) trained on real images with the same engine as the student (utils/train/loop.py).

    SAVEDIR/teacher_run/   its checkpoints, logs, DDIM sample grids and last/
    SAVEDIR/teacher/       the EMA teacher in our checkpoint format (what stage 1 uses)
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import tensorflow as tf

from models.configs import CKPT_EVERY, DatasetConfig
from models.diffusion import alpha_bars, ddim_fn, ddpm_loss
from models.unet import UNet
from models.weights import META_FILE
from utils import fileio
from utils.errors import UserError
from utils.train.loop import Stage, generator_dataset, replica_specs

TEACHER_DIR, TEACHER_RUN = "teacher", "teacher_run"
N_SAMPLES = 64


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
                  command: str | None = None, steps_per_call: int = 1) -> str:
    """Train (or resume training) the teacher with the dataset's recipe (DDPM's if it has none);
    returns the folder of its exported EMA weights. Checkpoints (with a DDIM sample grid) come
    every `ckpt_every` steps; by default ten times a run, at most CKPT_EVERY steps apart."""
    tt = cfg.teacher_training
    provenance = {"dataset": cfg.name, "ema": True, "command": command,
                  "source": source or "DDPM teacher trained by training.py"}
    total = steps or tt.steps
    per_epoch = len(images) // tt.batch_size
    if per_epoch == 0:
        raise UserError(f"{len(images)} images are fewer than one batch of {tt.batch_size}")
    abar = tf.constant(alpha_bars(cfg.sampler), tf.float32)
    run_dir = os.path.join(savedir, TEACHER_RUN)
    shape = images.shape[1:]
    stage = Stage(strategy, run_dir, lambda: UNet(cfg.network), tt.optim,
                  lambda m, x0, eps, t, step: ddpm_loss(m, x0, eps, t, abar),
                  global_batch=tt.batch_size, total_steps=total, xla=xla,
                  make_sampler=lambda ema: ddim_fn(ema, cfg.sampler),
                  noise=tf.random.stateless_normal([N_SAMPLES, *shape], seed=[seed, 4321]))

    def checkpoint(step: int) -> None:
        stage.sample_grid(step, "teacher_ddim_samples")
        stage.export(os.path.join(run_dir, "last"), {**provenance, "step": step})

    specs = replica_specs(tt.batch_size // strategy.num_replicas_in_sync,
                          (shape, tf.float32), (shape, tf.float32), ((), tf.int32))

    def make_dataset(epoch: int, start: int, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        part = (ctx.input_pipeline_id, ctx.num_input_pipelines)

        def host_batches():  # this epoch from `start` on, then the next epochs from their start
            for e in itertools.count(epoch):
                yield from teacher_batches(images, tt.batch_size, e, seed, start if e == epoch else 0,
                                           part, cfg.sampler.num_timesteps)
        local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        return generator_dataset(host_batches, specs, local)

    step = stage.run(
        steps_per_epoch=per_epoch, make_dataset=make_dataset, on_checkpoint=checkpoint,
        ckpt_every=ckpt_every or min(max(total // 10, 1), CKPT_EVERY),
        desc=f"teacher ({cfg.name})", progress=progress, steps_per_call=steps_per_call,
        ckpt_at_epoch_end=False)  # small data sets make epochs of a few steps
    out = os.path.join(savedir, TEACHER_DIR)
    stage.export(out, {**provenance, "step": step})
    return out
