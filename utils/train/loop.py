"""The training engine shared by the student (distillation) and the teacher (DDPM) stages (the
optimiser is utils/train/optim.py): an EMA of the weights, gradient accumulation, a compiled distributed step,
checkpoints that resume exactly, TensorBoard and a progress bar (Trainer, run_loop), and the run
folder around them: sample grids, the exported EMA weights in last/, the distributed epoch data
(Stage).

The caller supplies the per-example loss and what is its own; everything else is here, written once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from models.configs import STEPS_PER_CALL, OptimConfig
from models.unet import UNet, official_variables
from models.weights import variables_checkpoint, write_weights
from utils import fileio
from utils.errors import UserError
from utils.fileio import write_json
from utils.images import make_grid, save_png, to_uint8
from utils.strategy import worker_info
from utils.train.optim import FusedAdam, LinearWarmup


def check_batch_split(global_batch: int, replicas: int, grad_accum: int = 1) -> None:
    """Each replica takes an equal share of every accumulation step: a UserError otherwise."""
    if global_batch % (replicas * grad_accum):
        raise UserError(f"batch {global_batch} is not divisible by {replicas} replica(s) x "
                        f"{grad_accum} accumulation step(s) (--batch_size, --grad_accum)")


LossFn = Callable[..., tf.Tensor]
"""(model, *batch_tensors, step) -> per-example losses [b]; summed and divided by the global batch."""


class Trainer:
    """Model, EMA, optimizer and position, built inside the strategy's scope; one step at a time."""

    def __init__(self, strategy: tf.distribute.Strategy, make_model: Callable[[], UNet],
                 opt: OptimConfig, loss_fn: LossFn, savedir: str, *, global_batch: int,
                 grad_accum: int = 1, total_steps: int = 0, xla: bool = False,
                 max_to_keep: int = 2):
        """global_batch: examples per optimizer update (all replicas, all accumulation steps);
        total_steps: the run's length, where a cosine decay reaches zero."""
        self.strategy, self.opt_cfg, self.loss_fn = strategy, opt, loss_fn
        self.global_batch, self.grad_accum = global_batch, grad_accum
        check_batch_split(global_batch, strategy.num_replicas_in_sync, grad_accum)
        with strategy.scope():
            self.model, self.ema = make_model(), make_model()
            self.variables = self.model.trainable_variables
            self.optimizer = FusedAdam(
                LinearWarmup(opt.lr, opt.warmup_steps, opt.decay_steps(total_steps)),
                beta_1=opt.beta_1, beta_2=opt.beta_2, epsilon=opt.epsilon)
            self.optimizer.build(self.variables)  # slots exist before restore and the first step
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.best_heldout = tf.Variable(math.inf, dtype=tf.float32, trainable=False)
        self.checkpoint = tf.train.Checkpoint(
            model=variables_checkpoint(self.model), ema=variables_checkpoint(self.ema),
            optimizer=self.optimizer, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            best_heldout=self.best_heldout)
        self.manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(savedir, "checkpoints"),
                                                  max_to_keep=max_to_keep)
        self.savedir = savedir
        # XLA inside strategy.run fails with mirrored variables, and on CPUs with collectives:
        # compile where a single replica trains (TPUs compile anyway).
        self.xla = xla and strategy.num_replicas_in_sync == 1
        # No tensor-dependent Python control flow in the step: autograph would only add trace time.
        self._replica_step = tf.function(self._replica_step_fn, jit_compile=self.xla,
                                         autograph=False)

    # -- state ------------------------------------------------------------------------------
    def init_from(self, source: UNet) -> None:
        """Student and EMA both start at the given weights (the teacher's)."""
        src = official_variables(source)
        for target in (self.model, self.ema):
            for name, var in official_variables(target).items():
                var.assign(src[name])

    def restore(self) -> bool:
        """Resume from the latest checkpoint, if any; True if one was restored."""
        path = self.manager.latest_checkpoint
        if not path:
            return False
        self.checkpoint.restore(path).assert_existing_objects_matched()
        return True

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # -- the step ---------------------------------------------------------------------------
    def _replica_step_fn(self, *batch):
        """One optimizer update from this replica's share of the global batch, in grad_accum
        micro-batches whose gradients are summed (the loss is already divided by the global batch)."""
        k = self.grad_accum
        parts = [tf.split(b, k) for b in batch]
        step = self.optimizer.iterations
        grads, total = None, 0.0
        for i in range(k):  # k is small; unrolled keeps one micro-batch of activations at a time
            with tf.GradientTape() as tape:
                per_example = self.loss_fn(self.model, *[p[i] for p in parts], step)
                loss = tf.reduce_sum(per_example) / self.global_batch
            g = tape.gradient(loss, self.variables)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            total += loss
        self.optimizer.apply_gradients(zip(grads, self.variables))
        return total

    def _update_ema(self):
        # e <- d e + (1 - d) w, as e -= (1 - d)(e - w) on the TensorFlow variables: fewer ops to
        # trace than Keras variable arithmetic (one constant, not one per variable)
        rate = tf.constant(1.0 - self.opt_cfg.ema_decay, tf.float32)
        for e, w in zip(official_variables(self.ema).values(), official_variables(self.model).values()):
            e.value.assign_sub(rate * (e.value - w.value))

    def _one_step(self, batch) -> tf.Tensor:
        """One optimizer update on every replica, then the EMA update; the summed loss."""
        losses = self.strategy.run(self._replica_step, args=batch)
        # Cross-replica context: the same value lands on every replica. Kept out of the XLA step:
        # fused into it, the EMA cost 6x as much (docs/performance.md).
        self._update_ema()
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    @tf.function(autograph=False)
    def _distributed_step(self, batch):
        return self._one_step(batch)

    @tf.function(autograph=False)
    def _distributed_steps(self, iterator, n):
        """n updates in one call: the host waits once per call, not once per step. The same
        ops in the same order as n calls of train_step (a while-loop body keeps program order)."""
        def body(i, total):
            return i + 1, total + self._one_step(iterator.get_next())
        _, total = tf.while_loop(lambda i, _: i < n, body, [tf.constant(0), tf.constant(0.0)])
        return total

    def train_step(self, batch) -> tf.Tensor:
        """One step on a given batch (benches, tests); the loop uses train_steps."""
        return self._distributed_step(batch)

    def train_steps(self, iterator, n: int) -> tf.Tensor:
        """n steps from a distributed iterator in one compiled call; the sum of their losses."""
        return self._distributed_steps(iterator, tf.constant(n, tf.int32))


