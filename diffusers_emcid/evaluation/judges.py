"""Judges: image classifiers that say how probable a concept is in each image.

A judge of evaluations is any callable `judge(images) -> (num_images, num_labels)` probabilities with a `labels`
attribute naming its classes; the debiasing loop's judges take the phrases to choose from as well,
`judge(images, phrases)` (`clip_zero_shot_judge`). `concept_probability` reads the probability of a concept from
those: the sum over the labels the concept names (a whole label, one of its comma-separated aliases as in
ImageNet's, or all of its words, so that "square" collects "red square", "blue square", ...).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Protocol, Sequence, Union

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from ..debias import JudgeFn, check_judge_output

if TYPE_CHECKING:  # pragma: no cover
    from transformers import CLIPModel, CLIPProcessor


class Judge(Protocol):
    labels: list[str]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(len(images), len(labels)) class probabilities."""


class ImageClassifierJudge:
    """A Hugging Face image-classification model (and its image processor) as a judge.

    Args:
        model: e.g. `AutoModelForImageClassification.from_pretrained("google/vit-base-patch16-224")`, the
            paper's ImageNet judge, or the shipped shapes judge.
        processor: its image processor.
        batch_size: images per forward pass.
    """

    def __init__(self, model: PreTrainedModel, processor: object, batch_size: int = 64) -> None:
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: object
    ) -> "ImageClassifierJudge":
        """Loads a model id or folder with `AutoModelForImageClassification` and `AutoImageProcessor`."""
        model = AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs).to(device)
        return cls(model, AutoImageProcessor.from_pretrained(name_or_path, **kwargs))

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        probabilities = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
            probabilities.append(self.model(pixel_values=pixels).logits.float().softmax(-1).cpu())
        return torch.cat(probabilities) if probabilities else torch.zeros(0, len(self.labels))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def concept_labels(labels: Sequence[str], concept: str | int) -> list[int]:
    """Indices of the labels that `concept` names: a class index, a whole label or alias, or all of a label's words.

    Raises:
        ValueError: if no label matches, naming a few labels to choose from.
    """
    if isinstance(concept, int):
        if not 0 <= concept < len(labels):
            raise ValueError(f"Class index {concept} is out of range for a judge of {len(labels)} labels.")
        return [concept]
    wanted = _words(concept)
    exact = [i for i, label in enumerate(labels) if any(_words(alias) == wanted for alias in label.split(","))]
    if exact:
        return exact
    matching = [i for i, label in enumerate(labels) if wanted and set(wanted) <= set(_words(label))]
    if not matching:
        raise ValueError(
            f"The judge has no label for {concept!r} (labels include {list(labels[:8])}); name a label, one of its "
            "aliases or words, or give a class index."
        )
    return matching


def concept_probability(probabilities: torch.Tensor, labels: Sequence[str], concept: str | int) -> torch.Tensor:
    """P(concept) per image: the summed probabilities of the labels `concept` names, shape (num_images,)."""
    return probabilities[:, concept_labels(labels, concept)].sum(dim=1)


def clip_zero_shot_judge(
    model: "CLIPModel", processor: "CLIPProcessor", device: Union[str, torch.device, None] = None
) -> JudgeFn:
    """A judge that classifies images zero-shot with a CLIP model: softmax of `logits_per_image` over the phrases.

    Nothing is downloaded: pass a loaded model and processor, e.g. `CLIPModel.from_pretrained(
    "openai/clip-vit-large-patch14")` (the authors' judge) and its `CLIPProcessor`. The model is used as
    it is (from_pretrained gives eval mode) and is not moved; inputs go to `device`, by default the model's.

    Returns:
        `judge(images, phrases)` giving a (num_images, num_phrases) float32 CPU tensor whose rows sum to 1.
    """
    parameter = next(model.parameters())
    target_device = torch.device(device) if device is not None else parameter.device

    def judge(images: list[Image.Image], phrases: list[str]) -> torch.Tensor:
        if not images or not phrases:
            raise ValueError(
                f"The CLIP judge needs images and phrases, got {len(images)} images and {len(phrases)} phrases."
            )
        inputs = processor(text=list(phrases), images=list(images), return_tensors="pt", padding=True)
        inputs = {key: value.to(target_device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        with torch.no_grad():
            logits = model(**inputs).logits_per_image
        probabilities = logits.float().softmax(dim=-1).cpu()
        return check_judge_output(probabilities, len(images), len(phrases))

    return judge
