"""Hugging Face diffusers folders: a UNet2DModel (config.json + diffusion_pytorch_model.safetensors
or .bin, optionally scheduler_config.json beside them) or a pipeline folder (model_index.json with
unet/ and scheduler/), such as the hub's google/ddpm-cifar10-32, -church-256 and -bedroom-256
(ports of the official DDPM checkpoints).

The network is built from config.json. Every UNet2DModel of the DDPM family maps exactly onto our
NetworkConfig: diffusers' positional embedding with flip_sin_to_cos false and freq_shift 1 is
DDPM's [sin, cos] with frequencies 10000^(-i/(half-1)); downsample_padding 0 pads (0, 1, 0, 1),
TensorFlow's SAME for a stride-2 conv on even sizes; an explicit attention_head_dim null is one
head over all channels; skips are concatenated [h, skip]; the mid block is res, attention, res.
Anything else is refused in one line naming the field and its value, as is a scheduler config
that is not the linear DDPM schedule of 1,000 steps with epsilon prediction. Unlike diffusers, a
missing, extra or misshapen tensor is an error, never a random initialisation or a warning.

Tensors are read with the safetensors package (NumPy: no PyTorch needed) or, for .bin files,
torch.load(weights_only=True); exports are written with safetensors.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from models.configs import DatasetConfig, NetworkConfig, SamplerConfig
from models.formats.base import (Weights, WeightsError, cause, fit_report, from_torch_layout,
                                 to_torch_layout)
from models.unet import UNet, official_variables
from utils import fileio
from utils.fileio import sha256_file

CONFIG = "config.json"
PIPELINE = "model_index.json"
SCHEDULER = "scheduler_config.json"
SAFETENSORS = "diffusion_pytorch_model.safetensors"
BIN = "diffusion_pytorch_model.bin"
VERIFIED_VERSION = "0.42.1"  # the diffusers release the import and export are tested against

# UNet2DModel's defaults (diffusers 0.42) for the fields a config may leave out, and the values we
# can honour. A field is checked whether given or defaulted: an absent attention_head_dim means 8
# heads, an absent downsample_padding 1 (not DDPM's SAME padding), an absent flip_sin_to_cos True.
DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D", "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
}
REQUIRED = {  # field: the only value(s) the DDPM network has
    "center_input_sample": (False,), "time_embedding_type": ("positional",),
    "flip_sin_to_cos": (False,), "freq_shift": (1,), "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1, 1.0), "downsample_padding": (0,), "downsample_type": ("conv",),
    "upsample_type": ("conv",), "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",), "add_attention": (True,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "num_train_timesteps": (None, 1000),
}
DOWN, UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")


# -- folders ---------------------------------------------------------------------------------------

def is_diffusers_folder(path: str) -> bool:
    """A pipeline folder, or a folder whose config.json describes a diffusers model."""
    if fileio.exists(os.path.join(path, PIPELINE)):
        return True
    config = os.path.join(path, CONFIG)
    if not fileio.exists(config):
        return False
    return "_class_name" in _read_json(config)


def _read_json(path: str) -> dict:
    return fileio.read_json(path, error=WeightsError)


def unet_folder(path: str) -> tuple[str, str | None]:
    """(the UNet2DModel folder, its scheduler config or None) of a model or pipeline folder."""
    if fileio.exists(os.path.join(path, PIPELINE)):
        unet, scheduler = os.path.join(path, "unet"), os.path.join(path, "scheduler", SCHEDULER)
        if not fileio.exists(os.path.join(unet, CONFIG)):
            raise WeightsError(f"{path}: a pipeline folder without unet/{CONFIG}")
        return unet, scheduler if fileio.exists(scheduler) else None
    scheduler = os.path.join(path, SCHEDULER)
    return path, scheduler if fileio.exists(scheduler) else None


# -- config.json <-> NetworkConfig ------------------------------------------------------------------

def _refuse(where: str, field: str, value, why: str = "") -> WeightsError:
    return WeightsError(f"{where}: {field} {json.dumps(value)} is outside the DDPM family this "
                        f"network reproduces{': ' + why if why else ''}")


def network_from_config(config: dict, where: str) -> NetworkConfig:
    """Our NetworkConfig for a UNet2DModel config of the DDPM family; WeightsError naming the
    first field (and its value) that we cannot honour."""
    if config.get("_class_name") != "UNet2DModel":
        raise _refuse(where, "_class_name", config.get("_class_name"), "only UNet2DModel is read")
    known = set(DEFAULTS) | {"_class_name", "_diffusers_version", "_name_or_path",
                             "_use_default_values"}
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise WeightsError(f"{where}: unknown field {unknown[0]} {json.dumps(config[unknown[0]])} "
                           f"(diffusers {VERIFIED_VERSION} has no such UNet2DModel option)")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, allowed in REQUIRED.items():
        if c[field] not in allowed or isinstance(c[field], bool) != isinstance(allowed[0], bool):
            raise _refuse(where, field, c[field])
    channels = list(c["block_out_channels"])
    ch = channels[0]
    if any(not isinstance(b, int) or b % ch for b in channels):
        raise _refuse(where, "block_out_channels", channels, "each a multiple of the first")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise _refuse(where, "time_embedding_dim", c["time_embedding_dim"], f"DDPM's is {4 * ch}")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(where, "sample_size", size, "square images only")
        size = size[0]
    if not isinstance(size, int) or size % 2 ** (len(channels) - 1):
        raise _refuse(where, "sample_size", c["sample_size"],
                      f"a multiple of {2 ** (len(channels) - 1)} for {len(channels)} levels")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != len(channels) or len(up) != len(channels):
        raise _refuse(where, "down_block_types", down, "one block per block_out_channels entry")
    for i, kind in enumerate(down):
        if kind not in DOWN:
            raise _refuse(where, f"down_block_types[{i}]", kind)
    for k, kind in enumerate(up):
        mirror = UP[DOWN.index(down[len(down) - 1 - k])]
        if kind != mirror:
            raise _refuse(where, f"up_block_types[{k}]", kind, f"it must mirror the way down "
                                                               f"({mirror})")
    attn_levels = [i for i, kind in enumerate(down) if kind == "AttnDownBlock2D"]
    heads_dim = c["attention_head_dim"]
    for width in [channels[i] for i in attn_levels] + [channels[-1]]:  # the mid block's too
        if heads_dim is not None and heads_dim != width:
            raise _refuse(where, "attention_head_dim", heads_dim,
                          "DDPM attention has one head (null, or the channel count)")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        raise _refuse(where, "attn_norm_num_groups", c["attn_norm_num_groups"])
    if any(w % c["norm_num_groups"] for w in channels):
        raise _refuse(where, "norm_num_groups", c["norm_num_groups"], "must divide every width")
    return NetworkConfig(
        resolution=size, ch=ch, ch_mult=tuple(w // ch for w in channels),
        num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=tuple(size // 2 ** i for i in attn_levels), dropout=float(c["dropout"]),
        in_ch=int(c["in_channels"]), out_ch=int(c["out_channels"]), gn_eps=float(c["norm_eps"]),
        gn_groups=int(c["norm_num_groups"]))


def config_from_network(net: NetworkConfig) -> dict:
    """The UNet2DModel config.json of our network (every field explicit)."""
    n = len(net.ch_mult)
    attn = [net.resolution // 2 ** i in net.attn_resolutions for i in range(n)]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": VERIFIED_VERSION,
        **{k: DEFAULTS[k] for k in ("center_input_sample", "time_embedding_type", "mid_block_type",
                                    "downsample_type", "upsample_type", "act_fn",
                                    "resnet_time_scale_shift", "add_attention", "class_embed_type",
                                    "num_class_embeds", "num_train_timesteps",
                                    "time_embedding_dim", "attn_norm_num_groups")},
        "sample_size": net.resolution, "in_channels": net.in_ch, "out_channels": net.out_ch,
        "freq_shift": 1, "flip_sin_to_cos": False,
        "down_block_types": [DOWN[a] for a in attn], "up_block_types": [UP[a] for a in attn[::-1]],
        "block_out_channels": [net.ch * m for m in net.ch_mult],
        "layers_per_block": net.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 0, "dropout": net.dropout, "attention_head_dim": None,
        "norm_num_groups": net.gn_groups, "norm_eps": net.gn_eps,
    }


SCHEDULER_REQUIRED = {"beta_schedule": "linear", "prediction_type": "epsilon", "trained_betas": None,
                      "rescale_betas_zero_snr": False}  # what our samplers assume
# diffusers' defaults of the fields a scheduler config may leave out (they happen to be DDPM's)
SCHEDULER_DEFAULTS = {**SCHEDULER_REQUIRED, "num_train_timesteps": 1000, "beta_start": 1e-4,
                      "beta_end": 0.02}


def check_scheduler(path: str, sampler: SamplerConfig) -> None:
    """The scheduler config must describe the schedule the sampler assumes: linear betas from
    beta_start to beta_end over num_timesteps steps, the network predicting epsilon."""
    c = _read_json(path)
    want = {**SCHEDULER_REQUIRED, "num_train_timesteps": sampler.num_timesteps}
    for field, value in want.items():
        got = c.get(field, SCHEDULER_DEFAULTS[field])
        if got != value:
            raise WeightsError(f"{path}: {field} {json.dumps(got)} cannot be honoured (the "
                               f"sampler needs {json.dumps(value)})")
    for field, value in (("beta_start", sampler.beta_start), ("beta_end", sampler.beta_end)):
        got = c.get(field, SCHEDULER_DEFAULTS[field])
        if not isinstance(got, (int, float)) or abs(got - value) > 1e-12:
            raise WeightsError(f"{path}: {field} {json.dumps(got)} cannot be honoured (the "
                               f"sampler needs {value:g})")


# -- tensor names and layouts -----------------------------------------------------------------------

_RENAMED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEAF = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}
_LAYER = {"norm1": "norm1", "norm2": "norm2", "conv1": "conv1", "conv2": "conv2",
          "temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
          "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_name(official: str, n_levels: int) -> str:
    """`down_1/attn_0/q/W` -> `down_blocks.1.attentions.0.to_q.weight` (up levels are numbered
    from the lowest resolution in diffusers, from the highest in DDPM)."""
    *scopes, leaf = official.split("/")
    head = scopes[0]
    if head == "temb":
        return f"time_embedding.linear_{int(scopes[1][-1]) + 1}.{_LEAF[leaf]}"
    if head in ("conv_in", "conv_out"):
        return f"{head}.{_LEAF[leaf]}"
    if head == "norm_out":
        return f"conv_norm_out.{_LEAF[leaf]}"
    if head == "mid":
        part = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[scopes[1]]
        return f"mid_block.{part}.{_LAYER[scopes[2]]}.{_LEAF[leaf]}"
    way, level = head.split("_")
    index = int(level) if way == "down" else n_levels - 1 - int(level)
    kind, _, j = scopes[1].partition("_")
    if kind in ("downsample", "upsample"):
        return f"{way}_blocks.{index}.{kind}rs.0.conv.{_LEAF[leaf]}"
    group = {"block": "resnets", "attn": "attentions"}[kind]
    return f"{way}_blocks.{index}.{group}.{j}.{_LAYER[scopes[2]]}.{_LEAF[leaf]}"


def modern_name(key: str) -> str:
    """Attention tensors of checkpoints saved before diffusers' 2023 attention refactor (most on
    the hub) under today's names, as diffusers itself renames them when it loads."""
    return re.sub(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.",
                  lambda m: f".attentions.{m.group(1)}.{_RENAMED_ATTENTION[m.group(2)]}.", key)


