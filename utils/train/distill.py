"""Stage 2: the student loop. The teacher's U-Net, initialised from its weights and called at
t = STUDENT_T (999), regresses onto the stored pairs; the EMA weights are scored on the held-out
pairs at each checkpoint and the best are exported for evaluation (as the original did).

    SAVEDIR/checkpoints/   training state (model, EMA, Adam, position, best loss): resume from here
    SAVEDIR/best/          EMA weights with the lowest held-out loss: what eval.py loads
    SAVEDIR/last/          EMA weights at the last checkpoint
    SAVEDIR/samples/       a grid of EMA samples at each checkpoint
    SAVEDIR/logs/          TensorBoard events and scalars.jsonl
    SAVEDIR/config.json    the resolved settings
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import tensorflow as tf

from data.reader import PairReader, steps_per_epoch
from data.shards import dequantise_targets, heldout_batches, open_pair_set
from models.configs import CKPT_EVERY, STEPS_PER_CALL, DatasetConfig, TrainConfig
from models.diffusion import student_fn, student_loss
from models.unet import UNet
from models.weights import load_unet
from utils import fileio
from utils.strategy import worker_info
from utils.train.loop import Stage, save_run_config

MUST_MATCH_ON_RESUME = ("dataset", "batch_size", "grad_accum", "loss", "seed", "bf16")
N_SAMPLES = 64


@dataclass(frozen=True)
class StudentSettings:
    """Everything a student run is trained with: the dataset's TrainConfig (flags applied) and the
    run's own options."""
    dataset: str
    train: TrainConfig
    seed: int = 0
    grad_accum: int = 1
    bf16: bool = False
    xla: bool = True
    ckpt_every: int = CKPT_EVERY
    n_eval: int | None = None  # held-out pairs scored at each checkpoint (None: all)
    steps_per_call: int = STEPS_PER_CALL  # optimizer steps per compiled call

    def flat(self) -> dict:
        """One level of keys, as config.json has always held them (a resumed run compares them)."""
        run = {k: v for k, v in dataclasses.asdict(self).items() if k != "train"}
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "optim"}
        return {**run, **train, **dataclasses.asdict(self.train.optim)}


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


def train_student(cfg: DatasetConfig, s: StudentSettings, strategy: tf.distribute.Strategy,
                  datadir: str, teacher_path: str, savedir: str, raw_teacher: bool = False,
                  progress: bool = True, command: str | None = None) -> dict:
    tr = s.train
    shape = cfg.network.image_shape
    pairs = open_pair_set(datadir, shape)
    if worker_info()[0] == 0:
        local = fileio.is_local(datadir)
        save_run_config(savedir, {**s.flat(), "datadir": os.path.abspath(datadir) if local else datadir,
                                  "teacher": teacher_path}, MUST_MATCH_ON_RESUME)
    teacher, weights = load_unet(teacher_path, cfg, ema=not raw_teacher)
    net = teacher.cfg  # the teacher's network, GroupNorm epsilon included
    per_epoch = steps_per_epoch(pairs, tr.batch_size)
    total = int(math.ceil(tr.epochs * per_epoch))
    stage = Stage(
        strategy, savedir, lambda: UNet(net, compute_dtype="bfloat16" if s.bf16 else "float32"),
        tr.optim, lambda model, x, y, step: student_loss(model, tf.cast(x, tf.float32),
                                                         dequantise_targets(y), tr.loss),
        global_batch=tr.batch_size, grad_accum=s.grad_accum, total_steps=total, xla=s.xla,
        make_sampler=student_fn,
        noise=tf.random.stateless_normal([N_SAMPLES, *shape], seed=[s.seed, 12345]))
    trainer = stage.trainer
    if not stage.resumed:
        trainer.init_from(teacher)
    del teacher
    score_heldout = heldout_scorer(trainer.ema, pairs, tr.loss, s.n_eval)  # picks best/
    if stage.chief:
        print(f"student: {weights.describe()}; {pairs.n_train:,} pairs, {per_epoch} steps/epoch, "
              f"{total} steps, {strategy.num_replicas_in_sync} replica(s)"
              + (", resumed" if stage.resumed else ""))

    def checkpoint(step: int) -> None:
        """Score the EMA weights on the held-out pairs; export them (last, and best so far)."""
        loss = score_heldout()
        # Portable provenance: what the weights are and the command, not this machine's folders.
        meta = {"dataset": cfg.name, "source": f"Denoising Student distilled from {weights.source}",
                "command": command, "step": step, "ema": True, "heldout_loss": loss,
                "heldout_loss_kind": tr.loss,
                "teacher": weights.source, "teacher_step": weights.step,
                "teacher_sha256": weights.sha256}
        stage.export(os.path.join(savedir, "last"), meta)
        if loss < float(trainer.best_heldout.numpy()):
            trainer.best_heldout.assign(loss)
            stage.export(os.path.join(savedir, "best"), meta)
        stage.sample_grid(step, "ema_samples")
        stage.logger.scalars(step, heldout_loss=loss,
                             best_heldout_loss=float(trainer.best_heldout.numpy()))

    if not stage.resumed:
        checkpoint(0)  # the teacher-initialised student's held-out loss: the baseline
        trainer.manager.save(checkpoint_number=0)
    reader = PairReader(pairs, tr.batch_size, s.seed)
    per_replica = tr.batch_size // strategy.num_replicas_in_sync
    step = stage.run(
        steps_per_epoch=per_epoch,
        make_dataset=lambda epoch, start, ctx: reader.dataset(
            epoch, start, (ctx.input_pipeline_id, ctx.num_input_pipelines), per_replica),
        on_checkpoint=checkpoint, ckpt_every=s.ckpt_every, desc=f"student ({cfg.name})",
        progress=progress, steps_per_call=s.steps_per_call)
    best = os.path.join(savedir, "best")
    if stage.chief and fileio.isdir(best):
        print(f"best held-out {tr.loss} loss {float(trainer.best_heldout.numpy()):.6g}: {best}")
    return {"steps": step, "best_heldout": float(trainer.best_heldout.numpy())}
