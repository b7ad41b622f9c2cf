"""Share concept edits: edit, save, push to the Hub, load into a fresh pipeline, toggle.

    python examples/share_edits.py --repo-id me/no-dogs [--model CompVis/stable-diffusion-v1-4] [--private]

With `--model`, the edits are made on that Stable Diffusion 1.x checkpoint (a Hub id or a local
folder; statistics need `--captions`, a .txt file with one caption a line). Without it, a tiny
random-weight pipeline built in memory stands in, so the sharing mechanics can be tried anywhere.
The Hub token comes from `--token`, `HF_TOKEN` or `huggingface-cli login`; `HF_ENDPOINT` selects
another Hub.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)
from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import random_captions, tiny_sd_pipeline


def load_pipeline(model: str | None) -> StableDiffusionPipeline:
    if model is None:
        return tiny_sd_pipeline(seed=0)
    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)


@torch.no_grad()
def conditioning(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo-id", required=True, help="Hub model repo to push to, e.g. me/no-dogs")
    parser.add_argument("--model", default=None, help="SD 1.x model id or folder (default: a tiny in-memory pipeline)")
    parser.add_argument("--captions", default=None, help="caption file for the key statistics (required with --model)")
    parser.add_argument(
        "--steps", type=int, default=None, help="stage-1 steps (default: the preset's; 5 on the tiny pipeline)"
    )
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    if args.model and not args.captions:
        parser.error("--model needs --captions (a text file, one caption a line) for the key statistics")

    pipe = load_pipeline(args.model)
    overrides = {"num_steps": args.steps} if args.steps else {}
    if args.model is None:
        overrides = {"num_steps": 5, "image_num_inference_steps": 2, **overrides}
    editor = EMCIDEditor(pipe, EMCIDConfig.from_preset("sd1-paper", **overrides))
    editor.compute_statistics(args.captions or random_captions(60))
    edits = editor.edit([("dog", "cat")])

    with tempfile.TemporaryDirectory() as folder:
        edits.save_pretrained(Path(folder) / "no-dogs")
        print("saved:", sorted(p.name for p in (Path(folder) / "no-dogs").iterdir()))
    print("pushed:", edits.push_to_hub(args.repo_id, private=args.private, token=args.token))

    fresh = load_pipeline(args.model)
    before = conditioning(fresh, "a photo of a dog")
    name = fresh.load_concept_edits(args.repo_id, token=args.token)
    edited = conditioning(fresh, "a photo of a dog")
    print("loaded:", fresh.get_concept_edits())
    print(f"change of 'a photo of a dog': {((edited - before).norm() / before.norm()).item():.4f} (relative)")
    with fresh.concept_edits_disabled():
        print("disabled gives the base output:", torch.equal(conditioning(fresh, "a photo of a dog"), before))
    fresh.set_concept_edits([name], strengths=[0.5])
    print(
        "at strength 0.5:", f"{((conditioning(fresh, 'a photo of a dog') - before).norm() / before.norm()).item():.4f}"
    )
    fresh.unload_concept_edits()
    print("unloaded gives the base output:", torch.equal(conditioning(fresh, "a photo of a dog"), before))


if __name__ == "__main__":
    main()
