"""Stage 1: one vector per concept and text encoder, by dual self-distillation (`docs/algorithm.md`, section 2).

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
- (`stage1_mode="fast"`, the default) several concepts are optimised in one batch, each with its own
  generator, loss, gradient and Adam state, and the text encoders' layers up to the z layer, which the
  delta cannot change, run once per concept rather than at every step; `"reference"` keeps the plain
  one-concept, full-forward path, and both give the same vectors up to float rounding;
- SD-XL: each encoder tokenises its own prompts, destinations included (theirs reuse the first tokenizer's
  destination ids); noise is added with DDPM's schedule of the model's training betas, not the sampling
  scheduler; the time ids describe the training images' real size and crop; the second encoder's delta is
  written once (in stage 2; theirs adds it twice); its vectors are cached together with the first encoder's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import diffusers
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
from .config import EMCIDConfig, Stage1Padding
from .encoders import EditedEncoder
from .errors import EMCIDNumericalError
from .hooks import captured_outputs, layers_skipped_to, residual_addition, run_until_stopped
from .requests import ConceptEdit, load_image
from .tokens import TokenizedPrompts, subject_token_positions, tokenize, tokenize_as_pipeline


@dataclass
class Stage1Result:
    """What stage 1 finds for one concept.

    Attributes:
        vectors: per edited text encoder, z = h0 + delta, shape (d,), in the optimisation dtype (see
            `optimization_dtype`): the target of stage 2.
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
    """Side of the images drawn for training: the config's, else the pipeline's default output size."""
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


@contextlib.contextmanager
def _image_scheduler(pipe: DiffusionPipeline, name: str | None) -> Iterator[None]:
    """Draws with a scheduler of class `name` (from the pipeline's scheduler config) for the duration, if given."""
    if name is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, name).from_config(original.config)
    try:
        yield
    finally:
        pipe.scheduler = original


@torch.no_grad()
def training_images(pipe: DiffusionPipeline, requests: Sequence[ConceptEdit], config: EMCIDConfig) -> list[torch.Tensor]:
    """Each request's images, or images generated by the (unedited) pipeline from its source prompts.

    Generation follows the authors (with the pipeline's scheduler or `config.image_scheduler`): one call over the P
    source prompts, repeated `samples_per_prompt` times
    with the same advancing generator, seeded by the request. The requests that need images are drawn
    together in one batched call in which every image has its request's generator, so a request's images
    do not depend on the other requests of the call.

    Returns:
        Per request, (P, S, 3, R, R) in [0, 1], image [p, s] being sample s of template p, R being the drawing size
        times `config.image_training_scale`, rounded to a multiple of the VAE's scale factor.
    """
    resolution = image_resolution(pipe, config)
    factor = pipe.vae_scale_factor
    training_resolution = max(factor, round(resolution * config.image_training_scale / factor) * factor)
    images: list[torch.Tensor | None] = [None] * len(requests)
    for index, request in enumerate(requests):
        if request.images is not None:
            given = torch.cat([resize_and_crop(load_image(image)[None], training_resolution) for image in request.images])
            images[index] = given.unflatten(0, (-1, len(request.templates))).transpose(0, 1).clamp(0, 1)
    drawn = [index for index, request in enumerate(requests) if request.images is None]
    if not drawn:
        return images
    prompts = [prompt for index in drawn for prompt in requests[index].source_prompts]
    generators = [torch.Generator().manual_seed(requests[index].resolved_seed) for index in drawn]
    per_image = [g for g, index in zip(generators, drawn) for _ in requests[index].templates]
    generator = text_to_image_pipeline(pipe)
    samples = []
    with quiet_progress_bar(generator), _image_scheduler(generator, config.image_scheduler), \
            _autocast(generator.device, config.dtype):
        for _ in range(config.samples_per_prompt):
            output = generator(
                prompts,
                num_inference_steps=config.image_num_inference_steps,
                guidance_scale=config.image_guidance_scale,
                height=resolution,
                width=resolution,
                generator=per_image,
                output_type="pt",
            )
            drawn_images = output.images.float().cpu()
            if training_resolution != resolution:
                drawn_images = resize_and_crop(drawn_images, training_resolution).clamp(0, 1)
            samples.append(drawn_images)
    samples = torch.stack(samples, dim=1).split([len(requests[index].templates) for index in drawn])
    for index, sample in zip(drawn, samples):
        images[index] = sample
    return images


