"""ICEB-style metrics of an edit (`docs/algorithm.md`, section 7): images drawn before and after with the same
seeds, judged.

Every evaluation prompt belongs to a group and names the concept it is judged by:

* `efficacy`: the edit's own prompts; `generality`: held-out prompts of the edited concepts; `alias`: other
  names of the edited concepts. Each gives *source forget* = P_before(source) - P_after(source) and
  *source to destination* = P_after(destination) - P_before(destination) on the same prompts and seeds.
* `specificity`: prompts of concepts that were not edited, judged by their own concept (`source`); the
  metric is P_after(source) - P_before(source), which should stay near 0.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..edits import ConceptEdits
from ..images import draw_prompt_images
from .judges import Judge, concept_labels, concept_probability

Group = Literal["efficacy", "generality", "alias", "specificity"]
GROUPS: tuple[str, ...] = ("efficacy", "generality", "alias", "specificity")


@dataclass(frozen=True)
class EvaluationPrompt:
    """One prompt of an evaluation.

    Attributes:
        prompt: the text drawn.
        group: `"efficacy"`, `"generality"`, `"alias"` or `"specificity"`.
        source: the concept the images are judged by before the edit (for specificity: the prompt's own concept),
            a judge label, alias, word or class index.
        destination: the concept an edit should turn `source` into (not for specificity).
        seed: images use seeds `seed, seed + 1, ...`, the same before and after.
    """

    prompt: str
    group: Group
    source: str | int
    destination: str | int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"EvaluationPrompt({self.prompt!r}): group {self.group!r} must be one of {list(GROUPS)}.")
        if self.group != "specificity" and self.destination is None:
            raise ValueError(f"EvaluationPrompt({self.prompt!r}): a {self.group} prompt needs a destination.")


@dataclass
class EditEvaluation:
    """The result of `evaluate_edits`.

    Attributes:
        rows: per prompt, its fields and the mean probabilities before and after (`source_before`, ...).
        summary: per group, the mean metrics (see the module docstring) and the mean probabilities.
        images: per prompt, `(before, after)` lists of PIL images.
    """

    rows: list[dict[str, object]]
    summary: dict[str, dict[str, float]]
    images: dict[str, tuple[list[Image.Image], list[Image.Image]]] = field(default_factory=dict, repr=False)

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary, "prompts": self.rows}, indent=2)

    def table(self) -> str:
        """A Markdown table of the rows."""
        lines = [
            "| group | prompt | judged as | before | after | destination before | destination after |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            destination = [
                f"{row[k]:.2f}" if row.get(k) is not None else "" for k in ("destination_before", "destination_after")
            ]
            lines.append(
                f"| {row['group']} | {row['prompt']} | {row['source']} | {row['source_before']:.2f} | "
                f"{row['source_after']:.2f} | {destination[0]} | {destination[1]} |"
            )
        return "\n".join(lines)

    def image_grid(self, prompts: Sequence[str] | None = None, max_images: int = 8, cell: int = 64) -> Image.Image:
        """A before/after grid: two rows per prompt (before, after) of up to `max_images` images of `cell` pixels."""
        prompts = list(prompts) if prompts is not None else list(self.images)
        label_width = 6 * max(len(p) for p in prompts) + 70  # the default bitmap font is about 6 pixels a character
        columns = min(max_images, max(len(self.images[p][0]) for p in prompts))
        grid = Image.new("RGB", (label_width + columns * cell, 2 * len(prompts) * cell), "white")
        draw = ImageDraw.Draw(grid)
        for index, prompt in enumerate(prompts):
            for offset, (when, images) in enumerate(zip(("before", "after"), self.images[prompt])):
                top = (2 * index + offset) * cell
                draw.text((4, top + cell // 2 - 6), f"{prompt} ({when})", fill="black")
                for column, image in enumerate(images[:columns]):
                    grid.paste(
                        image.convert("RGB").resize((cell, cell), Image.NEAREST), (label_width + column * cell, top)
                    )
        return grid

    def save(self, folder: str | os.PathLike) -> Path:
        """Writes `metrics.json`, `metrics.md` and `before_after.png` into `folder` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(self.to_json() + "\n")
        (folder / "metrics.md").write_text(self.table() + "\n")
        if self.images:
            self.image_grid().save(folder / "before_after.png")
        return folder


def load_evaluation_prompts(path: str | os.PathLike) -> list[EvaluationPrompt]:
    """Reads evaluation prompts from a CSV file with a header `group,prompt,source,destination[,seed]`.

    Raises:
        ValueError: naming the file and line of a bad row.
    """
    path = Path(path)
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = {"group", "prompt", "source"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path}: the header must name group,prompt,source,destination[,seed]; {sorted(missing)} missing."
            )
        prompts = []
        for line, row in enumerate(reader, start=2):
            try:
                prompts.append(
                    EvaluationPrompt(
                        prompt=row["prompt"],
                        group=row["group"].strip(),
                        source=row["source"].strip(),
                        destination=(row.get("destination") or "").strip() or None,
                        seed=int(row.get("seed") or 0),
                    )
                )
            except ValueError as error:
                raise ValueError(f"{path}, line {line}: {error}") from error
    if not prompts:
        raise ValueError(f"{path} holds no evaluation prompts.")
    return prompts


