"""`EMCIDEditor`: the entry point that runs statistics, stage 1 and stage 2 on a pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterable, Iterator, Sequence

import torch
from accelerate.utils import broadcast_object_list
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer

from .cache import ModuleFingerprints, TensorCache, pipeline_digest, text_encoder_fingerprint
from .config import DEFAULT_PRESETS, KIND_PRESETS, EMCIDConfig
from .debias import (
    DEBIAS_TEMPLATES,
    DEFAULT_MAX_ITER,
    DEFAULT_NUM_IMAGES,
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_STEP,
    DEFAULT_TOLERANCE,
    JudgeFn,
    profession_requests,
    tune_blends,
)
from .edits import ConceptEdits, base_weights_fingerprint
from .encoders import EditedEncoder, TextEncoderLayout, find_edited_encoders, module_device, pipeline_family
from .hooks import adapters_disabled, frozen
from .key_statistics import CaptionSource, KeyStatistics, StatisticsStore, load_captions, sample_captions
from .requests import DEFAULT_TEMPLATES, ConceptEdit, as_concept_edits, canonical_order, load_image
from .stage1 import Stage1Result
from .stage1_cache import cached_stage1, process_state
from .stage2 import compute_stage2_deltas
from .tokens import check_prompt_lengths, subject_token_positions

logger = logging.getLogger(__name__)


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
        self.statistics = StatisticsStore(self.cache)
        self._fingerprint = ModuleFingerprints()

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
        computed = {}
        with self._base_model():
            for encoder in self.encoders:
                statistics = self.statistics.compute(
                    encoder.component, encoder.layout, encoder.tokenizer, encoder.layers,
                    self._encoder_fingerprint(encoder), texts, self.config, self.progress,
                )
                message = statistics.rank_deficiency(encoder.layout.intermediate_size)
                if message:
                    logger.warning("%s: %s", encoder.component, message)
                computed[encoder.component] = dict(statistics.covariances)
        return computed

    def _encoder_fingerprint(self, encoder: EditedEncoder) -> str:
        return text_encoder_fingerprint(self._fingerprint, encoder.layout.model, encoder.tokenizer)

    def _statistics_of(self, encoder: EditedEncoder) -> KeyStatistics:
        return self.statistics.find(encoder.component, encoder.layers, self._encoder_fingerprint(encoder), self.config)

    def has_statistics(self) -> bool:
        """Whether key statistics of every edited layer are known (computed or cached) for this model."""
        try:
            for encoder in self.encoders:
                self._statistics_of(encoder)
        except ValueError:
            return False
        return True

    def _checked_statistics(self) -> dict[str, KeyStatistics]:
        """The statistics of every edited encoder, refused if rank-deficient or numerically singular."""
        statistics = {encoder.component: self._statistics_of(encoder) for encoder in self.encoders}
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

    def _stage1(self, requests: list[ConceptEdit], device: torch.device) -> list[Stage1Result]:
        """Stage 1 of every request, from the cache where possible (`stage1_cache.cached_stage1`)."""
        text_encoders = {encoder.component: (encoder.layout.model, encoder.tokenizer) for encoder in self.encoders}
        model_digest = pipeline_digest(self.pipe, text_encoders, self._fingerprint)
        return cached_stage1(self.pipe, self.encoders, requests, self.config, self.cache, model_digest, device,
                             self.progress)

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
            statistics = self._checked_statistics()
            results = self._stage1(requests, device)
            vectors = {e.component: torch.stack([r.vectors[e.component] for r in results]) for e in self.encoders}
            state = process_state()
            edits = [self._solve(requests, vectors, statistics) if state.is_main_process else None]
            if state.num_processes > 1:
                broadcast_object_list(edits, from_process=0)
        edits[0].stage1_losses = [result.losses for result in results]
        return edits[0]

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
        image steps, guidance and resolution) and asks `judge` which attribute each shows. All professions' blended
        vectors then go through one joint stage 2 ("mixed" mode): the result is one adapter.

        Args:
            professions: e.g. `["a doctor", "a nurse"]`.
            attributes: attribute templates, filled with the profession without its article.
            judge: `judge(images, phrases) -> (num_images, n) probabilities`, e.g. `clip_zero_shot_judge(model,
                processor)` with a CLIP model you have.
            templates: the stage-1 prompt templates (the paper's debiasing templates by default).
            num_images, prompt_template, tolerance, step, max_iter: the feedback loop's settings.
        """
        if judge is None or not callable(judge):
            raise TypeError(
                "debias() needs judge=callable(images, phrases) -> probabilities, e.g. clip_zero_shot_judge(model, "
                "processor)."
            )
        groups = profession_requests(professions, attributes, templates, num_images, tolerance, step, max_iter)
        every_request = [request for group in groups for request in group.requests]
        self._check_requests(every_request)
        with self._kind_settings("debias"), self._base_model() as device:
            statistics = self._checked_statistics()
            results = self._stage1(every_request, device)
            vectors = {e.component: torch.stack([r.vectors[e.component] for r in results]) for e in self.encoders}
            requests, blended = tune_blends(
                self.pipe, self.encoders, self.config, groups, vectors,
                lambda requests, vectors: self._solve(requests, vectors, statistics), judge, prompt_template, num_images,
                tolerance, step, max_iter,
            )
            return self._solve(requests, blended, statistics)
