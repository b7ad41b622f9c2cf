"""Small pipelines built from configs, for tests, examples and benchmarks (no download needed).

The networks are the real diffusers/transformers classes with small sizes and random weights, so
everything EMCID does runs on them exactly as on Stable Diffusion, only faster.
"""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "by", "in", "on", "with", "and", "image", "photo", "picture", "painting", "artwork",
    "style", "art", "drawing", "dog", "cat", "car", "tree", "house", "apple", "banana", "red", "blue", "green",
    "circle", "square", "van", "gogh", "monet", "president", "united", "states", "doctor", "nurse",
)
"""Words that the toy tokenizer keeps whole; any other word is split into single characters."""


def toy_clip_tokenizer(words: Iterable[str] = TOY_WORDS, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (with and without `</w>`) plus `words`.

    It tokenises like SD's tokenizer (lower-casing, `</w>` word ends, start and end markers, padding
    with the end marker) and gives character offsets, but is built in memory.
    """
    symbols = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_sd_pipeline(
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 5,
    num_attention_heads: int = 4,
    unet_channels: tuple[int, int] = (8, 16),
    vae_channels: tuple[int, int] = (8, 16),
    sample_size: int = 8,
    vocab_size: int | None = None,
    tokenizer: CLIPTokenizer | None = None,
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` of randomly initialised small networks, reproducible from `seed`.

    With the defaults it draws 16x16 images through 4x8x8 latents; its text encoder has
    `num_hidden_layers` layers of width `hidden_size` and MLP width `intermediate_size`. Passing the sizes
    of CLIP ViT-L/14 (768, 3072, 12 layers, 12 heads) gives a "mini-SD" with SD 1.x's text encoder.
    """
    tokenizer = tokenizer or toy_clip_tokenizer()
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size or len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=end_of_text,
            pad_token_id=end_of_text,
        ))
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=unet_channels,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=hidden_size,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=sample_size * 2 ** (len(vae_channels) - 1),
        )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mini_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.x's text encoder shape (CLIP ViT-L/14: 12 layers, d = 768, d_ff = 3072, vocabulary 49,408) with a
    small UNet (cross-attention width 768) and VAE drawing 32x32 images; random weights."""
    return tiny_sd_pipeline(
        seed=seed, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        unet_channels=(32, 64), vae_channels=(16, 32), sample_size=16, vocab_size=49408,
    )
