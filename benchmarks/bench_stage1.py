"""Stage-1 cost: the `reference` path against the fast path at several concept batch sizes, in one run.

    python benchmarks/bench_stage1.py [--architecture mini|sd14|shapes] [--device cpu|cuda] [--batch-sizes 1 4 16]
                                      [--steps 10] [--image-steps 4] [--repeats 3] [--fast-dtype bfloat16]
                                      [--compile-unet] [--profile] [--stopping-interval 5]

For SD 1.4's architecture on a GPU: `--architecture sd14 --device cuda --fast-dtype bfloat16 --batch-sizes 8 16 32`,
with and without `--compile-unet`.

* `reference`: `EMCIDConfig(stage1_mode="reference")`, one concept at a time, full text-encoder passes,
  float32: the plain path of the paper (with the images encoded once and the destination computed once);
* `fast`: `stage1_mode="fast"` with `concept_batch_size` B, the text encoder's layers before the z layer
  computed once, and `--fast-dtype` autocast for the networks (none by default on the CPU).

Each repetition optimises fresh concepts (B of them for the fast path, one for the reference), timed around
`optimize_concept_vectors`, which includes drawing the training images (also timed on their own). Reported
per mode: the median over repetitions of seconds per concept, split into image generation and optimisation
(per step, set-up included); the same with the optimisation extrapolated to the paper's 200 steps (images as
drawn here), and concepts per hour; the peak memory
(device memory on CUDA, resident set on the CPU); and the largest relative difference of the stage-1 vectors
from the reference path's for the same concepts at equal steps.

`--architecture mini` is `mini_sd_pipeline` (CLIP-L text encoder, random weights) with a UNet of
`--unet-channels` at `--sample-size` latents, by default sized so that one UNet forward costs about three
text-encoder forwards (the measured ratio is printed); `sd14` is SD 1.4's architecture (860M-parameter UNet,
512x512 images), for a GPU; `shapes` is the trained model the package ships (real shape and colour
pairs), on which `--stopping-interval K` also measures what the stopping rule saves and changes.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDPMScheduler

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid import stage1 as stage1_module
from diffusers_emcid.testing import mini_sd_pipeline, sd14_architecture_pipeline

PAPER_STEPS = 200


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak resident set (VmHWM) from now


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def median_seconds(function: Callable[[], Any], repeats: int = 5) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_to_text_encoder_ratio(pipe, device: torch.device) -> float:
    """Seconds of one UNet forward over those of one text-encoder forward, both at batch 3 (one concept's prompts)."""
    ids = pipe.tokenizer(
        ["an image of concept000", "a photo of concept000", "concept000"], padding=True, return_tensors="pt"
    ).input_ids.to(device)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids).last_hidden_state
        size = pipe.unet.config.sample_size
        latents = torch.randn(3, 4, size, size, device=device)
        timesteps = torch.tensor([10, 500, 900], device=device)

        def text_encoder() -> None:
            pipe.text_encoder(ids)
            synchronize(device)

        def unet() -> None:
            pipe.unet(latents, timesteps, encoder_hidden_states=hidden)
            synchronize(device)

        return median_seconds(unet) / median_seconds(text_encoder)


