"""The many-concept model: a tiny Stable Diffusion pipeline in which 432 ordinary words are each bound to one
(colour, shape) pair, shipped with the package to measure edits of hundreds of concepts at once.

"a picture of anna" draws the pair bound to "anna" (say, a green star), as "a picture of a green star" does.
The pipeline shares the shapes model's tokenizer, VAE, sampler and judge; its text encoder is the shapes encoder
widened (MLP 256 -> 1,024, so that layers 0 and 1, where EMCID edits, have 1,024 key dimensions each) and taught
the names; see the model card and `python scripts/train_names.py`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..evaluation import EditEvaluation, EvaluationPrompt, Judge, concept_probability, draw_prompt_images
from ..requests import ConceptEdit
from .render import COLOURS, PAIRS, SHAPES, TRAIN_TEMPLATES, all_captions

NAME_TEMPLATES: tuple[str, ...] = ("a picture of {name}", "an image of {name}", "a photo of {name}", "{name}")
"""The templates the names were taught with."""
PAIR_TEMPLATES: tuple[str, ...] = (
    "a picture of a {colour} {shape}",
    "an image of a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a {colour} {shape}",
)
"""For each of `NAME_TEMPLATES`, the shapes model's prompt whose conditioning the name's prompt was taught."""
HELDOUT_NAME_TEMPLATES: tuple[str, ...] = (
    "{name} on a white background",
    "a picture of {name} on a white background",
    "photo of {name}",
    "image of {name}",
)
"""Templates never used for names (their words are known from the shapes model's captions); they measure how far
an edit of a name generalises."""
EDIT_NAME_TEMPLATES: tuple[str, ...] = NAME_TEMPLATES + ("picture of {name}", "a {name}")
"""The templates of a rebinding request: the training templates, and two more so that the name stands at every
position a short prompt puts it (1 to 4). The model's first layers see no context, so a name's keys there differ by
position, and an edit reaches the positions its prompts cover: with the training templates alone (positions 1 and 4)
the held-out prompts "photo of {name}" and "image of {name}" (position 3) took the new pair with P 0.55 and 0.51 at
K = 100 (benchmarks/README.md)."""


def names_model_path() -> Path:
    """The folder of the shipped many-concept diffusers pipeline."""
    return Path(__file__).parent / "names_model"


@lru_cache(maxsize=1)
def name_bindings() -> dict[str, tuple[str, str]]:
    """Every bound name and its `(colour, shape)`, in the order of the model's `bindings.json`."""
    data = json.loads((names_model_path() / "bindings.json").read_text(encoding="utf-8"))
    return {name: (colour, shape) for name, (colour, shape) in data["bindings"].items()}


def load_names_pipeline(
    torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline:
    """Loads the shipped many-concept pipeline (no safety checker) in `torch_dtype` on `device`."""
    pipe = StableDiffusionPipeline.from_pretrained(
        names_model_path(), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, torch_dtype)


def name_captions(names: list[str] | None = None, templates: tuple[str, ...] = NAME_TEMPLATES) -> list[str]:
    """Every caption of `templates` for `names` (all bound names by default)."""
    names = list(name_bindings()) if names is None else names
    return [template.format(name=name) for template in templates for name in names]


def names_statistics_captions() -> list[str]:
    """The captions to compute the many-concept model's key statistics on: every name under the name templates
    (1,728) and every caption of the shapes model's training templates (216).

    The names' own keys must be in the statistics, or an edit of some names is free to move the others.
    """
    return name_captions() + all_captions(TRAIN_TEMPLATES)


def pair_prompt(colour: str, shape: str, template: str = "a {colour} {shape}") -> str:
    """A prompt of the shapes model for one pair."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"Unknown pair ({colour!r}, {shape!r}); colours are {list(COLOURS)}, shapes {SHAPES}.")
    return template.format(colour=colour, shape=shape)


NUM_CONTROL_NAMES = 32
"""Names a `rebinding_plan` never edits, to measure specificity at every size of edit."""


def rebinding_plan(seed: int = 0) -> tuple[list[str], list[str], dict[str, tuple[str, str]]]:
    """A seeded plan of rebinding edits: `(names to edit, in order; control names; each name's new pair)`.

    The edit of size K rebinds the first K names (400 at most), so the edits of different sizes are nested.
    """
    bindings = name_bindings()
    names = list(bindings)
    rng = random.Random(seed)
    rng.shuffle(names)
    edited, controls = names[NUM_CONTROL_NAMES:], names[:NUM_CONTROL_NAMES]
    destinations = {name: rng.choice([p for p in PAIRS if p != bindings[name]]) for name in edited}
    return edited, controls, destinations


def rebinding_requests(names: list[str], destinations: dict[str, tuple[str, str]]) -> list[ConceptEdit]:
    """One request per name: its prompts under `EDIT_NAME_TEMPLATES` should draw what the same prompts with
    "a {colour} {shape}" of its new pair draw."""
    templates = tuple(template.replace("{name}", "{}") for template in EDIT_NAME_TEMPLATES)
    return [ConceptEdit(name, pair_prompt(*destinations[name]), templates=templates, seed=0) for name in names]


def rebinding_prompts(
    names: list[str], destinations: dict[str, tuple[str, str]], controls: list[str]
) -> list[EvaluationPrompt]:
    """The evaluation prompts of a rebinding edit, each with its own seed:

    * efficacy: `names` under `NAME_TEMPLATES`, judged by their old and new pair;
    * generality: `names` under `HELDOUT_NAME_TEMPLATES`, the same;
    * specificity: `controls` under `NAME_TEMPLATES` and the 36 prompts "a {colour} {shape}", by their own pair.
    """
    bindings = name_bindings()
    prompts = []
    for index, name in enumerate(names):
        source, destination = " ".join(bindings[name]), " ".join(destinations[name])
        for group, templates, offset in (("efficacy", NAME_TEMPLATES, 0), ("generality", HELDOUT_NAME_TEMPLATES, 1)):
            for t, template in enumerate(templates):
                seed = 1_000_000 * offset + 1_000 * index + 100 * t
                prompts.append(EvaluationPrompt(template.format(name=name), group, source, destination, seed))
    for index, name in enumerate(controls):
        for t, template in enumerate(NAME_TEMPLATES):
            seed = 2_000_000 + 1_000 * index + 100 * t
            prompts.append(
                EvaluationPrompt(template.format(name=name), "specificity", " ".join(bindings[name]), seed=seed)
            )
    for index, (colour, shape) in enumerate(PAIRS):
        seed = 3_000_000 + 1_000 * index
        prompts.append(EvaluationPrompt(pair_prompt(colour, shape), "specificity", f"{colour} {shape}", seed=seed))
    return prompts


def destination_prompts(prompts: list[EvaluationPrompt]) -> list[EvaluationPrompt]:
    """The efficacy and generality prompts of `prompts` with each name replaced by "a {colour} {shape}" of its new
    pair ("a picture of anna" -> "a picture of a red square"), same groups and seeds: what a perfect rebinding
    would draw."""
    bindings = name_bindings()
    return [
        dataclasses.replace(
            prompt,
            prompt=" ".join(f"a {prompt.destination}" if word in bindings else word for word in prompt.prompt.split()),
        )
        for prompt in prompts
        if prompt.group in ("efficacy", "generality")
    ]


def rebinding_ceiling(
    pipe: StableDiffusionPipeline,
    judge: Judge,
    prompts: list[EvaluationPrompt],
    num_images: int = 1,
    images_per_call: int = 64,
    **sampling: object,
) -> dict[str, float]:
    """What a rebinding edit can reach at best with this judge: `efficacy_ceiling` and `generality_ceiling`, the
    mean P(new pair) of the unedited `pipe`'s images of `destination_prompts(prompts)`: the model's own accuracy on
    the destinations, about 0.89 for the shipped model (`benchmarks/README.md`).

    Args:
        pipe: the unedited many-concept pipeline.
        judge: the shapes judge.
        prompts: the prompts of `rebinding_prompts`; specificity prompts are skipped.
        num_images: images per prompt, seeds `seed, seed + 1, ...` as in `evaluate_edits`.
        images_per_call: images drawn in one pipeline call.
        sampling: keyword arguments of the pipeline call (e.g. `SAMPLING`).
    """
    chosen = destination_prompts(prompts)
    images = draw_prompt_images(pipe, [(p.prompt, p.seed) for p in chosen], num_images, images_per_call, **sampling)
    ceiling = {}
    for group in ("efficacy", "generality"):
        values = [
            float(concept_probability(judge(drawn), judge.labels, p.destination).mean())
            for drawn, p in zip(images, chosen)
            if p.group == group
        ]
        if values:
            ceiling[f"{group}_ceiling"] = statistics.fmean(values)
    return ceiling


def rebinding_metrics(evaluation: EditEvaluation) -> dict[str, float]:
    """The three figures of a rebinding edit from its `evaluate_edits` result (of `rebinding_prompts`):

    * `efficacy`, `generality`: P(new pair) after the edit (and `..._before`);
    * `specificity_drop_names`, `specificity_drop_plain`: the mean drop of P(own pair), in points, for the control
      names and for the plain prompts (and their P before, `control_names_before`, `plain_prompts_before`).

    A figure is left out when the evaluation has no prompts of its kind.
    """
    bindings = name_bindings()
    controls = [r for r in evaluation.rows if r["group"] == "specificity" and r["prompt"].split()[-1] in bindings]
    plain = [r for r in evaluation.rows if r["group"] == "specificity" and r["prompt"].split()[-1] not in bindings]
    result = {}
    for group in ("efficacy", "generality"):
        if group in evaluation.summary:
            result[group] = evaluation.summary[group]["destination_after"]
            result[f"{group}_before"] = evaluation.summary[group]["destination_before"]
    for label, rows, before in (("names", controls, "control_names"), ("plain", plain, "plain_prompts")):
        if rows:
            result[f"specificity_drop_{label}"] = 100 * statistics.fmean(
                r["source_before"] - r["source_after"] for r in rows
            )
            result[f"{before}_before"] = statistics.fmean(r["source_before"] for r in rows)
    return result
