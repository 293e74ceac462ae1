"""CLI plumbing: quiet TensorFlow start-up and one-line errors (exit code 2, no traceback)."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


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


def writable_dir(path: str, label: str = "") -> str:
    """Create `path` if needed; a clear UserError if it is a file or cannot be written."""
    name = f"{label} {path}".strip()
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{name} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {name}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{name} is not writable")
    return path


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Call main; turn UserError (and unknown-dataset errors) into `error: ...` and exit 2."""
    from models.configs import UnknownDatasetError
    from models.weights import WeightsError
    from data.shards import PairSetError
    from utils.fid import FIDError
    try:
        code = main(argv)
    except (UserError, UnknownDatasetError, WeightsError, PairSetError, FIDError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
