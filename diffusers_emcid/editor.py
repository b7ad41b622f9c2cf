"""`EMCIDEditor`: the entry point that runs statistics, stage 1 and stage 2 on a pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Iterable, Iterator, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
from diffusers import DDPMScheduler, DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm

from .cache import ModuleFingerprints, TensorCache, digest
from .config import DEFAULT_PRESETS, KIND_PRESETS, EMCIDConfig
from .edits import ConceptEdits, base_weights_fingerprint
from .encoders import EditedEncoder, TextEncoderLayout, find_edited_encoders, module_device, pipeline_family
from .errors import EMCIDNumericalError
from .debias import (
    DEFAULT_MAX_ITER,
    DEFAULT_NUM_IMAGES,
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_STEP,
    DEFAULT_TOLERANCE,
    JudgeFn,
    attribute_phrases,
    blend_factors,
    blend_vectors,
    judge_ratios,
)
from .hooks import adapters_disabled, frozen, low_rank_output_offsets
from .requests import DEFAULT_TEMPLATES, ConceptEdit, as_concept_edits, canonical_order, load_image
from .stage1 import Stage1Result, image_resolution, optimize_concept_vectors, quiet_progress_bar, text_to_image_pipeline
from .stage2 import compute_stage2_deltas
from .key_statistics import CaptionSource, KeyStatistics, compute_key_second_moments, load_captions, sample_captions
from .tokens import check_prompt_lengths, subject_token_positions

logger = logging.getLogger(__name__)

STAGE1_FORMAT = "emcid-stage1-v3"
DEBIAS_TEMPLATES = ("a photo of {}", "an image of {}", "{}")
"""The paper's stage-1 templates for debiasing."""
STATISTICS_FORMAT = "emcid-statistics-v1"


