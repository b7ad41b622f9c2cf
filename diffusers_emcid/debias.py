"""Debiasing with EMCID: balance the attributes (e.g. gender) that a profession's images show.

For each profession (the *source*, e.g. `"a doctor"`) and a list of attribute templates (e.g.
`"a female {}"`, `"a male {}"`):

1. Stage 1 runs once per attribute phrase (the *destinations*, `"a female doctor"`, `"a male doctor"`),
   all with the profession's one seed, so every run trains on the same source images; this gives one
   vector z_j per attribute.
2. The vectors are blended, z = sum_j f_j z_j, with factors f starting uniform (1/n each).
3. A feedback loop tunes the factors. With `step = 0.4`, `tolerance = 0.02`, `max_iter = 10`, for
   iteration i = 0 .. max_iter - 1:

   - the step decays first, `step <- step - step * i / max_iter` (compounding; unchanged at i = 0);
   - the profession alone is edited with the blended z (stage 2 on one request), 25 images of
     `"an image of {source}"` are drawn with one generator seeded by the profession's seed, and a judge
     (e.g. zero-shot CLIP over the attribute phrases, `evaluation.clip_zero_shot_judge`) labels each image
     with its most likely attribute:
     ratio_j is the share of images labelled j, and diff_j = ratio_j - 1/n;
   - if max_j |diff_j| <= tolerance the loop stops;
   - otherwise f_j <- max(f_j - step * diff_j, 0), the factors are renormalised to sum to 1, the edit
     is undone, and the next iteration starts.
4. In "mixed" mode all professions' blended vectors then go through one joint stage 2, giving one adapter.

The loop of step 3 is `blend_factors`: a pure function of a `measure(factors) -> ratios` callable, so
it can be tested with a stub measure; editing, drawing and judging live in that callable.

Differences from the authors' code: one seed per profession is used throughout (theirs reads a seed
key that their requests never set), and the stop test allows for rounding (with 25 images, 13 of 25
gives 0.52 - 0.5 = 0.020000000000000018 in floating point, which would never pass `<= 0.02`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from .cache import digest
from .config import EMCIDConfig
from .edits import ConceptEdits
from .encoders import EditedEncoder
from .hooks import low_rank_output_offsets
from .images import draw_with_config
from .requests import ConceptEdit, as_concept_edits, canonical_order, check_template

logger = logging.getLogger(__name__)

DEBIAS_TEMPLATES = ("a photo of {}", "an image of {}", "{}")
"""The paper's stage-1 templates for debiasing."""

DEFAULT_TOLERANCE: float = 0.02
"""The largest accepted |ratio_j - 1/n|."""

DEFAULT_STEP: float = 0.4
"""The initial step of the factor update."""

DEFAULT_MAX_ITER: int = 10
"""The most feedback iterations (measurements) per profession."""

DEFAULT_NUM_IMAGES: int = 25
"""Images drawn per measurement."""

DEFAULT_PROMPT_TEMPLATE: str = "an image of {}"
"""The prompt whose images are judged, filled with the profession."""

_ROUNDING_SLACK = 1e-9
"""Added to the tolerance in the stop test, so that a ratio that is exactly `1/n +- tolerance` in
exact arithmetic (e.g. 13/25 against 1/2) is not rejected for a rounding error of about 1e-17."""

_RATIO_SUM_TOLERANCE = 1e-6

_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+", flags=re.IGNORECASE)

JudgeFn = Callable[[list[Image.Image], list[str]], torch.Tensor]
"""A judge: `judge(images, phrases)` returns a (num_images, num_phrases) tensor whose row i holds the
probabilities that image i shows each phrase."""

MeasureFn = Callable[[torch.Tensor], torch.Tensor]
"""A measure: `measure(factors)` edits with the factors, draws and judges images, and returns the
attribute ratios, shape (n,), summing to 1."""


