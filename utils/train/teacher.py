"""Stage 0, for datasets without a pretrained teacher: a standard DDPM (epsilon prediction, Ho et
al. 2020) trained on real images with the same engine as the student (utils/train/loop.py).

    SAVEDIR/teacher_run/   its checkpoints, logs, DDIM sample grids and last/
    SAVEDIR/teacher/       the EMA teacher in our checkpoint format (what stage 1 uses)
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from models.configs import CKPT_EVERY, STEPS_PER_CALL, DatasetConfig
from models.diffusion import alpha_bars, ddpm_loss, teacher_fn
from models.unet import UNet
from models.weights import recognise
from utils.errors import UserError
from utils.train.loop import Stage

TEACHER_DIR, TEACHER_RUN = "teacher", "teacher_run"
TEACHER_KEY = 0x7EAC_4E75  # keeps the teacher stage's random streams apart from other uses of `seed`
N_SAMPLES = 64


def teacher_dataset(images: np.ndarray, batch: int, seed: int, num_timesteps: int, *,
                    epoch: int, start: int, part: tuple[int, int], local_replicas: int
                    ) -> tf.data.Dataset:
    """This host's per-replica (x0, eps, t) batches from step `start` of `epoch` on, without end:
    each epoch a stateless shuffle of the images keyed by (seed, epoch), and noise and timesteps
    keyed by (seed, epoch, step), so the stream is the same for any number of hosts and replicas.
    Host h of n takes the h-th n-th of every global batch; consecutive elements go to consecutive
    local replicas (what distribute_datasets_from_function does with them)."""
    host, n_hosts = part
    per_host = batch // n_hosts
    per_replica = per_host // local_replicas
    n, shape = len(images), images.shape[1:]
    data = tf.constant(images, tf.float32)

    def one_epoch(e):  # e and step: int64 (Dataset.range), as the keys' definition has them
        key = tf.random.experimental.stateless_fold_in(tf.constant([seed, TEACHER_KEY], tf.int64), e)
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=key)

        def step_batch(step):
            step_key = tf.random.experimental.stateless_fold_in(key, step + 1)
            eps = tf.random.stateless_normal([batch, *shape], seed=step_key)
            t = tf.random.stateless_uniform([batch], seed=step_key[::-1], maxval=num_timesteps,
                                            dtype=tf.int32)
            mine = slice(host * per_host, (host + 1) * per_host)
            x0 = tf.gather(data, order[step * batch:(step + 1) * batch][mine])
            split = lambda v: tf.reshape(v, [local_replicas, per_replica, *v.shape[1:]])
            return tf.data.Dataset.from_tensor_slices((split(x0), split(eps[mine]), split(t[mine])))
        first = tf.where(e == epoch, tf.constant(start, tf.int64), 0)
        return tf.data.Dataset.range(first, n // batch).flat_map(step_batch)
    return tf.data.Dataset.range(epoch, 2 ** 62).flat_map(one_epoch)


def trained_teacher(savedir: str) -> str | None:
    path = os.path.join(savedir, TEACHER_DIR)
    return path if recognise(path) else None


def train_teacher(cfg: DatasetConfig, images: np.ndarray, strategy: tf.distribute.Strategy,
                  savedir: str, seed: int = 0, steps: int | None = None, xla: bool = True,
                  progress: bool = True, source: str = "", ckpt_every: int | None = None,
                  command: str | None = None, steps_per_call: int = STEPS_PER_CALL) -> str:
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
                  make_sampler=lambda ema: teacher_fn(ema, cfg.sampler),
                  noise=tf.random.stateless_normal([N_SAMPLES, *shape], seed=[seed, 4321]))

    def checkpoint(step: int) -> None:
        stage.sample_grid(step, "teacher_ddim_samples")
        stage.export(os.path.join(run_dir, "last"), {**provenance, "step": step})

    def make_dataset(epoch: int, start: int, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return teacher_dataset(images, tt.batch_size, seed, cfg.sampler.num_timesteps, epoch=epoch,
                               start=start, part=(ctx.input_pipeline_id, ctx.num_input_pipelines),
                               local_replicas=ctx.num_replicas_in_sync // ctx.num_input_pipelines)

    step = stage.run(
        steps_per_epoch=per_epoch, make_dataset=make_dataset, on_checkpoint=checkpoint,
        ckpt_every=ckpt_every or min(max(total // 10, 1), CKPT_EVERY),
        desc=f"teacher ({cfg.name})", progress=progress, steps_per_call=steps_per_call,
        ckpt_at_epoch_end=False)  # small data sets make epochs of a few steps
    out = os.path.join(savedir, TEACHER_DIR)
    stage.export(out, {**provenance, "step": step})
    return out
