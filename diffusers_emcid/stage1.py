"""Stage 1: one vector per concept and text encoder, by dual self-distillation (spec sections 2 and 7).

For a concept with source prompts s_p and destination prompts d_p (p = 1..P), a vector delta is added
to the residual stream of each edited text encoder at its z layer, at the last token of the source
words. The vectors are trained together so that the UNet conditioned on the edited source prompt
predicts the noise the frozen model predicts for the destination prompt, at the same noisy latent
and timestep:

    L = mean((eps(x_t, t, c(s_p; delta)) - target)^2)
        + sum_e weight_decay * ||delta_e|| / ||h0_e||^2
        + text_alignment_weight * sum_e mean((pool_e(s_p; delta) - pool_e(d_p))^2)

with target = eps(x_t, t, c(d_p)) of the frozen model, or, for `use_real_noise` requests (real images
of the destination), the true noise (or v-target). x_t noises latents of images drawn from the source
prompts by the unedited pipeline, or of the request's images. After each Adam step every delta_e is
projected onto the ball of radius clamp_norm_factor * ||h0_e||. The results are z_e = h0_e + delta_e,
with h0_e the clean hidden state of prompt 0.

The conditioning c is the pipeline's: SD 1.x/2.x give the UNet the text encoder's final, normalised
hidden states; SD-XL concatenates both encoders' penultimate-layer outputs and adds the second
encoder's projected pooled output and the size/crop time ids.

Where this differs from the authors' code, and why:
- every random draw (images, flips, sample choice, latent sampling, noise, timesteps) comes from
  generators seeded by the request, so a vector depends on nothing but its request and the model;
- the hook acts on the live text encoders (no deep copy); the destination conditioning and the image
  latents' distribution do not change from step to step and are computed once;
- SD-XL: each encoder tokenises its own prompts, destinations included (their bug B2); noise is added
  with DDPM's schedule of the model's training betas, not the sampling scheduler (B3); the time ids
  describe the training images' real size and crop (B3); the second encoder's delta is written once
  (B1, in stage 2); its vectors are cached together with the first encoder's (B4).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import (
    AutoPipelineForText2Image,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .cache import digest
from .config import EMCIDConfig
from .encoders import EditedEncoder
from .errors import EMCIDNumericalError
from .hooks import captured_outputs, residual_addition, run_until_stopped
from .requests import ConceptEdit, load_image
from .tokens import TokenizedPrompts, subject_token_positions, tokenize


@dataclass
class Stage1Result:
    """What stage 1 finds for one concept.

    Attributes:
        vectors: per edited text encoder, z = h0 + delta, shape (d,), float32: the target of stage 2.
        h0: per edited text encoder, the clean z-layer hidden state at the subject token of prompt 0, (d,).
        losses: the total loss at every step, shape (num_steps,).
        clamp_hits: at how many steps a norm bound `clamp_norm_factor * ||h0||` was enforced.
    """

    vectors: dict[str, torch.Tensor]
    h0: dict[str, torch.Tensor]
    losses: torch.Tensor
    clamp_hits: int = 0

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """A flat dict for the cache (see `from_tensors`)."""
        tensors = {f"vector.{name}": v for name, v in self.vectors.items()}
        tensors.update({f"h0.{name}": v for name, v in self.h0.items()})
        return {**tensors, "losses": self.losses, "clamp_hits": torch.tensor(self.clamp_hits)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Stage1Result":
        pick = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        return cls(pick("vector."), pick("h0."), tensors["losses"], int(tensors["clamp_hits"]))


@contextlib.contextmanager
def quiet_progress_bar(pipe: DiffusionPipeline) -> Iterator[None]:
    """Hides the pipeline's denoising progress bar for the duration (ours show the progress)."""
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = previous


def image_resolution(pipe: DiffusionPipeline, config: EMCIDConfig) -> int:
    """Side of the training images: the config's, else the pipeline's default output size."""
    return config.image_resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor


