"""Massive edits, measured: rebind K names of the shipped many-concept model at once, with EMCID and with UCE.

    python benchmarks/bench_massive.py [--ks 1 10 50 100 200 400] [--methods emcid uce] [--out DIR]
        [--preservation-weight LAMBDA] [--sampler-steps N] [--cache-dir DIR]

The many-concept model (`diffusers_emcid.shapes.names`) binds 432 words to (colour, shape) pairs. A seeded plan
sets 32 of them aside as controls that are never edited and gives each of the other 400 a new pair; the edit
of size K rebinds the first K of them, all in one edit (the sets are nested, so stage-1 vectors computed for a
smaller K are reused from the cache and every concept's stage 1 runs once). For each K and method, images drawn
with the same seeds before and after are read by the shipped judge (`evaluate_edits`, mean probabilities; the
"before" images are drawn once per K for both methods):

* efficacy: P(new pair) for the names' training templates (`NAME_TEMPLATES`), up to `--eval-names` edited names,
  with enough images per prompt for `--images` images in all (so K = 1 is not judged on 4 images);
* generality: P(new pair) for templates never used for names (`HELDOUT_NAME_TEMPLATES`), the same names;
* their ceilings: P(new pair) when the unedited model draws the same prompts and seeds with the name replaced by
  "a {colour} {shape}" of the new pair (`rebinding_ceiling`);
* specificity: P(own pair) for the 32 control names (training templates) and for the 36 prompts
  "a {colour} {shape}", one image each; the drop is before minus after, in points;
* the cost: EMCID's stage-1 seconds per concept (concepts new to the cache only), stage-2 seconds (a second,
  timed solve of the same vectors), UCE's seconds, and the process's peak memory.

Prints one JSON object, writes it to `DIR/massive.json` and plots the metrics against K and against K / (edited
key dimensions) in `DIR/massive.png` (needs matplotlib: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_stage1 import peak_memory_gb, reset_peak_memory, synchronize
from uce_baseline import UCEEdit

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.evaluation import (
    EditEvaluation,
    evaluate_edits,
    summarize,
)
from diffusers_emcid.shapes import SAMPLING, load_shapes_judge
from diffusers_emcid.shapes.names import (
    NAME_TEMPLATES,
    NUM_CONTROL_NAMES,
    load_names_pipeline,
    names_statistics_captions,
    pair_prompt,
    rebinding_ceiling,
    rebinding_metrics,
    rebinding_plan,
    rebinding_prompts,
    rebinding_requests,
)
from diffusers_emcid.shapes.render import PAIRS

PRESET = "shapes-names"


def uce_prompts(requests: list[ConceptEdit], kept_names: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """UCE's edits, the prompt pairs of EMCID's `requests`, and its preserved prompts: the names not edited under
    the name templates and the 36 plain prompts."""
    edits = [(t.format(r.source), t.format(r.destination)) for r in requests for t in r.templates]
    kept = [t.format(name=n) for n in kept_names for t in NAME_TEMPLATES]
    kept += [pair_prompt(*pair) for pair in PAIRS]
    return edits, kept


def by_template(rows: list[dict], names: list[str]) -> dict[str, float]:
    """P(new pair) after the edit per template of the edited names' prompts (efficacy and generality)."""
    names = set(names)
    values: dict[str, list[float]] = {}
    for row in rows:
        if row["group"] in ("efficacy", "generality"):
            template = " ".join("{name}" if word in names else word for word in row["prompt"].split())
            values.setdefault(template, []).append(row["destination_after"])
    return {template: round(statistics.fmean(v), 4) for template, v in values.items()}