DatasetFn = Callable[[int, int, tf.distribute.InputContext], tf.data.Dataset]
"""(epoch, start step, input context) -> this host's per-replica batches from that point on."""


def distributed_dataset(strategy: tf.distribute.Strategy, make: DatasetFn, epoch: int, start: int):
    """Per-host input (distribute_datasets_from_function): each host builds and reads its own
    part of every global batch. A single replica reads its dataset directly: the distribution
    wrapper costs a single replica more than the reader itself (docs/performance.md)."""
    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return make(epoch, start, ctx).prefetch(2)
    if strategy.num_replicas_in_sync == 1:  # one replica, so one host
        return dataset_fn(tf.distribute.InputContext())
    # On accelerators the batches are copied to the device ahead of the step; on a CPU that copy
    # would be one more pass over every batch for nothing.
    on_cpu = all("CPU" in d.upper() for d in strategy.extended.worker_devices)
    options = tf.distribute.InputOptions(experimental_fetch_to_device=not on_cpu)
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def call_length(step: int, step_in_epoch: int, *, total_steps: int, steps_per_epoch: int,
                ckpt_every: int, steps_per_call: int) -> int:
    """Steps in the next call: at most steps_per_call, cut short at the next checkpoint, epoch
    end or the run's end, so these fall on the same steps whatever steps_per_call is."""
    return min(steps_per_call, total_steps - step, steps_per_epoch - step_in_epoch,
               ckpt_every - step % ckpt_every)


def run_loop(trainer: Trainer, *, total_steps: int, steps_per_epoch: int, data, ckpt_every: int,
             on_checkpoint: Callable[[int], None], logger: "Logger", desc: str,
             progress: bool = True, ckpt_at_epoch_end: bool = True,
             steps_per_call: int = STEPS_PER_CALL) -> int:
    """Train until `total_steps`, resuming at the trainer's saved position, reading `data` (the
    distributed batches from that position on; one iterator for the whole run). Every
    `ckpt_every` steps, at each epoch end (unless ckpt_at_epoch_end is off: tiny epochs) and at
    the end, on_checkpoint(step) is called and then a checkpoint saved. Up to `steps_per_call`
    steps run in one compiled call (see call_length)."""
    step = trainer.step
    bar = progress_bar(total_steps, step, desc, not progress)
    speed, loss_sum, loss_steps = Throughput(), 0.0, 0
    iterator = iter(data) if step < total_steps else None
    while step < total_steps:
        in_epoch = int(trainer.step_in_epoch.numpy())
        if in_epoch >= steps_per_epoch:
            raise UserError(f"the run stopped at step {in_epoch} of an epoch, but an epoch of these "
                            f"pairs has {steps_per_epoch} steps: another pair set than the run's?")
        n = call_length(step, in_epoch, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                        ckpt_every=ckpt_every, steps_per_call=steps_per_call)
        total = float(trainer.train_steps(iterator, n))  # one compiled function for any n
        step += n
        trainer.step_in_epoch.assign_add(n)
        loss_sum, loss_steps = loss_sum + total, loss_steps + n
        speed.add(n * trainer.global_batch)
        end_of_epoch = int(trainer.step_in_epoch.numpy()) == steps_per_epoch
        if end_of_epoch:
            trainer.epoch.assign_add(1)
            trainer.step_in_epoch.assign(0)
        bar.update(n)
        bar.set_postfix(loss=f"{total / n:.4g}")
        if step % ckpt_every == 0 or (end_of_epoch and ckpt_at_epoch_end) or step == total_steps:
            logger.scalars(step, train_loss=loss_sum / loss_steps, examples_per_s=speed.read(),
                           learning_rate=float(trainer.optimizer.learning_rate))
            loss_sum, loss_steps = 0.0, 0
            on_checkpoint(step)  # may update state that is saved (the best held-out loss)
            trainer.manager.save(checkpoint_number=step)
    bar.close()
    return step


