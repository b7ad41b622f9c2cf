"""Rectify a concept the model draws wrongly with EMCID, learning from real images of it.

    python examples/rectify_with_images.py --tiny
    python examples/rectify_with_images.py --model CompVis/stable-diffusion-v1-4 --captions captions.txt \
        --source tench --destination "a tench fish" --images tench/*.jpg --device cuda --images-out images

Stage 1 trains the concept's vector against the true noise of the given images (not against the frozen
model's prediction for the destination), so prompts with `--source` come to draw what the images show. The
images (any size: they are resized and centre-cropped) go with the templates "An image of {}", "A photo of
{}", "{}": give a multiple of 3, image j going with template j mod 3. `--no-text-alignment` drops the term
pulling the source's text towards the destination's (the paper drops it for classes the model cannot draw).
`--model`: an SD 1.x model (Hub id or local folder); `--captions`: a text file, one caption a line, for the
key statistics. `--tiny` uses the in-memory random-weight pipeline of `diffusers_emcid.testing`, random
images, built-in captions and few steps: offline, in seconds (its images are noise, so none are saved).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
from PIL import Image

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)
from diffusers_emcid import DEFAULT_TEMPLATES, ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import tiny_sd_pipeline

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
    parser.add_argument("--tiny", action="store_true", help="use the tiny in-memory pipeline and random images")
    parser.add_argument("--source", default="tench", help="the concept to rectify")
    parser.add_argument("--destination", default="a tench fish", help="what it should mean (for text alignment)")
    parser.add_argument("--images", nargs="+", default=[], help="image files of the concept, a multiple of 3")
    parser.add_argument("--no-text-alignment", action="store_true", help="drop the text-alignment term")
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (preset: 200; --tiny: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", default=None, help="folder to save the edits to (save_pretrained)")
    parser.add_argument("--images-out", default=None, help="folder for before/after images (real models only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the before/after images")
    args = parser.parse_args()
    if args.tiny == bool(args.model) or (args.model and not (args.captions and args.images)):
        parser.error("give either --tiny, or --model with --captions (a text file, one caption a line) and --images")

    if args.tiny:  # three random 24x24 images, one per template
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in DEFAULT_TEMPLATES]
    else:
        images = [Path(path) for path in args.images]
    try:  # checked before the model is loaded
        request = ConceptEdit(source=args.source, destination=args.destination, images=images)
    except ValueError as error:  # e.g. an image count that is not a multiple of the templates' count
        parser.error(str(error))
    pipe = load_pipeline(args)
    overrides = {"num_steps": 10, "image_num_inference_steps": 2} if args.tiny else {}
    overrides.update({"num_steps": args.steps} if args.steps else {})
    with tempfile.TemporaryDirectory() as scratch:
        editor = EMCIDEditor(pipe, EMCIDConfig.from_preset("sd1-paper", **overrides),
                             cache_dir=scratch if args.tiny else None, progress=not args.tiny)
        editor.compute_statistics(TINY_CAPTIONS if args.tiny else args.captions)
        edits = editor.rectify([request], text_alignment=False if args.no_text_alignment else None)
    print(edits)
    print("concepts:", edits.concepts, f"from {len(images)} images")
    print("request:", edits.requests[0].to_dict())
    if args.out:
        print("saved the edits to", edits.save_pretrained(args.out))

    edited = DEFAULT_TEMPLATES[1].format(args.source)
    before = {prompt: conditioning(pipe, prompt) for prompt in (edited, CONTROL)}
    name = pipe.load_concept_edits(edits, adapter_name="rectified")
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
