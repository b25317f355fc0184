"""Train on Google Colab and survive runtime disconnects: everything a rerun needs lives on Drive.

A Colab runtime that disconnects comes back with an empty local disk, so the notebook
(``notebooks/train_colab.ipynb``) clones the repository again into fast local disk on every
session. What DVC needs to skip finished stages, and what training needs to resume, is kept in a
project folder on Google Drive instead (:class:`DriveLayout`):

- ``dvc-cache/``: the DVC cache (``dvc cache dir --local``). DVC copies every cached output into it
  as each stage finishes, so finished outputs are on Drive before ``dvc.lock`` says so.
- ``checkpoints/``: ``.cache/checkpoints`` (the trainer's checkpoint root, one folder per run
  hash) is a symlink to it, so each ``accelerator.save_state`` checkpoint is written straight to
  Drive.
- ``state/``: a mirror of ``dvc.lock`` and of the outs DVC does not cache (metrics, plots,
  ``dvclive/``), copied while the run goes on (:class:`StateMirror`) and restored into a fresh clone.
  ``dvc.lock`` is what tells DVC that a stage has finished; the run-cache cannot replace it, since
  DVC keeps no run-cache for stages with ``persist`` outs (download).
- ``logs/``: the full output of every run (the notebook's own output is lost with the runtime).
- ``recipe.json``: the recipe the first run chose for its GPU (:func:`keep_first_recipe`). A runtime
  after a disconnect may get another GPU; choosing afresh would change params that shape training
  (``model.dtype``, ``train.base_quantization``, ``train.optimizer``, ``train.mixed_precision``) and
  silently start training over, so later runs keep the first recipe's training params (memory
  settings follow the GPU at hand) or stop with one line when this GPU cannot run them.

The run writes the overrides into ``params.yaml`` exactly as ``dvc exp run -S`` would, then runs
``dvc repro --pull --allow-missing``: a finished stage whose outputs are only in the cache is skipped
without copying them back (``--allow-missing``), and a stage that has to run gets its missing inputs
checked out of the cache first (``--pull``; a resumed train needs only ``data/cache`` (its latents and text halves)).

Why ``dvc repro`` and not ``dvc exp run``: the run is one line of work per Drive project, not an
experiment to compare, and ``--pull --allow-missing`` skips finished stages whose outputs are only
on Drive. (Checkpoints would survive ``dvc exp run`` too: they are not a DVC output.)

Why not keep the whole working copy on Drive: Drive's FUSE mount is slow and unreliable with
thousands of small files in one folder (``data/raw/images``), git and DVC would keep their lock and
index files on it, and every output would be stored twice on Drive (workspace and cache).

Choices are functions, so they are tested: :func:`gpu_overrides` (which recipe for which GPU),
:func:`keep_first_recipe`, :class:`DriveLayout` (where things go on Drive), :func:`repro_command`,
:func:`state_paths`.

Local test mode: ``IMPRESSIONIST_COLAB_LOCAL=/some/folder`` makes that folder stand in for Google
Drive, skips the Hub login (no token) and the package installs, so the notebook runs headless
on CPU (``tests/test_colab.py``). ``IMPRESSIONIST_REPO=/path/to/checkout`` makes the notebook use
an existing checkout instead of cloning (its first cell reads it, before this package can be
imported).

The modules, in the order the notebook uses them:

- ``console``: the ``colab: ...`` progress lines, and a UserError as one line in the notebook.
- ``drive``: where the notebook runs (:func:`detect_environment`), the project folder on Drive
  (:class:`DriveLayout`, :func:`mount_drive`).
- ``gpu``: the runtime's GPU and RAM (:func:`detect_gpu`, :func:`system_ram_gib`).
- ``recipe``: GPU -> params overrides (:func:`gpu_overrides`, :func:`select_recipe`,
  :func:`keep_first_recipe`).
- ``hub_login``: the Hugging Face token (:func:`login`).
- ``state_mirror``: dvc.lock and the uncached outs mirrored to Drive (:class:`StateMirror`).
- ``working_copy``: the clone pointed at Drive (:func:`prepare`, :func:`link_checkpoints`).
- ``pipeline_run``: the overrides into params.yaml, then ``dvc repro`` (:func:`run`).
- ``results``: the sample grid and the metrics (:func:`show_results`).
"""

from __future__ import annotations

from .console import enable_one_line_errors
from .drive import ENV_LOCAL, DriveLayout, Environment, detect_environment, mount_drive
from .gpu import Gpu, detect_gpu, parse_nvidia_smi
from .hub_login import login
from .pipeline_run import apply_params, planned_params, repro_command, run
from .recipe import (CHECKPOINT_EVERY_BF16, CHECKPOINT_EVERY_NF4, Recipe, choose_recipe, gpu_overrides,
                     keep_first_recipe, select_recipe)
from .results import show_results
from .state_mirror import StateMirror, state_paths
from .working_copy import drop_incomplete_checkpoints, link_checkpoints, prepare

# What the notebook, the README and tests/test_colab.py use.
__all__ = [
    "CHECKPOINT_EVERY_BF16", "CHECKPOINT_EVERY_NF4", "ENV_LOCAL", "DriveLayout", "Environment", "Gpu", "Recipe",
    "StateMirror", "apply_params", "choose_recipe", "detect_environment", "detect_gpu",
    "drop_incomplete_checkpoints", "enable_one_line_errors", "gpu_overrides", "keep_first_recipe",
    "link_checkpoints", "login", "mount_drive", "parse_nvidia_smi", "planned_params", "prepare", "repro_command",
    "run", "select_recipe", "show_results", "state_paths",
]
