"""Fine-tune FLUX.1-dev with a LoRA on WikiArt Impressionist paintings, as a DVC stage graph."""

__version__ = "0.1.0"
