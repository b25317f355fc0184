"""Where the stages read and write (see docs/layout.md and dvc.yaml): one definition per path.

Paths are relative to the repository root, where DVC runs every stage. A path or manifest name that
more than one module reads or writes is defined here and imported, never spelled again.
"""

from pathlib import Path

RAW_DIR = Path("data/raw")
IMAGES_SUBDIR = "images"  # in RAW_DIR and FILTERED_DIR: the image files, <id>.<ext> (sidecar captions beside)
FILTERED_DIR = Path("data/filtered")
DESCRIPTIONS_DIR = Path("data/descriptions")  # describe: one VLM description per filtered image
DESCRIPTIONS = DESCRIPTIONS_DIR / "descriptions.parquet"
DESCRIBE_METRICS = Path("metrics/describe.json")
CAPTIONS_DIR = Path("data/captions")
CAPTIONS = CAPTIONS_DIR / "captions.parquet"
CACHE_DIR = Path("data/cache")                # encode's two outs, each its own DVC stage:
LATENT_CACHE_DIR = CACHE_DIR / "latents"      # encode_latents: VAE latents (data/filtered, encode.*)
TEXT_CACHE_DIR = CACHE_DIR / "text"           # encode_text: text embeddings (data/captions)
REFERENCE_DIR = Path("data/reference")  # the real paintings' evaluation features
LORA_DIR = Path("models/lora")
REPLICATES_DIR = Path("models/replicates")  # <k>/: replicate k >= 1 of the recipe (replicates.count)
REPLICATES_MANIFEST = "replicates.json"     # in REPLICATES_DIR and SAMPLES_REPLICATES_DIR: count and seeds
# The file name FluxPipeline.save_lora_weights writes and load_lora_weights looks for.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SAMPLES_DIR = Path("samples")
SAMPLES_TABLE = "samples.csv"  # in each folder the sample stages write: one row per drawn image
SAMPLES_REPLICATES_DIR = SAMPLES_DIR / "replicates"  # <k>/: replicate k's evaluation set
EVAL_SET_TABLE = "eval.csv"  # in samples/base and samples/lora: the evaluation set (sample writes, evaluate reads)
PLOTS_DIR = Path("plots")
SAMPLE_GRID = PLOTS_DIR / "samples_grid.png"
EVAL_METRICS = Path("metrics/eval.json")
EVAL_IMAGES = Path("metrics/eval_images.csv")  # per-image scores: pairs commits in the PR report
EVAL_REPLICATES = Path("metrics/eval_replicates.csv")  # every training replicate's LoRA per-image scores
EXPORT_DIR = Path("models/export")
EXPORT_MANIFEST = "export.json"              # in EXPORT_DIR: names the exported files and their sizes
TRAINING_CONFIG = "training_config.json"     # in LORA_DIR: the params and base-model commit of the run
DVC_PIPELINE = Path("dvc.yaml")
# A resumable stage's progress (download in data/raw/.partial, describe's raw-description cache):
# the rows done so far, one JSON object per line, and the position to resume from.
RESUME_ROWS, RESUME_STATE = "rows.jsonl", "state.json"
CHECKPOINT_ROOT = Path(".cache/checkpoints")  # git- and DVC-ignored; <run hash>/step-NNNNNNNN inside
DOWNLOAD_METRICS = Path("metrics/download.json")
DATA_METRICS = Path("metrics/data.json")
DATA_ARTISTS_PLOT = PLOTS_DIR / "data_artists.png"
TRAIN_METRICS = Path("metrics/train.json")
LOSS_PLOT = PLOTS_DIR / "loss.png"
CAPTION_METRICS = Path("metrics/captions.json")
CAPTION_LENGTHS_PLOT = PLOTS_DIR / "caption_lengths.png"