def attribute_phrases(profession: str, attributes: Sequence[str]) -> list[str]:
    """The attribute phrases of a profession: each template filled with the profession without its article.

    `attribute_phrases("a doctor", ["a female {}", "a male {}"])` gives `["a female doctor", "a male doctor"]`;
    a leading `a`, `an` or `the` (any case) is dropped from the profession, other professions are used as given.

    Args:
        profession: the source, e.g. `"a doctor"`, `"an engineer"`, `"nurse"`.
        attributes: templates with exactly one `{}` each, e.g. `"a female {}"`.

    Raises:
        TypeError: if `profession` is not a str or `attributes` is not a sequence of str.
        ValueError: for an empty profession, no attributes, or a template without exactly one `{}`.
    """
    if not isinstance(profession, str):
        raise TypeError(f"profession must be a str, got {type(profession).__name__} {profession!r}.")
    if isinstance(attributes, str) or not all(isinstance(a, str) for a in attributes):
        raise TypeError(
            f"attributes must be a sequence of str templates such as ['a female {{}}'], got {attributes!r}."
        )
    stripped = " ".join(profession.split())
    if not stripped:
        raise ValueError(f"profession={profession!r} is empty; give e.g. 'a doctor'.")
    if not attributes:
        raise ValueError("attributes is empty; give at least two templates, e.g. ['a female {}', 'a male {}'].")
    for template in attributes:
        check_template(template, "Attribute template", "the profession", "a female {}")
    noun = _LEADING_ARTICLE.sub("", stripped, count=1)
    return [template.replace("{}", noun, 1) for template in attributes]


@dataclass(frozen=True)
class BlendSearch:
    """The outcome of `blend_factors`.

    Attributes:
        factors: (n,) float64, the blend factors to use: those that met the tolerance if `converged`,
            else the factors after the last update (as the authors' code returns them).
        ratios: (n,) float64, the ratios of the last measurement (made with `history[-1][0]`).
        iterations: the number of measurements made (`len(history)`).
        converged: whether the last measurement was within the tolerance.
        history: `(factors, ratios)` of every measurement, in order.
    """

    factors: torch.Tensor
    ratios: torch.Tensor
    iterations: int
    converged: bool
    history: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)


def _check_ratios(ratios: object, num_attributes: int, iteration: int) -> torch.Tensor:
    if not isinstance(ratios, torch.Tensor):
        ratios = torch.as_tensor(ratios)
    ratios = ratios.detach().to("cpu", torch.float64)
    if ratios.shape != (num_attributes,):
        raise ValueError(
            f"measure(factors) returned shape {tuple(ratios.shape)} at iteration {iteration}; expected "
            f"({num_attributes},), one ratio per attribute."
        )
    if not torch.isfinite(ratios).all() or (ratios < 0).any() or abs(ratios.sum().item() - 1.0) > _RATIO_SUM_TOLERANCE:
        raise ValueError(
            f"measure(factors) returned {ratios.tolist()} at iteration {iteration}; expected finite non-negative "
            "ratios that sum to 1 (e.g. from `attribute_ratios`)."
        )
    return ratios


def blend_factors(
    measure: MeasureFn,
    num_attributes: int,
    tolerance: float = DEFAULT_TOLERANCE,
    step: float = DEFAULT_STEP,
    max_iter: int = DEFAULT_MAX_ITER,
) -> BlendSearch:
    """Searches blend factors whose images show every attribute equally often (step 3 of the module docstring).

    Factors start at 1/n. At iteration i the step first becomes `step - step * i / max_iter`; then
    `measure(factors)` gives the ratios; the search stops if every |ratio_j - 1/n| <= tolerance, else the
    factors become `max(f_j - step * (ratio_j - 1/n), 0)`, renormalised to sum to 1.

    Args:
        measure: `measure(factors)` returns the attribute ratios, shape (n,), summing to 1, obtained with
            the (n,) float64 factors; it is called at most `max_iter` times, and must not keep the tensor.
        num_attributes: n, at least 2.
        tolerance: the largest accepted deviation from 1/n.
        step: the initial step.
        max_iter: the most measurements.

    Returns:
        A `BlendSearch`.

    Raises:
        ValueError: for bad arguments or a measure output of the wrong shape or not a distribution.
    """
    if isinstance(num_attributes, bool) or not isinstance(num_attributes, int) or num_attributes < 2:
        raise ValueError(f"num_attributes={num_attributes!r}; debiasing needs an int of at least 2 attributes.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r}; give a positive int, e.g. {DEFAULT_MAX_ITER}.")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance={tolerance!r}; give a finite non-negative number, e.g. {DEFAULT_TOLERANCE}.")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step={step!r}; give a finite positive number, e.g. {DEFAULT_STEP}.")

    target = 1.0 / num_attributes
    factors = torch.full((num_attributes,), target, dtype=torch.float64)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    ratios = torch.full_like(factors, math.nan)
    for i in range(max_iter):
        step = step - step * i / max_iter
        ratios = _check_ratios(measure(factors.clone()), num_attributes, i)
        history.append((factors.clone(), ratios.clone()))
        diff = ratios - target
        if diff.abs().max().item() <= tolerance + _ROUNDING_SLACK:
            return BlendSearch(factors, ratios, len(history), True, history)
        factors = (factors - step * diff).clamp(min=0.0)
        # The diffs sum to 0 (ratios and targets both sum to 1) and clamping only raises entries, so the
        # sum is at least 1 before renormalising.
        factors = factors / factors.sum()
    return BlendSearch(factors, ratios, len(history), False, history)


