"""Choosing the tf.distribute strategy: TPU, multi-worker, mirrored GPUs, or the CPU.

One code path serves all of them; callers only see `strategy.num_replicas_in_sync` and the
worker's place in the job (`worker_info`).
"""
from __future__ import annotations

import json
import os
import urllib.error

import tensorflow as tf

from utils.errors import UserError, first_line


def split_cpu(n: int) -> None:
    """Expose the CPU as n logical devices (tests of multi-replica code on one machine).
    Must run before TensorFlow initialises its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)


def make_strategy(tpu: str | None = None, devices: list[str] | None = None,
                  cpu_replicas: int = 1) -> tf.distribute.Strategy:
    """TPUStrategy for `tpu`; MultiWorkerMirroredStrategy when TF_CONFIG names a cluster;
    MirroredStrategy over the GPUs (or `devices`); else the CPU (several logical replicas if asked)."""
    if tpu:
        return _tpu_strategy(tpu)
    if _tf_config().get("cluster", {}).get("worker"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cpu_replicas > 1:
        split_cpu(cpu_replicas)
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    gpus = _known_devices(devices) if devices else [
        d.name for d in tf.config.list_logical_devices("GPU")]
    if gpus:
        return tf.distribute.MirroredStrategy(gpus)
    # a note, not a warning: on stderr, with its source line, it read as a failure
    print("devices: no GPU or TPU found, running on the CPU "
          "(fine for small runs, slow for real ones)")
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def _known_devices(devices: list[str]) -> list[str]:
    """`devices` if each names a device of this machine (MirroredStrategy accepts any name, and
    fails only at the first step)."""
    def key(name: str) -> tuple[str, int]:
        spec = tf.DeviceSpec.from_string(name)
        return (spec.device_type or "").upper(), spec.device_index or 0
    here = tf.config.list_logical_devices()
    known = {key(d.name) for d in here}
    for name in devices:
        try:
            found = key(name) in known
        except ValueError:
            found = False
        if not found:
            raise UserError(f"no device {name} here (devices: "
                            f"{', '.join(d.name.split('device:')[-1] for d in here)})")
    return devices


def _tpu_strategy(tpu: str) -> tf.distribute.TPUStrategy:
    """TPUStrategy on `tpu`; an unreachable or unknown TPU is the user's one-line error."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (OSError, ValueError, RuntimeError, tf.errors.OpError) as e:
        raise UserError(f"cannot use TPU {tpu!r}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    """The first line of an error; a TPU name is looked up through the GCE metadata server."""
    if isinstance(e, urllib.error.URLError):
        return f"address lookup failed ({e.reason})"
    return first_line(e)


def _tf_config() -> dict:
    try:
        return json.loads(os.environ.get("TF_CONFIG", "{}"))
    except json.JSONDecodeError:
        raise UserError("the TF_CONFIG environment variable is not valid JSON") from None


def worker_info() -> tuple[int, int]:
    """(this worker's index, number of workers) from TF_CONFIG; (0, 1) for a single machine."""
    cfg = _tf_config()
    workers = cfg.get("cluster", {}).get("worker", [])
    if not workers:
        return 0, 1
    task = cfg.get("task", {})
    return (int(task.get("index", 0)) if task.get("type", "worker") == "worker" else 0), len(workers)