# -- reading and writing ---------------------------------------------------------------------------

def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """The folder's tensors by their diffusers names, and the file they came from."""
    safetensors, bin_file = os.path.join(folder, SAFETENSORS), os.path.join(folder, BIN)
    if fileio.exists(safetensors):
        from safetensors import SafetensorError
        from safetensors.numpy import load
        data = fileio.read_bytes(safetensors)
        try:
            return load(data), safetensors
        except KeyError:  # a dtype NumPy has not (safetensors' NumPy API: BF16)
            return _load_bfloat16(data, safetensors), safetensors
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{safetensors}: unreadable safetensors file ({cause(e)})") from None
    if fileio.exists(bin_file):
        try:
            import torch
        except ImportError:
            raise WeightsError(f"{bin_file}: reading a .bin file needs PyTorch (pip install torch)"
                               f"; a .safetensors file needs only the safetensors package") from None
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated or foreign files
            raise WeightsError(f"{bin_file}: unreadable PyTorch file ({cause(e)})") from None
        return {k: v.detach().float().numpy() for k, v in state.items()}, bin_file
    raise WeightsError(f"{folder}: no {SAFETENSORS} or {BIN} beside {CONFIG}")


_FLOATS = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def _load_bfloat16(data: bytes, path: str) -> dict[str, np.ndarray]:
    """A safetensors file with bfloat16 tensors (diffusers' torch_dtype=torch.bfloat16), as
    float32: its 8-byte header length, JSON header and raw tensors, per the safetensors format; a
    bfloat16 is the top half of a float32."""
    try:
        n = int.from_bytes(data[:8], "little")
        head = json.loads(data[8:8 + n])
        out = {}
        for name, t in head.items():
            if name == "__metadata__":
                continue
            raw = data[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]]
            if t["dtype"] == "BF16":
                bits = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
                out[name] = bits.view(np.float32).reshape(t["shape"])
            elif t["dtype"] in _FLOATS:
                out[name] = np.frombuffer(raw, _FLOATS[t["dtype"]]).astype(np.float32).reshape(
                    t["shape"])
            else:
                raise WeightsError(f"{path}: tensor {name} is {t['dtype']}, not a float")
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({cause(e)})") from None


