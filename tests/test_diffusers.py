"""diffusers folders in and out, against the real library: folders made by diffusers itself
(UNet2DModel.save_pretrained, DDPMPipeline.save_pretrained) with random weights, and diffusers'
own forward pass as the reference for ours; our exports loaded back by diffusers."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from models.configs import CONFIGS
from models.diffusion import student_fn
from models.formats.diffusers import network_from_config
from models.unet import count_parameters
from models.weights import WeightsError, load_unet, read_weights
from tests.helpers import run_main

pytestmark = pytest.mark.xdist_group("diffusers")

TINY = CONFIGS["tiny"]
DDPM_FAMILY = dict(time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
                   downsample_padding=0, attention_head_dim=None, act_fn="silu",
                   mid_block_scale_factor=1)
# google/ddpm-cifar10-32's unet config, as on the hub
CIFAR10_HUB = dict(DDPM_FAMILY, sample_size=32, block_out_channels=[128, 256, 256, 256],
                   layers_per_block=2, norm_eps=1e-6, norm_num_groups=32,
                   down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
# the tiny test network's shape (8x8x3, two levels, attention at 4x4) at another width
SMALL = dict(DDPM_FAMILY, sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
             norm_eps=1e-6, norm_num_groups=8, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "UpBlock2D"])
# three levels, one channel, attention at the lowest level with an explicit one-head dim
GREY = dict(DDPM_FAMILY, sample_size=16, in_channels=1, out_channels=1,
            block_out_channels=[16, 32, 32], layers_per_block=2, norm_eps=1e-5, norm_num_groups=8,
            attention_head_dim=32, dropout=0.1,
            down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
            up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 variance_type="fixed_large", clip_sample=True)


# PyTorch and diffusers are imported by the tests, not when pytest collects this module (seconds
# and hundreds of MB in every process that collects it); without them every test here is skipped.
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _needs_torch_and_diffusers(torch, diffusers):
    pass


def make_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DModel with random weights everywhere (no zero-initialised layers)."""
    import diffusers
    import torch
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                        + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    return unet


def theirs(unet, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
    return out.permute(0, 2, 3, 1).numpy()


def ours(model, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return model(x, t).numpy()


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-4) -> None:
    assert np.abs(a - b).max() <= rel * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()


def rename_to_pre_2023(folder) -> None:
    """Rewrite a saved UNet's attention tensors under the names the hub's older files use."""
    from safetensors.numpy import load_file, save_file
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for k, v in load_file(path).items():
        for new, before in old.items():
            k = k.replace(f".{new}.", f".{before}.")
        tensors[k] = v
    save_file(tensors, path)


@pytest.mark.parametrize("config,layout", [(SMALL, "safetensors"), (GREY, "pre-2023 names"),
                                           (SMALL, "bin"), (GREY, "pipeline")])
def test_our_forward_matches_diffusers_forward(tmp_path, config, layout, diffusers):
    unet = make_unet(config)
    folder = tmp_path / "unet"
    if layout == "pipeline":
        scheduler = diffusers.DDPMScheduler(**SCHEDULER)
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
        folder = tmp_path / "pipe"
        assert (folder / "model_index.json").exists() and (folder / "unet").is_dir()
    else:
        unet.save_pretrained(folder, safe_serialization=layout != "bin")
    if layout == "pre-2023 names":
        rename_to_pre_2023(folder)
        unet = diffusers.UNet2DModel.from_pretrained(folder).eval()  # diffusers renames them back
    net = network_from_config(dict(unet.config), "config")
    cfg = TINY.replace(network=dict(resolution=net.resolution, in_ch=net.in_ch, out_ch=net.out_ch))
    model, weights = load_unet(str(folder), cfg)
    assert weights.format == "diffusers" and model.cfg == net
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *net.image_shape)).astype(np.float32)
    for t in ([0, 999], [37, 500], [999, 999]):
        t = np.array(t, np.int64)
        assert_close(ours(model, x, t), theirs(unet, x, t))


def test_the_hubs_cifar10_config_is_the_cifar10_network(tmp_path):
    unet = make_unet(CIFAR10_HUB)
    unet.save_pretrained(tmp_path / "ddpm-cifar10-32")
    config = json.loads((tmp_path / "ddpm-cifar10-32" / "config.json").read_text())
    net = network_from_config(config, "config.json")
    assert net == CONFIGS["cifar10"].network.__class__(
        **{**CONFIGS["cifar10"].network.__dict__, "dropout": 0.0})  # dropout: a training setting
    model, _ = load_unet(str(tmp_path / "ddpm-cifar10-32"), CONFIGS["cifar10"])
    assert count_parameters(model) == sum(p.numel() for p in unet.parameters()) == 35_746_307
    x = np.random.default_rng(2).standard_normal((1, 32, 32, 3)).astype(np.float32)
    for t in (10, 999):
        t = np.array([t], np.int64)
        assert_close(ours(model, x, t), theirs(unet, x, t))


