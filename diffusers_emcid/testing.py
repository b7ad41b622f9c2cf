"""Small pipelines built from configs, for tests, examples and benchmarks (no download needed).

The networks are the real diffusers/transformers classes with small sizes and random weights, so
everything EMCID does runs on them exactly as on Stable Diffusion, only faster.
"""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOY_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "by",
    "in",
    "on",
    "with",
    "and",
    "image",
    "photo",
    "picture",
    "painting",
    "artwork",
    "style",
    "art",
    "drawing",
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "apple",
    "banana",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "van",
    "gogh",
    "monet",
    "president",
    "united",
    "states",
    "doctor",
    "nurse",
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


def random_captions(count: int = 600, seed: int = 0) -> list[str]:
    """`count` distinct captions of 5-15 random toy words and letters: enough varied tokens (about 10 a caption)
    for key statistics of full rank, also for CLIP-L's 3072 key dimensions with the default count."""
    generator = torch.Generator().manual_seed(seed)
    words = list(TOY_WORDS) + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    captions = []
    for _ in range(count):
        length = int(torch.randint(5, 16, (1,), generator=generator))
        captions.append(" ".join(words[i] for i in torch.randint(len(words), (length,), generator=generator)))
    return captions


def _text_config(tokenizer: CLIPTokenizer, **sizes: object) -> CLIPTextConfig:
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        vocab_size=sizes.pop("vocab_size", None) or len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        **sizes,
    )


def _tiny_vae(channels: tuple[int, ...], sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2 ** (len(channels) - 1),
    )


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
    hidden_act: str = "quick_gelu",
    prediction_type: str = "epsilon",
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` of randomly initialised small networks, reproducible from `seed`.

    With the defaults it draws 16x16 images through 4x8x8 latents; its text encoder has
    `num_hidden_layers` layers of width `hidden_size` and MLP width `intermediate_size`. Passing the sizes
    of CLIP ViT-L/14 (768, 3072, 12 layers, 12 heads) gives a "mini-SD" with SD 1.x's text encoder;
    `hidden_act="gelu"` and `prediction_type="v_prediction"` make it SD 2.x-like (OpenCLIP's activation,
    linear attention projections, v-prediction).
    """
    tokenizer = tokenizer or toy_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            _text_config(
                tokenizer,
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads,
                hidden_act=hidden_act,
            )
        )
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
            use_linear_projection=hidden_act == "gelu",
        )
        vae = _tiny_vae(vae_channels, sample_size)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mini_sd_pipeline(
    seed: int = 0, unet_channels: tuple[int, int] = (32, 64), sample_size: int = 16
) -> StableDiffusionPipeline:
    """SD 1.x's text encoder shape (CLIP ViT-L/14: 12 layers, d = 768, d_ff = 3072, vocabulary 49,408) with a
    small UNet (cross-attention width 768, `unet_channels` wide) and VAE drawing images of `2 * sample_size`
    pixels; random weights."""
    return tiny_sd_pipeline(
        seed=seed,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        unet_channels=unet_channels,
        vae_channels=(16, 32),
        sample_size=sample_size,
        vocab_size=49408,
    )


def sd14_architecture_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD 1.4's architecture with random weights: its UNet (860M parameters) and VAE configs drawing 512x512
    images, and the CLIP ViT-L/14 text encoder of `mini_sd_pipeline` (with the toy tokenizer). For timings."""
    pipe = mini_sd_pipeline(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
        )
    sd14 = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=unet.eval(),
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    sd14.set_progress_bar_config(disable=True)
    return sd14


def tiny_sd2_pipeline(seed: int = 0, num_hidden_layers: int = 6) -> StableDiffusionPipeline:
    """An SD 2.x-shaped small pipeline: an OpenCLIP-style text encoder in `CLIPTextModel` form (GELU,
    `num_hidden_layers` layers, d_ff = 4 d), linear attention projections, v-prediction."""
    return tiny_sd_pipeline(
        seed=seed,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        hidden_act="gelu",
        prediction_type="v_prediction",
    )


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8) -> StableDiffusionXLPipeline:
    """An SD-XL-shaped small pipeline: two text encoders (a `CLIPTextModel` of 5 layers and a
    `CLIPTextModelWithProjection` of 7), a UNet with text-time conditioning (pooled text embeddings and
    size/crop time ids), a VAE and an Euler scheduler; random weights, reproducible from `seed`."""
    tokenizer = toy_clip_tokenizer()
    tokenizer_2 = toy_clip_tokenizer()
    tokenizer_2.pad_token = "!"  # as SD-XL's second tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            _text_config(tokenizer, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(
                tokenizer_2,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=7,
                num_attention_heads=4,
                projection_dim=32,
                hidden_act="gelu",
            )
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
            norm_num_groups=4,
        )
        vae = _tiny_vae((8, 16), sample_size)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
