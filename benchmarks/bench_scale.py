"""How an edit's cost grows with the number of concepts N: statistics, stage 1 and stage 2.

    python benchmarks/bench_scale.py [--num-concepts 10 100 1000] [--captions 2000] [--steps 2] [--device cpu]

On `mini_sd_pipeline()` (SD 1.x's text encoder: CLIP ViT-L/14 shape, 12 layers, d = 768, d_ff = 3072; random
weights; layers 0-10 edited as in the paper):

* statistics: `EMCIDEditor.compute_statistics` over `--captions` synthetic captions (5-15 words), C of all 11
  layers in one pass per batch, reported as seconds per 10,000 captions;
* for each N, with concepts not seen before: stage 1 of N concepts with only `--steps` steps and given training images
  (so no image generation), fast mode in batches of 16, so that N = 1,000 fits this machine; then stage 2,
  the joint closed-form update of all N concepts (timed around `compute_stage2_deltas`, for all 11 layers);
* peak memory per N (device memory on CUDA, resident set on the CPU) and the growth of each figure with N.

Stage 2 does not depend on how the vectors were obtained, so its figures are those of a full edit. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from typing import Any

import torch
from bench_stage1 import peak_memory_gb, reset_peak_memory, synchronize

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid import editor as editor_module
from diffusers_emcid.testing import mini_sd_pipeline, random_captions


def timed_stage2(device: torch.device, seconds: list[float]):
    """`compute_stage2_deltas` of the editor module, appending each call's seconds to `seconds`."""
    original = editor_module.compute_stage2_deltas

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = original(*args, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        return result

    return original, wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-concepts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=2, help="stage-1 steps (the paper: 200)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    pipe = mini_sd_pipeline(0).to(device)
    config = EMCIDConfig.from_preset("sd1-paper", num_steps=args.steps, concept_batch_size=16, device=args.device)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "settings": {
            "stage1_steps": args.steps,
            "statistics_captions": args.captions,
            "edited_layers": 11,
            "templates_per_concept": 3,
            "stage1_images": "given (no generation)",
        },
    }
    with tempfile.TemporaryDirectory() as cache:
        editor = EMCIDEditor(pipe, config, cache_dir=cache, progress=False)
        reset_peak_memory(device)
        start = time.perf_counter()
        editor.compute_statistics(random_captions(args.captions), num_samples=args.captions)
        synchronize(device)
        seconds = time.perf_counter() - start
        report["statistics"] = {
            "seconds": round(seconds, 2),
            "seconds_per_10000_captions": round(seconds * 10_000 / args.captions, 2),
            "peak_memory_gb": round(peak_memory_gb(device), 3),
        }
        rows, first_number = [], 0
        for count in args.num_concepts:  # fresh concepts for every N, so nothing comes from the stage-1 cache
            numbers = range(first_number, first_number + count)
            first_number += count
            requests = [ConceptEdit(f"concept{n:04d}", f"target{n:04d}", seed=n, images=[image] * 3) for n in numbers]
            stage2_seconds: list[float] = []
            original, wrapper = timed_stage2(device, stage2_seconds)
            editor_module.compute_stage2_deltas = wrapper
            reset_peak_memory(device)
            try:
                start = time.perf_counter()
                editor.edit(requests)
                synchronize(device)
                total = time.perf_counter() - start
            finally:
                editor_module.compute_stage2_deltas = original
            rows.append(
                {
                    "num_concepts": count,
                    "stage2_seconds": round(stage2_seconds[0], 2),
                    "stage1_seconds": round(total - stage2_seconds[0], 2),
                    "peak_memory_gb": round(peak_memory_gb(device), 3),
                }
            )
    first = rows[0]
    for row in rows:
        row["stage2_growth_vs_first"] = round(row["stage2_seconds"] / first["stage2_seconds"], 2)
        row["peak_memory_growth_vs_first"] = round(row["peak_memory_gb"] / first["peak_memory_gb"], 2)
    report["by_num_concepts"] = rows
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
