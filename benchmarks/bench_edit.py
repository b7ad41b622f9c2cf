"""Benchmark of an EMCID edit on `mini_sd_pipeline()` (SD 1.x's text-encoder shape, random weights), on CPU.

For each number of concepts N (`--num-concepts 1 4 16`), with a fresh temporary cache so that nothing is
reused between runs, it measures:

* statistics: `EMCIDEditor.compute_statistics` on synthetic captions (600 by default), scaled linearly to
  seconds per 1,000 captions (C of all 11 edited layers, 3072 x 3072 each);
* stage 1: seconds per concept of `optimize_concept_vector` (training-image generation included; that part
  is also given on its own), the median over the N concepts (and the repeats);
* stage 2: seconds of `compute_stage2_deltas`, the joint closed-form update of all N concepts;
* the wall time of `EMCIDEditor.edit` and the peak resident set size of the process so far.

The timers wrap the functions that `diffusers_emcid.editor` calls (by monkeypatching), so the measured work
is exactly the library's. The UNet and VAE of the mini pipeline are far smaller than SD's, so stage-1 times
here are much lower than on Stable Diffusion; the text-encoder side (statistics, stage 2) is SD 1.x size.

Prints one JSON object. Example: python benchmarks/bench_edit.py --num-concepts 1 4 16 --num-steps 20
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Any, Callable

import diffusers
import torch

import diffusers_emcid
from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid import editor as editor_module
from diffusers_emcid import stage1 as stage1_module
from diffusers_emcid.testing import mini_sd_pipeline, random_captions

PAPER_NUM_STEPS = 200
TIMINGS: dict[str, list[float]] = {}


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, appending the seconds of each call to `TIMINGS[name]`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMINGS.setdefault(name, []).append(time.perf_counter() - start)

    return wrapper


def concepts(count: int) -> list[tuple[str, str]]:
    """Distinct synthetic (source, destination) pairs; "conceptNN" is never a substring of another source."""
    return [(f"concept{i:02d}", f"target{i:02d}") for i in range(count)]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-concepts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-steps", type=int, default=20, help=f"stage-1 steps (the paper: {PAPER_NUM_STEPS})")
    parser.add_argument("--image-steps", type=int, default=10, help="denoising steps of the training images")
    parser.add_argument("--repeats", type=int, default=1, help="runs per N (each with a fresh cache)")
    parser.add_argument("--statistics-captions", type=int, default=600)
    args = parser.parse_args()

    editor_module.optimize_concept_vector = timed("stage1", editor_module.optimize_concept_vector)
    editor_module.compute_stage2_deltas = timed("stage2", editor_module.compute_stage2_deltas)
    stage1_module.training_images = timed("images", stage1_module.training_images)

    pipe = mini_sd_pipeline()
    config = EMCIDConfig.from_preset("sd1-paper", num_steps=args.num_steps, image_num_inference_steps=args.image_steps)
    captions = random_captions(args.statistics_captions)
    # Untimed warm-up (first calls pay for allocator and BLAS/LAPACK start-up), so N = 1 is not penalised.
    warm_up = EMCIDConfig.from_preset("sd1-paper", num_steps=1, image_num_inference_steps=1)
    with tempfile.TemporaryDirectory(prefix="emcid-bench-") as cache_dir:
        editor = EMCIDEditor(pipe, warm_up, cache_dir=cache_dir, progress=False)
        editor.compute_statistics(captions)
        editor.edit(concepts(1))
    results = []
    for num_concepts in args.num_concepts:
        runs: dict[str, list[float]] = {"stage1": [], "images": [], "stage2": [], "statistics": [], "edit": []}
        for _ in range(args.repeats):
            TIMINGS.clear()
            with tempfile.TemporaryDirectory(prefix="emcid-bench-") as cache_dir:
                editor = EMCIDEditor(pipe, config, cache_dir=cache_dir, progress=False)
                start = time.perf_counter()
                editor.compute_statistics(captions)
                runs["statistics"].append(time.perf_counter() - start)
                start = time.perf_counter()
                editor.edit(concepts(num_concepts))
                runs["edit"].append(time.perf_counter() - start)
            for name in ("stage1", "images", "stage2"):
                runs[name] += TIMINGS.get(name, [])
        statistics_seconds = median(runs["statistics"])
        optimisation = [total - images for total, images in zip(runs["stage1"], runs["images"])]
        at_paper_steps = [images + rest * PAPER_NUM_STEPS / max(config.num_steps, 1)
                          for images, rest in zip(runs["images"], optimisation)]
        results.append({
            "num_concepts": num_concepts,
            "stage1_seconds_per_concept": median(runs["stage1"]),
            "stage1_image_generation_seconds_per_concept": median(runs["images"]),
            f"stage1_seconds_per_concept_estimated_at_{PAPER_NUM_STEPS}_steps": median(at_paper_steps),
            "stage2_seconds": median(runs["stage2"]),
            "edit_seconds_total": median(runs["edit"]),
            "statistics_seconds": statistics_seconds,
            "statistics_seconds_per_1000_captions": round(statistics_seconds * 1000 / len(captions), 3),
            "peak_rss_mb_process_so_far": round(peak_rss_mb(), 1),
        })

    layers, z_layer = config.resolve_layers(pipe.text_encoder.config.num_hidden_layers)
    print(json.dumps({
        "benchmark": "EMCID edit cost on diffusers_emcid.testing.mini_sd_pipeline() (random weights), CPU",
        "pipeline": "CLIP text encoder of SD 1.x shape (12 layers, d=768, d_ff=3072, vocabulary 49,408); small "
                    "UNet and VAE drawing 32x32 images (much cheaper than SD's, so stage 1 is far faster than on SD)",
        "settings": {
            "preset": config.preset,
            "num_steps": config.num_steps,
            "paper_num_steps": PAPER_NUM_STEPS,
            "image_num_inference_steps": config.image_num_inference_steps,
            "templates_per_concept_P": len(diffusers_emcid.DEFAULT_TEMPLATES),
            "samples_per_prompt": config.samples_per_prompt,
            "edited_layers": layers,
            "z_layer": z_layer,
            "residual": config.residual,
            "statistics_captions": len(captions),
            "repeats": args.repeats,
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
            "diffusers_emcid_version": diffusers_emcid.__version__,
            "machine_cpu_count": os.cpu_count(),
            "usable_cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "results": results,
        "notes": [
            f"Stage-1 time scales linearly with num_steps; the paper uses {PAPER_NUM_STEPS} steps. The estimate at "
            f"{PAPER_NUM_STEPS} steps keeps the image generation and scales the rest of each concept's time by "
            f"{PAPER_NUM_STEPS}/num_steps.",
            "stage1_seconds_per_concept is the median over concepts (and repeats) of one optimize_concept_vector "
            "call, training-image generation included.",
            f"statistics_seconds_per_1000_captions is compute_statistics on {len(captions)} synthetic captions "
            "scaled linearly to 1,000 (random toy-word captions of 5-15 words; real captions are similar in length).",
            "peak_rss_mb_process_so_far is the peak resident set size of the whole process up to the end of that "
            "N (ru_maxrss), so it never decreases from one N to the next.",
            "Each N (and repeat) uses a fresh temporary cache, so statistics and stage-1 vectors are recomputed. An "
            "untimed warm-up edit (1 concept, 1 step) runs first.",
        ],
    }, indent=2))


if __name__ == "__main__":
    main()