def resize_and_crop(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resizes the shorter side to `resolution` (bilinear) and centre-crops a square.

    Args:
        images: (B, 3, H, W).
    Returns:
        (B, 3, resolution, resolution).
    """
    height, width = images.shape[-2:]
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return images[..., top : top + resolution, left : left + resolution]


def text_to_image_pipeline(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """`pipe` itself if it draws from text alone, else a text-to-image pipeline sharing its components
    (for image-to-image and inpainting pipelines, which need an input image)."""
    if isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        return pipe
    return AutoPipelineForText2Image.from_pipe(pipe)


@torch.no_grad()
def training_images(pipe: DiffusionPipeline, request: ConceptEdit, config: EMCIDConfig) -> torch.Tensor:
    """The request's images, or images generated by the (unedited) pipeline from the source prompts.

    Generation follows the authors: one batched call over the P source prompts, repeated
    `samples_per_prompt` times with the same advancing generator, seeded by the request.

    Returns:
        (P, S, 3, R, R) in [0, 1], image [p, s] being sample s of template p.
    """
    prompts = request.source_prompts
    resolution = image_resolution(pipe, config)
    if request.images is not None:
        images = torch.cat([resize_and_crop(load_image(image)[None], resolution) for image in request.images])
        return images.unflatten(0, (-1, len(prompts))).transpose(0, 1).clamp(0, 1)
    generator = text_to_image_pipeline(pipe)
    image_generator = torch.Generator().manual_seed(request.resolved_seed)
    samples = []
    with quiet_progress_bar(generator):
        for _ in range(config.samples_per_prompt):
            output = generator(
                prompts,
                num_inference_steps=config.image_num_inference_steps,
                guidance_scale=config.image_guidance_scale,
                height=resolution,
                width=resolution,
                generator=image_generator,
                output_type="pt",
            )
            samples.append(output.images.float().cpu())
    return torch.stack(samples, dim=1)


def _autocast(device: torch.device, dtype: str | None) -> torch.autocast:
    """Mixed precision for the frozen networks when `dtype` is float16 or bfloat16; a no-op otherwise."""
    enabled = dtype in ("float16", "bfloat16")
    return torch.autocast(device.type, dtype=getattr(torch, dtype) if enabled else None, enabled=enabled)


@dataclass
class _Conditioning:
    """What the UNet is given for a batch of prompts, and the pooled outputs of the text-alignment term."""

    hidden: torch.Tensor
    pooled: list[torch.Tensor]
    added: dict[str, torch.Tensor] | None = field(default=None)

    def unet_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": self.added}


def _condition(
    encoders: list[EditedEncoder],
    batches: list[TokenizedPrompts],
    time_ids: torch.Tensor | None,
    deltas: list[torch.Tensor] | None = None,
    positions: list[torch.Tensor] | None = None,
) -> _Conditioning:
    """Runs every text encoder on its tokens (with its delta added at the z layer, if given)."""
    hidden, pooled = [], []
    for index, (encoder, batch) in enumerate(zip(encoders, batches)):
        with contextlib.ExitStack() as stack:
            if deltas is not None:
                stack.enter_context(residual_addition(encoder.layout.layers[encoder.z_layer], positions[index], deltas[index]))
            output = encoder.layout.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          output_hidden_states=encoder.conditioning == "penultimate")
        hidden.append(output.last_hidden_state if encoder.conditioning == "last" else output.hidden_states[-2])
        pooler = getattr(output, "pooler_output", None)
        pooled.append(pooler if pooler is not None else output.text_embeds)
    added = None
    if time_ids is not None:
        added = {"text_embeds": pooled[-1], "time_ids": time_ids.expand(hidden[0].shape[0], -1)}
    return _Conditioning(torch.cat(hidden, dim=-1), pooled, added)


def _tokenize_alike(encoders: list[EditedEncoder], prompts: list[str]) -> list[TokenizedPrompts]:
    """Each encoder's tokens of `prompts`, padded to one common length (their hidden states are concatenated)."""
    batches = [tokenize(encoder.tokenizer, prompts) for encoder in encoders]
    length = max(batch.input_ids.shape[1] for batch in batches)
    padded = []
    for encoder, batch in zip(encoders, batches):
        extra = length - batch.input_ids.shape[1]
        pad_id = encoder.tokenizer.pad_token_id if encoder.tokenizer.pad_token_id is not None else encoder.tokenizer.eos_token_id
        padded.append(TokenizedPrompts(F.pad(batch.input_ids, (0, extra), value=pad_id), F.pad(batch.attention_mask, (0, extra))))
    return padded


def optimize_concept_vector(
    pipe: DiffusionPipeline,
    encoders: list[EditedEncoder],
    request: ConceptEdit,
    config: EMCIDConfig,
    noise_scheduler: DDPMScheduler,
    device: torch.device,
) -> Stage1Result:
    """Runs stage 1 for one concept on the live (frozen, unedited) pipeline; see the module docstring."""
    unet, vae = pipe.unet, pipe.vae
    draws = torch.Generator().manual_seed(int(digest("emcid-stage1-draws", request.resolved_seed)[:15], 16))

    images = training_images(pipe, request, config).flatten(0, 1)  # (P * S, 3, R, R) in [0, 1]
    num_prompts, num_samples = len(request.templates), images.shape[0] // len(request.templates)
    resolution = images.shape[-1]
    flip = torch.rand(images.shape[0], generator=draws) < 0.5  # the authors' one random flip per image
    images = torch.where(flip[:, None, None, None], images.flip(-1), images) * 2 - 1
    with torch.no_grad():
        latent_dist = vae.encode(images.to(device, vae.dtype)).latent_dist
        latent_mean = latent_dist.mean.float().unflatten(0, (num_prompts, num_samples))
        latent_std = latent_dist.std.float().unflatten(0, (num_prompts, num_samples))

    time_ids = None
    if getattr(unet.config, "addition_embed_type", None) == "text_time":  # SD-XL: original size, crop corner, target size
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=unet.dtype)
    source = [batch.to(device) for batch in _tokenize_alike(encoders, request.source_prompts)]
    destination = [batch.to(device) for batch in _tokenize_alike(encoders, request.destination_prompts)]
    positions = [
        torch.tensor(subject_token_positions(e.tokenizer, request.source_prompts, request.source), device=device)
        for e in encoders
    ]
    h0 = []
    with torch.no_grad(), _autocast(device, config.dtype):
        for encoder, batch, position in zip(encoders, source, positions):
            z_module = encoder.layout.layers[encoder.z_layer]
            with captured_outputs({"z": z_module}, stop_at=z_module) as captured:
                run_until_stopped(encoder.layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            h0.append(captured["z"][0, position[0]].float())
        target_conditioning = _condition(encoders, destination, time_ids)

    deltas = [torch.zeros_like(h, requires_grad=True) for h in h0]
    optimizer = torch.optim.Adam(deltas, lr=config.learning_rate)
    radii = [config.clamp_norm_factor * h.norm() for h in h0]
    decay_scales = [config.weight_decay / h.norm() ** 2 for h in h0]  # the decay is ||delta|| / ||h0||^2
    use_text_term = config.text_alignment_weight > 0 and request.text_alignment
    prediction_type = noise_scheduler.config.prediction_type
    prompt_index = torch.arange(num_prompts)
    losses = torch.empty(config.num_steps)
    clamp_hits = 0
    for step in range(config.num_steps):
        chosen = torch.randint(num_samples, (num_prompts,), generator=draws)
        unit_noise = torch.randn(latent_mean[:, 0].shape, generator=draws)
        noise = torch.randn(latent_mean[:, 0].shape, generator=draws).to(device)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (num_prompts,), generator=draws).to(device)
        latents = (latent_mean[prompt_index, chosen] + latent_std[prompt_index, chosen] * unit_noise.to(device))
        latents = latents * vae.config.scaling_factor
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(unet.dtype)

        with _autocast(device, config.dtype):
            edited = _condition(encoders, source, time_ids, deltas, positions)
            prediction = unet(noisy, timesteps, **edited.unet_kwargs()).sample
            with torch.no_grad():
                if not request.use_real_noise:
                    target = unet(noisy, timesteps, **target_conditioning.unet_kwargs()).sample
                elif prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = latents if prediction_type == "sample" else noise
        loss = F.mse_loss(prediction.float(), target.float())
        for delta, scale in zip(deltas, decay_scales):
            loss = loss + scale * delta.norm()
        if use_text_term:
            for pooled, target_pooled in zip(edited.pooled, target_conditioning.pooled):
                loss = loss + config.text_alignment_weight * F.mse_loss(pooled.float(), target_pooled.float())
        if not torch.isfinite(loss):
            raise EMCIDNumericalError(
                f"stage 1 of {request.source!r} -> {request.destination!r}: the loss became {loss.item()} at step {step}. "
                f"Lower learning_rate (now {config.learning_rate}) or run the networks in float32 (dtype=None)."
            )
        for delta, gradient in zip(deltas, torch.autograd.grad(loss, deltas)):
            delta.grad = gradient
        optimizer.step()
        with torch.no_grad():
            clamped = False
            for delta, radius in zip(deltas, radii):
                norm = delta.norm()
                if norm > radius:
                    delta.mul_(radius / norm)
                    clamped = True
            clamp_hits += clamped
        losses[step] = loss.detach()
    vectors = {e.component: (h + delta.detach()).cpu() for e, h, delta in zip(encoders, h0, deltas)}
    if not all(torch.isfinite(v).all() for v in vectors.values()):
        raise EMCIDNumericalError(f"stage 1 of {request.source!r} -> {request.destination!r} gave a non-finite vector; lower learning_rate.")
    return Stage1Result(vectors=vectors, h0={e.component: h.cpu() for e, h in zip(encoders, h0)}, losses=losses,
                        clamp_hits=clamp_hits)