def test_export_loads_in_diffusers_and_round_trips_bit_for_bit(tiny_teacher, tmp_path, capsys,
                                                               torch, diffusers):
    out = tmp_path / "hf"
    code, stdout, err = run_main("eval", ["export", out, "tiny", "--model_dir", tiny_teacher,
                                          "--format", "diffusers"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["README.txt", "config.json",
                                       "diffusion_pytorch_model.safetensors"]
    readme = (out / "README.txt").read_text()
    assert "x0 = (z - unet(z, 999).sample).clamp(-1, 1)" in readme
    unet = diffusers.UNet2DModel.from_pretrained(out).eval()
    model, _ = load_unet(tiny_teacher, TINY)
    z = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():  # the README's lines
        x0 = (torch.from_numpy(z).permute(0, 3, 1, 2) - unet(torch.from_numpy(z).permute(0, 3, 1, 2),
                                                              999).sample).clamp(-1, 1)
    assert_close(x0.permute(0, 2, 3, 1).numpy(), np.clip(student_fn(model)(z).numpy(), -1, 1))
    code, _, err = run_main("eval", ["figures", tmp_path / "fig", "tiny", "--model_dir", out,
                                     "--n_images", "4", "--no-xla"], capsys)  # eval reads it back
    assert code == 0 and (tmp_path / "fig" / "tiny_figure_0.png").exists(), err
    again = read_weights(str(out), TINY)
    before = read_weights(tiny_teacher, TINY)
    assert again.params.keys() == before.params.keys()
    for name, value in before.params.items():
        assert again.params[name].tobytes() == value.tobytes(), name
    code, _, err = run_main("eval", ["export", tmp_path / "x", "tiny", "--model_dir", tiny_teacher,
                                     "--format", "diffusers", "--tflite", "int8"], capsys)
    assert code == 2 and "--tflite applies to --format tf only" in err


def test_the_network_travels_with_the_weights(tmp_path, capsys):
    make_unet(SMALL).save_pretrained(tmp_path / "wide")
    model, _ = load_unet(str(tmp_path / "wide"), TINY)  # tiny's image shape, twice its width
    assert model.cfg.ch == 32 and TINY.network.ch == 16
    with pytest.raises(WeightsError, match="makes 8x8x3 images; cifar10 needs 32x32x3"):
        load_unet(str(tmp_path / "wide"), CONFIGS["cifar10"])
    code, out, err = run_main("models.convert", ["--dataset", "tiny", tmp_path / "wide",
                                                 tmp_path / "converted"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "converted" / "weights.json").read_text())
    assert meta["network"]["ch"] == 32 and meta["source_format"] == "diffusers"
    model, weights = load_unet(str(tmp_path / "converted"), TINY)
    assert model.cfg.ch == 32 and weights.network.ch == 32


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for k, v in changes.items():
        if v is KeyError:
            config.pop(k)
        else:
            config[k] = v
    path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
    from safetensors.numpy import load_file, save_file
    path = str(folder / "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


BAD_CONFIGS = [
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos true is outside the DDPM family"),
    (dict(freq_shift=0), "freq_shift 0 is outside"),
    (dict(attention_head_dim=KeyError), "attention_head_dim 8 is outside"),  # absent: 8 heads
    (dict(attention_head_dim=8), "attention_head_dim 8 is outside"),
    (dict(downsample_padding=1), "downsample_padding 1 is outside"),
    (dict(class_embed_type="timestep"), 'class_embed_type "timestep" is outside'),
    (dict(num_class_embeds=10), "num_class_embeds 10 is outside"),
    (dict(time_embedding_type="fourier"), 'time_embedding_type "fourier" is outside'),
    (dict(resnet_time_scale_shift="scale_shift"), 'resnet_time_scale_shift "scale_shift"'),
    (dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"]),
     'down_block_types[1] "CrossAttnDownBlock2D" is outside'),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), 'up_block_types[0] "UpBlock2D" is outside'),
    (dict(_class_name="UNet2DConditionModel"), '_class_name "UNet2DConditionModel" is outside'),
    (dict(cross_attention_dim=768), "unknown field cross_attention_dim 768"),
]
BAD_TENSORS = [
    (lambda t: t.pop("conv_in.bias"), "1 missing: conv_in.bias"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "1 not in the network: extra"),
    (lambda t: t.update({"conv_out.weight": np.zeros((3, 32, 1, 1), np.float32)}),
     "1 misshapen: conv_out.weight [3, 32, 1, 1]"),
]
BAD_SCHEDULERS = [
    (dict(beta_schedule="squaredcos_cap_v2"), 'beta_schedule "squaredcos_cap_v2" cannot be honoured'),
    (dict(prediction_type="v_prediction"), 'prediction_type "v_prediction" cannot be honoured'),
    (dict(num_train_timesteps=4000), "num_train_timesteps 4000 cannot be honoured"),
    (dict(beta_end=0.012), "beta_end 0.012 cannot be honoured"),
]


def test_what_we_cannot_honour_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    good = tmp_path / "good"
    make_unet(SMALL).save_pretrained(good)
    cases = [(lambda f, c=c: _edit_config(f, **c), m) for c, m in BAD_CONFIGS]
    cases += [(lambda f, e=e: _edit_tensors(f, e), m) for e, m in BAD_TENSORS]
    cases += [(lambda f, c=c: (f / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, **c})),
               m) for c, m in BAD_SCHEDULERS]

    def truncate(f):
        path = f / "diffusion_pytorch_model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    cases.append((truncate, "unreadable safetensors file (incomplete or corrupt)"))
    for i, (spoil, message) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        shutil.copytree(good, folder)
        spoil(folder)
        out = tmp_path / f"out{i}"
        code, _, err = run_main("models.convert", ["--dataset", "tiny", folder, out], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (message, err)
        assert not out.exists()


def test_a_bfloat16_folder_is_read_as_float32(tmp_path, torch):
    """diffusers saves torch_dtype=torch.bfloat16 models with BF16 tensors, which safetensors'
    NumPy API cannot hold: they are widened to float32 (a bfloat16 is a float32's top half)."""
    unet = make_unet(SMALL)
    unet.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    weights = read_weights(str(tmp_path / "bf16"), TINY)
    state = {k: v.float().numpy() for k, v in unet.state_dict().items()}
    np.testing.assert_array_equal(weights.params["conv_in/W"],
                                  state["conv_in.weight"].transpose(2, 3, 1, 0))
    assert all(v.dtype == np.float32 for v in weights.params.values())
