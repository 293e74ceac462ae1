"""What every weight format reader returns (Weights) and how it fails (WeightsError)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from models.configs import NetworkConfig
from utils.errors import UserError

OFFICIAL_GN_EPS = 1e-6  # tf.contrib group_norm (DDPM), torch GroupNorm(eps=1e-6) (DDIM), diffusers' ports
ORIGINAL_GN_EPS = 1e-3  # tensorflow-addons' default, used by the original repo's teachers and students
META_FILE = "weights.json"  # our converted checkpoint: this file + tf.train.Checkpoint prefix "weights"


class WeightsError(UserError, ValueError):
    """A weight file that cannot be used as asked: missing, corrupt, or for another network."""


@dataclass
class Weights:
    """Tensors under their official DDPM names (without `model/`) in the official layouts, plus
    where they came from. `network`: the network they belong to where the file says (ours and
    diffusers folders); None: the dataset's network (the official files and the original's)."""
    params: dict[str, np.ndarray]
    gn_eps: float
    source: str
    format: str  # "ddpm_tf1" | "ddim_pth" | "original_h5" | "converted" | "diffusers"
    ema: bool | None = None
    step: int | None = None
    dataset: str | None = None
    sha256: str | None = None
    ignored: list[str] = field(default_factory=list)
    command: str | None = None  # the command that made them (ours), SAVEDIR left symbolic
    network: NetworkConfig | None = None

    def describe(self) -> str:
        ema = {True: "EMA", False: "raw", None: "as stored"}[self.ema]
        step = f", step {self.step:,}" if self.step is not None else ""
        made = f", made by `{self.command}`" if self.command else ""
        return (f"{self.source} ({self.format}, {ema} weights{step}{made}; {len(self.params)} "
                f"tensors, GroupNorm eps {self.gn_eps:g}; ignored {len(self.ignored)} other entries)")


def fit_report(missing: list[str], extra: list[str], misshapen: list[str], shown: int = 4) -> str:
    """'2 missing: a, b; 1 not in the network: c': why a set of tensors does not fit a network."""
    parts = [(missing, "missing"), (extra, "not in the network"), (misshapen, "misshapen")]
    return "; ".join(f"{len(p)} {what}: {', '.join(p[:shown])}{' ...' if len(p) > shown else ''}"
                     for p, what in parts if p)


def cause(e: BaseException) -> str:
    """A short reason for a reader's failure, in our words: the libraries' own messages run to
    paragraphs and repeat the (possibly long) path, and cutting them leaves half a sentence."""
    code = getattr(e, "error_code", None)  # TF raises some as a bare OpError with a code
    if isinstance(e, FileNotFoundError) or code == tf.errors.NOT_FOUND:
        return "a file is missing"
    if isinstance(e, PermissionError) or code == tf.errors.PERMISSION_DENIED:
        return "permission denied"
    if isinstance(e, json.JSONDecodeError):
        return "a JSON file is not valid JSON"
    return "incomplete or corrupt"


# 1x1 convolutions in PyTorch files (DDIM's q/k/v/proj_out, diffusers' conv_shortcut) that the
# official layout keeps as dense [in, out] weights
_DENSE_1X1 = re.compile(r"/(q|k|v|proj_out|nin_shortcut)/W$")


def from_torch_layout(name: str, a: np.ndarray) -> np.ndarray:
    """A PyTorch tensor (conv [out, in, kh, kw], Linear [out, in], 1x1 conv [out, in, 1, 1]) in
    the official layout of weight `name` (conv [kh, kw, in, out], dense and nin [in, out])."""
    a = np.asarray(a, np.float32)
    if a.ndim == 4 and a.shape[2:] == (1, 1) and _DENSE_1X1.search(name):
        return np.ascontiguousarray(a[:, :, 0, 0].T)
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    if a.ndim == 2:
        return np.ascontiguousarray(a.T)
    return a


def to_torch_layout(name: str, a: np.ndarray, conv_1x1: bool = False) -> np.ndarray:
    """The inverse of from_torch_layout; conv_1x1: a dense weight goes back as a 1x1 conv."""
    a = np.asarray(a, np.float32)
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if a.ndim == 2:
        t = np.ascontiguousarray(a.T)
        return t[:, :, None, None] if conv_1x1 else t
    return a
