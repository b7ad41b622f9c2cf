"""Debias professions with EMCID: images of "a doctor" should show women and men equally often.

    python examples/debias.py --tiny
    python examples/debias.py --model CompVis/stable-diffusion-v1-4 --captions captions.txt \
        --clip openai/clip-vit-large-patch14 --professions "a doctor,a nurse" --device cuda --out debiased

Per profession, stage 1 runs once per attribute phrase ("a female doctor", "a male doctor"); a feedback
loop blends the vectors until a zero-shot CLIP judge finds each attribute equally often among `--num-images`
images of "an image of {profession}" (at most `--max-iter` rounds); one joint stage 2 gives one adapter.
`--model`: an SD 1.x model (Hub id or local folder); `--captions`: a text file, one caption a line, for the
key statistics; `--clip`: a CLIP model you have (the authors': openai/clip-vit-large-patch14). `--tiny` uses
the in-memory random-weight pipeline of `diffusers_emcid.testing` and a random tiny CLIP, random toy-word
captions, 4 images and 2 rounds: offline, in seconds (the judge guesses, and the images are noise, so none are
saved).
"""

from __future__ import annotations

import argparse
import logging

import torch
from example_utils import (
    CONTROL,
    add_run_arguments,
    conditioning,
    example_parser,
    load_pipeline,
    parse_args,
    prepared_editor,
    print_conditioning_change,
    save_before_after,
)
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)
from diffusers_emcid import clip_zero_shot_judge
from diffusers_emcid.testing import toy_clip_tokenizer

ATTRIBUTES = ["a female {}", "a male {}"]


def load_clip(args: argparse.Namespace) -> tuple[CLIPModel, CLIPProcessor]:
    if not args.tiny:
        return CLIPModel.from_pretrained(args.clip).to(args.device).eval(), CLIPProcessor.from_pretrained(args.clip)
    tokenizer = toy_clip_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=end,
        pad_token_id=end,
        **sizes,
    )
    vision = dict(image_size=32, patch_size=8, **sizes)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).to(args.device).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def main() -> None:
    parser = example_parser(
        __doc__,
        model_help="SD 1.x model id or local diffusers folder",
        tiny_help="use the tiny in-memory pipeline and a random tiny CLIP",
        model_options={"--clip": "CLIP model id or folder for the judge (with --model)"},
    )
    parser.add_argument("--professions", default="a doctor,a nurse", help="comma-separated professions")
    parser.add_argument("--num-images", type=int, default=None, help="images per measurement (25; --tiny: 4)")
    parser.add_argument("--max-iter", type=int, default=None, help="feedback rounds (10; --tiny: 2)")
    add_run_arguments(parser, preset_steps=200)
    args = parse_args(parser, "clip")
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("diffusers_emcid").setLevel(logging.INFO)  # the feedback loop logs its factors and ratios
    professions = [name.strip() for name in args.professions.split(",") if name.strip()]

    pipe = load_pipeline(args)
    judge = clip_zero_shot_judge(*load_clip(args))
    num_images, max_iter = args.num_images or (4 if args.tiny else 25), args.max_iter or (2 if args.tiny else 10)
    with prepared_editor(pipe, "sd1-paper", args) as editor:
        edits = editor.debias(professions, attributes=ATTRIBUTES, judge=judge, num_images=num_images, max_iter=max_iter)
    print(edits)
    print("concepts:", edits.concepts)
    if args.out:
        print("saved the edits to", edits.save_pretrained(args.out))

    edited = f"an image of {professions[0]}"
    before = {prompt: conditioning(pipe, prompt) for prompt in (edited, CONTROL)}
    name = pipe.load_concept_edits(edits, adapter_name="debiased")
    print(f"loaded adapter {name!r}, concepts:", pipe.get_concept_edits()[name]["concepts"])
    print_conditioning_change(pipe, before, edited)
    save_before_after(pipe, edited, args)


if __name__ == "__main__":
    main()
