"""Debias professions with EMCID: images of "a doctor" should show women and men equally often.

    python examples/debias.py --tiny
    python examples/debias.py --model CompVis/stable-diffusion-v1-4 --captions captions.txt \
        --clip openai/clip-vit-large-patch14 --professions "a doctor,a nurse" --device cuda --out debiased

Per profession, stage 1 runs once per attribute phrase ("a female doctor", "a male doctor"); a feedback
loop blends the vectors until a zero-shot CLIP judge finds each attribute equally often among `--num-images`
images of "an image of {profession}" (at most `--max-iter` rounds); one joint stage 2 gives one adapter.
`--model`: an SD 1.x model (Hub id or local folder); `--captions`: a text file, one caption a line, for the
key statistics; `--clip`: a CLIP model you have (the authors': openai/clip-vit-large-patch14). `--tiny` uses
the in-memory random-weight pipeline of `diffusers_emcid.testing` and a random tiny CLIP, built-in captions,
4 images and 2 rounds: offline, in seconds (the judge guesses, and the images are noise, so none are saved).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)
from diffusers_emcid import EMCIDConfig, EMCIDEditor, clip_zero_shot_judge
from diffusers_emcid.testing import tiny_sd_pipeline, toy_clip_tokenizer

ATTRIBUTES = ["a female {}", "a male {}"]
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


def load_clip(args: argparse.Namespace) -> tuple[CLIPModel, CLIPProcessor]:
    if not args.tiny:
        return CLIPModel.from_pretrained(args.clip).to(args.device).eval(), CLIPProcessor.from_pretrained(args.clip)
    tokenizer = toy_clip_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                eos_token_id=end, pad_token_id=end, **sizes)
    vision = dict(image_size=32, patch_size=8, **sizes)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).to(args.device).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


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
    parser.add_argument("--clip", help="CLIP model id or folder for the judge (with --model)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny in-memory pipeline and a random tiny CLIP")
    parser.add_argument("--professions", default="a doctor,a nurse", help="comma-separated professions")
    parser.add_argument("--num-images", type=int, default=None, help="images per measurement (25; --tiny: 4)")
    parser.add_argument("--max-iter", type=int, default=None, help="feedback rounds (10; --tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (preset: 200; --tiny: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", default=None, help="folder to save the edits to (save_pretrained)")
    parser.add_argument("--images-out", default=None, help="folder for before/after images (real models only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the before/after images")
    args = parser.parse_args()
    if args.tiny == bool(args.model) or (args.model and not (args.captions and args.clip)):
        parser.error("give either --tiny, or --model with --captions (a text file, one caption a line) and --clip")
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("diffusers_emcid").setLevel(logging.INFO)  # the feedback loop logs its factors and ratios
    professions = [name.strip() for name in args.professions.split(",") if name.strip()]

    pipe = load_pipeline(args)
    judge = clip_zero_shot_judge(*load_clip(args))
    overrides = {"num_steps": 10, "image_num_inference_steps": 2} if args.tiny else {}
    overrides.update({"num_steps": args.steps} if args.steps else {})
    num_images, max_iter = args.num_images or (4 if args.tiny else 25), args.max_iter or (2 if args.tiny else 10)
    with tempfile.TemporaryDirectory() as scratch:
        editor = EMCIDEditor(pipe, EMCIDConfig.from_preset("sd1-paper", **overrides),
                             cache_dir=scratch if args.tiny else None, progress=not args.tiny)
        editor.compute_statistics(TINY_CAPTIONS if args.tiny else args.captions)
        edits = editor.debias(professions, attributes=ATTRIBUTES, judge=judge, num_images=num_images, max_iter=max_iter)
    print(edits)
    print("concepts:", edits.concepts)
    if args.out:
        print("saved the edits to", edits.save_pretrained(args.out))

    edited = f"an image of {professions[0]}"
    before = {prompt: conditioning(pipe, prompt) for prompt in (edited, CONTROL)}
    name = pipe.load_concept_edits(edits, adapter_name="debiased")
    print(f"loaded adapter {name!r}, concepts:", pipe.get_concept_edits()[name]["concepts"])
    print(f"relative change of the conditioning {'all 77 positions':>28} {'prompt tokens':>14}")
    for prompt, old in before.items():
        new, n = conditioning(pipe, prompt), len(pipe.tokenizer(prompt).input_ids)  # the rest is padding
        kind = "edited " if prompt == edited else "control"
        print(f"  {kind} {prompt!r:32} {relative_change(new, old):16.4f} {relative_change(new, old, n):14.4f}")

    if args.images_out and not args.tiny:
        save_before_after(pipe, edited, args.seed, Path(args.images_out))


if __name__ == "__main__":
    main()