def read_diffusers(path: str, sampler: SamplerConfig) -> Weights:
    """A UNet2DModel or pipeline folder as Weights under official names, with its network."""
    folder, scheduler = unet_folder(path)
    net = network_from_config(_read_json(os.path.join(folder, CONFIG)), os.path.join(folder, CONFIG))
    if scheduler:
        check_scheduler(scheduler, sampler)
    tensors, source = _read_tensors(folder)
    expected = {n: tuple(v.shape) for n, v in official_variables(UNet(net)).items()}
    by_key = {diffusers_name(n, len(net.ch_mult)): n for n in expected}
    params, extra, wrong, seen = {}, [], [], set()
    for key, value in tensors.items():
        official = by_key.get(modern_name(key))
        if official is None:
            extra.append(key)
            continue
        seen.add(official)
        value = from_torch_layout(official, value)
        if value.shape != expected[official]:
            wrong.append(f"{key} {list(np.shape(tensors[key]))}")
            continue
        params[official] = value
    missing = [k for k, n in by_key.items() if n not in seen]
    if missing or extra or wrong:
        raise WeightsError(f"{source} does not fit its {CONFIG}: "
                           f"{fit_report(missing, extra, wrong)}")
    return Weights(params, net.gn_eps, path, "diffusers", sha256=sha256_file(source),
                   network=net)


