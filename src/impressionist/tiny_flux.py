"""A tiny random-weight pipeline with the FLUX.1 architecture, built locally for offline runs.

It has every component FLUX.1-dev has (two text encoders with their tokenizers, a 16-channel VAE
with FLUX's shift/scale factors, a Flux transformer with double and single blocks and guidance
embeddings, the flow-matching scheduler), each a few kilobytes. It is saved as an ordinary
diffusers folder so the demo and the tests load it through the same ``from_pretrained`` code as
the real model. Its weights are random: images it makes are noise-like, and metrics computed on
them only show that the pipeline runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Bump when the architecture or tokenizers below change, so stale cached builds are not reused.
BUILDER_VERSION = 1
SEED = 0

# FLUX.1-dev's VAE normalisation constants and scheduler settings, kept so the tiny model exercises
# the same latent scaling and timestep shifting as the real one.
VAE_SHIFT_FACTOR = 0.1159
VAE_SCALING_FACTOR = 0.3611
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
)

TEXT_DIM = 32  # T5 d_model == transformer joint_attention_dim; CLIP hidden == pooled_projection_dim
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges: every word is spelled out in characters."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    pieces = chars + [c + "</w>" for c in chars] + list(CLIP_SPECIALS)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    """A unigram T5 tokenizer over single characters (with and without the word-start marker)."""
    from transformers import T5TokenizerFast

    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in alphabet] + [("\u2581" + c, -2.5) for c in alphabet]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_flux_pipeline():
    """Build the tiny pipeline in memory, deterministically from :data:`SEED`.

    The caller's global RNG is left as it was: whether the model had to be built (or came from the
    cache) must not change what a seeded run draws afterwards.
    """
    with torch.random.fork_rng(devices=[]):  # built on the CPU: only the CPU generator is touched
        torch.manual_seed(SEED)
        return _build()


def _build():
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=TEXT_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=TEXT_DIM, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=TEXT_DIM, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
        use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=VAE_SHIFT_FACTOR, scaling_factor=VAE_SCALING_FACTOR,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=transformer,
    )


def save_tiny_flux(folder: Path) -> None:
    build_tiny_flux_pipeline().save_pretrained(folder)
