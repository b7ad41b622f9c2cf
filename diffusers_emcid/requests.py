"""Edit requests: what to change into what, with which prompts, seed and images."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Union

import numpy as np
import torch
from PIL import Image

from .cache import digest

DEFAULT_TEMPLATES: tuple[str, ...] = ("An image of {}", "A photo of {}", "{}")
"""The paper's three prompt templates for object edits."""

ImageInput = Union[Image.Image, torch.Tensor, str, os.PathLike]


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu().contiguous()
        header = f"tensor{tuple(tensor.shape)}{tensor.dtype}".encode()
        return header + tensor.view(torch.uint8).numpy().tobytes()
    if isinstance(image, Image.Image):
        return f"pil{image.size}{image.mode}".encode() + image.tobytes()
    with open(image, "rb") as file:
        return b"file" + file.read()


def check_template(template: str, what: str, filler: str, example: str) -> None:
    """Raises a ValueError unless `template` has exactly one `{}` (where `filler` goes) and no other braces."""
    rest = template.replace("{}", "", 1)
    if "{}" not in template or "{" in rest or "}" in rest:
        raise ValueError(
            f"{what} {template!r} must contain exactly one '{{}}' (and no other braces) where {filler} goes, "
            f"e.g. {example!r}."
        )


@dataclass(frozen=True)
class ConceptEdit:
    """One concept to edit: prompts with `source` should draw what prompts with `destination` draw.

    Args:
        source: the words to edit, e.g. `"dog"` or `"Van Gogh"`.
        destination: what they should mean after the edit, e.g. `"cat"`, `"art"`; `""` or `" "` erases
            towards an (almost) unconditional prompt.
        templates: prompt templates with one `{}` each, filled with the source (and the destination);
            defaults to `DEFAULT_TEMPLATES`.
        seed: seed of every random draw of this concept's stage 1; defaults to a stable hash of
            `(source, destination, templates)`, so the same request always gives the same result.
        images: training images to use instead of generated ones (PIL images, tensors in [0, 1] of
            shape (3, H, W), or file paths); their count must be a multiple of the number of
            templates, ordered sample-major (image j belongs to template j mod P).
        text_alignment: whether stage 1 uses the text-alignment term for this concept.
        use_real_noise: train against the true noise of the images instead of the frozen model's prediction for
            the destination (the paper's rectification with real images of the destination).
    """

    source: str
    destination: str
    templates: tuple[str, ...] | None = None
    seed: int | None = None
    images: tuple[ImageInput, ...] | None = field(default=None, repr=False)
    text_alignment: bool = True
    use_real_noise: bool = False

    def __post_init__(self) -> None:
        for name in ("source", "destination"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"ConceptEdit.{name} must be a str, got {type(value).__name__} {value!r}.")
        if not self.source.strip():
            raise ValueError(f"ConceptEdit.source={self.source!r} is empty; give the words to edit.")
        if self.source.strip().lower() == self.destination.strip().lower():
            raise ValueError(
                f"ConceptEdit({self.source!r} -> {self.destination!r}): source and destination are the same; "
                "an edit needs a different destination."
            )
        templates = DEFAULT_TEMPLATES if self.templates is None else self.templates
        if isinstance(templates, str) or not all(isinstance(t, str) for t in templates):
            raise TypeError(f"ConceptEdit.templates must be a sequence of str, got {templates!r}.")
        templates = tuple(templates)
        if not templates:
            raise ValueError(
                f"ConceptEdit({self.source!r}): templates is empty; give at least one, e.g. 'A photo of {{}}'."
            )
        for template in templates:
            check_template(template, f"ConceptEdit({self.source!r}): template", "the concept", "A photo of {}")
        object.__setattr__(self, "templates", templates)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"ConceptEdit({self.source!r}): seed={self.seed!r} must be a non-negative int or None.")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"ConceptEdit({self.source!r}): seed={self.seed!r} must be a non-negative int or None.")
        for name in ("text_alignment", "use_real_noise"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ConceptEdit({self.source!r}): {name}={getattr(self, name)!r} must be True or False.")
        if self.images is not None:
            single = isinstance(self.images, (torch.Tensor, Image.Image, str, os.PathLike))
            images = (self.images,) if single else tuple(self.images)
            if len(images) == 0 or len(images) % len(templates):
                raise ValueError(
                    f"ConceptEdit({self.source!r}): {len(images)} images for {len(templates)} templates; give a "
                    f"non-zero multiple of {len(templates)} (ordered sample-major: image j belongs to template j mod "
                    f"{len(templates)})."
                )
            object.__setattr__(self, "images", images)

    @property
    def source_prompts(self) -> list[str]:
        return [template.format(self.source) for template in self.templates]

    @property
    def destination_prompts(self) -> list[str]:
        return [template.format(self.destination) for template in self.templates]

    @property
    def resolved_seed(self) -> int:
        """The seed used for this request: the given one, or a stable hash of the request's text."""
        if self.seed is not None:
            return self.seed
        return int(digest(self.source, self.destination, list(self.templates))[:8], 16) & 0x7FFFFFFF

    def fingerprint(self) -> str:
        """A digest of everything in the request that changes its stage-1 vector, image bytes included."""
        images = None
        if self.images is not None:
            images = [hashlib.sha256(_image_bytes(image)).hexdigest() for image in self.images]
        return digest(
            self.source,
            self.destination,
            list(self.templates),
            self.resolved_seed,
            images,
            self.text_alignment,
            self.use_real_noise,
        )

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description (images are summarised by their count)."""
        return {
            "source": self.source,
            "destination": self.destination,
            "templates": list(self.templates),
            "seed": self.resolved_seed,
            "num_images": 0 if self.images is None else len(self.images),
            "text_alignment": self.text_alignment,
            "use_real_noise": self.use_real_noise,
        }


def load_image(image: ImageInput) -> torch.Tensor:
    """Reads an image input as a float tensor of shape (3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"An image tensor must have shape (3, H, W), got {tuple(image.shape)}.")
        if image.dtype == torch.uint8:
            return image.detach().float().cpu() / 255
        image = image.detach().float().cpu()
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError("A float image tensor must hold values in [0, 1] (or be uint8 in [0, 255]).")
        return image
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def as_concept_edits(requests: Iterable[ConceptEdit | tuple[str, str]]) -> list[ConceptEdit]:
    """Normalises requests: `(source, destination)` tuples become `ConceptEdit`s with default templates.

    Raises:
        TypeError: for an entry that is neither.
        ValueError: for an empty list or two requests with the same source (case-insensitive).
    """
    if isinstance(requests, (ConceptEdit, str)) or (
        isinstance(requests, tuple) and len(requests) == 2 and all(isinstance(r, str) for r in requests)
    ):
        raise TypeError("Pass a list of requests, e.g. [('dog', 'cat')], not a single request.")
    edits: list[ConceptEdit] = []
    for index, request in enumerate(requests):
        if isinstance(request, ConceptEdit):
            edits.append(request)
        elif isinstance(request, (tuple, list)) and len(request) == 2:
            edits.append(ConceptEdit(source=request[0], destination=request[1]))
        else:
            raise TypeError(f"Request {index} is {request!r}; give a (source, destination) tuple or a ConceptEdit.")
    if not edits:
        raise ValueError("No requests given; pass e.g. [('dog', 'cat')].")
    seen: dict[str, int] = {}
    for index, edit in enumerate(edits):
        key = " ".join(edit.source.lower().split())
        if key in seen:
            raise ValueError(
                f"Requests {seen[key]} and {index} both edit the source {edit.source!r}; one concept can only "
                "get one destination per call. Remove one of them."
            )
        seen[key] = index
    return edits


def canonical_order(requests: list[ConceptEdit]) -> list[ConceptEdit]:
    """The requests sorted by source (case- and space-insensitive, then exact), so that results do not
    depend on the order in which concepts were asked for."""
    return sorted(requests, key=lambda r: (" ".join(r.source.lower().split()), r.source, r.destination))
