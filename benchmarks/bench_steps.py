"""Stage-1 quality against the number of steps, the learning rate and stopping criteria, on the shipped models.

    python benchmarks/bench_steps.py [--models shapes names] [--steps 10 20 50 100 200]
                                     [--fast-learning-rate 0.4] [--fast-steps 10 20] [--tolerances 0.1 0.05]

One stage-1 run of every concept at the largest step count records each concept's delta after every step. A run
of N steps is the first N steps of a longer one (Adam's learning rate is constant and every draw comes from the
concept's own generator in order; checked here against a separate run of the smallest N), so the vectors of every
step count, and of every stopping rule, come from that one run. For each, stage 2 writes the vectors and the
evaluation library measures the edit (same seeds before and after):

* `shapes`: the shipped shapes model (preset `shapes-demo`), four shape edits ("circle" -> "square", ...) each
  solved and judged alone: efficacy (the request's training prompts), generality (held-out phrasings) and
  specificity (the four other shapes), P(shape) from the shipped judge;
* `names`: the many-concept model (preset `shapes-names`), 32 names rebound at once (`rebinding_plan`),
  `rebinding_metrics` on 24 of them and 16 control names.

Stopping rules, evaluated every `--interval` steps on the recorded run:

* `loss window`: the loss-window rule of the past (the mean loss of the last window is not below the window
  before by 1%), with the window = interval;
* `delta change <tol>`: stop once delta moved by less than tol * ||h0|| over the last interval (each encoder).

Also the relative distance of z from the largest step count's z (mean and max over concepts) and stage-1 seconds.
Prints one JSON object per model, and writes them to `--out` (`steps.json`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid import stage1 as stage1_module
from diffusers_emcid.evaluation import EvaluationPrompt, evaluate_edits
from diffusers_emcid.shapes import (
    HELDOUT_TEMPLATES,
    SAMPLING,
    SHAPES,
    load_shapes_judge,
    load_shapes_pipeline,
    statistics_captions,
)
from diffusers_emcid.shapes.names import (
    load_names_pipeline,
    names_statistics_captions,
    rebinding_metrics,
    rebinding_plan,
    rebinding_prompts,
    rebinding_requests,
)

SHAPE_EDITS = (("circle", "square"), ("triangle", "heart"), ("star", "cross"), ("square", "circle"))
SHAPE_TEMPLATES = (
    "a red {}",
    "a photo of a blue {}",
    "an image of a green {}",
    "a picture of a yellow {}",
    "a purple {} on a white background",
    "black {}",
)
"""One colour per training template of the shapes model (the demo's request)."""
COLOURS_OF_HELDOUT = ("red", "blue", "green", "yellow")
NAMES_EDITED, NAMES_EVALUATED, NAMES_CONTROLS = 32, 24, 16


class Recorder:
    """Records every concept's deltas after every step of `optimize_concept_vectors` (after the norm clamp)."""

    def __init__(self) -> None:
        self.deltas: dict[str, list[list[torch.Tensor]]] = {}
        self.h0: dict[str, list[torch.Tensor]] = {}
        self.original = stage1_module._ConceptRun.clamp

    def __enter__(self) -> "Recorder":
        recorder, original = self, self.original

        def clamp(run: stage1_module._ConceptRun) -> None:
            original(run)
            if run.request.source not in recorder.h0:  # h0 never changes: copy it once
                recorder.h0[run.request.source] = [h.detach().cpu() for h in run.h0]
            recorder.deltas.setdefault(run.request.source, []).append([d.detach().cpu().clone() for d in run.deltas])

        stage1_module._ConceptRun.clamp = clamp
        return self

    def __exit__(self, *exc: object) -> None:
        stage1_module._ConceptRun.clamp = self.original

    def vectors(self, requests: list[ConceptEdit], components: list[str], steps: dict[str, int]) -> dict:
        """{component: (N, d)} z = h0 + delta after `steps[source]` steps of each request."""
        return {
            component: torch.stack(
                [self.h0[r.source][e] + self.deltas[r.source][steps[r.source] - 1][e] for r in requests]
            )
            for e, component in enumerate(components)
        }


def loss_window_stop(losses: list[float], window: int) -> int:
    """The step the loss-window rule stops at (the number of steps run)."""
    for end in range(2 * window, len(losses) + 1, window):
        if sum(losses[end - window : end]) > 0.99 * sum(losses[end - 2 * window : end - window]):
            return end
    return len(losses)


def moved(deltas: list[list[torch.Tensor]], h0: list[torch.Tensor], end: int, interval: int) -> float:
    """max over encoders of ||delta after `end` steps - delta `interval` steps before|| / ||h0||."""
    return max(float((a - b).norm() / h.norm()) for a, b, h in zip(deltas[end - 1], deltas[end - 1 - interval], h0))


def delta_change_stop(deltas: list[list[torch.Tensor]], h0: list[torch.Tensor], interval: int, tol: float) -> int:
    """The step at which delta moved by less than `tol * ||h0||` over the last `interval` steps (each encoder)."""
    for end in range(2 * interval, len(deltas) + 1, interval):
        if moved(deltas, h0, end, interval) < tol:
            return end
    return len(deltas)


def shapes_setup() -> tuple:
    pipe = load_shapes_pipeline()
    requests = [ConceptEdit(s, d, templates=SHAPE_TEMPLATES, seed=0) for s, d in SHAPE_EDITS]
    return pipe, requests, statistics_captions(), "shapes-demo"


def shapes_prompts(request: ConceptEdit) -> list[EvaluationPrompt]:
    source, destination = request.source, request.destination
    prompts = [
        EvaluationPrompt(p, "efficacy", source, destination, seed=100 * i) for i, p in enumerate(request.source_prompts)
    ]
    for i, (template, colour) in enumerate(zip(HELDOUT_TEMPLATES, COLOURS_OF_HELDOUT)):
        prompt = template.format(colour=colour, shape=source)
        prompts.append(EvaluationPrompt(prompt, "generality", source, destination, seed=10_000 + 100 * i))
    for i, shape in enumerate(s for s in SHAPES if s not in (source, destination)):
        prompts.append(EvaluationPrompt(f"a blue {shape}", "specificity", shape, seed=20_000 + 100 * i))
    return prompts


def measure(
    model: str,
    editor: EMCIDEditor,
    requests: list[ConceptEdit],
    vectors: dict[str, torch.Tensor],
    judge,
    baselines: dict,
) -> dict[str, float]:
    """Stage 2 of `vectors` and the evaluation: efficacy, generality, specificity (P(source after) of controls)."""
    if model == "names":
        edited, controls, destinations = rebinding_plan()
        prompts = rebinding_prompts(edited[:NAMES_EVALUATED], destinations, controls[:NAMES_CONTROLS])
        edits = editor.solve(requests, vectors)
        result = evaluate_edits(
            editor.pipe, edits, judge, prompts, 1, 128, progress=False, baseline=baselines.get(0), **SAMPLING
        )
        baselines[0] = result
        figures = rebinding_metrics(result)
        return {k: round(figures[k], 4) for k in ("efficacy", "generality", "specificity_drop_names")}
    rows = []
    for index, request in enumerate(requests):
        edits = editor.solve([request], {c: v[index : index + 1] for c, v in vectors.items()})
        result = evaluate_edits(
            editor.pipe,
            edits,
            judge,
            shapes_prompts(request),
            4,
            128,
            progress=False,
            baseline=baselines.get(index),
            **SAMPLING,
        )
        baselines[index] = result
        rows.extend(result.rows)
    mean = lambda group, key: statistics.fmean(r[key] for r in rows if r["group"] == group)  # noqa: E731
    return {
        "efficacy": round(mean("efficacy", "destination_after"), 4),
        "generality": round(mean("generality", "destination_after"), 4),
        "specificity_drop": round(
            100 * (mean("specificity", "source_before") - mean("specificity", "source_after")), 2
        ),
    }


def run_model(model: str, args: argparse.Namespace) -> dict:
    if model == "shapes":
        pipe, requests, captions, preset = shapes_setup()
    else:
        pipe = load_names_pipeline()
        edited, _, destinations = rebinding_plan()
        requests, captions, preset = (
            rebinding_requests(edited[:NAMES_EDITED], destinations),
            names_statistics_captions(),
            "shapes-names",
        )
    judge = load_shapes_judge()
    report: dict = {"model": model, "preset": preset, "concepts": len(requests), "runs": []}
    baselines: dict = {}
    for learning_rate, steps in ((None, args.steps), (args.fast_learning_rate, args.fast_steps)):
        overrides = {} if learning_rate is None else {"learning_rate": learning_rate}
        config = EMCIDConfig.from_preset(preset, num_steps=max(steps), **overrides)
        with tempfile.TemporaryDirectory() as cache:
            editor = EMCIDEditor(pipe, config, cache_dir=cache, progress=False)
            editor.compute_statistics(captions)
            with Recorder() as recorder:
                began = time.perf_counter()
                edits = editor.edit(requests)
                seconds = time.perf_counter() - began
        components = [e.component for e in editor.encoders]
        final = recorder.vectors(requests, components, {r.source: max(steps) for r in requests})

        def distance(vectors: dict[str, torch.Tensor]) -> tuple[float, float]:
            values = [
                float((v[i] - final[c][i]).norm() / final[c][i].norm())
                for c, v in vectors.items()
                for i in range(len(requests))
            ]
            return round(statistics.fmean(values), 4), round(max(values), 4)

        def record(label: str, step_of: Callable[[ConceptEdit], int]) -> None:
            stops = {r.source: step_of(r) for r in requests}
            vectors = recorder.vectors(requests, components, stops)
            mean_distance, max_distance = distance(vectors)
            row = {
                "learning_rate": config.learning_rate,
                "rule": label,
                "mean_steps": statistics.fmean(stops.values()),
                "min_steps": min(stops.values()),
                "max_steps": max(stops.values()),
                "z_distance_mean": mean_distance,
                "z_distance_max": max_distance,
                **measure(model, editor, requests, vectors, judge, baselines),
            }
            report["runs"].append(row)
            print(json.dumps(row), flush=True)

        report.setdefault("stage1_seconds_per_concept", {})[f"lr {config.learning_rate}, {max(steps)} steps"] = round(
            seconds / len(requests), 3
        )
        losses = {r.source: [float(x) for x in loss] for r, loss in zip(edits.requests, edits.stage1_losses)}
        for n in steps:
            record(f"{n} steps", lambda r, n=n: n)
        if learning_rate is not None:
            continue
        # the prefix claim: a separate run of the fewest steps gives the recorded vectors of that step
        with tempfile.TemporaryDirectory() as cache:
            short = EMCIDConfig.from_preset(preset, num_steps=min(steps))
            short_editor = EMCIDEditor(pipe, short, cache_dir=cache, progress=False)
            short_editor.compute_statistics(captions)
            check = short_editor.edit(requests[:1])
        recorded = recorder.vectors(requests[:1], components, {requests[0].source: min(steps)})
        report["prefix_check_relative_difference"] = max(
            float((check.vectors[c][0] - recorded[c][0]).norm() / recorded[c][0].norm()) for c in components
        )
        report["delta_moved_per_interval"] = {}  # mean and max over the concepts
        for end in range(2 * args.interval, max(steps) + 1, args.interval):
            values = [moved(d, recorder.h0[source], end, args.interval) for source, d in recorder.deltas.items()]
            report["delta_moved_per_interval"][end] = [round(statistics.fmean(values), 4), round(max(values), 4)]
        record(f"loss window {args.interval}", lambda r: loss_window_stop(losses[r.source], args.interval))
        for tol in args.tolerances:
            record(
                f"delta change {tol}",
                lambda r, tol=tol: delta_change_stop(
                    recorder.deltas[r.source], recorder.h0[r.source], args.interval, tol
                ),
            )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shapes", "names"], choices=["shapes", "names"])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 200])
    parser.add_argument("--fast-learning-rate", type=float, default=0.4)
    parser.add_argument("--fast-steps", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/steps"))
    args = parser.parse_args()
    reports = [run_model(model, args) for model in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "steps.json").write_text(json.dumps(reports, indent=1) + "\n")
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