def plot(results: list[dict], key_dimensions: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("emcid", "-"), ("uce", "--")):
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        for key, colour in (("efficacy", "C0"), ("generality", "C1"), ("specificity", "C2")):
            values = [r[key] if key != "specificity" else 1 - r["specificity_drop_names"] / 100 for r in rows]
            for axis, x in zip(axes, ([r["k"] for r in rows], [r["k"] / key_dimensions for r in rows])):
                axis.plot(x, values, style, color=colour, marker="o", label=f"{method.upper()} {key}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("K, names edited at once")
    axes[1].set_xlabel(f"K / edited key dimensions ({key_dimensions})")
    for axis in axes:
        axis.set_ylim(-0.02, 1.02)
        axis.set_ylabel("judged probability")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    figure.suptitle("Rebinding K names at once in the many-concept shapes model (specificity: 1 - drop, control names)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50, 100, 200, 400])
    parser.add_argument("--methods", nargs="+", default=["emcid", "uce"], choices=["emcid", "uce"])
    parser.add_argument("--eval-names", type=int, default=25, help="edited names evaluated per K")
    parser.add_argument(
        "--images", type=int, default=100, help="images per group at least (more per prompt at small K)"
    )
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument(
        "--uce-preservation-scale", type=float, default=1.0, help="UCE's weight of the preserved prompts (default: 1)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/massive"))
    parser.add_argument("--preservation-weight", type=float, help="EMCID's lambda (default: the preset's)")
    parser.add_argument(
        "--sampler-steps", type=int, default=SAMPLING["num_inference_steps"], help="DPM-Solver++ steps of every image"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="a stage-1 cache to use and fill (default: a new temporary one); concepts found there cost no stage 1",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    pipe = load_names_pipeline(device=args.device)
    judge = load_shapes_judge(device=args.device)
    edited, controls, destinations = rebinding_plan()
    if max(args.ks) > len(edited):
        parser.error(f"--ks: at most {len(edited)} names can be edited ({NUM_CONTROL_NAMES} are controls).")
    config = EMCIDConfig.from_preset(args.preset, device=args.device)
    sampling = {**SAMPLING, "num_inference_steps": args.sampler_steps}
    if args.preservation_weight is not None:
        config = dataclasses.replace(config, preservation_weight=args.preservation_weight)
    cache = tempfile.TemporaryDirectory()
    editor = EMCIDEditor(pipe, config, cache_dir=args.cache_dir or cache.name, progress=False)
    began = time.perf_counter()
    editor.compute_statistics(names_statistics_captions())
    statistics_seconds = time.perf_counter() - began
    key_dimensions = sum(editor.layout.layers[layer].mlp.fc2.in_features for layer in editor.layers)
    results, computed = [], set()
    for k in sorted(args.ks):
        names = edited[:k]
        requests = rebinding_requests(names, destinations)
        evaluated = names[: args.eval_names]
        num_images = max(1, math.ceil(args.images / (len(evaluated) * len(NAME_TEMPLATES))))
        prompts = rebinding_prompts(evaluated, destinations, controls)
        groups = (  # the edited names' prompts with num_images each, the controls' with one
            ([p for p in prompts if p.group != "specificity"], num_images),
            ([p for p in prompts if p.group == "specificity"], 1),
        )
        ceiling = rebinding_ceiling(pipe, judge, groups[0][0], num_images, images_per_call=128, **sampling)
        baselines: list[EditEvaluation | None] = [None, None]
        for method in args.methods:
            reset_peak_memory(device)
            began = time.perf_counter()
            if method == "emcid":
                edit = editor.edit(requests)
                synchronize(device)
                edit_seconds = time.perf_counter() - began
                began = time.perf_counter()
                editor.solve(edit.requests, edit.vectors)
                synchronize(device)
                stage2 = time.perf_counter() - began
                new = len(set(names) - computed)
                computed |= set(names)
                cost = {"stage1_s_per_concept": (edit_seconds - stage2) / max(new, 1), "stage2_s": stage2}
            else:
                edits, kept = uce_prompts(requests, edited[k:] + controls)
                edit = UCEEdit.compute(pipe, edits, kept, preservation_scale=args.uce_preservation_scale)
                synchronize(device)
                cost = {"uce_s": time.perf_counter() - began}
            cost["peak_memory_gb"] = peak_memory_gb(device)
            parts = [
                evaluate_edits(
                    pipe,
                    edit,
                    judge,
                    group,
                    num_images=n,
                    images_per_call=128,
                    progress=False,
                    baseline=baseline,
                    **sampling,
                )
                for (group, n), baseline in zip(groups, baselines)
            ]
            baselines = parts
            rows = parts[0].rows + parts[1].rows
            row = {"method": method, "k": k, "evaluated_names": len(evaluated), "images_per_prompt": num_images}
            row.update(rebinding_metrics(EditEvaluation(rows, summarize(rows))))
            row.update(ceiling)
            row.update(cost)
            row["new_pair_by_template"] = by_template(rows, evaluated)
            results.append(row)
            print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
    report = {
        "model": "diffusers_emcid.shapes.names",
        "preset": args.preset,
        "preservation_weight": config.preservation_weight,
        "uce_preservation_scale": args.uce_preservation_scale,
        "edited_layers": editor.layers,
        "edited_key_dimensions": key_dimensions,
        "statistics_s": statistics_seconds,
        "sampling": sampling,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "massive.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, key_dimensions, args.out / "massive.png")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
