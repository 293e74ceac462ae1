"""`eval.py speed`: images/s of the student's one call against the teacher's solver loop on the
same network (so the same cost per call), and of the student in bfloat16, in one process."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import tensorflow as tf

from models.configs import DatasetConfig, SamplerConfig
from models.diffusion import STUDENT_T, solver_plan, student_fn, teacher_fn
from models.unet import UNet, in_compute_dtype
from utils.evaluate.sampling import noise_for


def best_seconds(fn: Callable, x: tf.Tensor, repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed call (tracing, compilation)."""
    fn(x).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_speed(model: UNet, cfg: DatasetConfig, sampler: SamplerConfig, batch: int,
                  repeats: int, xla: bool, bf16: Callable[[], tuple[str, bool]] | None = None,
                  say=print) -> None:
    """Print the figures; bf16() -> (compute dtype, xla) times the student in bfloat16 too."""
    z = noise_for(np.arange(batch), cfg, 0)
    # t is built inside, as in the student, so both let XLA fold the constant timestep embedding
    bare = tf.function(lambda v: model(v, tf.fill([tf.shape(v)[0]], STUDENT_T)), jit_compile=xla)
    s_bare = best_seconds(bare, z, repeats)
    student = student_fn(model, xla)
    s_student = best_seconds(student, z, repeats)
    reference = student(z).numpy()  # float32, before --bf16 can rewrite what runs next
    s_teacher = best_seconds(teacher_fn(model, sampler, xla), z, max(1, repeats - 2))
    calls = solver_plan(sampler).n_calls
    say(f"device: {tf.config.list_logical_devices()[-1].name}, batch {batch}, xla {xla}")
    say(f"bare forward pass:      {batch / s_bare:10.2f} img/s")
    say(f"student (1 call):       {batch / s_student:10.2f} img/s ({s_bare / s_student:.3f}x bare)")
    say(f"teacher ({calls} calls):  {batch / s_teacher:10.2f} img/s ({sampler.solver})")
    say(f"student / teacher:      {s_teacher / s_student:10.1f}x faster")
    if bf16 is not None:  # the same student again in bfloat16, in this process: the ratio
        dtype, xla16 = bf16()
        fast_student = student_fn(in_compute_dtype(model, dtype), xla16)
        s_bf16 = best_seconds(fast_student, z, repeats)
        drift = np.abs(fast_student(z).numpy() - reference)
        say(f"student, bfloat16:      {batch / s_bf16:10.2f} img/s ({s_student / s_bf16:.2f}x "
            f"float32; largest output difference {drift.max():.3g})")
