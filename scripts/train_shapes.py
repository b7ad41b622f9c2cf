"""Trains the tiny shapes text-to-image pipeline and its judge that `diffusers_emcid.shapes` ships, from scratch,
reproducibly, on CPU. A development tool of the repository, not part of the installed package.

    pip download open-clip-torch==3.3.0 --no-deps -d wheels     # for the BPE vocabulary (MIT licence)
    python scripts/train_shapes.py --out DIR --bpe wheels/open_clip_torch-3.3.0-py3-none-any.whl [--seed 0]

Stages (each is saved under `DIR/checkpoints` and skipped when rerun):

1. tokenizer: SD 1.x's CLIP BPE tokenizer (49,408 tokens), converted from OpenCLIP's
   `bpe_simple_vocab_16e6.txt.gz`;
2. text encoder: a 4-layer CLIPTextModel whose first `--zero-attention-layers` layers have their attention
   output projection fixed at zero, so that a token's state there depends on the token and its position
   only. It is trained to classify shape and colour from every end-of-text and padding position, then frozen
   and checked for editability (`checks.conditioning_gap_closed`) and non-degeneracy
   (`checks.end_of_text_separation`);
3. VAE: an AutoencoderKL with 4x16x16 latents;
4. judge: a small ResNet classifying "{colour} {shape}", trained on rendered images and their VAE
   reconstructions;
5. UNet: a UNet2DConditionModel trained with DDPM on the frozen encoder (10% empty captions for
   classifier-free guidance), keeping an exponential moving average of its weights.

The pipeline is written to `DIR/model` and the judge to `DIR/judge`.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import shutil
import time
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    ResNetConfig,
    ResNetForImageClassification,
    ViTImageProcessor,
)

from diffusers_emcid.encoders import find_text_encoder_layout
from diffusers_emcid.shapes.checks import conditioning_gap_closed, end_of_text_separation, pipeline_token_ids
from diffusers_emcid.shapes.render import COLOURS, RESOLUTION, SHAPES, class_names, draw_batch, draw_captions

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
JUDGE_RESOLUTION = 64
NUM_MERGES = 49152 - 256 - 2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- tokenizer


@lru_cache()
def byte_unicode_table() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters, which CLIP's BPE works on."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def read_bpe_merges(path: str | Path) -> list[str]:
    """The merges of OpenCLIP's BPE file, from the `.txt.gz` itself or from the open-clip-torch wheel."""
    path = Path(path)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            compressed = wheel.read(BPE_MEMBER)
    else:
        compressed = path.read_bytes()
    lines = gzip.decompress(compressed).decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]


def build_clip_tokenizer(bpe_path: str | Path, directory: Path) -> CLIPTokenizer:
    """Writes SD 1.x's CLIP tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`) into `directory`,
    from OpenCLIP's merges, and loads it."""
    merges = read_bpe_merges(bpe_path)
    characters = list(byte_unicode_table().values())
    vocab = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
                "errors": "replace",
            },
            indent=1,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    expected = [49406, 320, 1125, 539, 320, 2368, 49407]
    if tokenizer("a photo of a cat").input_ids != expected or len(tokenizer) != 49408:
        raise RuntimeError("The converted tokenizer does not reproduce SD 1.x's CLIP tokenizer.")
    for word in (*SHAPES, *COLOURS):
        if len(tokenizer(word).input_ids) != 3:
            raise RuntimeError(f"{word!r} is not a single token of the CLIP tokenizer.")
    return tokenizer


# ---------------------------------------------------------------------------------------------- text encoder


def text_encoder_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=64,
    )


def zero_attention_outputs(encoder: CLIPTextModel, num_layers: int) -> None:
    """Sets the attention output projections of the first `num_layers` layers (weight and bias) to zero."""
    with torch.no_grad():
        for layer in find_text_encoder_layout(encoder).layers[:num_layers]:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()


