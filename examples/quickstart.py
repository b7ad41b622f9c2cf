"""EMCID quickstart: edit two concepts of a Stable Diffusion text encoder and measure what changed.

This script runs offline, in seconds on a CPU, on `tiny_sd_pipeline()`: a Stable Diffusion pipeline
built in memory from small networks with random weights and a toy tokenizer. Its images are noise,
so nothing meaningful is drawn; what the script shows is the change EMCID makes to the text encoder,
which is all an edit consists of:

1. key statistics C from a few dozen built-in captions (the paper uses 100,000 CCS captions);
2. stage 1 and stage 2 for "dog" -> "cat" and "Van Gogh" -> "art";
3. the edits applied as a LoRA adapter, and the relative change of the text encoder's output for
   prompts with and without the edited words, over all 77 positions (what the UNet sees; the padding
   positions attend to the whole prompt, so they move for every prompt) and over the prompt's own
   tokens; plus the cosine similarity of "a photo of a dog" to the unedited "a photo of a cat";
4. the adapter removed: the text encoder is bitwise as before.

The numbers are those of a random network, not of Stable Diffusion: stage 1 fits a random UNet, so
the edited "dog" need not come closer to "cat" in text space, and how far an edit carries from its
training prompts to other phrasings depends on the (here random) weights. The stage-2 residual
defaults to "memit", which moved the controls less than "paper" in this setting.

Run: python examples/quickstart.py [--steps 30] [--residual memit|paper] [--cache-dir DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from diffusers_emcid import ConceptEdit, EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import tiny_sd_pipeline

# Captions built only from words the toy tokenizer keeps whole (`diffusers_emcid.testing.TOY_WORDS`).
CAPTIONS: list[str] = [
    f"{frame} a {colour} {thing}"
    for frame in ("a photo of", "a picture of", "a drawing of", "a painting of")
    for colour in ("red", "blue", "green")
    for thing in ("car", "tree", "house", "apple", "dog", "cat", "circle", "square")
] + [
    "a painting by monet",
    "artwork by van gogh",
    "the style of monet",
    "an image of a doctor and a nurse",
    "the president of the united states",
    "a banana on a house",
    "a cat with a dog",
    "a dog in a car",
]

EDITED_PROMPTS = ["a photo of a dog", "painting by Van Gogh"]
CONTROL_PROMPTS = ["a photo of a tree", "a red car"]


@torch.no_grad()
def encode(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states (B, 77, d), padded to max_length as the pipeline does."""
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu()


def relative_change(after: torch.Tensor, before: torch.Tensor) -> float:
    return ((after - before).norm() / before.norm()).item()


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return F.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="stage-1 Adam steps per concept (the paper: 200)")
    parser.add_argument("--residual", choices=["paper", "memit"], default="memit", help="stage-2 residual form")
    parser.add_argument("--preservation-weight", type=float, default=4000.0, help="lambda (the paper's 4000)")
    parser.add_argument("--cache-dir", default=None, help="EMCID cache folder (default: a temporary one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pipe = tiny_sd_pipeline().to(args.device)
    config = EMCIDConfig.from_preset(
        "sd1-paper",
        num_steps=args.steps,
        image_num_inference_steps=4,
        preservation_weight=args.preservation_weight,
        residual=args.residual,
    )
    requests = [
        ("dog", "cat"),
        ConceptEdit("Van Gogh", "art", templates=["painting by {}", "artwork by {}", "style of {}"], seed=7),
    ]
    prompts = EDITED_PROMPTS + CONTROL_PROMPTS
    with tempfile.TemporaryDirectory() as temporary:
        editor = EMCIDEditor(pipe, config, cache_dir=args.cache_dir or temporary, progress=False)
        editor.compute_statistics(CAPTIONS)
        edits = editor.edit(requests)

    before, cat = encode(pipe, prompts), encode(pipe, ["a photo of a cat"])[0]
    edits.apply(pipe)
    after = encode(pipe, prompts)
    print(
        f"{edits!r}\nresidual={config.residual!r}, lambda={config.preservation_weight:g}, "
        f"alpha={config.edit_weight}, stage-1 steps={config.num_steps}, edited layers={editor.layers}, "
        f"z layer={editor.z_layer}\n"
    )
    print("relative change ||after - before|| / ||before|| of the text-encoder output")
    print(f"  {'':33} {'all 77 positions':>16} {'prompt tokens':>14}")
    for prompt, old, new in zip(prompts, before, after):
        kind = "edited " if prompt in EDITED_PROMPTS else "control"
        n = len(pipe.tokenizer(prompt).input_ids)  # start marker, words, end marker; the rest is padding
        print(f"  {kind}  {prompt!r:24} {relative_change(new, old):16.4f} {relative_change(new[:n], old[:n]):14.4f}")
    print(
        f"\ncosine('a photo of a dog', unedited 'a photo of a cat'), all 77 positions: "
        f"before {cosine(before[0], cat):.4f}, after {cosine(after[0], cat):.4f}"
    )

    edits.remove(pipe)
    restored = torch.equal(encode(pipe, prompts), before)
    print(f"\nafter edits.remove(pipe), the output is bitwise restored: {restored}")


if __name__ == "__main__":
    main()
