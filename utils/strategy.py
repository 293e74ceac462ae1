"""Choosing the tf.distribute strategy: TPU, multi-worker, mirrored GPUs, or the CPU.

One code path serves all of them; callers only see `strategy.num_replicas_in_sync` and the
worker's place in the job (`worker_info`).
"""
from __future__ import annotations

import json
import os
import warnings

import tensorflow as tf


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
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if _tf_config().get("cluster", {}).get("worker"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if cpu_replicas > 1:
        split_cpu(cpu_replicas)
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    gpus = devices or [d.name for d in tf.config.list_logical_devices("GPU")]
    if gpus:
        return tf.distribute.MirroredStrategy(gpus)
    warnings.warn("no GPU or TPU found: running on the CPU (fine for small runs, slow for real ones)",
                  stacklevel=2)
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def _tf_config() -> dict:
    try:
        return json.loads(os.environ.get("TF_CONFIG", "{}"))
    except json.JSONDecodeError:
        raise ValueError("TF_CONFIG is not valid JSON") from None


def worker_info() -> tuple[int, int]:
    """(this worker's index, number of workers) from TF_CONFIG; (0, 1) for a single machine."""
    cfg = _tf_config()
    workers = cfg.get("cluster", {}).get("worker", [])
    if not workers:
        return 0, 1
    task = cfg.get("task", {})
    return (int(task.get("index", 0)) if task.get("type", "worker") == "worker" else 0), len(workers)