class Stage:
    """One training stage's run folder around its Trainer: resume, a grid of EMA samples and the
    EMA weights in last/ at each checkpoint, the epoch data, the loop. Workers other than the
    chief keep their state in a temporary folder, removed at the end.

        RUN_DIR/checkpoints/  RUN_DIR/last/  RUN_DIR/samples/  RUN_DIR/logs/
    """

    def __init__(self, strategy: tf.distribute.Strategy, run_dir: str, make_model: Callable[[], UNet],
                 opt: OptimConfig, loss_fn: LossFn, *, global_batch: int, total_steps: int,
                 make_sampler: Callable[[UNet], Callable[[tf.Tensor], tf.Tensor]], noise: tf.Tensor,
                 grad_accum: int = 1, xla: bool = False):
        worker = worker_info()[0]
        self.chief, self.run_dir, self.total_steps = worker == 0, run_dir, total_steps
        state_dir = run_dir if self.chief else os.path.join(tempfile.gettempdir(),
                                                            f"worker{worker}-{os.getpid()}")
        self.trainer = Trainer(strategy, make_model, opt, loss_fn, state_dir,
                               global_batch=global_batch, grad_accum=grad_accum,
                               total_steps=total_steps, xla=xla)
        self.resumed = self.trainer.restore()
        self.logger = Logger(run_dir, enabled=self.chief)
        self._sample = make_sampler(self.trainer.ema)  # z -> x0 by the EMA weights
        self._noise = noise

    def sample_grid(self, step: int, tag: str) -> None:
        """A grid of EMA samples (fixed noise) into samples/step_{step}.png and TensorBoard."""
        if not self.chief:
            return
        grid = make_grid(to_uint8(self._sample(self._noise).numpy()))
        fileio.makedirs(os.path.join(self.run_dir, "samples"))
        save_png(os.path.join(self.run_dir, "samples", f"step_{step:07d}.png"), grid)
        self.logger.image(step, tag, grid)

    def export(self, folder: str, meta: dict) -> None:
        """The EMA weights into `folder` (replaced whole; chief only)."""
        if self.chief:
            write_weights("converted", folder, self.trainer.ema, meta, replace=True)

    def run(self, *, steps_per_epoch: int, make_dataset: DatasetFn,
            on_checkpoint: Callable[[int], None], ckpt_every: int, desc: str, progress: bool,
            ckpt_at_epoch_end: bool = True, steps_per_call: int = STEPS_PER_CALL) -> int:
        """Train to total_steps on make_dataset(epoch, start, ctx): this host's per-replica
        batches from step `start` of `epoch` on. Returns the last step."""
        trainer = self.trainer
        data = distributed_dataset(trainer.strategy, make_dataset, int(trainer.epoch.numpy()),
                                   int(trainer.step_in_epoch.numpy()))
        step = run_loop(trainer, total_steps=self.total_steps, steps_per_epoch=steps_per_epoch,
                        data=data, ckpt_every=ckpt_every, on_checkpoint=on_checkpoint,
                        logger=self.logger, desc=desc, progress=progress and self.chief,
                        ckpt_at_epoch_end=ckpt_at_epoch_end, steps_per_call=steps_per_call)
        if not self.chief:
            shutil.rmtree(self.trainer.savedir, ignore_errors=True)
        return step


class Logger:
    """TensorBoard scalars and images (chief only) plus a JSON-lines log of the same scalars."""

    def __init__(self, savedir: str, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            self.writer = tf.summary.create_file_writer(os.path.join(savedir, "logs"))
            self.jsonl = os.path.join(savedir, "logs", "scalars.jsonl")

    def scalars(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.writer.as_default():
            for k, v in values.items():
                tf.summary.scalar(k, v, step=step)
        self.writer.flush()
        fileio.append_line(self.jsonl, json.dumps({"step": step, **{k: float(v) for k, v in
                                                                     values.items()}}))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            with self.writer.as_default():
                tf.summary.image(name, image[None], step=step)


class Throughput:
    """Pairs per second over the steps since the last reading."""

    def __init__(self):
        self.t, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return rate


def save_run_config(savedir: str, config: dict, must_match: tuple[str, ...]) -> None:
    """Write the resolved settings; a resumed run must agree on those in `must_match`."""
    path = os.path.join(savedir, "config.json")
    if fileio.exists(path):
        old = fileio.read_json(path)
        diff = [k for k in must_match if old.get(k) != config.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} before, {config.get(k)!r} now" for k in diff)
            raise UserError(f"{savedir} holds a run with other settings ({shown}); "
                             f"use another SAVEDIR to start afresh")
    write_json(path, config)


def progress_bar(total: int, initial: int, desc: str, disable: bool) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=disable,
                dynamic_ncols=True, smoothing=0.05)

