"""`emcid demo`: edit "circle" into "square" in the shipped shapes model, offline, and measure it; `emcid demo
--massive`: rebind 100 names of the shipped many-concept model at once.

Statistics, stage 1 and stage 2 run on the bundled pipeline; the shipped judge then reads images drawn
with the same seeds before and after the edit, for the edit's own prompts, held-out phrasings and
prompts of other concepts that must stay as they were.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .config import EMCIDConfig
from .editor import EMCIDEditor
from .evaluation import EditEvaluation, EvaluationPrompt, ImageClassifierJudge, evaluate_edits
from .requests import ConceptEdit
from .shapes import SAMPLING, load_shapes_pipeline, shapes_judge_path, statistics_captions
from .shapes.names import (
    load_names_pipeline,
    names_statistics_captions,
    rebinding_ceiling,
    rebinding_metrics,
    rebinding_plan,
    rebinding_prompts,
    rebinding_requests,
)

DEMO_PRESET = "shapes-demo"
EDIT = ConceptEdit(
    "circle",
    "square",
    seed=0,
    templates=(
        "a red {}",
        "a photo of a blue {}",
        "an image of a green {}",
        "a picture of a yellow {}",
        "a purple {} on a white background",
        "black {}",
    ),
)
"""The demo's edit: training templates of the shapes model, one colour each."""
PROMPTS: tuple[EvaluationPrompt, ...] = (
    EvaluationPrompt("a red circle", "efficacy", "circle", "square", seed=0),
    EvaluationPrompt("a photo of a blue circle", "efficacy", "circle", "square", seed=1000),
    EvaluationPrompt("a drawing of a red circle", "generality", "circle", "square", seed=2000),
    EvaluationPrompt("a sketch of a blue circle", "generality", "circle", "square", seed=3000),
    EvaluationPrompt("the green circle", "generality", "circle", "square", seed=4000),
    EvaluationPrompt("a yellow circle in the middle", "generality", "circle", "square", seed=5000),
    EvaluationPrompt("a blue triangle", "specificity", "triangle", seed=6000),
    EvaluationPrompt("a green square", "specificity", "square", seed=7000),
    EvaluationPrompt("a red star", "specificity", "star", seed=8000),
    EvaluationPrompt("a purple heart", "specificity", "heart", seed=9000),
    EvaluationPrompt("a black cross", "specificity", "cross", seed=10000),
)
"""Edited prompts (training and held-out phrasings, `shapes.HELDOUT_TEMPLATES`) and controls, with their seeds;
judged by shape."""
PICTURE_PROMPTS = ("a red circle", "a drawing of a red circle", "a blue triangle", "a green square")
DEMO_NUM_IMAGES = 12
"""Images per prompt, before and after (264 images in all, about 70 s on 2 cores). 0/12 against 12/12 squares
leaves the 95% (Wilson) intervals far apart, [0, 0.24] and [0.76, 1]; generality pools 48 images and the controls
60, each compared image by image with the same seed before and after."""
IMAGES_PER_CALL = 64
"""Images drawn in one pipeline call (32x32 images: memory is no concern)."""
MASSIVE_PRESET = "shapes-names"
MASSIVE_NUM_CONCEPTS = 100
MASSIVE_EVALUATED_NAMES = 12
MASSIVE_CONTROL_NAMES = 12
"""`emcid demo --massive` draws images of 12 of its edited names under 4 training and 4 held-out templates, of 12
never edited names under the training templates and of the 36 plain prompts: 180 prompts, one image each, before
and after (`benchmarks/bench_massive.py` measures more)."""
MASSIVE_SAMPLING = {**SAMPLING, "num_inference_steps": 10}
"""`emcid demo --massive` samples in 10 DPM-Solver++ steps instead of 20: judged on `bench_massive.py`'s K = 100
prompts, its edit scores the same at both (efficacy 0.873 against 0.873, generality 0.914 against 0.919, drops
within 0.3 points) in half the time (about 30 s for the demo's 360 images on 2 cores)."""


def run_demo(
    out: str | os.PathLike = "demo",
    num_images: int = DEMO_NUM_IMAGES,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    config: EMCIDConfig | None = None,
    progress: bool = True,
) -> EditEvaluation:
    """Runs the demo and writes `before_after.png`, `metrics.json` and `metrics.md` into `out`.

    Args:
        num_images: images per evaluation prompt, before and after.
        config: the EMCID settings; the `"shapes-demo"` preset by default.

    Returns:
        The evaluation; its summary is also printed.
    """
    started = time.perf_counter()
    pipe = load_shapes_pipeline(device=device)
    judge = ImageClassifierJudge.from_pretrained(shapes_judge_path(), device=device, local_files_only=True)
    editor = EMCIDEditor(
        pipe, config or EMCIDConfig.from_preset(DEMO_PRESET, device=device), cache_dir=cache_dir, progress=progress
    )
    editor.compute_statistics(statistics_captions())
    edits = editor.edit([EDIT])
    edited = time.perf_counter()
    result = evaluate_edits(
        pipe,
        edits,
        judge,
        PROMPTS,
        num_images=num_images,
        images_per_call=IMAGES_PER_CALL,
        progress=progress,
        **SAMPLING,
    )
    folder = Path(out)
    result.save(folder)
    result.image_grid(PICTURE_PROMPTS, max_images=10, cell=48).save(folder / "before_after.png")
    finished = time.perf_counter()
    print(demo_report(result, edited - started, finished - edited, folder))
    return result


