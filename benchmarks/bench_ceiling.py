"""How high efficacy can go on the many-concept model: the unedited model's own P(pair) for the prompts an edit
is judged against, by sampler setting, and one rebinding edit against that ceiling on all of its names.

    python benchmarks/bench_ceiling.py [--guidance 3 4 5 5.5 6 7] [--steps 10] [--edit-names 100]

1. For each guidance scale (at `--steps` DPM-Solver++ steps), the unedited model draws: the destination prompts of
   the first 100 planned edits under the name templates (2 images each) and of the first 50 under the held-out
   templates (2 each), i.e. "a picture of a red square" for a name to be rebound to a red square; 100 names under
   the name templates, judged by their own pair (1 each); the 36 plain prompts (4 each). Each is read by the
   shipped judge as the mean P(pair) and the share of images whose top-1 label is the pair: if the two agree, the
   ceiling is the model's accuracy, not the judge's softness.
2. With `--edit-names K`: the preset's edit of the first K planned names, judged on all K names (2 images per
   prompt, `--steps` steps, guidance 4) against `rebinding_ceiling` on the same prompts and seeds, with 95%
   intervals of (after - ceiling) from a bootstrap over names.

Prints one JSON line per measurement. Seeds are those of `rebinding_prompts`, so the images are the ones
`bench_massive.py` draws for the same prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.evaluation import EvaluationPrompt, Judge, concept_probability, draw_prompt_images, evaluate_edits
from diffusers_emcid.shapes import SAMPLING, load_shapes_judge
from diffusers_emcid.shapes.names import (
    NAME_TEMPLATES,
    destination_prompts,
    load_names_pipeline,
    name_bindings,
    names_statistics_captions,
    rebinding_metrics,
    rebinding_plan,
    rebinding_prompts,
    rebinding_requests,
)

PRESET = "shapes-names"


def judged(
    judge: Judge, images: list, prompts: list[EvaluationPrompt], concept: str
) -> tuple[list[float], list[float]]:
    """Per prompt, the mean P(`concept` field of the prompt) and the share of images whose top-1 label is it."""
    means, top1 = [], []
    for drawn, prompt in zip(images, prompts):
        probabilities = judge(drawn)
        label = getattr(prompt, concept)
        means.append(float(concept_probability(probabilities, judge.labels, label).mean()))
        top1.append(float((probabilities.argmax(1) == judge.labels.index(label)).float().mean()))
    return means, top1


def ceiling_sets(names: int = 100) -> dict[str, tuple[list[EvaluationPrompt], int]]:
    """The prompt sets of part 1 and their images per prompt."""
    edited, controls, destinations = rebinding_plan()
    planned = destination_prompts(rebinding_prompts(edited[:names], destinations, controls))
    half = destination_prompts(rebinding_prompts(edited[: names // 2], destinations, controls))
    own = [  # the seeds `rebinding_prompts` gives control names
        EvaluationPrompt(t.format(name=n), "specificity", " ".join(name_bindings()[n]), 2_000_000 + 1_000 * i + 100 * j)
        for i, n in enumerate(edited[:names])
        for j, t in enumerate(NAME_TEMPLATES)
    ]
    plain = [p for p in rebinding_prompts([], destinations, []) if p.group == "specificity"]
    return {
        "destinations, name templates": ([p for p in planned if p.group == "efficacy"], 2),
        "destinations, held-out templates": ([p for p in half if p.group == "generality"], 2),
        "names, own pair": (own, 1),
        "plain prompts": (plain, 4),
    }


def bootstrap(per_name: dict[str, list[tuple[float, float]]], resamples: int = 2000) -> tuple[float, float]:
    """The 95% interval of mean(after) - mean(ceiling) over names drawn with replacement."""
    rng, names, differences = random.Random(0), list(per_name), []
    for _ in range(resamples):
        pick = [rng.choice(names) for _ in names]
        after = statistics.fmean(a for n in pick for a, _ in per_name[n])
        ceiling = statistics.fmean(c for n in pick for _, c in per_name[n])
        differences.append(after - ceiling)
    differences.sort()
    return differences[int(0.025 * resamples)], differences[int(0.975 * resamples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidance", type=float, nargs="*", default=[3.0, 4.0, 5.0, 5.5, 6.0, 7.0])
    parser.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps of every image")
    parser.add_argument("--names", type=int, default=100, help="names of part 1's sets")
    parser.add_argument("--edit-names", type=int, default=0, help="K of part 2 (0: skip it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pipe = load_names_pipeline(device=args.device)
    judge = load_shapes_judge(device=args.device)
    sets = ceiling_sets(args.names)
    for guidance in args.guidance:
        began, row = time.perf_counter(), {"steps": args.steps, "guidance": guidance}
        for label, (prompts, num_images) in sets.items():
            concept = "source" if prompts[0].group == "specificity" else "destination"
            images = draw_prompt_images(
                pipe,
                [(p.prompt, p.seed) for p in prompts],
                num_images,
                128,
                num_inference_steps=args.steps,
                guidance_scale=guidance,
            )
            means, top1 = judged(judge, images, prompts, concept)
            row[label] = {"mean_p": round(statistics.fmean(means), 4), "top1": round(statistics.fmean(top1), 4)}
        row["seconds"] = round(time.perf_counter() - began, 1)
        print(json.dumps(row), flush=True)
    if args.edit_names:
        sampling = {**SAMPLING, "num_inference_steps": args.steps}
        edited, controls, destinations = rebinding_plan()
        editor = EMCIDEditor(pipe, EMCIDConfig.from_preset(PRESET, device=args.device), cache_dir=tempfile.mkdtemp())
        editor.compute_statistics(names_statistics_captions())
        edits = editor.edit(rebinding_requests(edited[: args.edit_names], destinations))
        prompts = rebinding_prompts(edited[: args.edit_names], destinations, controls)
        evaluation = evaluate_edits(pipe, edits, judge, prompts, num_images=2, images_per_call=128, **sampling)
        row = {"k": args.edit_names, **rebinding_metrics(evaluation)}
        ceilings = destination_prompts(prompts)
        images = draw_prompt_images(pipe, [(p.prompt, p.seed) for p in ceilings], 2, 128, **sampling)
        ceiling_means, _ = judged(judge, images, ceilings, "destination")
        rows = [r for r in evaluation.rows if r["group"] in ("efficacy", "generality")]
        for group in ("efficacy", "generality"):
            per_name: dict[str, list[tuple[float, float]]] = {}
            for evaluated, ceiling in zip(rows, ceiling_means):
                if evaluated["group"] == group:
                    name = next(w for w in evaluated["prompt"].split() if w in name_bindings())
                    per_name.setdefault(name, []).append((evaluated["destination_after"], ceiling))
            row[f"{group}_ceiling"] = statistics.fmean(c for pairs in per_name.values() for _, c in pairs)
            row[f"{group}_minus_ceiling_95"] = bootstrap(per_name)
            row[f"{group}_names_at_least_0.9"] = statistics.fmean(
                statistics.fmean(a for a, _ in pairs) >= 0.9 for pairs in per_name.values()
            )
        print(json.dumps({k: v if not isinstance(v, float) else round(v, 4) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
