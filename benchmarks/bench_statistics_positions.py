"""What the key statistics' positions change: drift of unedited conditioning, and the shapes model's metrics.

    python benchmarks/bench_statistics_positions.py [--families sd1 sd2 sdxl] [--shapes] [--num-images 12]
                                                    [--padding-weights 0.1 1 10] [--encoder-sweep]

For each statistics setting (`statistics_positions="paper"`, and `"pipeline"` with each padding weight), and for
the default statistics with stage 1 conditioning the UNet on the pipeline's 77 positions (`stage1_padding=
"pipeline"`) instead of the prompts padded to the longest:

* **tiny pipelines** (`diffusers_emcid.testing`, random weights, SD 1.x / 2.x / SD-XL), one edit `("dog", "cat")`
  with each family's default preset (lambda scaled to the key width, as 4000 is for CLIP-L's 3072) on 600 random
  captions: the change of the 77-position conditioning the pipeline's `encode_prompt` gives the UNet, relative to
  its norm, for the empty prompt, the edited prompt and unrelated prompts, and the unrelated prompts' change as a
  fraction of the edited prompt's;
* **the shipped shapes model** (`--shapes`): the demo's edit and evaluation (efficacy, generality, specificity
  with the shipped judge, `--num-images` per prompt, same seeds before and after) and the conditioning drift.
  `"paper (spelled-out padding)"` is the earlier workaround: captions followed by end-of-text markers written as
  text, counted as real tokens;
* **random SD 1.x encoders of other shapes** (`--encoder-sweep`): the same drift figures with the default settings
  for wider keys, wider or deeper encoders and token embeddings scaled up (so that a word's identity outweighs its
  position), to see what the share left to unrelated prompts depends on in random encoders.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import torch

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.evaluation import conditioning_change
from diffusers_emcid.families import pipeline_family
from diffusers_emcid.testing import random_captions, tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

FAMILIES = {"sd1": tiny_sd_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}
EDITED = ["An image of dog", "a photo of dog"]
UNRELATED = ["a photo of a tree", "a red car at night", "a painting of a house"]
CLIP_L_KEY_WIDTH = 3072


def settings(padding_weights: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """The statistics settings measured, then the default statistics with stage 1 conditioned on 77 positions."""
    rows = [("paper", {"statistics_positions": "paper"})]
    rows += [
        (f"pipeline, padding weight {w:g}", {"statistics_positions": "pipeline", "statistics_padding_weight": w})
        for w in padding_weights
    ]
    rows.append(("pipeline, padding weight 1, stage-1 padding 'pipeline'", {"stage1_padding": "pipeline"}))
    return rows


def drift_report(pipe: Any, edits: Any) -> dict[str, float]:
    empty = conditioning_change(pipe, edits, [""])
    edited, unrelated = conditioning_change(pipe, edits, EDITED), conditioning_change(pipe, edits, UNRELATED)
    return {
        "empty": empty[0],
        "edited": max(edited),
        "unrelated_max": max(unrelated),
        "unrelated_over_edited": max(unrelated) / max(edited),
    }


def tiny_family(name: str, padding_weights: list[float], cache: str) -> dict[str, Any]:
    pipe = FAMILIES[name](seed=0)
    preset = pipeline_family(pipe).default_preset
    results = {}
    for label, overrides in settings(padding_weights):
        width = pipe.text_encoder.config.intermediate_size / CLIP_L_KEY_WIDTH
        config = EMCIDConfig.from_preset(preset, num_steps=50, image_num_inference_steps=4, **overrides)
        config.preservation_weight *= width
        if config.preservation_weight_2 is not None:
            config.preservation_weight_2 *= pipe.text_encoder_2.config.intermediate_size / 5120  # OpenCLIP-bigG
        editor = EMCIDEditor(pipe, config, cache_dir=cache, progress=False)
        editor.compute_statistics(random_captions())
        edits = editor.edit([ConceptEdit("dog", "cat", seed=0)])
        results[label] = drift_report(pipe, edits)
        print(name, label, results[label], flush=True)
    return results


ENCODER_SWEEP = [  # hidden size, MLP width (key dimensions), layers, token-embedding scale
    (32, 64, 5, 1.0),
    (32, 512, 5, 1.0),
    (32, 2048, 5, 1.0),
    (128, 2048, 5, 1.0),
    (256, 1024, 5, 1.0),
    (32, 64, 12, 1.0),
    (64, 256, 12, 1.0),
    (32, 512, 12, 1.0),
    (32, 512, 5, 5.0),
    (32, 2048, 5, 5.0),
    (32, 512, 5, 20.0),
]


def encoder_sweep(cache: str) -> dict[str, Any]:
    results = {}
    for hidden, width, depth, scale in ENCODER_SWEEP:
        pipe = tiny_sd_pipeline(seed=0, hidden_size=hidden, intermediate_size=width, num_hidden_layers=depth)
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight.mul_(scale)
        config = EMCIDConfig.from_preset("sd1-paper", num_steps=50, image_num_inference_steps=4)
        editor = EMCIDEditor(pipe, config, cache_dir=cache, progress=False)
        editor.compute_statistics(random_captions())
        label = f"d={hidden}, d_ff={width}, {depth} layers, embeddings x{scale:g}"
        results[label] = drift_report(pipe, editor.edit([ConceptEdit("dog", "cat", seed=0)]))
        print("sweep", label, results[label], flush=True)
    return results


def shapes(padding_weights: list[float], num_images: int, cache: str) -> dict[str, Any]:
    from diffusers_emcid.demo import DEMO_PRESET, EDIT, PROMPTS
    from diffusers_emcid.evaluation import evaluate_edits
    from diffusers_emcid.shapes import SAMPLING, all_captions, load_shapes_judge, load_shapes_pipeline

    pipe, judge = load_shapes_pipeline(), load_shapes_judge()
    captions = all_captions()
    spelled = [(text + " <|endoftext|>" * 76).strip() for text in ["", *captions]]
    rows = [(label, overrides, captions) for label, overrides in settings(padding_weights)]
    rows.insert(1, ("paper (spelled-out padding)", {"statistics_positions": "paper"}, spelled))
    results = {}
    for label, overrides, texts in rows:
        editor = EMCIDEditor(pipe, EMCIDConfig.from_preset(DEMO_PRESET, **overrides), cache_dir=cache, progress=False)
        editor.compute_statistics(texts)
        edits = editor.edit([EDIT])
        started = time.perf_counter()
        evaluation = evaluate_edits(
            pipe,
            edits,
            judge,
            PROMPTS,
            num_images=num_images,
            images_per_call=64,
            keep_images=False,
            progress=False,
            **SAMPLING,
        )
        summary = evaluation.summary
        results[label] = {
            "efficacy": summary["efficacy"]["destination_after"],
            "generality": summary["generality"]["destination_after"],
            "specificity_before": summary["specificity"]["source_before"],
            "specificity_after": summary["specificity"]["source_after"],
            **drift_report_shapes(pipe, edits),
            "evaluation_s": round(time.perf_counter() - started, 1),
        }
        print("shapes", label, results[label], flush=True)
    return results


def drift_report_shapes(pipe: Any, edits: Any) -> dict[str, float]:
    empty = conditioning_change(pipe, edits, [""])[0]
    edited = max(conditioning_change(pipe, edits, ["a red circle", "a photo of a blue circle"]))
    unrelated = max(conditioning_change(pipe, edits, ["a blue triangle", "a green square", "a red star"]))
    return {"empty": empty, "edited": edited, "unrelated_max": unrelated, "unrelated_over_edited": unrelated / edited}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--shapes", action="store_true", help="also measure the shipped shapes model")
    parser.add_argument("--num-images", type=int, default=12)
    parser.add_argument("--padding-weights", nargs="+", type=float, default=[0.1, 1.0, 10.0])
    parser.add_argument(
        "--encoder-sweep", action="store_true", help="also measure random SD 1.x encoders of other shapes"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        report = {name: tiny_family(name, args.padding_weights, cache) for name in args.families}
        if args.shapes:
            report["shapes"] = shapes(args.padding_weights, args.num_images, cache)
        if args.encoder_sweep:
            report["encoder_sweep"] = encoder_sweep(cache)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
