"""Gradio app: FLUX.1 base model vs the impressionist LoRA, same seed, side by side.

Run ``python app.py`` (http://127.0.0.1:7860; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change it), or
push this repository to a Hugging Face Space with a GPU. Settings: the ``app`` section of
params.yaml, each overridable with ``IMPRESSIONIST_<KEY>``, e.g.
``IMPRESSIONIST_BASE_MODEL=black-forest-labs/FLUX.1-dev IMPRESSIONIST_LORA=your-name/impressionist-flux-lora``.
See docs/sharing.md.
"""

import sys
from pathlib import Path

try:
    import impressionist  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # a Space runs this file from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

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
