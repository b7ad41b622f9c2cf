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
- with `stopping_interval` set, a concept stops once its delta has converged (it moved by less than
  `stopping_tolerance * ||h0||` over the last interval); the paper always runs `num_steps`;
- SD-XL: each encoder tokenises its own prompts, destinations included (theirs reuse the first tokenizer's
  destination ids); noise is added with DDPM's schedule of the model's training betas, not the sampling
  scheduler; the time ids describe the training images' real size and crop; the second encoder's delta is
  written once (in stage 2; theirs adds it twice); its vectors are cached together with the first encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from torch.profiler import record_function

from .cache import digest
from .conditioning import Conditioning, encode_prompts, length_mask, pad_id, padded_cat, tokenize_alike, unet_inputs
from .config import EMCIDConfig
from .encoders import EditedEncoder
from .errors import EMCIDNumericalError
from .families import pipeline_family
from .hooks import captured_outputs, run_until_stopped
from .images import network_autocast, training_images
from .requests import ConceptEdit
from .tokens import TokenizedPrompts, subject_token_positions


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


def optimization_dtype(pipe: DiffusionPipeline) -> torch.dtype:
    """The dtype of delta, its Adam state and the loss: float64 for a float64 pipeline (exact comparisons), else
    float32 whatever the networks' precision."""
    return torch.float64 if pipe.unet.dtype == torch.float64 else torch.float32


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

        self.source = [b.to(device) for b in tokenize_alike(encoders, request.source_prompts, config.stage1_padding)]
        self.destination = [
            b.to(device) for b in tokenize_alike(encoders, request.destination_prompts, config.stage1_padding)
        ]
        self.positions = [
            torch.tensor(subject_token_positions(e.tokenizer, request.source_prompts, request.source), device=device)
            for e in encoders
        ]
        rows = torch.arange(num_prompts, device=device)
        self.prefix, self.h0 = [], []
        with torch.no_grad(), network_autocast(device, config.dtype):
            for encoder, batch, position in zip(encoders, self.source, self.positions):
                z_module = encoder.layout.layers[encoder.z_layer]
                with captured_outputs({"z": z_module}, stop_at=z_module) as captured:
                    run_until_stopped(
                        encoder.layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask
                    )
                self.prefix.append(captured["z"])  # (P, T, d)
                self.h0.append(captured["z"][rows, position][0].to(self.dtype))
            self.target = encode_prompts(encoders, self.destination)
        self.deltas = [torch.zeros_like(h, requires_grad=True) for h in self.h0]
        self.radii = [config.clamp_norm_factor * h.norm() for h in self.h0]
        self.decay_scales = [config.weight_decay / h.norm() ** 2 for h in self.h0]  # the decay is ||delta|| / ||h0||^2
        self.losses: list[float] = []
        self.clamp_hits = 0
        self.checkpoint: list[torch.Tensor] | None = None  # the deltas at the last convergence check
        self.error: EMCIDNumericalError | None = None

    @property
    def source_length(self) -> int:
        return self.source[0].input_ids.shape[1]

    @property
    def destination_length(self) -> int:
        return self.destination[0].input_ids.shape[1]

    def draw_step(
        self, num_train_timesteps: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    def converged(self, config: EMCIDConfig) -> bool:
        """At every `stopping_interval`-th step: whether each delta moved by less than `stopping_tolerance * ||h0||`
        since the check before (the first check only records the deltas)."""
        interval = config.stopping_interval
        if interval is None or len(self.losses) % interval:
            return False
        previous, self.checkpoint = self.checkpoint, [delta.detach().clone() for delta in self.deltas]
        if previous is None:
            return False
        return all(
            float((now - before).norm()) < config.stopping_tolerance * float(h.norm())
            for now, before, h in zip(self.checkpoint, previous, self.h0)
        )

    def result(self, encoders: list[EditedEncoder]) -> Stage1Result:
        vectors = {e.component: (h + d.detach()).cpu() for e, h, d in zip(encoders, self.h0, self.deltas)}
        return Stage1Result(
            vectors=vectors,
            h0={e.component: h.cpu() for e, h in zip(encoders, self.h0)},
            losses=torch.tensor(self.losses),
            clamp_hits=self.clamp_hits,
        )


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
    target: Conditioning
    real_noise: torch.Tensor
    text_alignment: torch.Tensor
    decay_scales: list[torch.Tensor]

    @classmethod
    def of(
        cls, runs: list[_ConceptRun], encoders: list[EditedEncoder], fast: bool, device: torch.device
    ) -> "_ActiveBatch":
        rows = [run.num_prompts for run in runs]
        owner = torch.arange(len(runs), device=device).repeat_interleave(torch.tensor(rows, device=device))
        encoder_indices = range(len(encoders))
        return cls(
            runs=runs,
            owner=owner,
            counts=torch.tensor(rows, device=device, dtype=runs[0].dtype),
            source=[
                TokenizedPrompts(
                    padded_cat([run.source[e].input_ids for run in runs], pad_id(encoders[e])),
                    padded_cat([run.source[e].attention_mask for run in runs]),
                )
                for e in encoder_indices
            ],
            positions=[torch.cat([run.positions[e] for run in runs]) for e in encoder_indices],
            prefix=[padded_cat([run.prefix[e] for run in runs]) for e in encoder_indices] if fast else None,
            source_mask=length_mask([run.source_length for run in runs], rows, device),
            destination_mask=length_mask([run.destination_length for run in runs], rows, device),
            target=Conditioning(
                padded_cat([run.target.hidden for run in runs]),
                [torch.cat(p) for p in zip(*(run.target.pooled for run in runs))],
            ),
            real_noise=torch.tensor([run.request.use_real_noise for run in runs], device=device)[owner],
            text_alignment=torch.tensor(
                [run.request.text_alignment for run in runs], device=device, dtype=runs[0].dtype
            ),
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
    if pipeline_family(pipe).time_ids:  # original size, crop corner, target size
        resolution = images[0].shape[-1]
        time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=unet.dtype
        )
    fast = config.stage1_mode == "fast"
    prediction_type = noise_scheduler.config.prediction_type
    optimizer = torch.optim.Adam([delta for run in runs for delta in run.deltas], lr=config.learning_rate)
    active = list(runs)
    batch = _ActiveBatch.of(active, encoders, fast, device)
    for step in range(config.num_steps):
        if not active:
            break
        with record_function("emcid.stage1.step"):
            with record_function("emcid.stage1.draws"):
                draws = [run.draw_step(noise_scheduler.config.num_train_timesteps, device) for run in active]
                latents, noise, timesteps = (torch.cat(parts) for parts in zip(*draws))
                latents = latents * pipe.vae.config.scaling_factor
                noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(unet.dtype)

            with network_autocast(device, config.dtype):
                with torch.no_grad(), record_function("emcid.stage1.unet_target"):
                    if prediction_type == "v_prediction":
                        true_target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        true_target = latents if prediction_type == "sample" else noise
                    unet_target = true_target
                    if not batch.real_noise.all():
                        unet_target = unet(
                            noisy, timesteps, **unet_inputs(batch.target, batch.destination_mask, time_ids)
                        ).sample
                    target_noise = torch.where(
                        batch.real_noise[:, None, None, None], true_target, unet_target.to(true_target.dtype)
                    )
                deltas = [torch.stack([run.deltas[e] for run in active]) for e in range(len(encoders))]  # (B, d) each
                with record_function("emcid.stage1.text_encoder"):
                    if fast:
                        prompt_rows = torch.arange(len(batch.owner), device=device)
                        states = [
                            prefix.index_put(
                                (prompt_rows, positions), delta[batch.owner].to(prefix.dtype), accumulate=True
                            )
                            for prefix, positions, delta in zip(batch.prefix, batch.positions, deltas)
                        ]
                        edited = encode_prompts(encoders, batch.source, states=states)
                    else:
                        edited = encode_prompts(
                            encoders, batch.source, deltas=[d[batch.owner] for d in deltas], positions=batch.positions
                        )
                with record_function("emcid.stage1.unet_edited"):
                    prediction = unet(noisy, timesteps, **unet_inputs(edited, batch.source_mask, time_ids)).sample
            work_dtype = runs[0].dtype
            losses = batch.per_concept_mean(
                (prediction.to(work_dtype) - target_noise.to(work_dtype)).pow(2).flatten(1).mean(1)
            )
            for delta, scales in zip(deltas, batch.decay_scales):
                losses = losses + scales * delta.norm(dim=1)
            if config.text_alignment_weight > 0:
                for pooled, target_pooled in zip(edited.pooled, batch.target.pooled):
                    terms = batch.per_concept_mean(
                        (pooled.to(work_dtype) - target_pooled.to(work_dtype)).pow(2).mean(1)
                    )
                    losses = losses + config.text_alignment_weight * batch.text_alignment * terms
            finite = torch.isfinite(losses.detach())
            values, oks = losses.detach().tolist(), finite.tolist()  # one copy to the host per step
            for run, loss, ok in zip(active, values, oks):
                if not ok:
                    run.error = EMCIDNumericalError(
                        f"stage 1 of {run.request.source!r} -> {run.request.destination!r}: the loss became {loss} "
                        f"at step {step}. Lower learning_rate (now {config.learning_rate}) or run the networks in "
                        "float32 (dtype=None)."
                    )
            going_on = [run for run, ok in zip(active, oks) if ok]
            if going_on:  # a failed concept gets no gradient, and Adam leaves parameters without one untouched
                leaves = [delta for run in going_on for delta in run.deltas]
                with record_function("emcid.stage1.backward"):
                    gradients = torch.autograd.grad(losses[finite].sum(), leaves)
                for leaf, gradient in zip(leaves, gradients):
                    leaf.grad = gradient
            with record_function("emcid.stage1.optimizer"):
                optimizer.step()
            for run, loss in zip(going_on, [value for value, ok in zip(values, oks) if ok]):
                run.clamp()
                run.losses.append(loss)
                for delta in run.deltas:
                    delta.grad = None
            still_running = [run for run in going_on if not run.converged(config)]
            if still_running != active and still_running:
                batch = _ActiveBatch.of(still_running, encoders, fast, device)
            active = still_running
    results: list[Stage1Result | EMCIDNumericalError] = []
    for run in runs:
        result = run.error or run.result(encoders)
        if isinstance(result, Stage1Result) and not all(torch.isfinite(v).all() for v in result.vectors.values()):
            result = EMCIDNumericalError(
                f"stage 1 of {run.request.source!r} -> {run.request.destination!r} gave a non-finite vector; "
                "lower learning_rate."
            )
        results.append(result)
    return results
