"""Run-to-run determinism of an edit on a device, and its difference from the CPU.

    python benchmarks/bench_determinism.py [--device cuda] [--tiny]

The same two requests edited twice on `mini_sd_pipeline()` (fresh caches), on the device:
   the largest relative difference of the stage-1 vectors and of the dense stage-2 updates between the
   runs, and between the device and the CPU.
Prints one JSON object. `--tiny` shrinks everything, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import mini_sd_pipeline, random_captions, tiny_sd_pipeline

CAPTIONS = random_captions()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def edit_once(pipe, device: str, steps: int):
    config = EMCIDConfig.from_preset("sd1-paper", num_steps=steps, image_num_inference_steps=4, device=device)
    with tempfile.TemporaryDirectory() as cache:
        editor = EMCIDEditor(pipe, config, cache_dir=cache, progress=False)
        editor.compute_statistics(CAPTIONS)
        return editor.edit([("dog", "cat"), ("apple", "banana")])


def determinism(device: str, tiny: bool) -> dict:
    pipe = (tiny_sd_pipeline if tiny else mini_sd_pipeline)(seed=0)
    steps = 5 if tiny else 50
    runs = [edit_once(pipe, device, steps) for _ in range(2)] + [edit_once(pipe, "cpu", steps)]

    def worst(a, b):
        vectors = relative(a.vectors["text_encoder"], b.vectors["text_encoder"])
        deltas = max(
            relative(d.dense(), b.deltas["text_encoder"][layer].dense())
            for layer, d in a.deltas["text_encoder"].items()
        )
        return {"vectors": vectors, "updates": deltas}

    return {
        "stage1_steps": steps,
        "run_to_run_on_device": worst(runs[0], runs[1]),
        "device_vs_cpu": worst(runs[0], runs[2]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "determinism": determinism(args.device, args.tiny),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
