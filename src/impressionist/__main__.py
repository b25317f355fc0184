"""``python -m impressionist <stage> [options]``: the command of every dvc.yaml stage (see :mod:`.cli`)."""

from .cli import main

main()
