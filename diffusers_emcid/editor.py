"""`EMCIDEditor`: the entry point that runs statistics, stage 1 and stage 2 on a pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterable

import torch
from accelerate.utils import broadcast_object_list
from diffusers import DiffusionPipeline

from .cache import ModuleFingerprints, TensorCache, pipeline_digest
from .config import EMCIDConfig
from .edits import ConceptEdits, base_weights_fingerprint
from .encoders import EditedEncoder, TextEncoderLayout, check_editable_pipeline, find_edited_encoders
from .families import pipeline_family
from .hooks import base_networks
from .key_statistics import KeyStatistics, StatisticsStore
from .kinds import ConceptKindsMixin
from .requests import ConceptEdit, as_concept_edits, canonical_order
from .shared_statistics import StatisticsMixin
from .stage1 import Stage1Result
from .stage1_cache import cached_stage1, process_state
from .stage2 import compute_stage2_deltas
from .tokens import check_requests

logger = logging.getLogger(__name__)


class EMCIDEditor(ConceptKindsMixin, StatisticsMixin):
    """Edits concepts of a Stable Diffusion pipeline's text encoder(s) with EMCID.

    The pipeline is never modified: `edit` returns `ConceptEdits`, which `ConceptEdits.apply` adds to
    a pipeline as a LoRA adapter. Work is computed against the base weights (adapters of the pipeline
    are switched off meanwhile).

    Args:
        pipe: a Stable Diffusion 1.x/2.x pipeline (one CLIP text encoder) or an SD-XL pipeline (two), text-to-image,
            image-to-image or inpainting.
        config: the hyperparameters; defaults to the preset of the pipeline's family (`"sd1-paper"`, or
            `"sdxl-paper"` for SD-XL: `PipelineFamily.default_preset`). Without it, `debias` and `rectify` run with the
            presets of the paper's runs of those kinds (`PipelineFamily.kind_presets`: `"sd1-debias"`,
            `"sd1-rectify"`) as long as the config is left unchanged.
        cache_dir: where stage-1 vectors and key statistics are cached; defaults to `$EMCID_CACHE` or
            `emcid/` under the Hugging Face cache home.
        progress: show progress bars.

    Example:
        ```py
        editor = EMCIDEditor(pipe)
        editor.compute_statistics()  # or editor.load_statistics(repo_id) to use shared ones
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
        check_editable_pipeline(pipe)
        self.pipe = pipe
        self.config = config if config is not None else EMCIDConfig.from_preset(pipeline_family(pipe).default_preset)
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

    def _base_model(self) -> contextlib.AbstractContextManager[torch.device]:
        """The pipeline's networks frozen, with adapters off, on the work device; all restored afterwards."""
        modules = [encoder.layout.model for encoder in self.encoders] + [self.pipe.unet, self.pipe.vae]
        extras = [getattr(self.pipe, name, None) for name in ("safety_checker", "image_encoder")]
        modules += [module for module in extras if isinstance(module, torch.nn.Module)]  # they run in image generation
        return base_networks(modules, self.config.device)

    def _check_requests(self, requests: list[ConceptEdit]) -> None:
        check_requests(requests, [encoder.tokenizer for encoder in self.encoders])

    def _stage1(self, requests: list[ConceptEdit], device: torch.device) -> list[Stage1Result]:
        """Stage 1 of every request, from the cache where possible (`stage1_cache.cached_stage1`)."""
        text_encoders = {encoder.component: (encoder.layout.model, encoder.tokenizer) for encoder in self.encoders}
        model_digest = pipeline_digest(self.pipe, text_encoders, self._fingerprint)
        return cached_stage1(
            self.pipe, self.encoders, requests, self.config, self.cache, model_digest, device, self.progress
        )

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

    def solve(
        self, requests: Iterable[ConceptEdit | tuple[str, str]], vectors: dict[str, torch.Tensor]
    ) -> ConceptEdits:
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

    def _solve(
        self, requests: list[ConceptEdit], vectors: dict[str, torch.Tensor], statistics: dict[str, KeyStatistics]
    ) -> ConceptEdits:
        """Stage 2 of each encoder for canonically ordered requests, inside `_base_model()`."""
        deltas = {}
        for encoder in self.encoders:
            deltas[encoder.component] = compute_stage2_deltas(
                encoder.layout,
                encoder.tokenizer,
                requests,
                vectors[encoder.component],
                encoder.layers,
                encoder.z_layer,
                statistics[encoder.component].regularized(self.config.statistics_regularization),
                self.config.edit_weight,
                encoder.preservation_weight,
                self.config.residual,
                self.config.stage2_batch_size,
                self.progress,
                self.config.stage2_keys,
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
