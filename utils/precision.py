"""bfloat16 arithmetic (--bf16) by the fastest path of each device.

* GPU and TPU: the network's compute dtype (models.unet.UNet(compute_dtype="bfloat16")):
  convolutions and matmuls in bfloat16, GroupNorm in float32, float32 weights and outputs.
* CPU: oneDNN's automatic mixed precision, a TensorFlow graph rewrite
  (`auto_mixed_precision_onednn_bfloat16`) of the float32 network, run where the CPU has
  bfloat16 instructions (AVX512-BF16; AMX tiles on some Intel CPUs). It needs oneDNN, which
  TensorFlow turns on by itself only on some CPUs: the entry points set TF_ENABLE_ONEDNN_OPTS=1
  before TensorFlow starts when --bf16 is given (prepare). The rewrite works on graphs, not on
  XLA clusters: the network then runs as a plain graph. Where oneDNN is off all the same
  (TF_ENABLE_ONEDNN_OPTS=0), the compute dtype is used on the CPU too.

Either way the noise is made before the network, in float32, so seeds keep their meaning: the same
noise, only the arithmetic changes. A CPU without bfloat16 units still runs it, emulated and slower
than float32, and says so in one line.
"""
from __future__ import annotations

import os

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the instructions
ONEDNN = "onednn"  # the CPU's graph rewrite
COMPUTE_DTYPE = "compute_dtype"  # the network's own bfloat16 compute


def prepare(argv: list[str]) -> None:
    """Before TensorFlow is imported: oneDNN on if --bf16 is asked for (a user's own
    TF_ENABLE_ONEDNN_OPTS is kept)."""
    if "--bf16" in argv:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bfloat16 instructions; None where that cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return None
    return any(flag in flags for flag in BF16_FLAGS)


def onednn_enabled() -> bool:
    """Whether TensorFlow runs with oneDNN in this process (decided when it started)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # a TensorFlow without that probe: trust the setting
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1"


def on_accelerator() -> bool:
    import tensorflow as tf
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def enable_bf16(accelerator: bool | None = None, say=print) -> str:
    """Turn on bfloat16 for what runs next in this process; returns the path taken (ONEDNN or
    COMPUTE_DTYPE), for the caller to build its network accordingly. On a CPU without bfloat16
    units, says in one line that it will be slow."""
    import tensorflow as tf
    if accelerator if accelerator is not None else on_accelerator():
        return COMPUTE_DTYPE
    units = cpu_has_bf16()
    if units is False:
        say("bf16: this CPU has no bfloat16 units (AVX512-BF16 or AMX): bfloat16 is emulated "
            "here and slower than float32")
    if not onednn_enabled():
        return COMPUTE_DTYPE
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    return ONEDNN


def disable_bf16() -> None:
    """Undo enable_bf16's graph rewrite for what is traced next (tests, benches)."""
    import tensorflow as tf
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": False})


def network_precision(bf16: bool, xla: bool, rewrite: bool = True, say=print) -> tuple[str, bool]:
    """(the network's compute dtype, whether to XLA-compile it) for --bf16 / --xla: the one
    policy of every entry point. rewrite=False: never the CPU's process-wide graph rewrite (eval's
    fid: it would reach the Inception network too)."""
    if not bf16:
        return "float32", xla
    if rewrite and enable_bf16() == ONEDNN:
        say("bf16: oneDNN mixed precision (a graph rewrite: the network runs without XLA)")
        return "float32", False
    say("bf16: the network's compute dtype")
    return "bfloat16", xla


def pairs_precision(bf16: bool, recorded: str | None, xla: bool, say=print
                    ) -> tuple[str, str, bool]:
    """What a pair set records and how its teacher runs: (the set's precision, the teacher's
    compute dtype, XLA). A complete set (`recorded`: its precision) is kept as it was made,
    whatever --bf16 says now; an incomplete one is made (or finished) as asked."""
    wanted = "bfloat16" if bf16 else "float32"
    if recorded is not None and recorded != wanted:
        say(f"pairs: complete and kept, made in {recorded} (the student trains in {wanted})")
        return recorded, "float32", xla
    if recorded is not None or not bf16:
        return wanted, "float32", xla
    dtype, xla = network_precision(True, xla, say=lambda _: None)
    say(f"bf16: the teacher's pairs in bfloat16 ("
        f"{'its compute dtype' if dtype == 'bfloat16' else 'oneDNN mixed precision, no XLA'})")
    return wanted, dtype, xla

