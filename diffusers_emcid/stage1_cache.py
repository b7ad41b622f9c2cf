"""Stage 1 over many concepts: vectors cached on disk by content, and the missing ones computed in concept batches,
shared out between the processes of `accelerate launch`."""

from __future__ import annotations

import logging

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from diffusers import DDPMScheduler, DiffusionPipeline
from tqdm.auto import tqdm

from .cache import TensorCache, digest
from .config import EMCIDConfig
from .encoders import EditedEncoder
from .errors import EMCIDNumericalError
from .requests import ConceptEdit
from .stage1 import Stage1Result, optimize_concept_vectors

logger = logging.getLogger(__name__)

STAGE1_FORMAT = "emcid-stage1-v3"


def process_state() -> PartialState:
    """accelerate's view of the processes this run has: one, or those of `accelerate launch`. CPU processes are
    recognised by `ACCELERATE_USE_CPU=1`, as `accelerate launch --cpu` sets it."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def cached_stage1(
    pipe: DiffusionPipeline,
    encoders: list[EditedEncoder],
    requests: list[ConceptEdit],
    config: EMCIDConfig,
    cache: TensorCache,
    model_digest: str,
    device: torch.device,
    progress: bool = True,
) -> list[Stage1Result]:
    """Stage 1 for every request, from the cache where possible.

    An entry's key is the model's digest (`cache.pipeline_digest`), the request's fingerprint and the config's
    stage-1 settings. Missing vectors are computed `concept_batch_size` concepts at a time (one at a time in
    `"reference"` mode) and cached as each batch ends. Under `accelerate launch` with several processes the missing
    concepts are shared out between the processes, each caches its own, and all of them then read every vector from
    the (shared) cache.

    Raises:
        EMCIDNumericalError: naming the concepts whose stage 1 failed, after the others were cached.
    """
    z_layers = {encoder.component: encoder.z_layer for encoder in encoders}
    keys = [digest(STAGE1_FORMAT, model_digest, r.fingerprint(), config.stage1_settings(z_layers)) for r in requests]
    entries = {key: cache.load("stage1", key) for key in keys}
    missing = [(key, request) for key, request in dict(zip(keys, requests)).items() if entries[key] is None]
    state = process_state()
    with state.split_between_processes(missing) as shard:
        failures = _compute_and_cache(pipe, encoders, shard, config, cache, device, progress)
    if state.num_processes > 1:
        failures = [failure for part in gather_object([failures]) for failure in part]
    if failures:
        raise EMCIDNumericalError(
            f"Stage 1 failed for {len(failures)} of {len(requests)} concepts (the others are cached, so a rerun "
            "computes only these):\n- " + "\n- ".join(failures)
        )
    entries.update({key: cache.load("stage1", key) for key, _ in missing})
    results = []
    for key, request in zip(keys, requests):
        result = Stage1Result.from_tensors(entries[key][0])
        if config.num_steps and result.clamp_hits == len(result.losses):
            logger.warning(
                "Stage 1 of %r -> %r: the norm bound clamp_norm_factor * ||h0|| was hit at every one of %d steps, "
                "so the edit is as strong as the bound allows, not as the loss asks. Lower learning_rate (now %g) "
                "or raise clamp_norm_factor (now %g).",
                request.source,
                request.destination,
                len(result.losses),
                config.learning_rate,
                config.clamp_norm_factor,
            )
        results.append(result)
    return results


def _compute_and_cache(
    pipe: DiffusionPipeline,
    encoders: list[EditedEncoder],
    work: list[tuple[str, ConceptEdit]],
    config: EMCIDConfig,
    cache: TensorCache,
    device: torch.device,
    progress: bool,
) -> list[str]:
    """Runs stage 1 for `(cache key, request)` pairs in concept batches and caches each vector; returns the
    messages of the concepts that failed."""
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's training noise schedule
    batch_size = config.concept_batch_size if config.stage1_mode == "fast" else 1
    failures: list[str] = []
    bar = tqdm(total=len(work), desc="EMCID stage 1", unit="concept", disable=not progress)
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        results = optimize_concept_vectors(
            pipe, encoders, [request for _, request in batch], config, noise_scheduler, device
        )
        for (key, request), result in zip(batch, results):
            if isinstance(result, EMCIDNumericalError):
                failures.append(str(result))
                continue
            cache.save(
                "stage1", key, result.to_tensors(), {"source": request.source, "destination": request.destination}
            )
        bar.update(len(batch))
        bar.set_postfix_str(f"last: {batch[-1][1].source!r} -> {batch[-1][1].destination!r}")
    bar.close()
    return failures