def _process_state() -> PartialState:
    """accelerate's view of the processes this run has: one, or those of `accelerate launch`. CPU processes are
    recognised by `ACCELERATE_USE_CPU=1`, as `accelerate launch --cpu` sets it."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


class EMCIDEditor:
    """Edits concepts of a Stable Diffusion pipeline's text encoder(s) with EMCID.

    The pipeline is never modified: `edit` returns `ConceptEdits`, which `ConceptEdits.apply` adds to
    a pipeline as a LoRA adapter. Work is computed against the base weights (adapters of the pipeline
    are switched off meanwhile).

    Args:
        pipe: a Stable Diffusion 1.x/2.x pipeline (one CLIP text encoder) or an SD-XL pipeline (two), text-to-image,
            image-to-image or inpainting.
        config: the hyperparameters; defaults to the `"sd1-paper"` preset, or `"sdxl-paper"` for SD-XL. Without it,
            `debias` and `rectify` run with the presets of the paper's runs of those kinds (`KIND_PRESETS`:
            `"sd1-debias"`, `"sd1-rectify"`) as long as the config is left unchanged.
        cache_dir: where stage-1 vectors and key statistics are cached; defaults to `$EMCID_CACHE` or
            `emcid/` under the Hugging Face cache home.
        progress: show progress bars.

    Example:
        ```py
        editor = EMCIDEditor(pipe)
        editor.compute_statistics(captions)
        edits = editor.edit([("dog", "cat")])
        edits.apply(pipe)
        ```
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        config: EMCIDConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        missing = [name for name in ("text_encoder", "tokenizer", "unet", "vae", "scheduler") if getattr(pipe, name, None) is None]
        if missing:
            raise ValueError(
                f"{type(pipe).__name__} lacks {missing}; EMCID edits Stable Diffusion 1.x/2.x and SD-XL pipelines."
            )
        if pipe.unet.config.in_channels != 4:
            raise ValueError(
                f"{type(pipe).__name__}'s UNet takes {pipe.unet.config.in_channels} input channels (an inpainting "
                "checkpoint); EMCID trains through a text-to-image UNet. Edit the text-to-image model of the same base, "
                "then load the edits into this pipeline with load_concept_edits(..., force=True)."
            )
        self.pipe = pipe
        self.config = config if config is not None else EMCIDConfig.from_preset(DEFAULT_PRESETS[pipeline_family(pipe)])
        self._default_config = None if config is not None else dataclasses.replace(self.config)
        self.encoders: list[EditedEncoder] = find_edited_encoders(pipe, self.config)
        self.cache = TensorCache(cache_dir)
        self.progress = progress
        self._fingerprint = ModuleFingerprints()
        self._statistics: dict[str, KeyStatistics] = {}

    @property
    def layout(self) -> TextEncoderLayout:
        """The layout of the (first) text encoder."""
        return self.encoders[0].layout

    @property
    def layers(self) -> list[int]:
        """The edited layers of the (first) text encoder."""
        return self.encoders[0].layers

    @property
    def z_layer(self) -> int:
        """The z layer of the (first) text encoder."""
        return self.encoders[0].z_layer

    @property
    def z_layers(self) -> dict[str, int]:
        return {encoder.component: encoder.z_layer for encoder in self.encoders}

    # ---------------------------------------------------------------- shared plumbing

    @contextlib.contextmanager
    def _base_model(self) -> Iterator[torch.device]:
        """The pipeline's networks frozen, with adapters off, on the work device; all restored afterwards."""
        modules = [encoder.layout.model for encoder in self.encoders] + [self.pipe.unet, self.pipe.vae]
        extras = [getattr(self.pipe, name, None) for name in ("safety_checker", "image_encoder")]
        modules += [module for module in extras if isinstance(module, torch.nn.Module)]  # they run in image generation
        fused = [name for m in modules for name, layer in m.named_modules() if isinstance(layer, BaseTunerLayer) and layer.merged]
        if fused:
            raise ValueError(
                f"The pipeline has fused LoRA weights (e.g. {fused[0]}); EMCID edits the base model. Call "
                "pipe.unfuse_lora() (or unfuse_concept_edits()) first."
            )
        homes = [module_device(m) for m in modules]
        device = torch.device(self.config.device) if self.config.device else homes[0]
        with frozen(*modules), adapters_disabled(*modules):  # frozen outermost: it restores what PEFT's toggles change
            try:
                for module in modules:
                    module.to(device)
                yield device
            finally:
                for module, home in zip(modules, homes):
                    module.to(home)

    def _statistics_prefix(self, model_fingerprint: str, layer: int) -> str:
        """Statistics entries are named `{model}-layer{l}-{positions}-{captions}`, so that a model's entries of the
        configured positions can be listed."""
        positions = self.config.statistics_positions
        if positions == "pipeline":
            positions += f"{self.config.statistics_padding_weight:g}"
        return f"{model_fingerprint[:32]}-layer{layer}-{positions}-"

    @contextlib.contextmanager
    def _kind_settings(self, kind: str) -> Iterator[None]:
        """Runs with the preset of the paper's runs of `kind` (`KIND_PRESETS`) when the editor was built without a
        config and its config is unchanged; with the editor's own config otherwise."""
        name = KIND_PRESETS[pipeline_family(self.pipe)].get(kind)
        if name is None or self._default_config is None or self.config != self._default_config:
            yield
            return
        previous = self.config, self.encoders
        self.config = EMCIDConfig.from_preset(name)
        self.encoders = find_edited_encoders(self.pipe, self.config)
        try:
            yield
        finally:
            self.config, self.encoders = previous

    # ---------------------------------------------------------------- statistics

    def compute_statistics(
        self,
        captions: CaptionSource,
        *,
        column: str | None = None,
        split: str = "train",
        num_samples: int | None = None,
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Computes (or loads from the cache) C = E[k k^T] of every edited layer on the unedited model.

        Args:
            captions: a list of captions, a `.txt`/`.json`/`.jsonl` file, or a `datasets` name (with `column`).
            column: the caption field of JSON rows or dataset rows.
            split: the dataset split.
            num_samples: how many captions to use; defaults to `config.statistics_num_samples`.

        Returns:
            {text-encoder component: {layer: C (d_ff, d_ff) float32}}.
        """
        texts = sample_captions(load_captions(captions, column, split), num_samples or self.config.statistics_num_samples)
        suffix = digest(STATISTICS_FORMAT, digest(texts))[:32]
        with self._base_model():
            for encoder in self.encoders:
                fingerprint = self._encoder_fingerprint(encoder)
                statistics = self._load_statistics(encoder, fingerprint, suffix)
                if statistics is None:
                    covariances, count = compute_key_second_moments(
                        encoder.layout, encoder.tokenizer, texts, encoder.layers, self.config.statistics_batch_size,
                        self.progress, self.config.statistics_positions, self.config.statistics_padding_weight,
                    )
                    for layer, covariance in covariances.items():
                        self.cache.save("statistics", self._statistics_prefix(fingerprint, layer) + suffix, {"mom2": covariance},
                                        {"num_captions": str(len(texts)), "num_tokens": str(count), "layer": str(layer)})
                    statistics = KeyStatistics(covariances, count, fingerprint)
                message = statistics.rank_deficiency(encoder.layout.intermediate_size)
                if message:
                    logger.warning("%s: %s", encoder.component, message)
                self._statistics[encoder.component] = statistics
        return {component: dict(statistics.covariances) for component, statistics in self._statistics.items()}

    def _load_statistics(self, encoder: EditedEncoder, model_fingerprint: str, caption_set: str) -> KeyStatistics | None:
        """The cached statistics of one caption set, if every edited layer of `encoder` has them."""
        entries = {layer: self.cache.load("statistics", self._statistics_prefix(model_fingerprint, layer) + caption_set)
                   for layer in encoder.layers}
        if any(entry is None for entry in entries.values()):
            return None
        count = min(int(entry[1].get("num_tokens", 0)) for entry in entries.values())
        return KeyStatistics({layer: entry[0]["mom2"] for layer, entry in entries.items()}, count, model_fingerprint)

    def _statistics_for(self, encoder: EditedEncoder, model_fingerprint: str) -> KeyStatistics:
        """The statistics of an encoder: from memory, else from the newest cached caption set that covers every
        edited layer (layers never mix caption sets)."""
        known = self._statistics.get(encoder.component)
        if known is not None and known.model_fingerprint == model_fingerprint and set(encoder.layers) <= set(known.covariances):
            return known
        newest: dict[str, float] = {}
        for layer in encoder.layers:
            prefix = self._statistics_prefix(model_fingerprint, layer)
            for path in self.cache.find("statistics", prefix):
                caption_set = path.stem.removeprefix(prefix)
                newest[caption_set] = max(newest.get(caption_set, 0.0), path.stat().st_mtime)
        for caption_set in sorted(newest, key=newest.__getitem__, reverse=True):
            statistics = self._load_statistics(encoder, model_fingerprint, caption_set)
            if statistics is not None:
                self._statistics[encoder.component] = statistics
                return statistics
        raise ValueError(
            f"No key statistics for layers {encoder.layers} of this {encoder.component} (from one caption set). Call "
            "editor.compute_statistics(captions) once with many captions (the paper used 100,000 CCS captions): a "
            "list of strings, a .txt/.json/.jsonl file, or a dataset name with column='caption'. They are cached "
            f"under {self.cache.root / 'statistics'} and found again by later runs."
        )

    def _encoder_fingerprint(self, encoder: EditedEncoder) -> str:
        """What key statistics depend on: the encoder's weights and its tokenizer."""
        return digest(self._fingerprint(encoder.layout.model), self._tokenizer_digest(encoder))

    def has_statistics(self) -> bool:
        """Whether key statistics of every edited layer are known (computed or cached) for this model."""
        try:
            for encoder in self.encoders:
                self._statistics_for(encoder, self._encoder_fingerprint(encoder))
        except ValueError:
            return False
        return True

    def _checked_statistics(self) -> dict[str, KeyStatistics]:
        """The statistics of every edited encoder, refused if rank-deficient or numerically singular."""
        statistics = {e.component: self._statistics_for(e, self._encoder_fingerprint(e)) for e in self.encoders}
        for encoder in self.encoders:
            statistics[encoder.component].check_rank(encoder.layout.intermediate_size)
            statistics[encoder.component].check_conditioning(encoder.component, self.config.statistics_regularization)
        return statistics

    # ---------------------------------------------------------------- editing

    def _check_requests(self, requests: list[ConceptEdit]) -> None:
        """Fails fast on prompts the tokenizers cannot place, and on images that cannot be read."""
        for request in requests:
            for image in request.images or ():
                try:
                    load_image(image)
                except (OSError, ValueError) as error:
                    raise ValueError(f"ConceptEdit({request.source!r}): image {str(image)[:80]!r} cannot be used: {error}") from error
        for encoder in self.encoders:
            for request in requests:
                check_prompt_lengths(encoder.tokenizer, request.source_prompts + request.destination_prompts)
                subject_token_positions(encoder.tokenizer, request.source_prompts, request.source)

    def _stage1_key(self, request: ConceptEdit, model_digest: str) -> str:
        return digest(STAGE1_FORMAT, model_digest, request.fingerprint(), self.config.stage1_settings(self.z_layers))

    def _model_digest(self, fingerprints: dict[str, str]) -> str:
        """Everything of the model a stage-1 vector depends on: weights, configs, schedulers, tokenizers."""
        configs = [dict(module.config) for module in (self.pipe.unet, self.pipe.vae, self.pipe.scheduler)]
        configs = [{k: v for k, v in c.items() if k != "_use_default_values"} for c in configs]  # its order varies
        encoders = [(e.layout.model.config.to_dict(), self._tokenizer_digest(e)) for e in self.encoders]
        return digest(fingerprints, configs, type(self.pipe.scheduler).__name__, encoders)

    @staticmethod
    def _tokenizer_digest(encoder: EditedEncoder) -> str:
        """How an encoder's tokenizer splits text: its full definition where it has one, else its vocabulary."""
        backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return digest(sorted(encoder.tokenizer.get_vocab().items()))
        definition = json.loads(backend.to_str())  # parsed, so that digest sorts its maps (written in hash order)
        return digest({k: v for k, v in definition.items() if k not in ("truncation", "padding")})  # per-call settings

    def _model_fingerprints(self) -> dict[str, str]:
        modules = {encoder.component: encoder.layout.model for encoder in self.encoders}
        return {name: self._fingerprint(module) for name, module in {**modules, "unet": self.pipe.unet, "vae": self.pipe.vae}.items()}

    def edit(self, requests: Iterable[ConceptEdit | tuple[str, str]]) -> ConceptEdits:
        """Computes the edits of all `requests` jointly; the pipeline's weights are not changed.

        Stage-1 vectors are cached on disk by content, so a repeated or interrupted run recomputes only
        what is missing. Under `accelerate launch --num_processes n` (one pipeline per process, e.g. moved to
        `PartialState().device`, and one cache folder all processes share), stage 1 is shared out between the
        processes; the main process then runs stage 2 and every process returns its result. The result keeps
        the concepts in a canonical order (by source), so it does not depend on the order of `requests`.

        Args:
            requests: `ConceptEdit`s, or `(source, destination)` tuples with the default templates.

        Returns:
            The `ConceptEdits`; call `.apply(pipe)` to use them.

        Raises:
            ValueError / TypeError: for bad requests (before any heavy work), or when no key statistics exist.
            EMCIDNumericalError: for rank-deficient statistics (before any heavy work), or concepts whose stage 1
                diverged (after the others were computed and cached).
        """
        requests = canonical_order(as_concept_edits(requests))
        self._check_requests(requests)
        with self._base_model() as device:
            fingerprints = self._model_fingerprints()
            statistics = self._checked_statistics()
            results = self._stage1(requests, fingerprints, device)
            vectors = {e.component: torch.stack([r.vectors[e.component] for r in results]) for e in self.encoders}
            state = _process_state()
            edits = [self._solve(requests, vectors, statistics) if state.is_main_process else None]
            if state.num_processes > 1:
                broadcast_object_list(edits, from_process=0)
        edits[0].stage1_losses = [result.losses for result in results]
        return edits[0]

    def _stage1(self, requests: list[ConceptEdit], fingerprints: dict[str, str], device: torch.device) -> list[Stage1Result]:
        """Stage 1 for every request, from the cache where possible; numerical failures are collected.

        Missing vectors are computed `concept_batch_size` concepts at a time (one at a time in `"reference"` mode)
        and cached as each batch ends. Under `accelerate launch` with several processes, the missing concepts are
        shared out between the processes, each caches its own, and all of them then read every vector from the
        (shared) cache.
        """
        model_digest = self._model_digest(fingerprints)
        keys = [self._stage1_key(request, model_digest) for request in requests]
        entries = {key: self.cache.load("stage1", key) for key in keys}
        missing = [(key, request) for key, request in dict(zip(keys, requests)).items() if entries[key] is None]
        state = _process_state()
        with state.split_between_processes(missing) as shard:
            failures = self._compute_stage1(shard, device)
        if state.num_processes > 1:
            failures = [failure for part in gather_object([failures]) for failure in part]
        if failures:
            raise EMCIDNumericalError(
                f"Stage 1 failed for {len(failures)} of {len(requests)} concepts (the others are cached, so a rerun "
                "computes only these):\n- " + "\n- ".join(failures)
            )
        entries.update({key: self.cache.load("stage1", key) for key, _ in missing})
        results = []
        for key, request in zip(keys, requests):
            result = Stage1Result.from_tensors(entries[key][0])
            if self.config.num_steps and result.clamp_hits == len(result.losses):
                logger.warning(
                    "Stage 1 of %r -> %r: the norm bound clamp_norm_factor * ||h0|| was hit at every one of %d steps, "
                    "so the edit is as strong as the bound allows, not as the loss asks. Lower learning_rate (now %g) "
                    "or raise clamp_norm_factor (now %g).", request.source, request.destination, len(result.losses),
                    self.config.learning_rate, self.config.clamp_norm_factor,
                )
            results.append(result)
        return results

    def _compute_stage1(self, work: list[tuple[str, ConceptEdit]], device: torch.device) -> list[str]:
        """Runs stage 1 for `(cache key, request)` pairs in concept batches and caches each vector; returns the
        messages of the concepts that failed."""
        noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)  # the model's training noise schedule
        batch_size = self.config.concept_batch_size if self.config.stage1_mode == "fast" else 1
        failures: list[str] = []
        bar = tqdm(total=len(work), desc="EMCID stage 1", unit="concept", disable=not self.progress)
        for start in range(0, len(work), batch_size):
            batch = work[start : start + batch_size]
            results = optimize_concept_vectors(self.pipe, self.encoders, [request for _, request in batch], self.config,
                                               noise_scheduler, device)
            for (key, request), result in zip(batch, results):
                if isinstance(result, EMCIDNumericalError):
                    failures.append(str(result))
                    continue
                self.cache.save("stage1", key, result.to_tensors(), {"source": request.source, "destination": request.destination})
            bar.update(len(batch))
            bar.set_postfix_str(f"last: {batch[-1][1].source!r} -> {batch[-1][1].destination!r}")
        bar.close()
        return failures

    def solve(self, requests: Iterable[ConceptEdit | tuple[str, str]], vectors: dict[str, torch.Tensor]) -> ConceptEdits:
        """Stage 2 alone: writes concepts with known stage-1 vectors into the text encoders' layers.

        Args:
            requests: the concepts (their prompts give the keys).
            vectors: {component: Z (N, d)}, one row per request, for every edited text encoder.
        """
        requests = as_concept_edits(requests)
        expected = {e.component for e in self.encoders}
        if set(vectors) != expected or any(v.shape[0] != len(requests) for v in vectors.values()):
            raise ValueError(
                f"Expected vectors for {sorted(expected)} with {len(requests)} rows each, got "
                f"{ {name: tuple(v.shape) for name, v in vectors.items()} }."
            )
        ordered = canonical_order(requests)
        rows = [requests.index(request) for request in ordered]
        vectors = {name: v[rows] for name, v in vectors.items()}
        self._check_requests(ordered)
        with self._base_model():
            return self._solve(ordered, vectors, self._checked_statistics())

    def merge(self, first: ConceptEdits, second: ConceptEdits) -> ConceptEdits:
        """One edit set with the concepts of both, solved jointly by stage 2 from their stored vectors (no stage 1),
        with this editor's statistics.

        Raises:
            ValueError: if an edit set has no vectors, or the sets (or this editor) differ in stage-2 settings or
                layers.
        """
        requests, vectors = first.concatenate(second)
        first.check_solvable_with(self.config, self.z_layers)
        return self.solve(requests, vectors)

    def without(self, edits: ConceptEdits, sources: Iterable[str]) -> ConceptEdits:
        """`edits` minus the concepts with these sources (case-insensitive), re-solved by stage 2 like `merge`."""
        requests, vectors = edits.select_without(sources)
        edits.check_solvable_with(self.config, self.z_layers)
        return self.solve(requests, vectors)

    def _solve(self, requests: list[ConceptEdit], vectors: dict[str, torch.Tensor],
               statistics: dict[str, KeyStatistics]) -> ConceptEdits:
        """Stage 2 of each encoder for canonically ordered requests, inside `_base_model()`."""
        deltas = {}
        for encoder in self.encoders:
            deltas[encoder.component] = compute_stage2_deltas(
                encoder.layout, encoder.tokenizer, requests, vectors[encoder.component], encoder.layers, encoder.z_layer,
                statistics[encoder.component].regularized(self.config.statistics_regularization),
                self.config.edit_weight, encoder.preservation_weight,
                self.config.residual, self.config.stage2_batch_size, self.progress, self.config.stage2_keys,
            )
        return ConceptEdits(
            requests=list(requests),
            vectors={name: v.float().cpu() for name, v in vectors.items()},
            deltas=deltas,
            config=dataclasses.replace(self.config),  # a copy: later changes to the editor do not rewrite history
            z_layers=self.z_layers,
            base_model=getattr(self.pipe, "name_or_path", None) or None,
            base_fingerprints={e.component: base_weights_fingerprint(e.layout, e.layers) for e in self.encoders},
        )

    # ---------------------------------------------------------------- the paper's kinds of edit

    def erase(
        self,
        sources: Sequence[str],
        destination: str = "art",
        templates: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> ConceptEdits:
        """Erases concepts (styles, objects, words) by editing them towards a generic `destination`.

        Erasing is an edit like any other: for artist styles the paper uses destination "art", the templates
        "painting by {}", "artwork by {}", "style of {}" and the `"sd1-artists"` preset; `""` or `" "` erase
        towards an (almost) unconditional prompt.

        Args:
            sources: the concepts to erase, all in one call.
            destination: what they become.
            templates: prompt templates; the paper's object templates by default.
            seed: one seed for every source (default: each request's stable hash).
        """
        if isinstance(sources, str):
            raise TypeError(f"erase() takes a list of sources, e.g. [{sources!r}].")
        return self.edit([
            ConceptEdit(source, destination, tuple(templates) if templates is not None else DEFAULT_TEMPLATES, seed)
            for source in sources
        ])

    def rectify(self, requests: Iterable[ConceptEdit | tuple[str, str]], text_alignment: bool | None = None) -> ConceptEdits:
        """Rectifies concepts the model draws wrongly, learning from real images of the destination.

        Requests with `images` are trained against the true noise of those images (`use_real_noise`)
        instead of the frozen model's prediction for the destination; requests without images are plain
        edits.

        Args:
            requests: typically `ConceptEdit(source="tench", destination="real tench", images=[...])`.
            text_alignment: if given, overrides each request's text-alignment switch (the paper turns it off for
                classes the model cannot draw at all).
        """
        rectified = []
        for request in as_concept_edits(requests):
            changes = {"use_real_noise": request.images is not None}
            if text_alignment is not None:
                changes["text_alignment"] = text_alignment
            rectified.append(dataclasses.replace(request, **changes))
        with self._kind_settings("rectify"):
            return self.edit(rectified)

    def debias(
        self,
        professions: Sequence[str],
        attributes: Sequence[str] = ("a female {}", "a male {}"),
        judge: JudgeFn | None = None,
        templates: Sequence[str] = DEBIAS_TEMPLATES,
        num_images: int = DEFAULT_NUM_IMAGES,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        tolerance: float = DEFAULT_TOLERANCE,
        step: float = DEFAULT_STEP,
        max_iter: int = DEFAULT_MAX_ITER,
    ) -> ConceptEdits:
        """Balances attributes (e.g. gender) in the images of professions; see `diffusers_emcid.debias`.

        Per profession, stage 1 runs once per attribute phrase with one seed; the vectors are blended with
        factors tuned by a feedback loop that draws `num_images` images with the blended edit (with the config's
        image steps, guidance and resolution) and asks `judge` which attribute each shows. All professions' blended vectors then go through one joint stage 2
        ("mixed" mode): the result is one adapter.

        Args:
            professions: e.g. `["a doctor", "a nurse"]`.
            attributes: attribute templates, filled with the profession without its article.
            judge: `judge(images, phrases) -> (num_images, n) probabilities`, e.g. `clip_zero_shot_judge(model,
                processor)` with a CLIP model you have.
            templates: the stage-1 prompt templates (the paper's debiasing templates by default).
            num_images, prompt_template, tolerance, step, max_iter: the feedback loop's settings.
        """
        if judge is None or not callable(judge):
            raise TypeError("debias() needs judge=callable(images, phrases) -> probabilities, e.g. clip_zero_shot_judge(model, processor).")
        if isinstance(professions, str) or not professions:
            raise TypeError(f"debias() takes a non-empty list of professions, e.g. ['a doctor'], got {professions!r}.")
        if len(attributes) < 2:
            raise ValueError(f"debias() balances at least two attributes, got {list(attributes)!r}; e.g. ['a female {{}}', 'a male {{}}'].")
        if not (isinstance(num_images, int) and num_images > 0 and isinstance(max_iter, int) and max_iter > 0
                and step > 0 and tolerance >= 0):
            raise ValueError(
                f"debias() needs num_images > 0, max_iter > 0, step > 0 and tolerance >= 0; got {num_images}, {max_iter}, "
                f"{step}, {tolerance}."
            )
        groups = []
        for profession in professions:
            seed = int(digest("emcid-debias", profession, list(templates))[:8], 16) & 0x7FFFFFFF
            phrases = attribute_phrases(profession, attributes)
            groups.append((profession, seed, phrases,
                           [ConceptEdit(profession, phrase, tuple(templates), seed) for phrase in phrases]))
        as_concept_edits([group[3][0] for group in groups])  # one entry per profession
        every_request = [request for group in groups for request in group[3]]
        self._check_requests(every_request)
        with self._kind_settings("debias"), self._base_model() as device:
            fingerprints = self._model_fingerprints()
            statistics = self._checked_statistics()
            results = self._stage1(every_request, fingerprints, device)
            by_request = dict(zip((r.fingerprint() for r in every_request), results))
            blended_requests, blended_vectors = [], {e.component: [] for e in self.encoders}
            for profession, seed, phrases, requests in groups:
                vectors = {e.component: torch.stack([by_request[r.fingerprint()].vectors[e.component] for r in requests])
                           for e in self.encoders}
                representative = ConceptEdit(profession, " / ".join(phrases), tuple(templates), seed)

                def measure(factors: torch.Tensor) -> torch.Tensor:
                    blend = {c: blend_vectors(v, factors)[None] for c, v in vectors.items()}
                    probe = self._solve([representative], blend, statistics)
                    drawer = text_to_image_pipeline(self.pipe)
                    with self._deltas_in_effect(probe), quiet_progress_bar(drawer):
                        resolution = image_resolution(self.pipe, self.config)
                        images = drawer(
                            prompt_template.format(profession), num_images_per_prompt=num_images,
                            num_inference_steps=self.config.image_num_inference_steps,
                            guidance_scale=self.config.image_guidance_scale, height=resolution, width=resolution,
                            generator=torch.Generator().manual_seed(seed), output_type="pil",
                        ).images
                    return judge_ratios(judge, images, phrases)

                search = blend_factors(measure, len(phrases), tolerance, step, max_iter)
                logger.info("Debias %r: factors %s after %d measurement(s) (converged: %s), ratios %s", profession,
                            search.factors.tolist(), search.iterations, search.converged, search.ratios.tolist())
                blended_requests.append(representative)
                for component, v in vectors.items():
                    blended_vectors[component].append(blend_vectors(v, search.factors))
            ordered = canonical_order(blended_requests)
            rows = [blended_requests.index(r) for r in ordered]
            stacked = {c: torch.stack(v)[rows] for c, v in blended_vectors.items()}
            return self._solve(ordered, stacked, statistics)

    @contextlib.contextmanager
    def _deltas_in_effect(self, edits: ConceptEdits) -> Iterator[None]:
        """The pipeline computes as if `edits` were applied (through hooks; its weights stay untouched)."""
        with contextlib.ExitStack() as stack:
            for encoder in self.encoders:
                modules = {str(layer): encoder.layout.fc2(layer) for layer in edits.deltas[encoder.component]}
                offsets = stack.enter_context(low_rank_output_offsets(modules))
                for layer, delta in edits.deltas[encoder.component].items():
                    offsets[str(layer)] = (delta.up, delta.down)
            yield