def evaluate_edits(
    pipe: DiffusionPipeline,
    edits: ConceptEdits,
    judge: Judge,
    prompts: Sequence[EvaluationPrompt],
    num_images: int = 8,
    images_per_call: int = 8,
    adapter_name: str = "emcid-evaluation",
    keep_images: bool = True,
    progress: bool = True,
    baseline: EditEvaluation | None = None,
    **sampling: object,
) -> EditEvaluation:
    """Draws every prompt's images without and with `edits` (same seeds), judges them, and computes the metrics.

    The pipeline is left as it was: the edits are applied as the adapter `adapter_name` for the "after" images
    and removed again, also on errors.

    Args:
        pipe: the pipeline the edits were made for, without them applied.
        edits: the edits to measure.
        judge: a `Judge`, e.g. `ImageClassifierJudge.from_pretrained(...)`.
        prompts: the evaluation prompts.
        num_images: images per prompt (before and after each).
        images_per_call: images drawn in one pipeline call (all prompts of a phase are drawn together); lower it
            if a call runs out of memory.
        keep_images: keep the images in the result (for `image_grid`).
        baseline: an earlier evaluation of the same pipeline with these prompts, `num_images` and sampling, whose
            "before" figures (and images) are taken instead of drawing them again, e.g. to compare several edits.
        sampling: keyword arguments of the pipeline call (steps, guidance, size).
    """
    if not prompts:
        raise ValueError("evaluate_edits() needs at least one EvaluationPrompt.")
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be at least 1.")
    for item in prompts:  # fail on concepts the judge cannot name before drawing anything
        for concept in (item.source, item.destination):
            if concept is not None:
                concept_labels(judge.labels, concept)
    if images_per_call < 1:
        raise ValueError(f"images_per_call={images_per_call} must be at least 1.")
    earlier = _baseline_rows(baseline, prompts, num_images) if baseline is not None else None
    states = ("before", "after") if earlier is None else ("after",)
    phases: list[list[list[Image.Image]]] = []  # per phase (before, after): per prompt, its images
    bar = tqdm(
        total=len(states) * len(prompts) * num_images, desc="EMCID evaluation", unit="image", disable=not progress
    )
    for state in states:
        if state == "after":
            edits.apply(pipe, name=adapter_name)
        try:
            phases.append(
                draw_prompt_images(
                    pipe,
                    [(item.prompt, item.seed) for item in prompts],
                    num_images,
                    images_per_call,
                    progress=bar,
                    **sampling,
                )
            )
        finally:
            if state == "after":
                edits.remove(pipe, name=adapter_name)
    bar.close()
    if earlier is not None:
        phases.insert(0, [baseline.images.get(row["prompt"], ([], []))[0] for row in earlier])
    drawn = list(zip(*phases))  # per prompt: (before, after)
    rows = []
    for index, (item, images) in enumerate(zip(prompts, drawn)):
        row: dict[str, object] = {**asdict(item), "num_images": num_images}
        if earlier is not None:
            row.update({key: earlier[index][key] for key in ("source_before", "destination_before")})
        for state, state_images in zip(states, images[-len(states) :]):
            probabilities = judge(state_images)
            row[f"source_{state}"] = float(concept_probability(probabilities, judge.labels, item.source).mean())
            row[f"destination_{state}"] = (
                None
                if item.destination is None
                else float(concept_probability(probabilities, judge.labels, item.destination).mean())
            )
        rows.append(row)
    kept = {item.prompt: (images[0], images[1]) for item, images in zip(prompts, drawn)} if keep_images else {}
    return EditEvaluation(rows, summarize(rows), kept)


def _baseline_rows(
    baseline: EditEvaluation, prompts: Sequence[EvaluationPrompt], num_images: int
) -> list[dict[str, object]]:
    """The rows of `baseline` for `prompts`, in their order.

    Raises:
        ValueError: naming a prompt that `baseline` did not evaluate the same way.
    """
    rows = {(row["prompt"], row["seed"], row["source"], row["destination"]): row for row in baseline.rows}
    chosen = []
    for item in prompts:
        row = rows.get((item.prompt, item.seed, item.source, item.destination))
        if row is None or row.get("num_images") != num_images:
            raise ValueError(
                f"The baseline evaluation has no figures of {item.prompt!r} (seed {item.seed}) with "
                f"num_images={num_images}; evaluate it with the same prompts and num_images, or pass no baseline."
            )
        chosen.append(row)
    return chosen


def summarize(rows: Sequence[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Per group, the mean metrics of its rows (see the module docstring)."""
    summary = {}
    for group in GROUPS:
        members = [row for row in rows if row["group"] == group]
        if not members:
            continue
        mean = lambda key: statistics.fmean(float(row[key]) for row in members)  # noqa: E731
        result = {
            "num_prompts": len(members),
            "source_before": mean("source_before"),
            "source_after": mean("source_after"),
        }
        if group == "specificity":
            result["change"] = result["source_after"] - result["source_before"]
        else:
            result["destination_before"] = mean("destination_before")
            result["destination_after"] = mean("destination_after")
            result["source_forget"] = result["source_before"] - result["source_after"]
            result["source_to_destination"] = result["destination_after"] - result["destination_before"]
        summary[group] = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    return summary
