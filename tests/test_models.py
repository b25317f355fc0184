"""Model resolution: the tiny builtin pipeline and the refusals for Hub, GPU and bad folders."""

import json

import pytest
import torch

from impressionist.errors import UserError
from impressionist.models import load_pipeline, resolve_device, resolve_pretrained
from impressionist.params.model import BUILTIN_TINY_FLUX, ModelParams
from impressionist.tiny_flux import VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR


def test_tiny_flux_is_a_diffusers_folder_with_flux_constants(tiny_flux_dir):
    index = json.loads((__import__("pathlib").Path(tiny_flux_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    pipe = load_pipeline(tiny_flux_dir, torch.float32)
    assert pipe.vae.config.shift_factor == VAE_SHIFT_FACTOR == 0.1159
    assert pipe.vae.config.scaling_factor == VAE_SCALING_FACTOR == 0.3611
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.guidance_embeds
    # tokenizer special ids agree with the text encoder config
    assert pipe.tokenizer.eos_token_id == pipe.text_encoder.config.eos_token_id
    assert pipe.tokenizer_2.model_max_length == 512


def test_tiny_flux_is_deterministic_and_samples(tiny_flux_dir):
    pipe = load_pipeline(tiny_flux_dir, torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe("a harbor", height=32, width=48, num_inference_steps=2, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    first, second = draw(), draw()
    assert first.shape == (1, 32, 48, 3)
    assert (first == second).all()


def test_builtin_build_is_reused(tiny_flux_dir, monkeypatch):
    from impressionist import tiny_flux

    monkeypatch.setattr(tiny_flux, "save_tiny_flux", lambda folder: pytest.fail("rebuilt"))
    assert resolve_pretrained(BUILTIN_TINY_FLUX) == tiny_flux_dir


def test_building_the_tiny_model_leaves_the_global_rng_alone():
    from impressionist.tiny_flux import build_tiny_flux_pipeline

    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_flux_pipeline()
    assert torch.equal(torch.rand(4), expected)


def test_hub_model_without_network_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as err:
        resolve_pretrained("black-forest-labs/FLUX.1-dev")
    message = str(err.value)
    assert "\n" not in message
    assert "HF_TOKEN" in message and "impressionist demo" in message


def test_local_folder_must_be_a_pipeline(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        resolve_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="builtin"):
        resolve_pretrained("builtin:huge-flux")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(UserError, match="no CUDA GPU.*impressionist demo"):
        resolve_device(ModelParams(pretrained=BUILTIN_TINY_FLUX, device="cuda"))
    assert resolve_device(ModelParams(pretrained=BUILTIN_TINY_FLUX, device="cpu")).type == "cpu"


def test_model_params_declare_defaults_and_reject_typos():
    model = ModelParams.check({"model": {"pretrained": BUILTIN_TINY_FLUX}})
    assert (model.revision, model.dtype, model.device) == (None, "bfloat16", "cuda")
    with pytest.raises(UserError, match="'model.dtpye' is not a setting of 'model'"):
        ModelParams.check({"model": {"pretrained": BUILTIN_TINY_FLUX, "dtpye": "float32"}})
    with pytest.raises(UserError, match="model.dtype='fp8' is not one of"):
        ModelParams.check({"model": {"pretrained": BUILTIN_TINY_FLUX, "dtype": "fp8"}})
    with pytest.raises(UserError, match="'model.pretrained' is missing"):
        ModelParams.check({"model": {"dtype": "float32"}})
    with pytest.raises(UserError, match="no 'model' section"):
        ModelParams.check({})


def test_importing_the_libraries_prints_nothing():
    """Stage errors are one line: nothing the libraries log at import may come before them
    (bitsandbytes' CPU backend warns about an optional kernel on AVX512-BF16 machines; with
    torchao installed, torch warns twice about its Enums and diffusers misses its old classes)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import impressionist, peft, bitsandbytes, torchao.float8, "
                             "torchao.quantization; from diffusers import FluxPipeline"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stderr == ""


LONG_PROMPT = " ".join(["a harbor at sunset with boats and gulls"] * 12)  # far beyond CLIP's 77 tokens


@pytest.fixture
def library_messages():
    """What diffusers and transformers log (their loggers do not propagate to pytest's caplog)."""
    import logging

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

        def take(self) -> str:
            text, self.lines = "\n".join(self.lines), []
            return text

    recorder = Recorder()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(recorder)
    yield recorder
    for logger in loggers:
        logger.removeHandler(recorder)


def test_clip_truncation_dump_is_silenced_in_encode_prompts(tiny_flux_dir, library_messages):
    """diffusers logs the text CLIP drops (FLUX's CLIP sees 77 tokens by design); our calls do not."""
    from impressionist.models import encode_prompts, load_text_pipeline

    pipe = load_text_pipeline(tiny_flux_dir, torch.float32)
    pipe.encode_prompt(prompt=[LONG_PROMPT], prompt_2=None, max_sequence_length=32)  # the plain call...
    assert "truncated because CLIP" in library_messages.take()  # ...is noisy: the noise this guards

    batches = list(encode_prompts(tiny_flux_dir, torch.float32, torch.device("cpu"), [LONG_PROMPT], 32))
    assert batches[0][0].shape[0] == 1
    logged = library_messages.take()
    assert "truncated because CLIP" not in logged and "Token indices sequence length" not in logged
    assert "`max_sequence_length` is set to  32" in logged  # T5's truncation (the caption stage's concern) stays


def test_lora_load_message_about_text_encoders_is_silenced(tiny_flux_dir, tmp_path, library_messages):
    import logging

    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from impressionist.models import without_third_party_noise

    pipe = load_pipeline(tiny_flux_dir, torch.float32)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"]))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    plain, quiet = load_pipeline(tiny_flux_dir, torch.float32), load_pipeline(tiny_flux_dir, torch.float32)
    plain.load_lora_weights(str(tmp_path), adapter_name="a")
    assert "No LoRA keys associated to CLIPTextModel" in library_messages.take()  # the noise exists

    with without_third_party_noise():
        quiet.load_lora_weights(str(tmp_path), adapter_name="a")
        # only those messages go: another warning of the same logger still shows
        logging.getLogger("diffusers.loaders.lora_base").warning("something else")
    logged = library_messages.take()
    assert "No LoRA keys" not in logged and "something else" in logged
    assert quiet.transformer.peft_config  # the LoRA did load
