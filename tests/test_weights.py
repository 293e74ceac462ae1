"""Weight import from files written in the official formats by independent fixtures
(tests/reference), checked tensor by tensor and by an independent NumPy forward pass."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from models.configs import CONFIGS
from models.unet import UNet, official_variables
from models.weights import (ORIGINAL_GN_EPS, WeightsError, load_unet, read_weights,
                            save_converted)
from tests.reference.official import (numpy_forward, official_variable_shapes, random_params,
                                      write_ddim_pth, write_ddpm_tf1_checkpoint)
from tests.helpers import run_main
from tests.reference.original_h5 import write_original_h5

# One worker runs this module (make test: --dist loadgroup): the TF1 checkpoint is a module fixture.
pytestmark = pytest.mark.xdist_group("weights")
TINY = CONFIGS["tiny"]
NET = TINY.network
SHAPES = official_variable_shapes(NET.ch, NET.ch_mult, NET.num_res_blocks, NET.attn_resolutions,
                                  NET.resolution)
RAW, EMA = random_params(SHAPES, seed=1), random_params(SHAPES, seed=2)


def reference_output(params, gn_eps):
    x = np.random.default_rng(5).standard_normal((2, *NET.image_shape)).astype(np.float32)
    t = np.array([999, 37])
    ref = numpy_forward(params, x, t, ch=NET.ch, ch_mult=NET.ch_mult,
                        num_res_blocks=NET.num_res_blocks, attn_resolutions=NET.attn_resolutions,
                        groups=NET.gn_groups, gn_eps=gn_eps)
    return x, t, ref


def assert_holds(model, params):
    ours = official_variables(model)
    assert set(ours) == set(params)
    for name, value in params.items():
        np.testing.assert_array_equal(ours[name].numpy(), value, err_msg=name)


def assert_forward_matches(model, params, gn_eps):
    x, t, ref = reference_output(params, gn_eps)
    np.testing.assert_allclose(model(tf.constant(x), tf.constant(t)).numpy(), ref, atol=1e-4)


@pytest.fixture(scope="module")
def tf1_ckpt(tmp_path_factory):
    return write_ddpm_tf1_checkpoint(str(tmp_path_factory.mktemp("ddpm") / "model.ckpt"), RAW, EMA,
                                     step=790000)


def test_ddpm_tf1_loads_ema_by_name_and_matches_numpy_forward(tf1_ckpt):
    model, w = load_unet(tf1_ckpt, TINY)
    assert_holds(model, EMA)
    assert w.step == 790000 and w.ema and w.gn_eps == 1e-6
    assert any(n.endswith("/Adam") for n in w.ignored) and "global_step" not in w.params
    assert_forward_matches(model, EMA, gn_eps=1e-6)


def test_ddpm_tf1_raw_weights_on_request(tf1_ckpt):
    model, w = load_unet(os.path.dirname(tf1_ckpt), TINY, ema=False)  # a folder works too
    assert_holds(model, RAW)
    assert w.ema is False


def test_ddim_pth_loads_ema_and_matches_numpy_forward(tmp_path):
    pytest.importorskip("torch")
    path = write_ddim_pth(str(tmp_path / "ckpt.pth"), RAW, EMA)
    model, w = load_unet(path, TINY.replace(family="ddim"))
    assert_holds(model, EMA)
    assert_forward_matches(model, EMA, gn_eps=1e-6)
    raw_model, _ = load_unet(path, TINY, ema=False)
    assert_holds(raw_model, RAW)


def test_ddim_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(WeightsError, match="pip install torch"):
        read_weights(str(tmp_path / "ckpt.pth"), TINY)


@pytest.mark.parametrize("family", ["ddpm", "ddim"])
@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_original_h5_lands_by_creation_order(tmp_path, family, kind):
    path = str(tmp_path / f"{kind}.h5")
    placed = write_original_h5(path, EMA, family=family, kind=kind)
    model, w = load_unet(path, TINY.replace(family=family))
    assert w.gn_eps == ORIGINAL_GN_EPS == 1e-3 and model.cfg.gn_eps == 1e-3
    assert_holds(model, EMA)
    assert len(placed) == len(SHAPES)
    assert_forward_matches(model, EMA, gn_eps=1e-3)


def test_original_h5_of_the_other_family_is_rejected(tmp_path):
    path = str(tmp_path / "student.h5")
    write_original_h5(path, EMA, family="ddim", kind="student")
    with pytest.raises(WeightsError, match="does not fit"):
        load_unet(path, TINY)  # read in DDPM order: kinds or shapes disagree


def test_convert_cli_records_provenance_and_round_trips(tf1_ckpt, tmp_path, capsys):
    # in this process (run_main); tests/test_bad_input.py checks the real process's exit and stderr
    out = str(tmp_path / "converted")
    argv = ["--dataset", "tiny", tf1_ckpt, out]
    code, _, err = run_main("models.convert", argv, capsys)
    assert code == 0, err
    model, w = load_unet(out, TINY)
    assert_holds(model, EMA)
    assert (w.format, w.ema, w.step, w.dataset) == ("converted", True, 790000, "tiny")
    assert len(w.sha256) == 64 and w.source == tf1_ckpt
    before = sorted(os.listdir(out))
    code, _, err = run_main("models.convert", argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert "already holds" in err and sorted(os.listdir(out)) == before


def test_converted_checkpoint_of_another_dataset_is_rejected(tmp_path):
    model = UNet(NET)
    save_converted(model, str(tmp_path / "c"), {"dataset": "tiny"})
    with pytest.raises(WeightsError, match="holds tiny weights, not cifar10"):
        load_unet(str(tmp_path / "c"), CONFIGS["cifar10"])


def test_wrong_dataset_names_the_variables(tf1_ckpt):
    net = CONFIGS["cifar10"].network
    big = official_variable_shapes(net.ch, net.ch_mult, net.num_res_blocks, net.attn_resolutions,
                                   net.resolution)
    missing = [n for n in big if n not in SHAPES]
    with pytest.raises(WeightsError) as e:
        load_unet(tf1_ckpt, CONFIGS["cifar10"])
    assert f"{len(missing)} missing: " in str(e.value)
    assert str(e.value).split(" missing: ")[1].split(",")[0] in missing
    tiny_w, big_w = SHAPES["temb/dense0/W"], big["temb/dense0/W"]  # (ch, 4 ch) in each network
    assert f"misshapen: temb/dense0/W {tuple(tiny_w)} vs {tuple(big_w)}" in str(e.value)


def test_h5_of_another_dataset_reports_counts(tmp_path):
    path = str(tmp_path / "s.h5")
    write_original_h5(path, EMA, family="ddpm", kind="student")
    with pytest.raises(WeightsError, match="another dataset"):
        load_unet(path, CONFIGS["cifar10"])


def _truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def test_truncated_files_give_clear_errors(tf1_ckpt, tmp_path):
    import shutil
    folder = tmp_path / "ddpm"
    shutil.copytree(os.path.dirname(tf1_ckpt), folder)
    prefix = str(folder / os.path.basename(tf1_ckpt))
    _truncate(prefix + ".data-00000-of-00001")
    with pytest.raises(WeightsError, match="checkpoint"):
        load_unet(prefix, TINY)

    h5 = str(tmp_path / "s.h5")
    write_original_h5(h5, EMA, family="ddpm", kind="student")
    _truncate(h5)
    with pytest.raises(WeightsError, match="unreadable Keras h5"):
        load_unet(h5, TINY)

    with pytest.raises(WeightsError, match="not found"):
        load_unet(str(tmp_path / "nothing.ckpt"), TINY)


def test_corrupt_pth_gives_clear_error(tmp_path):
    pytest.importorskip("torch")
    path = write_ddim_pth(str(tmp_path / "ckpt.pth"), RAW, EMA)
    _truncate(path)
    with pytest.raises(WeightsError, match="unreadable PyTorch"):
        load_unet(path, TINY)


@pytest.mark.parametrize("index_file", ["missing", "foreign", "stale copy"])
def test_tf1_folder_is_found_without_trusting_its_checkpoint_file(tf1_ckpt, tmp_path, index_file,
                                                                  caplog):
    import shutil
    folder = tmp_path / "diffusion_cifar10_model"
    shutil.copytree(os.path.dirname(tf1_ckpt), folder)
    if index_file == "missing":
        os.remove(folder / "checkpoint")
    elif index_file == "foreign":  # as in the official release: the authors' own machine
        (folder / "checkpoint").write_text(
            'model_checkpoint_path: "/home/authors/diffusion/cifar10/model.ckpt-790000"\n')
    # "stale copy": the copy's index file still names the original folder (still there)
    model, w = load_unet(str(folder), TINY)
    assert_holds(model, EMA)
    assert w.source == str(folder / os.path.basename(tf1_ckpt)) and w.step == 790000
    assert not [r for r in caplog.records if r.name.startswith("tensorflow")]


def test_tf1_folder_with_several_checkpoints_names_them(tmp_path):
    folder = tmp_path / "run"
    write_ddpm_tf1_checkpoint(str(folder / "model.ckpt"), RAW, EMA, step=10, with_adam=False,
                              also_steps=[20])  # one TF1 graph, saved at steps 10 and 20
    with pytest.raises(WeightsError) as e:
        load_unet(str(folder), TINY)
    assert str(e.value) == (f"{folder} holds 2 checkpoints (model.ckpt-10, model.ckpt-20); "
                            f"pass one, e.g. {folder / 'model.ckpt-20'}")
    model, _ = load_unet(str(folder / "model.ckpt-10"), TINY)
    assert_holds(model, EMA)


def test_errors_under_a_long_path_are_short_and_whole(tf1_ckpt, tmp_path, recwarn):
    import shutil
    folder = tmp_path / ("a_long_folder_name_" * 12)  # the libraries' messages repeat the path
    shutil.copytree(os.path.dirname(tf1_ckpt), folder)
    prefix = str(folder / os.path.basename(tf1_ckpt))
    os.remove(prefix + ".data-00000-of-00001")
    with pytest.raises(WeightsError) as e:
        load_unet(prefix, TINY)
    assert str(e.value) == f"{prefix}: unreadable TF checkpoint (incomplete or corrupt)"
    (folder / "model.ckpt-790000.index").write_bytes(b"")
    with pytest.raises(WeightsError) as e:
        load_unet(str(folder), TINY)
    assert str(e.value) == f"{folder}: unreadable TF checkpoint (incomplete or corrupt)"
    h5 = folder / "s.h5"
    h5.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError) as e:
        load_unet(str(h5), TINY)
    assert str(e.value) == f"{h5}: unreadable Keras h5 file (incomplete or corrupt)"
    if importlib.util.find_spec("torch"):
        import pickle
        pth = folder / "ckpt.pth"
        pth.write_bytes(pickle.dumps(object, protocol=4))  # torch warns about the protocol
        with pytest.raises(WeightsError) as e:
            load_unet(str(pth), TINY)
        assert str(e.value) == f"{pth}: unreadable PyTorch checkpoint (incomplete or corrupt)"
    assert not recwarn.list


def test_the_teacher_search_goes_through_every_format_and_skips_what_is_not_one(tmp_path,
                                                                                monkeypatch):
    """models.weights.find_teacher: the official release's layout in the default folders, found
    through the format registry; a folder of several checkpoints is passed over, not an error;
    weights lying loose in a default folder are nobody's teacher."""
    from models import weights
    cifar10 = CONFIGS["cifar10"]
    dirs = [str(tmp_path / d) for d in ("teachers", "official_models", "Original_Models")]
    monkeypatch.setattr(weights, "DEFAULT_TEACHER_DIRS", tuple(dirs))
    with pytest.raises(WeightsError, match="diffusion_cifar10_model/model.ckpt-790000") as e:
        weights.find_teacher(cifar10)
    assert "model_tf2_cifar10.h5" in str(e.value) and "\n" not in str(e.value)
    several = tmp_path / "teachers" / "cifar10"
    several.mkdir(parents=True)
    for name in ("a.index", "b.index"):
        (several / name).write_bytes(b"")
    save_converted(UNet(TINY.network), str(tmp_path / "teachers" / "loose"), {"dataset": "tiny"})
    official = tmp_path / "official_models" / "diffusion_cifar10_model"
    official.mkdir(parents=True)
    (official / "model.ckpt-790000.index").write_bytes(b"")
    assert weights.find_teacher(cifar10) == str(official / "model.ckpt-790000")
    h5 = tmp_path / "Original_Models" / "model_tf2_celeba.h5"
    h5.parent.mkdir()
    h5.write_bytes(b"")
    assert weights.find_teacher(CONFIGS["celeba"]) == str(h5)
