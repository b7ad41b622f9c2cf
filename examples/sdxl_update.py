"""Update a fact in SD-XL with EMCID: "The current President of the United States" should draw Joe Biden.

    python examples/sdxl_update.py --tiny
    python examples/sdxl_update.py --model stabilityai/stable-diffusion-xl-base-1.0 --captions captions.txt \
        --device cuda --dtype float16 --images-out images --out president

SD-XL has two text encoders and the `sdxl-paper` preset edits both (CLIP-L layers 8-10, OpenCLIP-bigG layers
26-30), one LoRA adapter per encoder under one name, so diffusers' own `pipe.set_adapters([name],
adapter_weights={"text_encoder": 1.0, "text_encoder_2": 0.0})` switches them per encoder: the script prints
each encoder's edited layers and how each encoder's part of the conditioning changes with both or either on.
`--model`: an SD-XL model (Hub id or local folder); `--captions`: a text file, one caption a line, for the key
statistics. `--tiny` uses the in-memory random-weight SD-XL pipeline of `diffusers_emcid.testing`, random
toy-word captions and few steps: offline, in seconds (its toy tokenizer spells unknown words letter by letter,
and its images are noise, so none are saved).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from example_utils import (
    CONTROL,
    add_run_arguments,
    example_parser,
    load_pipeline,
    parse_args,
    prepared_editor,
    relative_change,
    save_before_after,
)

import diffusers_emcid  # noqa: F401  (adds load_concept_edits & co. to the pipelines)
from diffusers_emcid.testing import tiny_sdxl_pipeline

ENCODERS = ("text_encoder", "text_encoder_2")


@torch.no_grad()
def conditioning(pipe: DiffusionPipeline, prompt: str) -> dict[str, torch.Tensor]:
    """What the UNet is given for `prompt` (the pipeline's own `encode_prompt`), split by encoder."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    width = pipe.text_encoder.config.hidden_size  # the embeddings are [text_encoder | text_encoder_2] features
    return {
        "text_encoder": embeds[..., :width].float().cpu(),
        "text_encoder_2": embeds[..., width:].float().cpu(),
        "pooled": pooled.float().cpu(),
    }


def main() -> None:
    parser = example_parser(
        __doc__,
        model_help="SD-XL model id or local diffusers folder",
        tiny_help="use the tiny in-memory SD-XL pipeline (offline, seconds)",
    )
    parser.add_argument("--source", default="The current President of the United States")
    parser.add_argument("--destination", default="Joe Biden")
    add_run_arguments(parser, preset_steps=100)
    args = parse_args(parser)

    pipe = load_pipeline(args, tiny_sdxl_pipeline)
    with prepared_editor(pipe, "sdxl-paper", args) as editor:
        edits = editor.edit([(args.source, args.destination)])
    print(edits)
    print("concepts:", edits.concepts)
    for component, deltas in edits.deltas.items():
        ranks = [delta.rank for delta in deltas.values()]
        print(f"  {component}: layers {sorted(deltas)} (ranks {ranks}), z layer {edits.z_layers[component]}")
    if args.out:
        print("saved the edits to", edits.save_pretrained(args.out))

    prompts = {"edited ": args.source, "control": CONTROL}
    before = {prompt: conditioning(pipe, prompt) for prompt in prompts.values()}
    name = pipe.load_concept_edits(edits, adapter_name="president")
    print("loaded:", pipe.get_concept_edits()[name])
    print("relative change of each encoder's part of the conditioning (all 77 positions / prompt tokens), and pooled")
    for weights in ((1.0, 1.0), (1.0, 0.0), (0.0, 1.0)):
        pipe.set_adapters([name], adapter_weights=dict(zip(ENCODERS, weights)))  # diffusers' own per-encoder control
        print(f"  set_adapters([{name!r}], adapter_weights={dict(zip(ENCODERS, weights))}):")
        for kind, prompt in prompts.items():
            new, old, n = conditioning(pipe, prompt), before[prompt], len(pipe.tokenizer(prompt).input_ids)
            cells = [
                f"{c} {relative_change(new[c], old[c]):.4f} / {relative_change(new[c], old[c], n):.4f}"
                for c in ENCODERS
            ] + [f"pooled {relative_change(new['pooled'], old['pooled']):.4f}"]
            print(f"    {kind} {prompt!r:46}", "   ".join(cells))
    pipe.set_adapters([name])  # both encoders edited again (for the images)
    save_before_after(pipe, args.source, args)


if __name__ == "__main__":
    main()
