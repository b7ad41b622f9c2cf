"""Update a fact in SD-XL with EMCID: "The current President of the United States" should draw Joe Biden.

    python examples/sdxl_update.py --tiny
    python examples/sdxl_update.py --model stabilityai/stable-diffusion-xl-base-1.0 --captions captions.txt \
        --device cuda --dtype float16 --images-out images --out president

SD-XL has two text encoders and the `sdxl-paper` preset edits both (CLIP-L layers 8-10, OpenCLIP-bigG layers
26-30), one LoRA adapter per encoder under one name, so diffusers' own `pipe.set_adapters([name],
adapter_weights={"text_encoder": 1.0, "text_encoder_2": 0.0})` switches them per encoder: the script prints
each encoder's edited layers and how each encoder's part of the conditioning changes with both or either on.
`--model`: an SD-XL model (Hub id or local folder); `--captions`: a text file, one caption a line, for the key
statistics. `--tiny` uses the in-memory random-weight SD-XL pipeline of `diffusers_emcid.testing`, built-in
captions and few steps: offline, in seconds (its toy tokenizer spells unknown words letter by letter, and its
images are noise, so none are saved).
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
from diffusers_emcid.testing import tiny_sdxl_pipeline

CONTROL = "a photo of a red house"
ENCODERS = ("text_encoder", "text_encoder_2")
# Captions of words the toy tokenizer keeps whole (`diffusers_emcid.testing.TOY_WORDS`), for --tiny.
TINY_CAPTIONS = [f"{frame} a {colour} {thing}" for frame in ("a photo of", "a painting of", "an image of")
                 for colour in ("red", "blue", "green") for thing in ("car", "tree", "house", "apple", "dog", "cat")]


def load_pipeline(args: argparse.Namespace) -> DiffusionPipeline:
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        return tiny_sdxl_pipeline(seed=0).to(args.device, None if dtype == torch.float32 else dtype)
    warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)  # old diffusers lack `dtype`
    return AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=dtype).to(args.device)


@torch.no_grad()
def conditioning(pipe: DiffusionPipeline, prompt: str) -> dict[str, torch.Tensor]:
    """What the UNet is given for `prompt` (the pipeline's own `encode_prompt`), split by encoder."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    width = pipe.text_encoder.config.hidden_size  # the embeddings are [text_encoder | text_encoder_2] features
    return {"text_encoder": embeds[..., :width].float().cpu(), "text_encoder_2": embeds[..., width:].float().cpu(),
            "pooled": pooled.float().cpu()}


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
    parser.add_argument("--model", help="SD-XL model id or local diffusers folder")
    parser.add_argument("--captions", help="text file, one caption a line, for the key statistics (with --model)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny in-memory SD-XL pipeline (offline, seconds)")
    parser.add_argument("--source", default="The current President of the United States")
    parser.add_argument("--destination", default="Joe Biden")
    parser.add_argument("--steps", type=int, default=None, help="stage-1 steps (preset: 100; --tiny: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", default=None, help="folder to save the edits to (save_pretrained)")
    parser.add_argument("--images-out", default=None, help="folder for before/after images (real models only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the before/after images")
    args = parser.parse_args()
    if args.tiny == bool(args.model) or (args.model and not args.captions):
        parser.error("give either --tiny, or --model with --captions (a text file, one caption a line)")

    pipe = load_pipeline(args)
    overrides = {"num_steps": 10, "image_num_inference_steps": 2} if args.tiny else {}
    overrides.update({"num_steps": args.steps} if args.steps else {})
    with tempfile.TemporaryDirectory() as scratch:
        editor = EMCIDEditor(pipe, EMCIDConfig.from_preset("sdxl-paper", **overrides),
                             cache_dir=scratch if args.tiny else None, progress=not args.tiny)
        editor.compute_statistics(TINY_CAPTIONS if args.tiny else args.captions)
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
            cells = [f"{c} {relative_change(new[c], old[c]):.4f} / {relative_change(new[c], old[c], n):.4f}"
                     for c in ENCODERS] + [f"pooled {relative_change(new['pooled'], old['pooled']):.4f}"]
            print(f"    {kind} {prompt!r:46}", "   ".join(cells))

    if args.images_out and not args.tiny:
        pipe.set_adapters([name])  # both encoders edited again
        save_before_after(pipe, args.source, args.seed, Path(args.images_out))


if __name__ == "__main__":
    main()
