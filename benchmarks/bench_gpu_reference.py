"""GPU figures: run-to-run determinism of an edit, and the stage-1 cost on the full SD 1.4 architecture.

    python benchmarks/bench_gpu_reference.py [--device cuda] [--tiny]

1. Determinism: the same two requests edited twice on `mini_sd_pipeline()` (fresh caches), on the device:
   the largest relative difference of the stage-1 vectors and of the dense stage-2 updates between the
   runs, and between the device and the CPU.
2. Cost: one concept's stage 1 on SD 1.4's real architecture (UNet of 860M parameters, CLIP ViT-L/14, the
   SD VAE; random weights, 512x512 training images), with `--steps` stage-1 steps and `--image-steps`
   generation steps, in float32 and with bfloat16 autocast; per-concept seconds extrapolated to the
   paper's 200 steps and 50 generation steps, concepts per hour, and peak device memory.
Prints one JSON object. `--tiny` shrinks everything, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

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
        deltas = max(relative(d.dense(), b.deltas["text_encoder"][l].dense()) for l, d in a.deltas["text_encoder"].items())
        return {"vectors": vectors, "updates": deltas}

    return {"stage1_steps": steps, "run_to_run_on_device": worst(runs[0], runs[1]), "device_vs_cpu": worst(runs[0], runs[2])}


def sd14_pipeline(tiny: bool):
    """SD 1.4's architecture (random weights): the real UNet and VAE configs, CLIP-L text encoder."""
    pipe = mini_sd_pipeline(seed=0) if not tiny else tiny_sd_pipeline(seed=0)
    if tiny:
        return pipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        )
    sd14 = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet.eval(), scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    sd14.set_progress_bar_config(disable=True)
    return sd14


def cost(device: str, tiny: bool, steps: int, image_steps: int) -> dict:
    import diffusers_emcid.editor as editor_module
    import diffusers_emcid.stage1 as stage1_module

    pipe = sd14_pipeline(tiny).to(device)
    results = {"unet_parameters_millions": sum(p.numel() for p in pipe.unet.parameters()) / 1e6}
    for dtype in (None, "bfloat16"):
        timings = {}
        generate, optimise = stage1_module.training_images, editor_module.optimize_concept_vector

        def timed(name, function):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                result = function(*args, **kwargs)
                if device == "cuda":
                    torch.cuda.synchronize()
                timings[name] = time.perf_counter() - start
                return result
            return wrapper

        stage1_module.training_images = timed("images", generate)
        editor_module.optimize_concept_vector = timed("stage1", optimise)
        try:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            config = EMCIDConfig.from_preset("sd1-paper", num_steps=steps, image_num_inference_steps=image_steps,
                                             dtype=dtype, device=device)
            with tempfile.TemporaryDirectory() as cache:
                editor = EMCIDEditor(pipe, config, cache_dir=cache, progress=False)
                editor.compute_statistics(CAPTIONS)
                editor.edit([("dog", "cat")])  # warm-up
                editor.edit([("apple", "banana")])
        finally:
            stage1_module.training_images, editor_module.optimize_concept_vector = generate, optimise
        optimisation = (timings["stage1"] - timings["images"]) / steps
        per_concept = timings["images"] * 50 / image_steps + optimisation * 200
        results[dtype or "float32"] = {
            "image_generation_seconds": timings["images"], "seconds_per_stage1_step": optimisation,
            "seconds_per_concept_at_paper_settings": per_concept, "concepts_per_hour": 3600 / per_concept,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-steps", type=int, default=10)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "determinism": determinism(args.device, args.tiny),
              "stage1_cost_sd14_architecture_reference_path": cost(args.device, args.tiny, args.steps, args.image_steps)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