class Timer:
    """Wraps `stage1.training_images` to add up its seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.original = device, 0.0, stage1_module.training_images

    def __enter__(self) -> "Timer":
        @functools.wraps(self.original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = self.original(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            return result

        stage1_module.training_images = timed
        return self

    def __exit__(self, *exc: object) -> None:
        stage1_module.training_images = self.original


def make_request(architecture: str, number: int) -> ConceptEdit:
    """Concept `number` of a run: synthetic words, or on the shapes model real shape and colour pairs."""
    if architecture != "shapes":
        return ConceptEdit(f"concept{number:03d}", f"target{number:03d}", seed=number)
    from diffusers_emcid.shapes import COLOURS, SHAPES

    pairs = [(a, b) for words in (SHAPES, tuple(COLOURS)) for a in words for b in words if a != b]
    source, destination = pairs[number % len(pairs)]
    return ConceptEdit(source, destination, seed=number)


def run_mode(
    pipe, device: torch.device, config: EMCIDConfig, batch: int, repeats: int, architecture: str
) -> dict[str, Any]:
    """`repeats` stage-1 runs of `batch` fresh concepts each; per-concept medians."""
    editor = EMCIDEditor(pipe, config, progress=False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    totals, images, vectors, steps_run = [], [], {}, []
    with editor._base_model():
        warm = [make_request(architecture, 999)]
        stage1_module.optimize_concept_vectors(pipe, editor.encoders, warm, config, scheduler, device)
        reset_peak_memory(device)
        for repeat in range(repeats):
            numbers = range(repeat * batch, (repeat + 1) * batch)
            requests = [make_request(architecture, n) for n in numbers]
            with Timer(device) as timer:
                start = time.perf_counter()
                results = stage1_module.optimize_concept_vectors(
                    pipe, editor.encoders, requests, config, scheduler, device
                )
                synchronize(device)
                totals.append((time.perf_counter() - start) / batch)
            images.append(timer.seconds / batch)
            vectors.update({n: r.vectors["text_encoder"] for n, r in zip(numbers, results)})
            steps_run.extend(len(r.losses) for r in results)
    total, image = statistics.median(totals), statistics.median(images)
    optimisation_per_step = (total - image) / config.num_steps
    at_paper = (
        image + optimisation_per_step * PAPER_STEPS
    )  # the images as drawn here: their cost is not linear in steps
    return {
        "mean_steps_run": statistics.fmean(steps_run),
        "seconds_per_concept": round(total, 4),
        "image_generation_seconds_per_concept": round(image, 4),
        "optimisation_seconds_per_concept_step": round(optimisation_per_step, 5),
        "seconds_per_concept_at_200_steps": round(at_paper, 3),
        "concepts_per_hour_at_200_steps": round(3600 / at_paper, 1),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "_vectors": vectors,
    }


def profile_step(pipe, device: torch.device, config: EMCIDConfig, batch: int, architecture: str) -> dict[str, float]:
    """Seconds per step of each labelled part of the stage-1 step (`emcid.stage1.*`, from `torch.profiler`), per
    concept, for one run of `batch` concepts after a warm-up run; `other` is the rest of the step (the loss, the
    clamp, the bookkeeping)."""
    editor = EMCIDEditor(pipe, config, progress=False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    requests = [make_request(architecture, 900 + n) for n in range(batch)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with editor._base_model():
        stage1_module.optimize_concept_vectors(pipe, editor.encoders, requests, config, scheduler, device)
        with torch.profiler.profile(activities=activities) as profiler:
            stage1_module.optimize_concept_vectors(pipe, editor.encoders, requests, config, scheduler, device)
    per_step = batch * config.num_steps
    totals = {
        event.key.removeprefix("emcid.stage1."): (
            event.device_time_total if device.type == "cuda" else event.cpu_time_total
        )
        / 1e6
        / per_step
        for event in profiler.key_averages()
        if event.key.startswith("emcid.stage1.")
    }
    step = totals.pop("step")
    parts = {name: round(seconds, 5) for name, seconds in sorted(totals.items(), key=lambda item: -item[1])}
    parts["other"] = round(step - sum(totals.values()), 5)
    parts["step"] = round(step, 5)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", choices=["mini", "sd14", "shapes"], default="mini")
    parser.add_argument("--unet-channels", type=int, nargs=2, default=[128, 256], help="mini only")
    parser.add_argument("--sample-size", type=int, default=32, help="mini only: latent side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--fast-dtype",
        default=None,
        choices=[None, "bfloat16", "float16"],
        help="autocast of the fast path (the reference stays float32)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image-steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stopping-interval",
        type=int,
        default=None,
        help="also run the largest batch with the stopping rule and compare its z with the full run's",
    )
    parser.add_argument("--stopping-tolerance", type=float, default=EMCIDConfig.stopping_tolerance)
    parser.add_argument(
        "--compile-unet", action="store_true", help="torch.compile the UNet (in place) before any timing"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the parts of one step: the reference path and the fast path at the largest batch",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.architecture == "mini":
        pipe = mini_sd_pipeline(0, unet_channels=tuple(args.unet_channels), sample_size=args.sample_size)
    elif args.architecture == "sd14":
        pipe = sd14_architecture_pipeline(0)
    else:
        from diffusers_emcid.shapes import load_shapes_pipeline

        pipe = load_shapes_pipeline()
    pipe.to(device)
    if args.compile_unet:
        pipe.unet.compile()
    settings = dict(num_steps=args.steps, image_num_inference_steps=args.image_steps, device=args.device)
    report: dict[str, Any] = {
        "architecture": args.architecture,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "unet_parameters_millions": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 2),
        "unet_forward_over_text_encoder_forward": round(unet_to_text_encoder_ratio(pipe, device), 2),
        "settings": {
            "steps": args.steps,
            "image_steps": args.image_steps,
            "repeats": args.repeats,
            "templates_per_concept": 3,
            "fast_dtype": args.fast_dtype,
            "compiled_unet": args.compile_unet,
        },
    }
    reference_config = EMCIDConfig.from_preset("sd1-paper", stage1_mode="reference", **settings)
    modes = {"reference": run_mode(pipe, device, reference_config, 1, args.repeats, args.architecture)}
    for batch in args.batch_sizes:
        config = EMCIDConfig.from_preset(
            "sd1-paper", stage1_mode="fast", concept_batch_size=batch, dtype=args.fast_dtype, **settings
        )
        modes[f"fast_batch_{batch}"] = run_mode(pipe, device, config, batch, args.repeats, args.architecture)
    if args.stopping_interval:
        batch = max(args.batch_sizes)
        config = EMCIDConfig.from_preset(
            "sd1-paper",
            stage1_mode="fast",
            concept_batch_size=batch,
            dtype=args.fast_dtype,
            stopping_interval=args.stopping_interval,
            stopping_tolerance=args.stopping_tolerance,
            **settings,
        )
        stopped = run_mode(pipe, device, config, batch, args.repeats, args.architecture)
        full = modes[f"fast_batch_{batch}"]["_vectors"]
        stopped["max_relative_difference_of_z_vs_full_steps"] = max(
            float((z - full[n]).norm() / full[n].norm()) for n, z in stopped["_vectors"].items()
        )
        modes[f"fast_batch_{batch}_stopping"] = stopped
    reference = modes["reference"].pop("_vectors")
    for name, mode in list(modes.items())[1:]:
        vectors = mode.pop("_vectors")
        mode["max_relative_difference_of_z_vs_reference"] = max(
            float((vectors[n] - z).norm() / z.norm()) for n, z in reference.items() if n in vectors
        )
        mode["speedup_vs_reference"] = round(modes["reference"]["seconds_per_concept"] / mode["seconds_per_concept"], 2)
        mode["speedup_vs_reference_at_200_steps"] = round(
            modes["reference"]["seconds_per_concept_at_200_steps"] / mode["seconds_per_concept_at_200_steps"], 2
        )
    report["modes"] = modes
    if args.profile:
        batch = max(args.batch_sizes)
        fast_config = EMCIDConfig.from_preset(
            "sd1-paper", stage1_mode="fast", concept_batch_size=batch, dtype=args.fast_dtype, **settings
        )
        report["seconds_per_concept_step_by_part"] = {
            "reference": profile_step(pipe, device, reference_config, 1, args.architecture),
            f"fast_batch_{batch}": profile_step(pipe, device, fast_config, batch, args.architecture),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
