"""Fine-tune FLUX.1-dev with a LoRA on WikiArt Impressionist paintings, as a DVC stage graph."""

import logging

__version__ = "0.1.0"

# diffusers and peft import bitsandbytes when it is installed; on CPUs with AVX512-BF16 its CPU
# backend then warns at import that an optional Hub kernel is missing (it falls back to its own).
# Every stage would print that line, before its one-line errors too.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
