"""Where the notebook runs (Colab or local test mode) and the project folder on Drive."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .console import say

ENV_LOCAL = "IMPRESSIONIST_COLAB_LOCAL"  # a folder standing in for Drive: local test mode
DRIVE_MOUNT = Path("/content/drive")
DRIVE_HOME = DRIVE_MOUNT / "MyDrive"
DEFAULT_PROJECT = "impressionist"


@dataclass(frozen=True)
class Environment:
    """Where the notebook runs: on Colab with Google Drive, or in local test mode."""

    on_colab: bool
    drive_root: Path  # MyDrive on Colab; the IMPRESSIONIST_COLAB_LOCAL folder in test mode

    @property
    def local_test(self) -> bool:
        return not self.on_colab


def detect_environment(environ: dict[str, str] | None = None) -> Environment:
    environ = os.environ if environ is None else environ
    local = environ.get(ENV_LOCAL, "").strip()
    if local:
        return Environment(on_colab=False, drive_root=Path(local).expanduser().resolve())
    try:
        importlib.import_module("google.colab")  # only a Colab runtime has it
    except ImportError:
        raise UserError(f"this is not a Google Colab runtime; to try the notebook elsewhere set "
                        f"{ENV_LOCAL}=/a/folder (it stands in for Google Drive, no Hub login)") from None
    return Environment(on_colab=True, drive_root=DRIVE_HOME)


@dataclass(frozen=True)
class DriveLayout:
    """The project folder on Drive and what each subfolder holds (see the package docstring)."""

    root: Path

    @classmethod
    def under(cls, drive_root: Path | str, project: str = DEFAULT_PROJECT) -> "DriveLayout":
        if not project or Path(project).is_absolute() or ".." in Path(project).parts:
            raise UserError(f"PROJECT={project!r} must be a folder name inside your Drive, e.g. "
                            f"{DEFAULT_PROJECT!r}")
        return cls(Path(drive_root) / project)

    @property
    def dvc_cache(self) -> Path:
        return self.root / "dvc-cache"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def recipe(self) -> Path:
        """The first run's recipe (:func:`keep_first_recipe`); beside ``state/``, which mirrors repo files."""
        return self.root / "recipe.json"

    def create(self) -> "DriveLayout":
        for folder in (self.dvc_cache, self.checkpoints, self.state, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def mount_drive(env: Environment, project: str = DEFAULT_PROJECT) -> DriveLayout:
    """Mount Google Drive (Colab asks for permission once) and create the project folder."""
    if env.on_colab and not DRIVE_HOME.is_dir():
        from google.colab import drive

        drive.mount(str(DRIVE_MOUNT))
    elif env.local_test:
        env.drive_root.mkdir(parents=True, exist_ok=True)
    layout = DriveLayout.under(env.drive_root, project).create()
    say(f"project folder {layout.root} ({'Google Drive' if env.on_colab else 'local test mode'})")
    return layout
