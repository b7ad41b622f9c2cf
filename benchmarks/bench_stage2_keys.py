"""Stage 2 with one key per concept (averaged over its prompts) against one key per prompt.

    python benchmarks/bench_stage2_keys.py [--families sd1 sd2 sdxl] [--shapes] [--num-images 12]

For `stage2_keys="concept"` (the authors') and `"prompt"`:

* **delivery**: for every training template of the edit, the share of the stage-1 delta that the edited weights
  deliver at its subject token, `(h_edited - h_clean) . delta / |delta|^2` at the z layer (1 = the whole delta;
  delta = z - h0 of prompt 0), per text encoder;
* **tiny pipelines** (`diffusers_emcid.testing`, random weights, SD 1.x / 2.x / SD-XL): one edit ("dog", "cat") with
  the default preset (50 stage-1 steps, lambda scaled to the key width) with the authors' residual and with
  MEMIT's, and the change of unrelated prompts' 77-position conditioning relative to the edited prompt's
  (`bench_statistics_positions.py`'s measure);
* **the shipped shapes model** (`--shapes`): the demo's edit, and per training template the share of squares drawn
  for it (`--num-images` per template), then the demo's efficacy, generality and controls.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import torch
from bench_statistics_positions import CLIP_L_KEY_WIDTH, FAMILIES, drift_report, drift_report_shapes

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.families import pipeline_family
from diffusers_emcid.hooks import captured_outputs, run_until_stopped
from diffusers_emcid.testing import random_captions
from diffusers_emcid.tokens import subject_token_positions, tokenize

MODES = ("concept", "prompt")


@torch.no_grad()
def subject_states(editor: EMCIDEditor, encoder: Any, request: ConceptEdit) -> torch.Tensor:
    """The z-layer state at the subject token of each of the request's prompts, (P, d) float64."""
    prompts = request.source_prompts
    batch = tokenize(encoder.tokenizer, prompts)
    z_module = encoder.layout.layers[encoder.z_layer]
    with captured_outputs({"z": z_module}, stop_at=z_module) as captured:
        run_until_stopped(encoder.layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    positions = torch.tensor(subject_token_positions(encoder.tokenizer, prompts, request.source))
    return captured["z"][torch.arange(len(prompts)), positions].double()


def delivered_shares(editor: EMCIDEditor, edits: Any, request: ConceptEdit) -> dict[str, list[float]]:
    """Per encoder, per template of `request`, the share of delta delivered at its subject token."""
    clean = {e.component: subject_states(editor, e, request) for e in editor.encoders}
    edits.apply(editor.pipe)
    try:
        edited = {e.component: subject_states(editor, e, request) for e in editor.encoders}
    finally:
        edits.remove(editor.pipe)
    index = [r.source for r in edits.requests].index(request.source)
    shares = {}
    for component, states in clean.items():
        delta = edits.vectors[component][index].double() - states[0]
        shares[component] = [
            round(float((e - c) @ delta / (delta @ delta)), 3) for e, c in zip(edited[component], states)
        ]
    return shares


def tiny_family(name: str, cache: str) -> dict[str, Any]:
    pipe = FAMILIES[name](seed=0)
    request = ConceptEdit("dog", "cat", seed=0)
    results = {}
    for residual, mode in [(residual, mode) for residual in ("paper", "memit") for mode in MODES]:
        config = EMCIDConfig.from_preset(
            pipeline_family(pipe).default_preset,
            num_steps=50,
            image_num_inference_steps=4,
            stage2_keys=mode,
            residual=residual,
        )
        config.preservation_weight *= pipe.text_encoder.config.intermediate_size / CLIP_L_KEY_WIDTH
        if config.preservation_weight_2 is not None:
            config.preservation_weight_2 *= pipe.text_encoder_2.config.intermediate_size / 5120  # OpenCLIP-bigG
        editor = EMCIDEditor(pipe, config, cache_dir=cache, progress=False)
        editor.compute_statistics(random_captions())
        edits = editor.edit([request])
        label = f"{residual} residual, keys per {mode}"
        results[label] = {"shares": delivered_shares(editor, edits, request), **drift_report(pipe, edits)}
        print(name, label, results[label], flush=True)
    return results


def shapes(num_images: int, cache: str) -> dict[str, Any]:
    from diffusers_emcid.demo import DEMO_PRESET, EDIT, PROMPTS
    from diffusers_emcid.evaluation import EvaluationPrompt, evaluate_edits
    from diffusers_emcid.shapes import SAMPLING, load_shapes_judge, load_shapes_pipeline, statistics_captions

    pipe, judge = load_shapes_pipeline(), load_shapes_judge()
    per_template = [
        EvaluationPrompt(prompt, "efficacy", "circle", "square", seed=20000 + 1000 * index)
        for index, prompt in enumerate(EDIT.source_prompts)
    ]
    results = {}
    for mode in MODES:
        editor = EMCIDEditor(
            pipe, EMCIDConfig.from_preset(DEMO_PRESET, stage2_keys=mode), cache_dir=cache, progress=False
        )
        editor.compute_statistics(statistics_captions())
        edits = editor.edit([EDIT])
        templates = evaluate_edits(
            pipe,
            edits,
            judge,
            per_template,
            num_images=num_images,
            images_per_call=64,
            keep_images=False,
            progress=False,
            **SAMPLING,
        )
        demo = evaluate_edits(
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
        results[mode] = {
            "shares": delivered_shares(editor, edits, EDIT),
            "squares_per_template": {row["prompt"]: round(row["destination_after"], 3) for row in templates.rows},
            "efficacy": demo.summary["efficacy"]["destination_after"],
            "generality": demo.summary["generality"]["destination_after"],
            "specificity_before": demo.summary["specificity"]["source_before"],
            "specificity_after": demo.summary["specificity"]["source_after"],
            **drift_report_shapes(pipe, edits),
        }
        print("shapes", mode, results[mode], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--shapes", action="store_true", help="also measure the shipped shapes model")
    parser.add_argument("--num-images", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        report = {name: tiny_family(name, cache) for name in args.families}
        if args.shapes:
            report["shapes"] = shapes(args.num_images, cache)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
