"""The one base class of the errors a user can cause, and how such an error is shown.

Every layer raises its own subclass (unknown dataset, unusable weights, bad pair set, missing FID
files, ...); the entry points catch `UserError` alone and print it as one line (utils.cli.run).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder): reported as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (TensorFlow's run to pages), or its type's name."""
    text = (getattr(e, "message", None) or str(e)).strip()  # OpError.message: without node text
    return text.splitlines()[0] if text else type(e).__name__
