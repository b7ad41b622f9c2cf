"""Seeded synthetic captioned images: one coloured shape on a near-white background, 32x32 RGB."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 210, 20),
    "purple": (140, 45, 175),
    "black": (25, 25, 25),
}
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "an image of a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {colour} {shape} on a white background",
    "{colour} {shape}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a drawing of a {colour} {shape}",
    "a sketch of a {colour} {shape}",
    "the {colour} {shape}",
    "a {colour} {shape} in the middle",
)
"""Templates never used in training; they measure how far an edit generalises. Like the training templates they
put the shape at token position 2, 3 or 6, the only positions where the models ever saw a shape word."""

RESOLUTION = 32
_SUPERSAMPLE = 4


@dataclass
class ShapeBatch:
    """A batch of rendered images.

    Attributes:
        images: (B, 3, 32, 32) float32 in [0, 1].
        shapes: (B,) indices into `SHAPES`.
        colours: (B,) indices into `COLOURS`.
        captions: one caption per image.
    """

    images: torch.Tensor
    shapes: torch.Tensor
    colours: torch.Tensor
    captions: list[str]

    @property
    def labels(self) -> torch.Tensor:
        """The combined class index `colour * len(SHAPES) + shape` (the judge's label ids)."""
        return self.colours * len(SHAPES) + self.shapes


PAIRS: tuple[tuple[str, str], ...] = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
"""Every `(colour, shape)`, in the order of the judge's labels."""


def class_names() -> list[str]:
    """The judge's labels, `"{colour} {shape}"`, indexed by `ShapeBatch.labels`."""
    return [f"{colour} {shape}" for colour, shape in PAIRS]


def caption(template: str, colour: str, shape: str) -> str:
    """Fills a template with a colour and a shape."""
    return template.format(colour=colour, shape=shape)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of `shape` centred at (cx, cy) with half-size r; `None` for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy + r * 0.15 + r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        w = r * 0.33
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    if shape == "heart":
        points = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 16.5))
        return points
    raise ValueError(f"Unknown shape {shape!r}; choose one of {SHAPES}.")


def render(shape: str, colour: str, rng: random.Random) -> Image.Image:
    """Draws one shape of one colour with random size, position and background tint."""
    scale = _SUPERSAMPLE
    size = RESOLUTION * scale
    background = tuple(rng.randint(232, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(7.0, 13.0)
    cx = rng.uniform(r + 1, RESOLUTION - r - 1) * scale
    cy = rng.uniform(r + 1, RESOLUTION - r - 1) * scale
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    outline = _outline(shape, cx, cy, r * scale)
    if outline is None:
        draw.ellipse((cx - r * scale, cy - r * scale, cx + r * scale, cy + r * scale), fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images as a (B, 3, H, W) float32 tensor in [0, 1]."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def draw_batch(batch_size: int, seed: int, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> ShapeBatch:
    """A reproducible batch: uniformly random shapes, colours and templates, all drawn from `seed`.

    Args:
        batch_size: the number of images.
        seed: the seed of every random choice.
        templates: caption templates with `{colour}` and `{shape}` fields.
    """
    rng = random.Random(seed)
    shapes, colours, captions = _draw_labels(batch_size, rng, templates)
    colour_names = list(COLOURS)
    images = [render(SHAPES[s], colour_names[c], rng) for s, c in zip(shapes, colours)]
    return ShapeBatch(to_tensor(images), torch.tensor(shapes), torch.tensor(colours), captions)


def draw_captions(
    batch_size: int, seed: int, templates: tuple[str, ...] = TRAIN_TEMPLATES
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Like `draw_batch` without the images: `(shapes, colours, captions)`."""
    shapes, colours, captions = _draw_labels(batch_size, random.Random(seed), templates)
    return torch.tensor(shapes), torch.tensor(colours), captions


def _draw_labels(
    batch_size: int, rng: random.Random, templates: tuple[str, ...]
) -> tuple[list[int], list[int], list[str]]:
    colour_names = list(COLOURS)
    shapes = [rng.randrange(len(SHAPES)) for _ in range(batch_size)]
    colours = [rng.randrange(len(colour_names)) for _ in range(batch_size)]
    captions = [caption(rng.choice(templates), colour_names[c], SHAPES[s]) for s, c in zip(shapes, colours)]
    return shapes, colours, captions


def all_captions(templates: tuple[str, ...] = TRAIN_TEMPLATES) -> list[str]:
    """Every caption the templates make, one per (template, colour, shape)."""
    return [caption(t, c, s) for t in templates for c in COLOURS for s in SHAPES]
