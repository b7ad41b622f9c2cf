"""Erase artist styles with EMCID: "painting by Van Gogh" should draw plain "art".

    python examples/erase_artists.py --tiny
    python examples/erase_artists.py --model CompVis/stable-diffusion-v1-4 --captions captions.txt \
        --artists "Van Gogh,Claude Monet" --device cuda --dtype float16 --images-out images --out no-artists

All artists are erased in one call, towards "art", with the paper's artist templates and the `sd1-artists`
preset (layers 7-10 of CLIP-L, 100 stage-1 steps, alpha 0.5). `--model`: an SD 1.x model (Hub id or local
folder); `--captions`: a text file, one caption a line, for the key statistics (the paper used 100,000 CCS
captions). `--tiny` uses the in-memory random-weight pipeline of `diffusers_emcid.testing`, random toy-word
captions and few steps: offline, in seconds (its images are noise, so none are saved). The script prints the edits and
the relative change of the text-encoder conditioning for an edited and a control prompt; with a real model,
`--images-out` saves the edited prompt's image before and after, from one seed.
"""

from __future__ import annotations

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

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)

TEMPLATES = ["painting by {}", "artwork by {}", "style of {}"]


def main() -> None:
    parser = example_parser(
        __doc__,
        model_help="SD 1.x model id or local diffusers folder",
        tiny_help="use the tiny in-memory pipeline (offline, seconds)",
    )
    parser.add_argument("--artists", default="Van Gogh,Claude Monet", help="comma-separated artists to erase")
    parser.add_argument("--destination", default="art", help="what the artists become")
    add_run_arguments(parser, preset_steps=100)
    args = parse_args(parser)
    artists = [name.strip() for name in args.artists.split(",") if name.strip()]

    pipe = load_pipeline(args)
    with prepared_editor(pipe, "sd1-artists", args) as editor:
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
    print_conditioning_change(pipe, before, edited)
    save_before_after(pipe, edited, args)


if __name__ == "__main__":
    main()