def write_diffusers(folder: str, params: dict[str, np.ndarray], net: NetworkConfig,
                    meta: dict[str, str] | None = None) -> list[str]:
    """config.json and diffusion_pytorch_model.safetensors of the network's weights (official
    names) into `folder`, each written atomically. Returns the file names."""
    from safetensors.numpy import save
    n = len(net.ch_mult)
    tensors = {diffusers_name(k, n): to_torch_layout(k, v, conv_1x1=k.endswith("nin_shortcut/W"))
               for k, v in params.items()}
    fileio.write_bytes(os.path.join(folder, SAFETENSORS), save(tensors, metadata=meta))
    fileio.write_json(os.path.join(folder, CONFIG), config_from_network(net))
    return [CONFIG, SAFETENSORS]


# -- the registry's interface (models/formats/__init__.py) ----------------------------------------
NAME = "diffusers"


def recognise(path: str) -> bool:
    return fileio.isdir(path) and is_diffusers_folder(path)


def read(path: str, cfg: DatasetConfig, ema: bool = True) -> Weights:
    return read_diffusers(path, cfg.sampler)


def locate(folder: str, cfg: DatasetConfig, role: str) -> list[str]:
    return ([] if role == "teacher" else [folder]) + [os.path.join(folder, cfg.name)]


def write(folder: str, model: UNet, meta: dict, replace: bool = False) -> list[str]:
    """Into a folder the caller made (eval.py export writes it whole, then renames it)."""
    params = {name: v.numpy() for name, v in official_variables(model).items()}
    return write_diffusers(folder, params, model.cfg, {k: str(v) for k, v in meta.items()})
