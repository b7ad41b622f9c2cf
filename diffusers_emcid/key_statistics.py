"""Key statistics C = E[k k^T] of the edited fc2 layers over a caption set (spec section 4).

C is the uncentred second moment of fc2's input over every non-padding token (start and end markers
included) of the captions, per layer, in float32, always computed on the unedited model.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .encoders import TextEncoderLayout, module_device
from .errors import EMCIDNumericalError
from .hooks import captured_outputs, run_until_stopped
from .tokens import tokenize

CaptionSource = Sequence[str] | str | os.PathLike


@dataclass
class KeyStatistics:
    """The key second moments of the edited layers of one text encoder, from one caption set.

    Attributes:
        covariances: {layer: C (d_ff, d_ff) float32}.
        num_tokens: the number of tokens averaged over; C has rank at most this.
        model_fingerprint: the fingerprint of the text encoder they were computed on.
    """

    covariances: dict[int, torch.Tensor]
    num_tokens: int
    model_fingerprint: str

    def rank_deficiency(self, intermediate_size: int) -> str | None:
        """A message if C cannot have full rank (fewer tokens than key dimensions), else `None`."""
        if self.num_tokens >= intermediate_size:
            return None
        return (
            f"The key statistics come from {self.num_tokens} tokens, fewer than the {intermediate_size} key dimensions, so C "
            "is rank-deficient and stage 2 cannot preserve unrelated prompts (its system is singular). Compute statistics "
            "on more captions (the paper used 100,000)."
        )

    def check_rank(self, intermediate_size: int) -> None:
        """Raises `EMCIDNumericalError` if C is rank-deficient."""
        message = self.rank_deficiency(intermediate_size)
        if message:
            raise EMCIDNumericalError(message)


def load_captions(captions: CaptionSource, column: str | None = None, split: str = "train") -> list[str]:
    """Reads captions from a list, a file, or a Hugging Face dataset.

    Args:
        captions: a list of strings; a path to a `.txt` file (one caption a line), a `.jsonl` file or a
            `.json` list (strings, or objects with the caption in `column`, default `"caption"`); or, with
            `column` given and no such file, the name of a `datasets` dataset.
        column: the field holding the caption in JSON rows or dataset rows.
        split: the dataset split.

    Raises:
        ValueError: if no caption can be read.
    """
    if isinstance(captions, (str, os.PathLike)):
        path = Path(captions)
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            field = column or "caption"
            if path.suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            elif path.suffix == ".json":
                rows = json.loads(text)
            else:
                rows = text.splitlines()
            loaded = [row if isinstance(row, str) else row[field] for row in rows]
        elif column is not None:
            try:
                import datasets
            except ImportError as error:
                raise ImportError(
                    "Reading captions from a Hugging Face dataset needs `datasets`: pip install 'diffusers-emcid[datasets]'."
                ) from error
            loaded = list(datasets.load_dataset(str(captions), split=split)[column])
        else:
            raise ValueError(
                f"Captions {str(captions)!r} is not a file. Pass a list of captions, a .txt/.json/.jsonl file, or a "
                "dataset name together with column='caption'."
            )
    else:
        loaded = list(captions)
    loaded = [caption for caption in loaded if isinstance(caption, str) and caption.strip()]
    if not loaded:
        raise ValueError("No captions to compute statistics from; give a non-empty list of caption strings.")
    return loaded


def sample_captions(captions: list[str], num_samples: int) -> list[str]:
    """A fixed pseudo-random subset of `num_samples` captions (all of them if there are fewer)."""
    if len(captions) <= num_samples:
        return captions
    indices = list(range(len(captions)))
    random.Random(1).shuffle(indices)
    return [captions[i] for i in sorted(indices[:num_samples])]


@torch.no_grad()
def compute_key_second_moments(
    layout: TextEncoderLayout,
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    layers: Sequence[int],
    batch_size: int = 100,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """E[k k^T] of the fc2 inputs k of several layers, in one forward pass per caption batch.

    Captions are sorted by length so that batches carry little padding; each pass stops after the
    deepest requested layer.

    Returns:
        `({layer: C (d_ff, d_ff) float32}, number of tokens averaged over)`.
    """
    device = module_device(layout.model)
    modules = {str(layer): layout.fc2(layer) for layer in layers}
    lengths = [len(ids) for ids in tokenizer(captions, truncation=True).input_ids]
    ordered = [captions[i] for i in sorted(range(len(captions)), key=lambda i: lengths[i])]
    sums = {layer: torch.zeros(layout.intermediate_size, layout.intermediate_size, device=device) for layer in layers}
    count = 0
    batches = range(0, len(ordered), batch_size)
    with captured_outputs(modules, capture_inputs=True, stop_at=modules[str(max(layers))]) as keys:
        for start in tqdm(batches, desc="EMCID statistics", unit="batch", disable=not progress):
            batch = tokenize(tokenizer, ordered[start : start + batch_size]).to(device)
            run_until_stopped(layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            mask = batch.attention_mask.bool()
            for layer in layers:
                k = keys[str(layer)][mask].float()
                sums[layer].addmm_(k.T, k)
            count += int(mask.sum())
    return {layer: (total / count).cpu() for layer, total in sums.items()}, count
