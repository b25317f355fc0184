"""Fine-tune FLUX.1-dev with a LoRA on WikiArt Impressionist paintings, as a DVC stage graph."""

import logging

__version__ = "0.1.0"

# diffusers and peft import bitsandbytes when it is installed; on CPUs with AVX512-BF16 its CPU
# backend then warns at import that an optional Hub kernel is missing (it falls back to its own).
# Every stage would print that line, before its one-line errors too.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _DropTorchaoImportNoise(logging.Filter):
    """The three lines importing diffusers prints when torchao (the fp8 path) is installed, and
    only those: torchao 0.18 registers two of its Enums as pytree constants, which torch 2.14 calls
    deprecated (one warning each), and diffusers 0.42 looks for torchao tensor classes where older
    torchao kept them, to allow-list them for loading torchao-serialised checkpoints, which this
    project never loads (fp8 quantises a 16-bit model as it loads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torch.utils._pytree":
            subject = record.args[0] if isinstance(record.args, tuple) and record.args else None
            return not (str(record.msg).startswith("%s is an Enum subclass")
                        and getattr(subject, "__module__", "").startswith("torchao."))
        return not record.getMessage().startswith("Unable to import `torchao` Tensor objects")


for _logger in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_logger).addFilter(_DropTorchaoImportNoise())