def optimization_dtype(pipe: DiffusionPipeline) -> torch.dtype:
    """The dtype of delta, its Adam state and the loss: float64 for a float64 pipeline (exact comparisons), else
    float32 whatever the networks' precision."""
    return torch.float64 if pipe.unet.dtype == torch.float64 else torch.float32


def _autocast(device: torch.device, dtype: str | None) -> torch.autocast:
    """Mixed precision for the frozen networks when `dtype` is float16 or bfloat16; a no-op otherwise."""
    enabled = dtype in ("float16", "bfloat16")
    return torch.autocast(device.type, dtype=getattr(torch, dtype) if enabled else None, enabled=enabled)


def _padded_cat(tensors: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    """Concatenates (B_i, T_i, ...) tensors along dim 0, padding dim 1 at the end to the longest T_i with `value`."""
    length = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
        padded.append(F.pad(t, pad, value=value))
    return torch.cat(padded)


def _length_mask(lengths: Sequence[int], rows: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """(sum(rows), max(lengths)) mask of the first `lengths[i]` columns for the `rows[i]` rows of group i;
    `None` when it masks nothing. It hides the padding that batching added from the UNet's cross-attention."""
    if len(set(lengths)) == 1:
        return None
    length = torch.tensor(lengths, device=device).repeat_interleave(torch.tensor(rows, device=device))
    return (torch.arange(max(lengths), device=device)[None] < length[:, None]).long()


@dataclass
class _Conditioning:
    """What the UNet is given for the prompts of one concept, and the pooled outputs of the text-alignment term.

    Attributes:
        hidden: (P, T, D) encoder hidden states (both encoders' concatenated for SD-XL).
        pooled: per encoder, (P, d_e) pooled outputs (SD-XL's second encoder: its projected `text_embeds`).
    """

    hidden: torch.Tensor
    pooled: list[torch.Tensor]


def _encode(
    encoders: list[EditedEncoder],
    batches: list[TokenizedPrompts],
    states: list[torch.Tensor] | None = None,
    deltas: list[torch.Tensor] | None = None,
    positions: list[torch.Tensor] | None = None,
) -> _Conditioning:
    """Runs every text encoder on its tokens.

    With `states` (each encoder's z-layer output for these tokens, (B, T, d), delta already added) only the layers
    after the z layer run; with `deltas` ((B, d) per encoder, added at `positions`), the full encoder runs with the
    delta added by a hook; with neither, the plain encoder runs.
    """
    hidden, pooled = [], []
    for index, (encoder, batch) in enumerate(zip(encoders, batches)):
        layout = encoder.layout
        conditioning_layer = layout.num_layers - (2 if encoder.conditioning == "penultimate" else 1)
        with contextlib.ExitStack() as stack:
            if states is not None:
                stack.enter_context(layers_skipped_to(layout, encoder.z_layer, states[index]))
            elif deltas is not None:
                stack.enter_context(residual_addition(layout.layers[encoder.z_layer], positions[index], deltas[index]))
            captured = {}
            if encoder.conditioning == "penultimate" and not (states is not None and encoder.z_layer == conditioning_layer):
                captured = stack.enter_context(captured_outputs({"hidden": layout.layers[conditioning_layer]}))
            output = layout.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        if encoder.conditioning == "last":
            hidden.append(output.last_hidden_state)
        else:
            hidden.append(captured["hidden"] if captured else states[index])
        pooler = getattr(output, "pooler_output", None)
        pooled.append(pooler if pooler is not None else output.text_embeds)
    return _Conditioning(torch.cat(hidden, dim=-1), pooled)


def _unet_inputs(
    conditioning: _Conditioning, mask: torch.Tensor | None, time_ids: torch.Tensor | None
) -> dict[str, object]:
    """The UNet's keyword arguments: the hidden states, the cross-attention `mask` of `_length_mask`, and
    SD-XL's added conditioning when `time_ids` (1, 6) is given."""
    added = None
    if time_ids is not None:
        added = {"text_embeds": conditioning.pooled[-1], "time_ids": time_ids.expand(conditioning.hidden.shape[0], -1)}
    return {"encoder_hidden_states": conditioning.hidden, "added_cond_kwargs": added, "encoder_attention_mask": mask}


def _tokenize_alike(
    encoders: list[EditedEncoder], prompts: list[str], padding: Stage1Padding = "longest"
) -> list[TokenizedPrompts]:
    """Each encoder's tokens of `prompts`, padded to one common length (their hidden states are concatenated).

    With `padding="pipeline"` every prompt is padded to the tokenizer's maximum length and the attention mask
    covers every position, as the pipeline encodes prompts; with `"longest"` the prompts are padded to the longest
    and the padding is masked."""
    if padding == "pipeline":
        batches = [tokenize_as_pipeline(encoder.tokenizer, prompts) for encoder in encoders]
        batches = [TokenizedPrompts(b.input_ids, torch.ones_like(b.attention_mask)) for b in batches]
    else:
        batches = [tokenize(encoder.tokenizer, prompts) for encoder in encoders]
    length = max(batch.input_ids.shape[1] for batch in batches)
    padded = []
    for encoder, batch in zip(encoders, batches):
        extra = length - batch.input_ids.shape[1]
        padded.append(TokenizedPrompts(F.pad(batch.input_ids, (0, extra), value=_pad_id(encoder)),
                                       F.pad(batch.attention_mask, (0, extra))))
    return padded


def _pad_id(encoder: EditedEncoder) -> int:
    tokenizer = encoder.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class _ConceptRun:
    """The state of one concept's optimisation: its data, which never changes, and its deltas.

    Every random draw comes from the concept's own generator, in a fixed order, so a concept's run does
    not depend on which other concepts share its batch.
    """

    def __init__(
        self,
        request: ConceptEdit,
        images: torch.Tensor,
        pipe: DiffusionPipeline,
        encoders: list[EditedEncoder],
        config: EMCIDConfig,
        device: torch.device,
    ) -> None:
        self.request = request
        self.draws = torch.Generator().manual_seed(int(digest("emcid-stage1-draws", request.resolved_seed)[:15], 16))
        num_prompts, num_samples = images.shape[:2]
        self.num_prompts, self.num_samples = num_prompts, num_samples
        images = images.flatten(0, 1)  # (P * S, 3, R, R)
        flip = torch.rand(images.shape[0], generator=self.draws) < 0.5  # the authors' one random flip per image
        images = torch.where(flip[:, None, None, None], images.flip(-1), images) * 2 - 1
        vae = pipe.vae
        with torch.no_grad():
            latent_dist = vae.encode(images.to(device, vae.dtype)).latent_dist
        self.dtype = optimization_dtype(pipe)
        self.latent_mean = latent_dist.mean.to(self.dtype).unflatten(0, (num_prompts, num_samples))
        self.latent_std = latent_dist.std.to(self.dtype).unflatten(0, (num_prompts, num_samples))

        self.source = [b.to(device) for b in _tokenize_alike(encoders, request.source_prompts, config.stage1_padding)]
        self.destination = [
            b.to(device) for b in _tokenize_alike(encoders, request.destination_prompts, config.stage1_padding)
        ]
        self.positions = [
            torch.tensor(subject_token_positions(e.tokenizer, request.source_prompts, request.source), device=device)
            for e in encoders
        ]
        rows = torch.arange(num_prompts, device=device)
        self.prefix, self.h0 = [], []
        with torch.no_grad(), _autocast(device, config.dtype):
            for encoder, batch, position in zip(encoders, self.source, self.positions):
                z_module = encoder.layout.layers[encoder.z_layer]
                with captured_outputs({"z": z_module}, stop_at=z_module) as captured:
                    run_until_stopped(encoder.layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                self.prefix.append(captured["z"])  # (P, T, d)
                self.h0.append(captured["z"][rows, position][0].to(self.dtype))
            self.target = _encode(encoders, self.destination)
        self.deltas = [torch.zeros_like(h, requires_grad=True) for h in self.h0]
        self.radii = [config.clamp_norm_factor * h.norm() for h in self.h0]
        self.decay_scales = [config.weight_decay / h.norm() ** 2 for h in self.h0]  # the decay is ||delta|| / ||h0||^2
        self.losses: list[float] = []
        self.clamp_hits = 0
        self.error: EMCIDNumericalError | None = None

    @property
    def source_length(self) -> int:
        return self.source[0].input_ids.shape[1]

    @property
    def destination_length(self) -> int:
        return self.destination[0].input_ids.shape[1]

    def draw_step(self, num_train_timesteps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's clean latents (unscaled), noise and timesteps, each with P rows."""
        prompt_index = torch.arange(self.num_prompts)
        chosen = torch.randint(self.num_samples, (self.num_prompts,), generator=self.draws)
        unit_noise = torch.randn(self.latent_mean[:, 0].shape, generator=self.draws).to(device)
        noise = torch.randn(self.latent_mean[:, 0].shape, generator=self.draws).to(device)
        timesteps = torch.randint(num_train_timesteps, (self.num_prompts,), generator=self.draws).to(device)
        latents = self.latent_mean[prompt_index, chosen] + self.latent_std[prompt_index, chosen] * unit_noise
        return latents, noise, timesteps

    def clamp(self) -> None:
        """Projects each delta onto its ball of radius `clamp_norm_factor * ||h0||`."""
        clamped = False
        with torch.no_grad():
            for delta, radius in zip(self.deltas, self.radii):
                norm = delta.norm()
                if norm > radius:
                    delta.mul_(radius / norm)
                    clamped = True
        self.clamp_hits += clamped

    def plateaued(self, config: EMCIDConfig) -> bool:
        """Whether the last window of losses did not improve on the one before by the configured fraction."""
        window = config.early_stopping_window
        if window is None or len(self.losses) < 2 * window or len(self.losses) % window:
            return False
        last, before = sum(self.losses[-window:]), sum(self.losses[-2 * window : -window])
        return last > (1 - config.early_stopping_min_improvement) * before

    def result(self, encoders: list[EditedEncoder]) -> Stage1Result:
        vectors = {e.component: (h + d.detach()).cpu() for e, h, d in zip(encoders, self.h0, self.deltas)}
        return Stage1Result(vectors=vectors, h0={e.component: h.cpu() for e, h in zip(encoders, self.h0)},
                            losses=torch.tensor(self.losses), clamp_hits=self.clamp_hits)


@dataclass
class _ActiveBatch:
    """What the optimisation step needs of the concepts still running, laid out as one batch of their prompts.

    Built once per change of the set of running concepts, not at every step. Shapes: R prompts in all, B concepts.

    Attributes:
        owner: (R,) the concept of each prompt.
        counts: (B,) prompts per concept.
        source: per encoder, the source tokens (R, T_src), padded to the longest concept.
        positions: per encoder, (R,) subject-token index.
        prefix: per encoder, the z-layer states of the source prompts (R, T_src, d) (fast mode only).
        source_mask / destination_mask: the cross-attention masks hiding the padding batching added.
        target: the frozen destination conditioning of every prompt.
        real_noise: (R,) whether a prompt's concept trains against the true noise.
        text_alignment: (B,) 1 where a concept uses the text-alignment term.
        decay_scales: per encoder, (B,) `weight_decay / ||h0||^2`.
    """

    runs: list[_ConceptRun]
    owner: torch.Tensor
    counts: torch.Tensor
    source: list[TokenizedPrompts]
    positions: list[torch.Tensor]
    prefix: list[torch.Tensor] | None
    source_mask: torch.Tensor | None
    destination_mask: torch.Tensor | None
    target: _Conditioning
    real_noise: torch.Tensor
    text_alignment: torch.Tensor
    decay_scales: list[torch.Tensor]

    @classmethod
    def of(cls, runs: list[_ConceptRun], encoders: list[EditedEncoder], fast: bool, device: torch.device) -> "_ActiveBatch":
        rows = [run.num_prompts for run in runs]
        owner = torch.arange(len(runs), device=device).repeat_interleave(torch.tensor(rows, device=device))
        encoder_indices = range(len(encoders))
        return cls(
            runs=runs,
            owner=owner,
            counts=torch.tensor(rows, device=device, dtype=runs[0].dtype),
            source=[TokenizedPrompts(_padded_cat([run.source[e].input_ids for run in runs], _pad_id(encoders[e])),
                                     _padded_cat([run.source[e].attention_mask for run in runs])) for e in encoder_indices],
            positions=[torch.cat([run.positions[e] for run in runs]) for e in encoder_indices],
            prefix=[_padded_cat([run.prefix[e] for run in runs]) for e in encoder_indices] if fast else None,
            source_mask=_length_mask([run.source_length for run in runs], rows, device),
            destination_mask=_length_mask([run.destination_length for run in runs], rows, device),
            target=_Conditioning(_padded_cat([run.target.hidden for run in runs]),
                                 [torch.cat(p) for p in zip(*(run.target.pooled for run in runs))]),
            real_noise=torch.tensor([run.request.use_real_noise for run in runs], device=device)[owner],
            text_alignment=torch.tensor([run.request.text_alignment for run in runs], device=device, dtype=runs[0].dtype),
            decay_scales=[torch.stack([run.decay_scales[e] for run in runs]) for e in encoder_indices],
        )

    def per_concept_mean(self, row_values: torch.Tensor) -> torch.Tensor:
        """(B,) the mean over each concept's prompts of (R,) values."""
        zeros = torch.zeros(len(self.runs), device=row_values.device, dtype=row_values.dtype)
        return zeros.index_add(0, self.owner, row_values) / self.counts


def optimize_concept_vectors(
    pipe: DiffusionPipeline,
    encoders: list[EditedEncoder],
    requests: Sequence[ConceptEdit],
    config: EMCIDConfig,
    noise_scheduler: DDPMScheduler,
    device: torch.device,
) -> list[Stage1Result | EMCIDNumericalError]:
    """Runs stage 1 for a batch of concepts on the live (frozen, unedited) pipeline; see the module docstring.

    The concepts are optimised together: each step makes one UNet call for the frozen model's targets of all
    their prompts and one for the edited predictions, and the loss is the sum of the concepts' losses, so each
    delta gets its own concept's gradient and its own Adam update. In `config.stage1_mode == "fast"` the text
    encoders run only their layers after the z layer at each step (the z-layer states of the source prompts
    are computed once); in `"reference"` mode every step runs the full encoders with the delta added by a hook.
    Concepts whose prompts are shorter than others' are padded, and the padding is hidden from the UNet's
    cross-attention, so that each concept sees what it would see alone.

    Returns:
        Per request, its `Stage1Result`, or the `EMCIDNumericalError` that ended it (the others go on).
    """
    unet = pipe.unet
    images = training_images(pipe, requests, config)
    runs = [_ConceptRun(request, image, pipe, encoders, config, device) for request, image in zip(requests, images)]
    time_ids = None
    if getattr(unet.config, "addition_embed_type", None) == "text_time":  # SD-XL: original size, crop corner, target size
        resolution = images[0].shape[-1]
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=unet.dtype)
    fast = config.stage1_mode == "fast"
    prediction_type = noise_scheduler.config.prediction_type
    optimizer = torch.optim.Adam([delta for run in runs for delta in run.deltas], lr=config.learning_rate)
    active = list(runs)
    batch = _ActiveBatch.of(active, encoders, fast, device)
    for step in range(config.num_steps):
        if not active:
            break
        draws = [run.draw_step(noise_scheduler.config.num_train_timesteps, device) for run in active]
        latents, noise, timesteps = (torch.cat(parts) for parts in zip(*draws))
        latents = latents * pipe.vae.config.scaling_factor
        noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(unet.dtype)

        with _autocast(device, config.dtype):
            with torch.no_grad():
                if prediction_type == "v_prediction":
                    true_target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    true_target = latents if prediction_type == "sample" else noise
                unet_target = true_target
                if not batch.real_noise.all():
                    unet_target = unet(noisy, timesteps, **_unet_inputs(batch.target, batch.destination_mask, time_ids)).sample
                target_noise = torch.where(batch.real_noise[:, None, None, None], true_target, unet_target.to(true_target.dtype))
            deltas = [torch.stack([run.deltas[e] for run in active]) for e in range(len(encoders))]  # (B, d) each
            if fast:
                prompt_rows = torch.arange(len(batch.owner), device=device)
                states = [prefix.index_put((prompt_rows, positions), delta[batch.owner].to(prefix.dtype), accumulate=True)
                          for prefix, positions, delta in zip(batch.prefix, batch.positions, deltas)]
                edited = _encode(encoders, batch.source, states=states)
            else:
                edited = _encode(encoders, batch.source, deltas=[d[batch.owner] for d in deltas], positions=batch.positions)
            prediction = unet(noisy, timesteps, **_unet_inputs(edited, batch.source_mask, time_ids)).sample
        work_dtype = runs[0].dtype
        losses = batch.per_concept_mean((prediction.to(work_dtype) - target_noise.to(work_dtype)).pow(2).flatten(1).mean(1))
        for delta, scales in zip(deltas, batch.decay_scales):
            losses = losses + scales * delta.norm(dim=1)
        if config.text_alignment_weight > 0:
            for pooled, target_pooled in zip(edited.pooled, batch.target.pooled):
                terms = batch.per_concept_mean((pooled.to(work_dtype) - target_pooled.to(work_dtype)).pow(2).mean(1))
                losses = losses + config.text_alignment_weight * batch.text_alignment * terms
        finite = torch.isfinite(losses.detach())
        for run, loss, ok in zip(active, losses.detach().tolist(), finite.tolist()):
            if not ok:
                run.error = EMCIDNumericalError(
                    f"stage 1 of {run.request.source!r} -> {run.request.destination!r}: the loss became {loss} at step "
                    f"{step}. Lower learning_rate (now {config.learning_rate}) or run the networks in float32 (dtype=None)."
                )
        going_on = [run for run, ok in zip(active, finite.tolist()) if ok]
        if going_on:  # a failed concept gets no gradient, and Adam leaves parameters without one untouched
            leaves = [delta for run in going_on for delta in run.deltas]
            gradients = torch.autograd.grad(losses[finite].sum(), leaves)
            for leaf, gradient in zip(leaves, gradients):
                leaf.grad = gradient
        optimizer.step()
        for run, loss in zip(going_on, losses.detach()[finite].tolist()):
            run.clamp()
            run.losses.append(loss)
            for delta in run.deltas:
                delta.grad = None
        still_running = [run for run in going_on if not run.plateaued(config)]
        if still_running != active and still_running:
            batch = _ActiveBatch.of(still_running, encoders, fast, device)
        active = still_running
    results: list[Stage1Result | EMCIDNumericalError] = []
    for run in runs:
        result = run.error or run.result(encoders)
        if isinstance(result, Stage1Result) and not all(torch.isfinite(v).all() for v in result.vectors.values()):
            result = EMCIDNumericalError(
                f"stage 1 of {run.request.source!r} -> {run.request.destination!r} gave a non-finite vector; lower learning_rate."
            )
        results.append(result)
    return results