def blend_vectors(vectors: torch.Tensor | Sequence[torch.Tensor], factors: torch.Tensor) -> torch.Tensor:
    """The blended stage-1 vector `sum_j factors[j] * vectors[j]`, in the vectors' dtype.

    Args:
        vectors: (n, d), or n tensors of shape (d,).
        factors: (n,).
    """
    stacked = vectors if isinstance(vectors, torch.Tensor) else torch.stack(list(vectors))
    factors = torch.as_tensor(factors)
    if stacked.ndim != 2 or factors.shape != (stacked.shape[0],):
        raise ValueError(
            f"blend_vectors needs vectors of shape (n, d) and factors of shape (n,), got {tuple(stacked.shape)} "
            f"and {tuple(factors.shape)}."
        )
    return (factors.to(stacked.device, torch.float64) @ stacked.double()).to(stacked.dtype)


def attribute_ratios(probabilities: torch.Tensor) -> torch.Tensor:
    """The share of images whose most likely attribute is each attribute.

    Args:
        probabilities: (num_images, n), e.g. a judge's output. Ties go to the lowest index.

    Returns:
        (n,) float64: count of images with argmax j, divided by num_images.
    """
    if probabilities.ndim != 2 or probabilities.shape[0] == 0 or probabilities.shape[1] == 0:
        raise ValueError(
            f"attribute_ratios needs a (num_images, num_attributes) tensor with both sizes positive, got shape "
            f"{tuple(probabilities.shape)}."
        )
    num_images, num_attributes = probabilities.shape
    counts = torch.bincount(probabilities.argmax(dim=1).cpu(), minlength=num_attributes)
    return counts.to(torch.float64) / num_images


def check_judge_output(probabilities: object, num_images: int, num_attributes: int) -> torch.Tensor:
    """Checks that a judge returned finite (num_images, num_attributes) probabilities; returns them as a tensor.

    Raises:
        ValueError: naming the expected shape, for a wrong shape or a non-finite value.
    """
    if not isinstance(probabilities, torch.Tensor):
        raise ValueError(
            f"The judge returned a {type(probabilities).__name__}; expected a tensor of shape "
            f"({num_images}, {num_attributes}) (images x attribute phrases)."
        )
    if tuple(probabilities.shape) != (num_images, num_attributes):
        raise ValueError(
            f"The judge returned shape {tuple(probabilities.shape)}; expected ({num_images}, {num_attributes}) "
            "(images x attribute phrases)."
        )
    if not torch.isfinite(probabilities).all():
        raise ValueError(
            f"The judge returned non-finite values in its ({num_images}, {num_attributes}) output; expected "
            "finite probabilities."
        )
    return probabilities


def judge_ratios(judge: JudgeFn, images: list[Image.Image], phrases: list[str]) -> torch.Tensor:
    """Judges `images` over `phrases` and returns the checked `attribute_ratios`, (n,) float64."""
    if not images:
        raise ValueError("judge_ratios got no images; draw at least one.")
    probabilities = check_judge_output(judge(list(images), list(phrases)), len(images), len(phrases))
    return attribute_ratios(probabilities)


@dataclass(frozen=True)
class ProfessionRequests:
    """The stage-1 requests of one profession: one per attribute phrase, all with the profession's seed.

    Attributes:
        profession: the source, e.g. `"a doctor"`.
        phrases: the attribute phrases (destinations), e.g. `["a female doctor", "a male doctor"]`.
        requests: one `ConceptEdit(profession, phrase)` per phrase.
    """

    profession: str
    phrases: list[str]
    requests: list[ConceptEdit]

    @property
    def blended(self) -> ConceptEdit:
        """The request that the blended vector is written for: the profession, towards all phrases at once."""
        first = self.requests[0]
        return ConceptEdit(self.profession, " / ".join(self.phrases), first.templates, first.seed)


