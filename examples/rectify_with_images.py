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
images, random toy-word captions and few steps: offline, in seconds (its images are noise, so none are saved).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
from PIL import Image

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)
from diffusers_emcid import DEFAULT_TEMPLATES, ConceptEdit


def main() -> None:
    parser = example_parser(
        __doc__,
        model_help="SD 1.x model id or local diffusers folder",
        tiny_help="use the tiny in-memory pipeline and random images",
    )
    parser.add_argument("--source", default="tench", help="the concept to rectify")
    parser.add_argument("--destination", default="a tench fish", help="what it should mean (for text alignment)")
    parser.add_argument("--images", nargs="+", default=[], help="image files of the concept, a multiple of 3")
    parser.add_argument("--no-text-alignment", action="store_true", help="drop the text-alignment term")
    add_run_arguments(parser, preset_steps=200)
    args = parse_args(parser, "images")

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
    with prepared_editor(pipe, "sd1-paper", args) as editor:
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
    print_conditioning_change(pipe, before, edited)
    save_before_after(pipe, edited, args)


if __name__ == "__main__":
    main()
