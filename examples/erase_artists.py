"""Erase artist styles with EMCID: "painting by Van Gogh" should draw plain "art".

    python examples/erase_artists.py --tiny
    python examples/erase_artists.py --model CompVis/stable-diffusion-v1-4 --captions captions.txt \
        --artists "Van Gogh,Claude Monet" --device cuda --dtype float16 --images-out images --out no-artists

All artists are erased in one call, towards "art", with the paper's artist templates and the `sd1-artists`
preset (layers 7-10 of CLIP-L, 100 stage-1 steps, alpha 0.5). `--model`: an SD 1.x model (Hub id or local
folder); `--captions`: a text file, one caption a line, for the key statistics (the paper used 100,000 CCS
captions). `--tiny` uses the in-memory random-weight pipeline of `diffusers_emcid.testing`, built-in captions
and few steps: offline, in seconds (its images are noise, so none are saved). The script prints the edits and
the relative change of the text-encoder conditioning for an edited and a control prompt; with a real model,
`--images-out` saves the edited prompt's image before and after, from one seed.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)
from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import tiny_sd_pipeline

TEMPLATES = ["painting by {}", "artwork by {}", "style of {}"]
CONTROL = "a photo of a red house"
# Captions of words the toy tokenizer keeps whole (`diffusers_emcid.testing.TOY_WORDS`), for --tiny.
TINY_CAPTIONS = [f"{frame} a {colour} {thing}" for frame in ("a photo of", "a painting of", "an image of")
                 for colour in ("red", "blue", "green") for thing in ("car", "tree", "house", "apple", "dog", "cat")]


def load_pipeline(args: argparse.Namespace) -> DiffusionPipeline:
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        return tiny_sd_pipeline(seed=0).to(args.device, None if dtype == torch.float32 else dtype)
    warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)  # old diffusers lack `dtype`
    return AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=dtype).to(args.device)


@torch.no_grad()
def conditioning(pipe: DiffusionPipeline, prompt: str) -> torch.Tensor:
    """What the UNet is given for `prompt` (the pipeline's own `encode_prompt`), all 77 positions."""
    return pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[0].float().cpu()


def relative_change(after: torch.Tensor, before: torch.Tensor, positions: int | None = None) -> float:
    """||after - before|| / ||before|| over all positions, or over the first `positions` (the prompt's tokens)."""
    after, before = after[:, :positions], before[:, :positions]
    return ((after - before).norm() / before.norm()).item()


def save_before_after(pipe: DiffusionPipeline, prompt: str, seed: int, folder: Path) -> None:
    """The prompt's image with the loaded edits and without them, from the same seed."""
    folder.mkdir(parents=True, exist_ok=True)
    for label, edits_off in (("after", contextlib.nullcontext()), ("before", pipe.concept_edits_disabled())):
        with edits_off:
            image = pipe(prompt, generator=torch.Generator(pipe.device).manual_seed(seed)).images[0]
        image.save(folder / f"{label}.png")
        print("saved", folder / f"{label}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SD 1.x model id or local diffusers folder")
    parser.add_argument("--captions", help="text file, one caption a line, for the key statistics (with --model)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny in-memory pipeline (offline, seconds)")
    parser.add_argument("--artists", default="Van Gogh,Claude Monet", help="comma-separated artists to erase")
    parser.add_argument("--destination", default="art", help="what the artists become")
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (preset: 100; --tiny: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", default=None, help="folder to save the edits to (save_pretrained)")
    parser.add_argument("--images-out", default=None, help="folder for before/after images (real models only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the before/after images")
    args = parser.parse_args()
    if args.tiny == bool(args.model) or (args.model and not args.captions):
        parser.error("give either --tiny, or --model with --captions (a text file, one caption a line)")
    artists = [name.strip() for name in args.artists.split(",") if name.strip()]

    pipe = load_pipeline(args)
    overrides = {"num_steps": 10, "image_num_inference_steps": 2} if args.tiny else {}
    overrides.update({"num_steps": args.steps} if args.steps else {})
    config = EMCIDConfig.from_preset("sd1-artists", **overrides)
    with tempfile.TemporaryDirectory() as scratch:
        editor = EMCIDEditor(pipe, config, cache_dir=scratch if args.tiny else None, progress=not args.tiny)
        editor.compute_statistics(TINY_CAPTIONS if args.tiny else args.captions)
        edits = editor.erase(artists, destination=args.destination, templates=TEMPLATES)
    print(edits)
    print("concepts:", edits.concepts)
    print(f"edited layers {editor.layers}, z layer {editor.z_layer}")
    if args.out:
        print("saved the edits to", edits.save_pretrained(args.out))

    edited = TEMPLATES[0].format(artists[0])
    before = {prompt: conditioning(pipe, prompt) for prompt in (edited, CONTROL)}
    name = pipe.load_concept_edits(edits, adapter_name="no_artists")
    print("loaded:", pipe.get_concept_edits()[name])
    print(f"relative change of the conditioning {'all 77 positions':>28} {'prompt tokens':>14}")
    for prompt, old in before.items():
        new, n = conditioning(pipe, prompt), len(pipe.tokenizer(prompt).input_ids)  # the rest is padding
        kind = "edited " if prompt == edited else "control"
        print(f"  {kind} {prompt!r:32} {relative_change(new, old):16.4f} {relative_change(new, old, n):14.4f}")

    if args.images_out and not args.tiny:
        save_before_after(pipe, edited, args.seed, Path(args.images_out))


if __name__ == "__main__":
    main()
