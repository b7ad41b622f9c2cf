"""Pieces shared by the example scripts `erase_artists.py`, `rectify_with_images.py`, `debias.py` and
`sdxl_update.py`: their common command-line arguments, the pipeline and editor they run on (a real model, or
the tiny in-memory one of `diffusers_emcid.testing` with `--tiny`), and the measurement and printing of how an
edit changes the conditioning. The scripts import it as `from example_utils import ...`, which works because
Python puts a script's folder on `sys.path` when running `python examples/<script>.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from diffusers_emcid import EMCIDConfig, EMCIDEditor
from diffusers_emcid.testing import random_captions, tiny_sd_pipeline

CONTROL = "a photo of a red house"
"""A prompt with none of the edited words: the conditioning change it shows is the edit's side effect."""


def example_parser(
    doc: str, model_help: str, tiny_help: str, model_options: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring, with --model, --captions, then the
    `model_options` ({"--option": help}: more inputs that go with --model), then --tiny."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--captions", help="text file, one caption a line, for the key statistics (with --model)")
    for option, option_help in (model_options or {}).items():
        parser.add_argument(option, help=option_help)
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, preset_steps: int) -> None:
    """Adds --steps (default: the preset's `preset_steps`; 10 with --tiny), --device, --dtype, --out,
    --images-out and --seed."""
    parser.add_argument("--steps", type=int, default=None, help=f"stage-1 steps (preset: {preset_steps}; --tiny: 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--out", default=None, help="folder to save the edits to (save_pretrained)")
    parser.add_argument("--images-out", default=None, help="folder for before/after images (real models only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the before/after images")


def parse_args(parser: argparse.ArgumentParser, *required: str) -> argparse.Namespace:
    """The parsed arguments; exits with a usage error unless there is either --tiny, or --model with --captions
    and the `required` options (given as their --option names, without the dashes)."""
    args = parser.parse_args()
    given = args.captions and all(getattr(args, option.replace("-", "_")) for option in required)
    if args.tiny == bool(args.model) or (args.model and not given):
        parser.error(
            "give either --tiny, or --model with --captions (a text file, one caption a line)"
            + "".join(f" and --{option}" for option in required)
        )
    return args


def load_pipeline(
    args: argparse.Namespace, tiny_pipeline: Callable[..., DiffusionPipeline] = tiny_sd_pipeline
) -> DiffusionPipeline:
    """`tiny_pipeline(seed=0)` with --tiny, else --model, in --dtype on --device."""
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        return tiny_pipeline(seed=0).to(args.device, None if dtype == torch.float32 else dtype)
    warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)  # old diffusers lack `dtype`
    return AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=dtype).to(args.device)


@contextlib.contextmanager
def prepared_editor(pipe: DiffusionPipeline, preset: str, args: argparse.Namespace) -> Iterator[EMCIDEditor]:
    """An editor with the `preset` config (few steps with --tiny, --steps if given) and its key statistics
    computed, from --captions or, with --tiny, random toy-word captions (cached in a scratch folder)."""
    overrides = {"num_steps": 10, "image_num_inference_steps": 2} if args.tiny else {}
    overrides.update({"num_steps": args.steps} if args.steps else {})
    with tempfile.TemporaryDirectory() as scratch:
        editor = EMCIDEditor(
            pipe,
            EMCIDConfig.from_preset(preset, **overrides),
            cache_dir=scratch if args.tiny else None,
            progress=not args.tiny,
        )
        # --tiny: 60 distinct captions of random toy words, more tokens than the MLP width for full-rank statistics
        editor.compute_statistics(random_captions(60) if args.tiny else args.captions)
        yield editor


@torch.no_grad()
def conditioning(pipe: DiffusionPipeline, prompt: str) -> torch.Tensor:
    """What the UNet is given for `prompt` (the pipeline's own `encode_prompt`), all 77 positions."""
    return (
        pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
        .float()
        .cpu()
    )


def relative_change(after: torch.Tensor, before: torch.Tensor, positions: int | None = None) -> float:
    """||after - before|| / ||before|| over all positions, or over the first `positions` (the prompt's tokens)."""
    after, before = after[:, :positions], before[:, :positions]
    return ((after - before).norm() / before.norm()).item()


def print_conditioning_change(pipe: DiffusionPipeline, before: dict[str, torch.Tensor], edited: str) -> None:
    """Prints, for each prompt of `before` (its conditioning without the edits), how much the conditioning
    changed with the loaded edits, over all 77 positions and over the prompt's own tokens."""
    print(f"relative change of the conditioning {'all 77 positions':>28} {'prompt tokens':>14}")
    for prompt, old in before.items():
        new, n = conditioning(pipe, prompt), len(pipe.tokenizer(prompt).input_ids)  # the rest is padding
        kind = "edited " if prompt == edited else "control"
        print(f"  {kind} {prompt!r:32} {relative_change(new, old):16.4f} {relative_change(new, old, n):14.4f}")


def save_before_after(pipe: DiffusionPipeline, prompt: str, args: argparse.Namespace) -> None:
    """With --images-out and a real model (--tiny draws noise), saves the prompt's image with the loaded edits
    and without them, from the same seed (--seed)."""
    if not args.images_out or args.tiny:
        return
    folder = Path(args.images_out)
    folder.mkdir(parents=True, exist_ok=True)
    for label, edits_off in (("after", contextlib.nullcontext()), ("before", pipe.concept_edits_disabled())):
        with edits_off:
            image = pipe(prompt, generator=torch.Generator(pipe.device).manual_seed(args.seed)).images[0]
        image.save(folder / f"{label}.png")
        print("saved", folder / f"{label}.png")
