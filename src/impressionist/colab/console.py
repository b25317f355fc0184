"""What the notebook prints: progress as ``colab: ...`` lines, and a UserError as one line."""

from __future__ import annotations

import sys

from ..errors import UserError


def say(message: str) -> None:
    print(f"colab: {message}", flush=True)


def enable_one_line_errors() -> None:
    """In a notebook, show a UserError as one ``error: ...`` line instead of a traceback (the
    cell still fails, so "Run all" stops there)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def handler(shell, etype, value, tb, tb_offset=None):
        print(f"error: {value}", file=sys.stderr)

    shell.set_custom_exc((UserError,), handler)