def frozen_attention_step(
    encoder: CLIPTextModel,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    zero_layers: int,
) -> None:
    """One optimiser step on `loss` that keeps the attention output of the first `zero_layers` layers at zero."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for layer in find_text_encoder_layout(encoder).layers[:zero_layers]:
        for parameter in layer.self_attn.out_proj.parameters():
            parameter.grad = None
    optimizer.step()
    scheduler.step()
    zero_attention_outputs(encoder, zero_layers)


def train_text_encoder(
    tokenizer: CLIPTokenizer, seed: int, steps: int, zero_layers: int, batch_size: int = 256
) -> CLIPTextModel:
    """Trains the encoder to classify shape and colour from every end-of-text and padding position."""
    torch.manual_seed(seed)
    encoder = CLIPTextModel(text_encoder_config())
    zero_attention_outputs(encoder, zero_layers)
    heads = torch.nn.ModuleDict(
        {"shape": torch.nn.Linear(64, len(SHAPES)), "colour": torch.nn.Linear(64, len(COLOURS))}
    )
    parameters = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        shapes, colours, captions = draw_captions(batch_size, seed * 1_000_003 + step)
        ids = pipeline_token_ids(tokenizer, captions)
        hidden = encoder(ids).last_hidden_state
        eot = (ids == tokenizer.eos_token_id).int().argmax(-1)
        after = torch.arange(ids.shape[1])[None] >= eot[:, None]
        states = hidden[after]
        counts = after.sum(-1)
        loss = F.cross_entropy(heads["shape"](states), shapes.repeat_interleave(counts)) + F.cross_entropy(
            heads["colour"](states), colours.repeat_interleave(counts)
        )
        frozen_attention_step(encoder, loss, optimizer, scheduler, zero_layers)
        if step % 100 == 0 or step == steps - 1:
            log(f"text encoder step {step}: loss {loss.item():.4f}")
    return encoder.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- VAE


def vae_model() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def train_vae(seed: int, steps: int, batch_size: int = 64) -> AutoencoderKL:
    """Trains the autoencoder (L1 + MSE reconstruction, a light KL term), then sets its latent scaling factor."""
    torch.manual_seed(seed)
    vae = vae_model()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        images = draw_batch(batch_size, seed * 1_000_003 + 500_000 + step).images * 2 - 1
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(draw_batch(512, seed + 77).images * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae


# ---------------------------------------------------------------------------------------------- judge


def judge_processor() -> ViTImageProcessor:
    return ViTImageProcessor(
        do_resize=True,
        size={"height": JUDGE_RESOLUTION, "width": JUDGE_RESOLUTION},
        resample=2,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def judge_inputs(images: torch.Tensor) -> torch.Tensor:
    """What `judge_processor` makes of (B, 3, 32, 32) images in [0, 1]: bilinear upsampling, then [-1, 1]."""
    return F.interpolate(images, size=JUDGE_RESOLUTION, mode="bilinear", align_corners=False) * 2 - 1


def train_judge(vae: AutoencoderKL, seed: int, steps: int, batch_size: int = 128) -> ResNetForImageClassification:
    """Trains the judge on rendered images, half of each batch passed through the VAE, so that it also
    reads the blur of decoded images."""
    torch.manual_seed(seed)
    names = class_names()
    config = ResNetConfig(
        num_channels=3,
        embedding_size=24,
        hidden_sizes=[32, 64, 128],
        depths=[1, 1, 1],
        layer_type="basic",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    judge = ResNetForImageClassification(config)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        batch = draw_batch(batch_size, seed * 1_000_003 + 700_000 + step)
        images = batch.images
        with torch.no_grad():
            half = batch_size // 2
            decoded = vae.decode(vae.encode(images[:half] * 2 - 1).latent_dist.sample()).sample
            images = torch.cat([(decoded.clamp(-1, 1) + 1) / 2, images[half:]])
        loss = F.cross_entropy(judge(pixel_values=judge_inputs(images)).logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"judge step {step}: loss {loss.item():.4f}")
    return judge.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- UNet


def unet_model() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 96),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def train_unet(
    tokenizer: CLIPTokenizer,
    encoder: CLIPTextModel,
    vae: AutoencoderKL,
    seed: int,
    steps: int,
    checkpoint: Path,
    batch_size: int = 64,
    ema_decay: float = 0.998,
) -> UNet2DConditionModel:
    """DDPM training with min-SNR(5) weighting and 10% empty captions; returns the EMA weights.

    Progress is saved to `checkpoint` every 200 steps and resumed from there.
    """
    torch.manual_seed(seed)
    unet = unet_model()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"unet resumed at step {start}")
    scheduler = noise_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    empty = pipeline_token_ids(tokenizer, [""])
    began = time.time()
    for step in range(start, steps):
        batch_seed = seed * 1_000_003 + 900_000 + step
        batch = draw_batch(batch_size, batch_seed)
        generator = torch.Generator().manual_seed(batch_seed)
        with torch.no_grad():
            ids = pipeline_token_ids(tokenizer, batch.captions)
            drop = torch.rand(batch_size, generator=generator) < 0.1
            ids[drop] = empty
            condition = encoder(ids).last_hidden_state
            latents = vae.encode(batch.images * 2 - 1).latent_dist.sample(generator) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, condition).sample
        weights = snr[timesteps].clamp(max=5.0) / snr[timesteps]
        loss = (weights * (prediction - noise).pow(2).mean((1, 2, 3))).mean()
        lr = 1e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(live, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            rate = (time.time() - began) / (step + 1 - start)
            log(f"unet step {step}: loss {loss.item():.4f} ({rate:.2f} s/step)")
        if (step + 1) % 200 == 0 or step == steps - 1:
            torch.save(
                {
                    "unet": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step + 1,
                },
                checkpoint,
            )
    return ema.eval()


# ---------------------------------------------------------------------------------------------- checks and output


def check_encoder(pipe: StableDiffusionPipeline, zero_layers: int) -> dict[str, object]:
    """Editability per layer (mean over shape pairs and colours) and end-of-text separation."""
    gaps = {}
    for layer in range(pipe.text_encoder.config.num_hidden_layers):
        values = [
            conditioning_gap_closed(pipe, f"a {c} {s}", f"a {c} {d}", s, d, layer)
            for c in COLOURS
            for s, d in zip(SHAPES, SHAPES[1:] + SHAPES[:1])
        ]
        gaps[layer] = (min(values), sum(values) / len(values))
    separation = end_of_text_separation(pipe, [f"a {c} {s}" for c in COLOURS for s in SHAPES])
    return {"gap_closed_min_mean": gaps, "end_of_text_separation": separation, "zero_attention_layers": zero_layers}


def checkpointed(path: Path, model_class: type, train: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The model saved at `path` (frozen, in eval mode) if there is one, else `train()`, saved there."""
    if (path / "config.json").exists():
        return model_class.from_pretrained(path).float().eval().requires_grad_(False)
    model = train()
    model.save_pretrained(path)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bpe", required=True, help="the open-clip-torch wheel, or bpe_simple_vocab_16e6.txt.gz from it"
    )
    parser.add_argument("--zero-attention-layers", type=int, default=2)
    parser.add_argument("--encoder-steps", type=int, default=400)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--judge-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=1500)
    args = parser.parse_args()
    checkpoints = args.out / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    began = time.time()
    tokenizer = build_clip_tokenizer(args.bpe, checkpoints / "tokenizer")
    timings["tokenizer"] = time.time() - began

    began = time.time()
    encoder = checkpointed(
        checkpoints / "text_encoder",
        CLIPTextModel,
        lambda: train_text_encoder(tokenizer, args.seed, args.encoder_steps, args.zero_attention_layers),
    )
    probe = StableDiffusionPipeline(
        vae=vae_model(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet_model(),
        scheduler=noise_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    report = check_encoder(probe, args.zero_attention_layers)
    log(f"encoder checks: {report}")
    (checkpoints / "encoder_checks.json").write_text(json.dumps(report, indent=1))
    if report["end_of_text_separation"] < 0.5:
        raise RuntimeError("The text encoder is degenerate: its end-of-text states hardly depend on the prompt.")
    timings["text_encoder"] = time.time() - began

    began = time.time()
    vae = checkpointed(checkpoints / "vae", AutoencoderKL, lambda: train_vae(args.seed, args.vae_steps))
    timings["vae"] = time.time() - began

    began = time.time()
    checkpointed(
        args.out / "judge", ResNetForImageClassification, lambda: train_judge(vae, args.seed, args.judge_steps)
    )
    judge_processor().save_pretrained(args.out / "judge")
    timings["judge"] = time.time() - began

    began = time.time()
    unet = train_unet(tokenizer, encoder, vae, args.seed, args.unet_steps, checkpoints / "unet.pt")
    timings["unet"] = time.time() - began

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder.to(torch.float16),
        tokenizer=tokenizer,
        unet=unet.to(torch.float16),
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler().config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out / "model")
    shutil.rmtree(args.out / "model" / "tokenizer")  # the converted files, without the larger tokenizer.json
    shutil.copytree(checkpoints / "tokenizer", args.out / "model" / "tokenizer")
    log(f"timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
