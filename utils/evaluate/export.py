"""The one-step student for deployment: a SavedModel (TF Serving, tf.saved_model.load) and a TFLite
model, or a diffusers UNet2DModel folder for PyTorch users, with a README.txt saying what is inside.

    python eval.py export ./export/digits digits               # SavedModel + denoise_float32.tflite
    python eval.py export ./export/c10 cifar10 --tflite int8   # dynamic-range int8 TFLite
    python eval.py export ./export/c10_hf cifar10 --format diffusers   # config.json + safetensors

The SavedModel's signatures:

- `sample(seed: int64 [], n: int32 [])` -> {"images": uint8 [n, H, W, C]} (also `serving_default`):
  the noise is re-derived in the graph by the same functions eval uses (utils.evaluate.sampling.noise_for),
  so image i is bit for bit the PNG `eval.py tofolder --seed SEED` writes for index i (with the
  same --xla setting: XLA and plain kernels round a few pixels in 10^5 differently);
- `denoise(z: float32 [N, H, W, C])` -> {"images": uint8 [N, H, W, C]}: the student's one step.

The TFLite model is `denoise`, converted from that SavedModel by TensorFlow's own converter.
The module tracks the network's tf.Variables themselves, not the Keras model: Keras 3 variables
saved through the model are not restored by TF1-style loaders (TF Serving's C++ loader, the
TFLite converter, which then silently writes a model without weights).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from typing import Callable

import numpy as np
import tensorflow as tf

from models.configs import DatasetConfig
from models.diffusion import STUDENT_T, student_fn
from models.unet import UNet, in_compute_dtype, official_variables
from models.weights import Weights, write_weights
from utils.errors import UserError
from utils.evaluate.sampling import SAMPLE_STREAM, noise_for
from utils.fileio import atomic_dir, atomic_write

TFLITE_VARIANTS = ("float32", "fp16", "int8")
SAVED_MODEL = "saved_model"
README = "README.txt"
DEFAULT_SIGNATURE = "sample"  # what TF Serving's `serving_default` runs


def tflite_name(variant: str) -> str:
    return f"denoise_{variant}.tflite"


def uint8_images(x: tf.Tensor) -> tf.Tensor:
    """utils.images.to_uint8 in the graph: clip to [-1, 1], scale, round half to even like np.rint."""
    return tf.cast(tf.round((tf.clip_by_value(x, -1.0, 1.0) + 1.0) * 127.5), tf.uint8)


class StudentExport(tf.Module):
    """The exported object: the student's weights and its `sample` and `denoise` functions."""

    def __init__(self, model: UNet, cfg: DatasetConfig, xla: bool = True) -> None:
        super().__init__()
        # The underlying tf.Variables, under their official names (see the module docstring).
        self.weights = {name: v.value for name, v in official_variables(model).items()}
        step = student_fn(model, xla)
        shape = list(model.cfg.image_shape)

        def sample(seed: tf.Tensor, n: tf.Tensor) -> dict[str, tf.Tensor]:
            tf.debugging.assert_non_negative(n, message="n must be >= 0")  # else tf.range: none
            return {"images": uint8_images(step(noise_for(tf.range(n), cfg, seed)))}

        def denoise(z: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"images": uint8_images(step(z))}

        self.sample = tf.function(sample, input_signature=[tf.TensorSpec([], tf.int64, "seed"),
                                                           tf.TensorSpec([], tf.int32, "n")])
        self.denoise = tf.function(denoise,
                                   input_signature=[tf.TensorSpec([None, *shape], tf.float32, "z")])

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        sample = self.sample.get_concrete_function()
        return {"serving_default": sample, "sample": sample,
                "denoise": self.denoise.get_concrete_function()}


def save_saved_model(module: StudentExport, path: str) -> None:
    tf.saved_model.save(module, path, signatures=module.signatures())


def tflite_model(saved_model: str, variant: str = "float32") -> bytes:
    """The SavedModel's `denoise` as TFLite: float32, fp16 weights, or int8 dynamic-range
    (weights int8, activations quantised on the fly where a kernel supports it)."""
    if variant not in TFLITE_VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}; one of {', '.join(TFLITE_VARIANTS)}")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=["denoise"])
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def tflite_denoiser(path: str, threads: int = 2) -> Callable[[np.ndarray], np.ndarray]:
    """z float32 [N, H, W, C] -> uint8 images, by the TFLite interpreter (resized to each N)."""
    with warnings.catch_warnings():
        # tf.lite.Interpreter still works in TF 2.21 but warns that it moves to ai-edge-litert.
        warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated")
        runner = tf.lite.Interpreter(model_path=path, num_threads=threads).get_signature_runner(
            "denoise")
    return lambda z: runner(z=np.asarray(z, np.float32))["images"]


