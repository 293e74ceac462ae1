"""The optimiser of both training stages: Adam (as Keras's, through TensorFlow's fused kernel)
with a linear warmup, then a constant or cosine-decayed learning rate."""
from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable("denoising_student")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """lr * min(1, (step + 1) / warmup): linear warmup, then constant (the original's student), or
    with decay_steps > 0 a cosine decay from lr at the end of the warmup to 0 at decay_steps."""

    def __init__(self, lr: float, warmup_steps: int, decay_steps: int = 0):
        self.lr, self.warmup_steps, self.decay_steps = lr, warmup_steps, decay_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0
        lr = self.lr * tf.minimum(1.0, step / max(self.warmup_steps, 1))
        if self.decay_steps > 0:
            span = max(self.decay_steps - self.warmup_steps, 1)
            done = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            lr *= 0.5 * (1.0 + tf.cos(math.pi * done))
        return lr

    def get_config(self):
        return {"lr": self.lr, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps}


class FusedAdam(keras.optimizers.Adam):
    """Keras Adam (same variables, same checkpoints, same arithmetic) whose per-variable update is
    TensorFlow's fused Adam kernel, one op instead of Keras's dozen, and whose step scalars (the
    bias-correction powers, the learning rate) are made once per update, not once per variable.
    Keras's distribution logic (gradient all-reduce, per-device update) is unchanged. No amsgrad:
    the kernel has none. Why: creating ops dominates a step's trace and the graph optimiser's
    first call (docs/performance.md has the op counts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.amsgrad:
            raise ValueError("FusedAdam has no amsgrad variant")
        self._scalars: dict = {}

    def apply(self, grads, trainable_variables=None):
        try:
            return super().apply(grads, trainable_variables)
        finally:
            self._scalars = {}  # made afresh in each update (and each traced graph)

    def _step_scalars(self, dtype: tf.DType, device: str, learning_rate) -> dict:
        """ResourceApplyAdam's scalar inputs for this update, once per dtype and device:
        lr_t = lr sqrt(1 - beta_2^t) / (1 - beta_1^t) is formed by the kernel from these."""
        key = (dtype, device)
        if key not in self._scalars:
            step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            self._scalars[key] = dict(
                beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                epsilon=tf.cast(self.epsilon, dtype))
        return self._scalars[key]

    def update_step(self, gradient, variable, learning_rate):
        # m, v: moving averages of g and g^2; var -= lr_t m / (sqrt(v) + eps)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        m, v = self._momentums[index].value, self._velocities[index].value
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, grad=tf.cast(gradient, dtype),
            **self._step_scalars(dtype, variable.device, learning_rate))
