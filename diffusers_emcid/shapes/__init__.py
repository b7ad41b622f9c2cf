"""A tiny genuine Stable Diffusion pipeline of coloured shapes, shipped with the package, and its judge.

The pipeline (`load_shapes_pipeline`) draws 32x32 images of "a {colour} {shape}" and its text encoder is built
to be editable by EMCID; the judge (`load_shapes_judge`) is an image classifier of "{colour} {shape}". Both were
trained from scratch on CPU by `python scripts/train_shapes.py`; see their model cards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..evaluation import ImageClassifierJudge, draw_images
from .checks import conditioning_gap_closed, end_of_text_separation, judge_images, pipeline_token_ids
from .render import (
    COLOURS,
    HELDOUT_TEMPLATES,
    SHAPES,
    TRAIN_TEMPLATES,
    ShapeBatch,
    all_captions,
    class_names,
    draw_batch,
)

SAMPLING = {"num_inference_steps": 20, "guidance_scale": 4.0}
"""The sampling settings the shipped pipeline was evaluated with (its scheduler is DPM-Solver++)."""
EDITABLE_LAYERS = (0, 1)
"""The text-encoder layers whose attention output is fixed at zero, where EMCID edits close the whole gap."""


def shapes_model_path() -> Path:
    """The folder of the shipped diffusers pipeline."""
    return Path(__file__).parent / "model"


def shapes_judge_path() -> Path:
    """The folder of the shipped judge (a transformers image classifier and its image processor)."""
    return Path(__file__).parent / "judge"


def load_shapes_pipeline(
    torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> StableDiffusionPipeline:
    """Loads the shipped shapes pipeline (no safety checker) in `torch_dtype` on `device`."""
    pipe = StableDiffusionPipeline.from_pretrained(
        shapes_model_path(), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )  # the shipped weights are float32
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, torch_dtype)


def load_shapes_judge(device: str | torch.device = "cpu") -> ImageClassifierJudge:
    """Loads the shipped judge, an image classifier of "{colour} {shape}"; see `judge_images`."""
    return ImageClassifierJudge.from_pretrained(shapes_judge_path(), device=device, local_files_only=True)


def statistics_captions(templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """The captions to compute the model's key statistics on: every caption of `templates` (216 for the
    training templates).

    The model's UNet reads its concepts from the end-of-text and padding positions, so the statistics must cover
    them, and the empty prompt of classifier-free guidance: the default `statistics_positions="pipeline"` does
    both (see `EMCIDConfig`).
    """
    return all_captions(templates)


@torch.no_grad()
def prompt_accuracy(
    pipe: StableDiffusionPipeline,
    judge: ImageClassifierJudge,
    prompt: str,
    shape: str,
    colour: str,
    num_samples: int = 50,
    seed: int = 0,
    **sampling: object,
) -> dict[str, float]:
    """Draws `num_samples` images of `prompt` (seeds `seed, seed + 1, ...`) and returns the fractions the judge
    reads as `shape`, as `colour`, and the distribution over shapes (`"shape:{name}"`).

    Args:
        sampling: keyword arguments of the pipeline call; `SAMPLING` by default.
    """
    images = draw_images(pipe, prompt, seed, num_samples, **{**SAMPLING, **sampling})
    shapes, colours = judge_images(judge, images)
    result = {
        "shape": sum(s == shape for s in shapes) / num_samples,
        "colour": sum(c == colour for c in colours) / num_samples,
    }
    result.update({f"shape:{name}": shapes.count(name) / num_samples for name in SHAPES})
    return result


__all__ = [
    "COLOURS",
    "EDITABLE_LAYERS",
    "HELDOUT_TEMPLATES",
    "SAMPLING",
    "SHAPES",
    "TRAIN_TEMPLATES",
    "ShapeBatch",
    "all_captions",
    "class_names",
    "conditioning_gap_closed",
    "draw_batch",
    "end_of_text_separation",
    "judge_images",
    "load_shapes_judge",
    "load_shapes_pipeline",
    "pipeline_token_ids",
    "prompt_accuracy",
    "shapes_judge_path",
    "shapes_model_path",
    "statistics_captions",
]
