"""What every benchmark script does with its table: print it and append it to a results file."""

from __future__ import annotations

import sys
from pathlib import Path


def command_line(script: str) -> str:
    """The command as the user typed it, for the table's provenance line."""
    return " ".join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]])


def publish(text: str, out: str | None) -> None:
    print(text)
    if out:
        with open(out, "a") as handle:
            handle.write("\n" + text)
