"""CLI plumbing: quiet TensorFlow start-up and one-line errors (exit code 2, no traceback)."""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import math
import os
import sys
from typing import Callable

from utils import fileio, precision
from utils.errors import UserError


def quiet_tensorflow() -> None:
    """Import TensorFlow without its C++ start-up chatter (CUDA probing on CPU-only machines).

    That chatter is written to file descriptor 2 before logging is configured, so it is hidden by
    pointing fd 2 at /dev/null for the import only; Python errors still surface afterwards. The C++
    log level is forced, not defaulted: at a user's common 2 (or 0, 1), TensorFlow's own notes
    (CUDA probing, oneDNN's DT_HALF, XLA start-up) read as errors of ours.
    """
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "tensorflow" in sys.modules:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def keep_freed_memory() -> None:
    """Ask glibc to serve large allocations from one heap and keep freed memory for reuse.

    By default it maps every block above 32 MB fresh from the OS and unmaps it when freed, and
    each thread allocating gets an arena of its own, where a block above 64 MB is always mapped
    fresh; the pair reader decodes whole shards into such blocks on tf.data's threads, so each
    was page-faulted in again. One arena and no trimming keep them (docs/performance.md has the
    reader's figures). The process keeps its peak memory instead of returning it. A no-op where
    the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 2 ** 31 - 1)


def writable_dir(path: str, label: str = "") -> str:
    """Create `path` if needed; a clear UserError if it is a file or cannot be written."""
    name = f"{label} {path}".strip()
    _check_output_dir(path, name)
    try:
        fileio.makedirs(path)
    except OSError as e:
        raise UserError(f"cannot create {name}: {e.strerror or e}") from None
    return path


def _check_output_dir(path: str, name: str) -> None:
    """UserError unless `path` is a writable folder or could be created as one (nothing is made).
    A `scheme://` path (any tf.io.gfile filesystem) is checked for an unknown scheme or a file in
    the way; whether it can be written shows at the first write."""
    if not fileio.is_local(path):
        try:
            if fileio.exists(path) and not fileio.isdir(path):
                raise UserError(f"{name} is a file, not a directory")
        except OSError as e:  # e.g. "File system scheme 'foo' not implemented"
            raise UserError(f"{name}: {str(e).split(': ', 1)[-1]}") from None
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{name} is a file, not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create {name}: {parent} is a file")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise UserError(f"{name} is not writable")


# -- argparse types: every flag checked where it is declared, before any work --------------------
# argparse reports their ArgumentTypeError as one line naming the flag (see Parser), exit code 2.

def _checked(parse: Callable[[str], float], kind: str, ok: Callable[[float], bool], rule: str
             ) -> Callable[[str], float]:
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return convert


positive_int = _checked(int, "an integer", lambda v: v > 0, "a positive integer")
nonneg_int = _checked(int, "an integer", lambda v: v >= 0, "an integer >= 0")
seed_int = _checked(int, "an integer", lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2^32)")
positive_float = _checked(float, "a number", lambda v: v > 0, "a positive number")
unit_interval = _checked(float, "a number", lambda v: 0 <= v < 1, "a number in [0, 1)")


def _path_type(check: Callable[[str], None]) -> Callable[[str], str]:
    def convert(path: str) -> str:
        if not path:
            raise argparse.ArgumentTypeError("empty path")
        try:
            check(path)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return path
    return convert


def _output_dir(path: str) -> None:
    _check_output_dir(path, path)


def _existing(is_kind: Callable[[str], bool], kind: str) -> Callable[[str], None]:
    def existing(path: str) -> None:
        if not is_kind(path):
            raise UserError(f"{path} is not a {kind}" if os.path.exists(path)
                            else f"{path} not found")
    return existing


def _weights_path(path: str) -> None:
    try:  # a file or folder on any tf.io.gfile filesystem, or the prefix of files (a checkpoint's)
        found = fileio.exists_or_prefix(path)
    except OSError as e:
        raise UserError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
    if not found:
        raise UserError(f"{path} not found")


def _new_file(path: str) -> None:
    if os.path.exists(path):
        raise UserError(f"{path} already exists; choose another name")
    folder = os.path.dirname(os.path.abspath(path))
    _check_output_dir(folder, folder)


output_dir = _path_type(_output_dir)  # a folder to write into: existing, or creatable
new_file = _path_type(_new_file)  # a file to create: not there yet, its folder creatable
existing_dir = _path_type(_existing(os.path.isdir, "directory"))
existing_file = _path_type(_existing(os.path.isfile, "file"))
existing_path = _path_type(_existing(os.path.exists, "file or folder"))
weights_path = _path_type(_weights_path)  # a weight file or folder, or a TF checkpoint prefix


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# -- override flags generated from a dataclass's fields ----------------------------------------
# A field whose metadata has "help" becomes `--NAME` (or `--{metadata["flag"]}`), default None:
# an unset flag keeps the configured value.

def _flag_fields(cls) -> list[tuple[dataclasses.Field, str]]:
    return [(f, f.metadata.get("flag") or f.name) for f in dataclasses.fields(cls)
            if "help" in f.metadata]


def add_flags(group, cls, choices: dict[str, tuple] | None = None) -> None:
    """Add an override flag to `group` for each flag field of the dataclass `cls`; `choices`
    gives the choices of fields whose values a table elsewhere lists (the losses)."""
    for f, name in _flag_fields(cls):
        group.add_argument(f"--{name}", dest=name, type=f.metadata.get("type"),
                           choices=(choices or {}).get(f.name, f.metadata.get("choices")),
                           help=f.metadata["help"])


def add_solver_flags(group, solvers: tuple[str, ...], spacings: tuple[str, ...],
                     default_steps: str) -> None:
    """The teacher's sampler flags, the same on training.py and eval.py (models.diffusion
    .choose_sampler turns them into a SamplerConfig)."""
    group.add_argument("--solver", choices=solvers, default=None,
                       help="the teacher's ODE solver: ddim (default: the paper's, the dataset's "
                            "steps and spacing) or dpmpp_2m (DPM-Solver++(2M), diffusers' default "
                            "sampler: the same images in about a third of the network calls)")
    group.add_argument("--solver_steps", type=positive_int, default=None, metavar="N",
                       help="the solver's timesteps = network calls (DDIM's quadratic spacing "
                            "skips its repeats: cifar10's 100 are 96 calls) (default: the "
                            f"dataset's for ddim; for dpmpp_2m {default_steps})")
    group.add_argument("--solver_spacing", choices=spacings, default=None,
                       help="where the timesteps lie: quadratic or uniform (DDIM's code, from "
                            "t = 800 or 980; default: the dataset's, the paper's map) or "
                            "linspace (diffusers' default, from t = 999)")


def overridden(args: argparse.Namespace, config):
    """`config` (a dataclass instance) with the fields whose flags were given replaced."""
    given = {f.name: getattr(args, name) for f, name in _flag_fields(type(config))
             if getattr(args, name, None) is not None}
    return dataclasses.replace(config, **given)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), like every other error here.
    No abbreviated flags: the entry points look for --bf16 before parsing (utils.precision)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """The entry points' wrapper: quiet TensorFlow, call main, turn any UserError (the base of
    every user-facing error) into one `error: ...` line with exit code 2."""
    keep_freed_memory()
    precision.prepare(sys.argv[1:] if argv is None else argv)  # before TensorFlow starts
    quiet_tensorflow()
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
