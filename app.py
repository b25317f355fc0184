"""Gradio app: FLUX.1 base model vs the impressionist LoRA, same seed, side by side.

Run ``python app.py`` (http://127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change it), or
deploy it as a Hugging Face Space with ``impressionist space`` (docs/sharing.md). Settings: the ``app`` section of
params.yaml, each overridable with ``IMPRESSIONIST_<KEY>``, e.g.
``IMPRESSIONIST_BASE_MODEL=black-forest-labs/FLUX.1-dev IMPRESSIONIST_LORA=your-name/impressionist-flux-lora``.
See docs/sharing.md.
"""

import sys
from pathlib import Path

try:  # ZeroGPU Spaces: `spaces` must be imported before torch sets up CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

# The package beside this file (a checkout, or the folder `impressionist space` writes) comes first,
# before any installed copy.
SRC = Path(__file__).resolve().parent / "src"
if (SRC / "impressionist").is_dir():
    sys.path.insert(0, str(SRC))

from impressionist.app import build_demo, describe, load_settings
from impressionist.errors import UserError

try:
    settings = load_settings()
    print(f"app: {describe(settings)}", flush=True)
    demo = build_demo(settings)
except UserError as err:  # one line, as every command of the project
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    demo.launch()