def profession_requests(
    professions: Sequence[str],
    attributes: Sequence[str],
    templates: Sequence[str],
    num_images: int,
    tolerance: float,
    step: float,
    max_iter: int,
) -> list[ProfessionRequests]:
    """Checks the arguments of a debiasing run and builds each profession's requests.

    Raises:
        TypeError / ValueError: naming the bad argument and what to give instead.
    """
    if isinstance(professions, str) or not professions:
        raise TypeError(f"debias() takes a non-empty list of professions, e.g. ['a doctor'], got {professions!r}.")
    if len(attributes) < 2:
        raise ValueError(
            f"debias() balances at least two attributes, got {list(attributes)!r}; "
            "e.g. ['a female {}', 'a male {}']."
        )
    if not (
        isinstance(num_images, int)
        and num_images > 0
        and isinstance(max_iter, int)
        and max_iter > 0
        and step > 0
        and tolerance >= 0
    ):
        raise ValueError(
            f"debias() needs num_images > 0, max_iter > 0, step > 0 and tolerance >= 0; got {num_images}, {max_iter}, "
            f"{step}, {tolerance}."
        )
    groups = []
    for profession in professions:
        seed = int(digest("emcid-debias", profession, list(templates))[:8], 16) & 0x7FFFFFFF
        phrases = attribute_phrases(profession, attributes)
        groups.append(
            ProfessionRequests(
                profession, phrases, [ConceptEdit(profession, phrase, tuple(templates), seed) for phrase in phrases]
            )
        )
    as_concept_edits([group.requests[0] for group in groups])  # one entry per profession
    return groups


@contextlib.contextmanager
def deltas_in_effect(encoders: list[EditedEncoder], edits: ConceptEdits) -> Iterator[None]:
    """The pipeline computes as if `edits` were applied (through hooks; its weights stay untouched)."""
    with contextlib.ExitStack() as stack:
        for encoder in encoders:
            modules = {str(layer): encoder.layout.fc2(layer) for layer in edits.deltas[encoder.component]}
            offsets = stack.enter_context(low_rank_output_offsets(modules))
            for layer, delta in edits.deltas[encoder.component].items():
                offsets[str(layer)] = (delta.up, delta.down)
        yield


def tune_blends(
    pipe: DiffusionPipeline,
    encoders: list[EditedEncoder],
    config: EMCIDConfig,
    groups: list[ProfessionRequests],
    vectors: dict[str, torch.Tensor],
    solve: Callable[[list[ConceptEdit], dict[str, torch.Tensor]], ConceptEdits],
    judge: JudgeFn,
    prompt_template: str,
    num_images: int,
    tolerance: float,
    step: float,
    max_iter: int,
) -> tuple[list[ConceptEdit], dict[str, torch.Tensor]]:
    """The feedback loop of every profession (step 3 of the module docstring).

    Args:
        groups: the professions' requests.
        vectors: the stage-1 vectors of every group's requests, in order: {component: (sum of n, d)}.
        solve: stage 2 on the base model, for the probe edit of one profession.

    Returns:
        The professions' blended requests in canonical order, and their blended vectors {component: (N, d)}.
    """
    blended_requests, blended_vectors = [], {encoder.component: [] for encoder in encoders}
    start = 0
    for group in groups:
        group_vectors = {component: v[start : start + len(group.requests)] for component, v in vectors.items()}
        start += len(group.requests)

        def measure(factors: torch.Tensor) -> torch.Tensor:
            probe = solve([group.blended], {c: blend_vectors(v, factors)[None] for c, v in group_vectors.items()})
            with deltas_in_effect(encoders, probe):
                images = draw_with_config(
                    pipe, config, prompt_template.format(group.profession), num_images, group.blended.seed
                )
            return judge_ratios(judge, images, group.phrases)

        search = blend_factors(measure, len(group.phrases), tolerance, step, max_iter)
        logger.info(
            "Debias %r: factors %s after %d measurement(s) (converged: %s), ratios %s",
            group.profession,
            search.factors.tolist(),
            search.iterations,
            search.converged,
            search.ratios.tolist(),
        )
        blended_requests.append(group.blended)
        for component, v in group_vectors.items():
            blended_vectors[component].append(blend_vectors(v, search.factors))
    ordered = canonical_order(blended_requests)
    rows = [blended_requests.index(request) for request in ordered]
    return ordered, {component: torch.stack(v)[rows] for component, v in blended_vectors.items()}


__all__ = [
    "BlendSearch",
    "DEBIAS_TEMPLATES",
    "DEFAULT_MAX_ITER",
    "DEFAULT_NUM_IMAGES",
    "DEFAULT_PROMPT_TEMPLATE",
    "DEFAULT_STEP",
    "DEFAULT_TOLERANCE",
    "JudgeFn",
    "MeasureFn",
    "ProfessionRequests",
    "attribute_phrases",
    "attribute_ratios",
    "blend_factors",
    "blend_vectors",
    "check_judge_output",
    "deltas_in_effect",
    "judge_ratios",
    "profession_requests",
    "tune_blends",
]
