"""The paper's kinds of edit besides a plain update: erasure, rectification with real images, and debiasing, as
methods of `EMCIDEditor` (`ConceptKindsMixin`), each run with the settings of the paper's runs of that kind."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, Iterator, Sequence

import torch

from .config import EMCIDConfig
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
from .edits import ConceptEdits
from .encoders import find_edited_encoders
from .families import pipeline_family
from .requests import DEFAULT_TEMPLATES, ConceptEdit, as_concept_edits


class ConceptKindsMixin:
    """`erase`, `rectify` and `debias` for `EMCIDEditor`, built on its `edit`, `_stage1` and `_solve` (and its
    `pipe`, `config`, `encoders`)."""

    @contextlib.contextmanager
    def _kind_settings(self, kind: str) -> Iterator[None]:
        """Runs with the preset of the paper's runs of `kind` (`PipelineFamily.kind_presets`) when the editor was built
        without a config and its config is unchanged; with the editor's own config otherwise."""
        name = pipeline_family(self.pipe).kind_presets.get(kind)
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
        return self.edit(
            [
                ConceptEdit(source, destination, tuple(templates) if templates is not None else DEFAULT_TEMPLATES, seed)
                for source in sources
            ]
        )

    def rectify(
        self, requests: Iterable[ConceptEdit | tuple[str, str]], text_alignment: bool | None = None
    ) -> ConceptEdits:
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
                self.pipe,
                self.encoders,
                self.config,
                groups,
                vectors,
                lambda requests, vectors: self._solve(requests, vectors, statistics),
                judge,
                prompt_template,
                num_images,
                tolerance,
                step,
                max_iter,
            )
            return self._solve(requests, blended, statistics)
