"""Key statistics C = E[k k^T] of the edited fc2 layers over a caption set.

C is an uncentred second moment of fc2's input, per layer, in float32, always computed on the unedited model.
Which positions of a caption it covers (`StatisticsPositions`):

* `"paper"`: every non-padding token (start and end markers included) of the captions, padded to the longest
  caption of a batch, as the EMCID authors computed it. Nothing holds the padding positions in place, although
  Stable Diffusion pipelines pad every prompt to 77 tokens and their UNet reads all 77, nor the empty prompt
  that drives classifier-free guidance.
* `"pipeline"`: the captions and the empty prompt tokenised as the pipeline does (padded to 77 with each
  tokenizer's pad token, no attention mask), so C also covers the padding positions:
  `C = C_tokens + padding_weight * C_padding`, with C_tokens the mean over the real tokens (the `"paper"` statistic
  plus the empty prompt's two markers: real tokens are encoded alike with or without padding, under the causal
  mask) and C_padding the mean over the padding positions. The padding thus carries a fixed share
  of C however many of the 77 positions it fills, and the real tokens keep their weight.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .cache import TensorCache, digest
from .config import STATISTICS_POSITIONS, EMCIDConfig, StatisticsPositions
from .encoders import TextEncoderLayout, module_device
from .errors import EMCIDNumericalError
from .hooks import captured_outputs, run_until_stopped
from .tokens import tokenize, tokenize_as_pipeline

CaptionSource = Sequence[str] | str | os.PathLike
STATISTICS_FORMAT = "emcid-statistics-v1"
MIN_EIGENVALUE_FRACTION = 1e-8
"""Key statistics are refused when a layer's C has an eigenvalue below this fraction of its mean eigenvalue
(trace / d_ff), or a negative one: C is then numerically singular (it is accumulated in float32, whose rounding
is about 1e-7 of its entries), and stage 2 would write arbitrarily large updates along the directions it does not
cover."""


@dataclass
class KeyStatistics:
    """The key second moments of the edited layers of one text encoder, from one caption set.

    Attributes:
        covariances: {layer: C (d_ff, d_ff) float32}.
        num_tokens: the number of tokens averaged over; C has rank at most this.
        model_fingerprint: the fingerprint of the text encoder they were computed on.
        checked_regularization: the regularization with which `check_conditioning` last passed, if it did.
    """

    covariances: dict[int, torch.Tensor]
    num_tokens: int
    model_fingerprint: str
    checked_regularization: float | None = field(default=None, compare=False)

    def regularized(self, regularization: float) -> dict[int, torch.Tensor]:
        """Per layer, `C + regularization * mean_eigenvalue(C) * I` (C itself for 0): a ridge that gives the key
        directions no caption covers a small preservation weight. (d_ff, d_ff) float32 each."""
        if not regularization:
            return self.covariances
        return {
            layer: covariance + regularization * covariance.diagonal().mean() * torch.eye(len(covariance))
            for layer, covariance in self.covariances.items()
        }

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

    def check_conditioning(self, component: str = "text_encoder", regularization: float = 0.0) -> None:
        """Raises `EMCIDNumericalError` naming the first layer whose C (regularized, see `regularized`) is numerically
        singular: an eigenvalue below `MIN_EIGENVALUE_FRACTION` of the mean eigenvalue, or negative. A float64
        Cholesky factorisation decides; the eigenvalues are computed only to report a failure. Passing is
        remembered in `checked_regularization`."""
        if self.checked_regularization == regularization:
            return
        covariances = self.regularized(regularization)
        for layer in sorted(covariances):
            covariance = covariances[layer].double()
            floor = MIN_EIGENVALUE_FRACTION * float(covariance.diagonal().mean())
            shifted = covariance - floor * torch.eye(covariance.shape[0], dtype=covariance.dtype)
            if int(torch.linalg.cholesky_ex(shifted).info) == 0:
                continue
            eigenvalues = torch.linalg.eigvalsh(covariance)
            mean = float(eigenvalues.mean())
            raise EMCIDNumericalError(
                f"The key statistics of {component} layer {layer} are numerically singular: their smallest eigenvalue is "
                f"{float(eigenvalues[0]):.3g}, {float(eigenvalues[0]) / mean:.2g} of the mean eigenvalue {mean:.3g} (the "
                f"limit is {MIN_EIGENVALUE_FRACTION:g}), and {int((eigenvalues < floor).sum())} of "
                f"{len(eigenvalues)} eigenvalues lie below it. Stage 2 would write unbounded updates along those "
                f"directions. Compute the statistics on more, and more varied, captions (they come from "
                f"{self.num_tokens} positions; the paper used 100,000 captions), or, where few distinct keys exist "
                f"by design, set EMCIDConfig.statistics_regularization (now {regularization:g}) to a small ridge "
                f"such as 1e-4."
            )
        self.checked_regularization = regularization


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
    positions: StatisticsPositions = "paper",
    padding_weight: float = 1.0,
) -> tuple[dict[int, torch.Tensor], int]:
    """C of the fc2 inputs k of several layers, in one forward pass per caption batch (see the module docstring).

    Each pass stops after the deepest requested layer. With `positions="paper"` the captions are sorted by length,
    so that batches carry little padding.

    Args:
        positions: `"paper"` (real tokens only) or `"pipeline"` (the empty prompt is added and the padding
            positions count, with weight `padding_weight`).
        padding_weight: the weight of the padding positions' mean against the real tokens' (`"pipeline"` only).

    Returns:
        `({layer: C (d_ff, d_ff) float32}, number of positions averaged over)`.
    """
    if positions not in STATISTICS_POSITIONS:
        raise ValueError(f"positions={positions!r} must be one of {list(STATISTICS_POSITIONS)}.")
    device = module_device(layout.model)
    modules = {str(layer): layout.fc2(layer) for layer in layers}
    pipeline = positions == "pipeline"
    if pipeline:
        ordered = ["", *captions]
    else:
        lengths = [len(ids) for ids in tokenizer(captions, truncation=True).input_ids]
        ordered = [captions[i] for i in sorted(range(len(captions)), key=lambda i: lengths[i])]
    width = layout.intermediate_size
    sums = {layer: torch.zeros(width, width, device=device) for layer in layers}
    padding_sums = {layer: torch.zeros(width, width, device=device) for layer in layers} if pipeline else {}
    count = padding_count = 0
    batches = range(0, len(ordered), batch_size)
    with captured_outputs(modules, capture_inputs=True, stop_at=modules[str(max(layers))]) as keys:
        for start in tqdm(batches, desc="EMCID statistics", unit="batch", disable=not progress):
            texts = ordered[start : start + batch_size]
            if pipeline:  # the encoder sees what the pipeline gives it: no attention mask
                batch = tokenize_as_pipeline(tokenizer, texts).to(device)
                run_until_stopped(layout.model, input_ids=batch.input_ids)
            else:
                batch = tokenize(tokenizer, texts).to(device)
                run_until_stopped(layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            mask = batch.attention_mask.bool()
            for layer in layers:
                k = keys[str(layer)][mask].float()
                sums[layer].addmm_(k.T, k)
                if pipeline:
                    k = keys[str(layer)][~mask].float()
                    padding_sums[layer].addmm_(k.T, k)
            count += int(mask.sum())
            padding_count += int((~mask).sum())
    covariances = {}
    for layer in layers:
        covariance = sums[layer] / count
        if pipeline and padding_count:
            covariance += padding_weight * padding_sums[layer] / padding_count
        covariances[layer] = covariance.cpu()
    return covariances, count + padding_count


class StatisticsStore:
    """Key statistics kept on disk in a `TensorCache` and in memory per text-encoder component.

    Entries are named `{model}-layer{l}-{positions}-{caption set}`, one per layer, so that the entries of a model and
    positions mode can be listed; a text encoder's statistics always come from one caption set for all its layers.
    """

    def __init__(self, cache: TensorCache) -> None:
        self.cache = cache
        self.known: dict[str, KeyStatistics] = {}

    @staticmethod
    def caption_set(captions: list[str]) -> str:
        """The name of a caption set in cache keys."""
        return digest(STATISTICS_FORMAT, digest(captions))[:32]

    @staticmethod
    def _prefix(model_fingerprint: str, layer: int, config: EMCIDConfig) -> str:
        positions = config.statistics_positions
        if positions == "pipeline":
            positions += f"{config.statistics_padding_weight:g}"
        return f"{model_fingerprint[:32]}-layer{layer}-{positions}-"

    def compute(
        self,
        component: str,
        layout: TextEncoderLayout,
        tokenizer: PreTrainedTokenizerBase,
        layers: Sequence[int],
        model_fingerprint: str,
        captions: list[str],
        config: EMCIDConfig,
        progress: bool = True,
    ) -> KeyStatistics:
        """The statistics of `captions` for `layers` of one text encoder: from the cache, else computed and cached."""
        caption_set = self.caption_set(captions)
        statistics = self._load(layers, model_fingerprint, caption_set, config)
        if statistics is None:
            covariances, count = compute_key_second_moments(
                layout, tokenizer, captions, layers, config.statistics_batch_size, progress,
                config.statistics_positions, config.statistics_padding_weight,
            )
            for layer, covariance in covariances.items():
                self.cache.save("statistics", self._prefix(model_fingerprint, layer, config) + caption_set,
                                {"mom2": covariance},
                                {"num_captions": str(len(captions)), "num_tokens": str(count), "layer": str(layer)})
            statistics = KeyStatistics(covariances, count, model_fingerprint)
        self.known[component] = statistics
        return statistics

    def _load(self, layers: Sequence[int], model_fingerprint: str, caption_set: str,
              config: EMCIDConfig) -> KeyStatistics | None:
        """The cached statistics of one caption set, if every layer has them."""
        entries = {layer: self.cache.load("statistics", self._prefix(model_fingerprint, layer, config) + caption_set)
                   for layer in layers}
        if any(entry is None for entry in entries.values()):
            return None
        count = min(int(entry[1].get("num_tokens", 0)) for entry in entries.values())
        return KeyStatistics({layer: entry[0]["mom2"] for layer, entry in entries.items()}, count, model_fingerprint)

    def find(self, component: str, layers: Sequence[int], model_fingerprint: str, config: EMCIDConfig) -> KeyStatistics:
        """The statistics of a text encoder: from memory, else from the newest cached caption set that covers every
        layer (layers never mix caption sets).

        Raises:
            ValueError: if there are none, saying how to compute them.
        """
        known = self.known.get(component)
        if known is not None and known.model_fingerprint == model_fingerprint and set(layers) <= set(known.covariances):
            return known
        newest: dict[str, float] = {}
        for layer in layers:
            prefix = self._prefix(model_fingerprint, layer, config)
            for path in self.cache.find("statistics", prefix):
                caption_set = path.stem.removeprefix(prefix)
                newest[caption_set] = max(newest.get(caption_set, 0.0), path.stat().st_mtime)
        for caption_set in sorted(newest, key=newest.__getitem__, reverse=True):
            statistics = self._load(layers, model_fingerprint, caption_set, config)
            if statistics is not None:
                self.known[component] = statistics
                return statistics
        raise ValueError(
            f"No key statistics for layers {list(layers)} of this {component} (from one caption set). Call "
            "editor.compute_statistics(captions) once with many captions (the paper used 100,000 CCS captions): a "
            "list of strings, a .txt/.json/.jsonl file, or a dataset name with column='caption'. They are cached "
            f"under {self.cache.root / 'statistics'} and found again by later runs."
        )