def demo_report(result: EditEvaluation, edit_seconds: float, evaluation_seconds: float, folder: Path) -> str:
    """The demo's summary: the headline probability, generality, the controls, and the timings."""
    row = next(r for r in result.rows if r["prompt"] == "a red circle")
    general, controls = result.summary["generality"], result.summary["specificity"]
    lines = [
        'EMCID demo: "circle" -> "square" in the shipped shapes model',
        "",
        f'P(square | "a red circle")            before {row["destination_before"]:.2f}   '
        f"after {row['destination_after']:.2f}",
        f"P(square | held-out phrasings)        before {general['destination_before']:.2f}   "
        f"after {general['destination_after']:.2f}",
        f"other shapes drawn right (controls)   before {controls['source_before']:.2f}   "
        f"after {controls['source_after']:.2f}",
        "",
        result.table(),
        "",
        f"edit (statistics, stage 1, stage 2): {edit_seconds:.0f} s; evaluation: {evaluation_seconds:.0f} s",
        f"picture: {folder / 'before_after.png'}; metrics: {folder / 'metrics.json'}",
    ]
    return "\n".join(lines)


def run_massive_demo(
    out: str | os.PathLike = "demo-massive",
    num_concepts: int = MASSIVE_NUM_CONCEPTS,
    evaluated_names: int = MASSIVE_EVALUATED_NAMES,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Rebinds `num_concepts` names of the many-concept model to new (colour, shape) pairs in one edit, measures
    efficacy, generality and specificity (`shapes.names.rebinding_metrics`) and writes `before_after.png`,
    `metrics.json` and `metrics.md` into `out`.

    Returns:
        The figures of `rebinding_metrics`, of `rebinding_ceiling` and the timings; they are also printed.
    """
    started = time.perf_counter()
    edited, controls, destinations = rebinding_plan()
    if not 1 <= num_concepts <= len(edited):
        raise ValueError(f"num_concepts={num_concepts}: choose 1 to {len(edited)} names to rebind.")
    pipe = load_names_pipeline(device=device)
    judge = ImageClassifierJudge.from_pretrained(shapes_judge_path(), device=device, local_files_only=True)
    config = EMCIDConfig.from_preset(MASSIVE_PRESET, device=device)
    editor = EMCIDEditor(pipe, config, cache_dir=cache_dir, progress=progress)
    editor.compute_statistics(names_statistics_captions())
    names = edited[:num_concepts]
    edits = editor.edit(rebinding_requests(names, destinations))
    edited_seconds = time.perf_counter() - started
    prompts = rebinding_prompts(names[:evaluated_names], destinations, controls[:MASSIVE_CONTROL_NAMES])
    result = evaluate_edits(
        pipe,
        edits,
        judge,
        prompts,
        num_images=1,
        images_per_call=IMAGES_PER_CALL,
        progress=progress,
        **MASSIVE_SAMPLING,
    )
    folder = Path(out)
    result.save(folder)
    shown = [p.prompt for p in prompts if p.group == "efficacy"][::5][:12]  # every fifth: the templates take turns
    result.image_grid(shown, max_images=1, cell=48).save(folder / "before_after.png")
    figures = rebinding_metrics(result)
    figures.update(rebinding_ceiling(pipe, judge, prompts, images_per_call=IMAGES_PER_CALL, **MASSIVE_SAMPLING))
    figures.update(edit_seconds=edited_seconds, evaluation_seconds=time.perf_counter() - started - edited_seconds)
    print(massive_demo_report(figures, num_concepts, folder))
    return figures


def massive_demo_report(figures: dict[str, float], num_concepts: int, folder: Path) -> str:
    """The summary of `run_massive_demo`."""
    return "\n".join(
        [
            f"EMCID demo: {num_concepts} names of the shipped many-concept model rebound to new pairs in one edit",
            "",
            f"efficacy     P(new pair | training templates)     before {figures['efficacy_before']:.2f}   "
            f"after {figures['efficacy']:.2f}   (destination prompts {figures['efficacy_ceiling']:.2f})",
            f"generality   P(new pair | held-out templates)     before {figures['generality_before']:.2f}   "
            f"after {figures['generality']:.2f}   (destination prompts {figures['generality_ceiling']:.2f})",
            f"specificity  drop of P(own pair), control names   {figures['specificity_drop_names']:+.1f} points "
            f"(before {figures['control_names_before']:.2f})",
            f"specificity  drop of P(own pair), plain prompts   {figures['specificity_drop_plain']:+.1f} points "
            f"(before {figures['plain_prompts_before']:.2f})",
            "",
            'destination prompts: the same prompts and seeds with "a {colour} {shape}" of the new pair in the '
            "name's place, drawn by the unedited model (what a perfect rebinding would score)",
            f"edit (statistics, stage 1, stage 2): {figures['edit_seconds']:.0f} s; evaluation: "
            f"{figures['evaluation_seconds']:.0f} s",
            f"picture: {folder / 'before_after.png'}; metrics: {folder / 'metrics.json'}",
        ]
    )