def require_new_dir(path: str) -> None:
    """A UserError unless `path` is absent or an empty folder: an export is never overwritten."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"{path} already exists and is not an empty directory; choose a new one "
                        f"(an export is never overwritten)")


def export(out_dir: str, model: UNet, weights: Weights, cfg: DatasetConfig,
           tflite: str = "float32", xla: bool = True, bf16: bool = False) -> list[str]:
    """Write the SavedModel, the TFLite model and README.txt into `out_dir`, which must be new
    or empty; everything goes to a temporary sibling first, so `out_dir` is complete or absent.
    bf16: the SavedModel's network computes in bfloat16; the TFLite model is converted from a
    float32 SavedModel all the same (TFLite has no bfloat16 kernels)."""
    require_new_dir(out_dir)
    try:
        with atomic_dir(out_dir) as tmp:
            saved = os.path.join(tmp, SAVED_MODEL)
            save_saved_model(StudentExport(in_compute_dtype(model, 'bfloat16' if bf16 else 'float32'), cfg, xla), saved)
            with tempfile.TemporaryDirectory() as float32_dir:
                source = saved
                if bf16:
                    source = os.path.join(float32_dir, SAVED_MODEL)
                    save_saved_model(StudentExport(model, cfg, xla), source)
                with atomic_write(os.path.join(tmp, tflite_name(tflite))) as f:
                    f.write(tflite_model(source, tflite))
            with atomic_write(os.path.join(tmp, README), "w") as f:
                f.write(readme(cfg, weights, tflite, xla, bf16))
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    return sorted(os.listdir(out_dir))


def readme(cfg: DatasetConfig, weights: Weights, tflite: str, xla: bool, bf16: bool = False) -> str:
    net = cfg.network
    hwc = ", ".join(map(str, net.image_shape))
    xla_note = ("on: the network is XLA-compiled, as eval.py runs it by default. TF Serving\n"
                "      needs --xla_cpu_compilation_enabled=true; export --no-xla for a server "
                "without XLA" if xla else "off: plain TensorFlow kernels (as eval.py --no-xla)")
    return f"""Denoising Student, {cfg.name} ({net.resolution}x{net.resolution}x{net.in_ch}), \
written by `python eval.py export`.
One network call: x0 = z - f(z, t={STUDENT_T}); images are uint8 round((clip(x0, -1, 1) + 1) * 127.5),
halves to even (as eval.py writes its PNGs).

Source weights: {weights.describe()}

{SAVED_MODEL}/  TensorFlow SavedModel: tf.saved_model.load("{SAVED_MODEL}"), or TF Serving.
  signature "{DEFAULT_SIGNATURE}" (also "serving_default"):
      inputs:  seed int64 scalar, n int32 scalar (n >= 0)
      outputs: images uint8 [n, {hwc}]
      Image i is {"from the same noise as" if bf16 else "bit for bit"} the PNG `eval.py tofolder DIR {cfg.name} --seed SEED` writes for
      index i ({"computed in bfloat16" if bf16 else "same --xla setting"}). Its noise is re-derived in the graph: N(0, I) from
      tf.random.stateless_normal keyed by (seed, {SAMPLE_STREAM} * 2^40 + i), rounded to float16.
  signature "denoise":
      inputs:  z float32 [N, {hwc}] (N(0, I) noise, any N)
      outputs: images uint8 [N, {hwc}]
  XLA {xla_note}.
  Arithmetic: {"bfloat16 (the network's compute dtype; GroupNorm in float32)" if bf16 else "float32"}.

{tflite_name(tflite)}  TFLite model of "denoise" ({tflite} weights{
    ", activations quantised on the fly" if tflite == "int8" else ""}):
  signature "denoise", input z float32 [N, {hwc}] (resize for N != 1),
  output images uint8 [N, {hwc}].
"""


def export_diffusers(out_dir: str, model: UNet, weights: Weights, cfg: DatasetConfig) -> list[str]:
    """The student as a diffusers UNet2DModel folder (config.json, safetensors, README.txt) in
    `out_dir`, which must be new or empty; complete or absent, as export()."""
    require_new_dir(out_dir)
    try:
        with atomic_dir(out_dir) as tmp:
            write_weights("diffusers", tmp, model, {"source": weights.describe()})
            with atomic_write(os.path.join(tmp, README), "w") as f:
                f.write(readme_diffusers(cfg, model, weights))
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    return sorted(os.listdir(out_dir))


def readme_diffusers(cfg: DatasetConfig, model: UNet, weights: Weights) -> str:
    h, w, c = model.cfg.image_shape
    return f"""Denoising Student, {cfg.name} ({h}x{w}x{c}), as a diffusers UNet2DModel, written by
`python eval.py export DIR {cfg.name} --format diffusers`. One network call:
x0 = z - unet(z, {STUDENT_T}).sample, clipped to [-1, 1].

Source weights: {weights.describe()}

    import torch
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained("DIR").eval()   # DIR: this folder
    z = torch.randn(16, {c}, {h}, {w})                        # N(0, I) noise, NCHW
    with torch.no_grad():
        x0 = (z - unet(z, {STUDENT_T}).sample).clamp(-1, 1)
    images = ((x0 + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # NHWC uint8

torch.randn is not eval.py's seeded noise: the same noise (eval.py's, NHWC, permuted to NCHW)
gives the same images as eval.py, up to float rounding.
"""
