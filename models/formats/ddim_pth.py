"""The DDIM CelebA PyTorch checkpoint (ermongroup/ddim): ckpt.pth, read with
torch.load(weights_only=True)."""
from __future__ import annotations

import re
import warnings

import numpy as np

from models.configs import DatasetConfig
from models.formats.base import OFFICIAL_GN_EPS, Weights, WeightsError, cause, from_torch_layout
from utils.fileio import sha256_file


def read_ddim_pth(path: str, ema: bool = True) -> Weights:
    """ckpt.pth = [model state_dict ('module.'-prefixed), optimizer, epoch, step, ema state_dict]."""
    try:
        import torch
    except ImportError:
        raise WeightsError("reading a DDIM .pth needs PyTorch (CPU is enough): "
                           "pip install torch") from None
    try:
        with warnings.catch_warnings():  # e.g. its note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            states = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found") from None
    except Exception as e:  # torch raises many types for truncated/corrupt archives
        raise WeightsError(f"{path}: unreadable PyTorch checkpoint ({cause(e)})") from None
    if isinstance(states, dict):  # a bare state_dict
        states = [states]
    if not isinstance(states, (list, tuple)) or not isinstance(states[0], dict):
        raise WeightsError(f"{path}: not a DDIM checkpoint (expected a list of state_dicts)")
    if ema and len(states) < 5:
        raise WeightsError(f"{path}: no EMA state in this checkpoint; use --raw for the raw weights")
    state = states[-1] if ema else states[0]
    params, ignored = {}, []
    for key, tensor in state.items():
        name = ddim_to_official_name(key.removeprefix("module."))
        if name is None:
            ignored.append(key)
            continue
        params[name] = from_torch_layout(name, tensor.detach().cpu().numpy())
    step = int(states[3]) if len(states) > 3 and isinstance(states[3], (int, np.integer)) else None
    return Weights(params, OFFICIAL_GN_EPS, path, "ddim_pth", ema=ema, step=step,
                   sha256=sha256_file(path), ignored=ignored)


def ddim_to_official_name(key: str) -> str | None:
    """`down.1.attn.0.q.weight` -> `down_1/attn_0/q/W`; None for entries that are not weights."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    out, i = [], 0
    body = parts[:-1]
    while i < len(body):
        p = body[i]
        if p in ("down", "up", "block", "attn") and i + 1 < len(body) and body[i + 1].isdigit():
            out.append(f"{p}_{body[i + 1]}")
            i += 2
        elif p == "temb" and body[i + 1:i + 2] == ["dense"]:
            out.append(f"temb/dense{body[i + 2]}")
            i += 3
            continue
        else:
            out.append(p)
            i += 1
    scope = "/".join(out)
    is_norm = re.search(r"(^|/)norm(1|2|_out)?$", scope) is not None
    leaf = {"weight": "gamma" if is_norm else "W", "bias": "beta" if is_norm else "b"}[parts[-1]]
    return f"{scope}/{leaf}"


# -- the registry's interface (models/formats/__init__.py) ----------------------------------------
NAME = "ddim_pth"


def recognise(path: str) -> bool:
    return path.endswith((".pth", ".pt"))  # read() says if it is missing, or needs PyTorch


def read(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    return read_ddim_pth(path, ema=ema)


def locate(folder: str, cfg: DatasetConfig, role: str) -> list[str]:
    return []  # the official release's layout (DatasetConfig.teacher_file): weights.find_teacher
