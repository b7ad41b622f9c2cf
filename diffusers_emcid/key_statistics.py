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

Without captions, `load_captions` reads `DEFAULT_CAPTIONS` (or `$EMCID_CAPTIONS`): a caption file of a Hub dataset,
named by an `hf://datasets/...` URL and downloaded with `huggingface_hub`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote

import torch
from huggingface_hub import hf_hub_download
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .cache import TensorCache, digest
from .config import STATISTICS_POSITIONS, EMCIDConfig, StatisticsPositions
from .encoders import TextEncoderLayout, module_device
from .errors import EMCIDNumericalError
from .hooks import captured_outputs, run_until_stopped
from .tokens import tokenize, tokenize_as_pipeline

logger = logging.getLogger(__name__)

CaptionSource = Sequence[str] | str | os.PathLike
STATISTICS_FORMAT = "emcid-statistics-v1"
HUB_URL_PREFIX = "hf://datasets/"
DEFAULT_CAPTIONS = "hf://datasets/google-research-datasets/conceptual_captions/unlabeled/train-00000-of-00002.parquet"
"""The captions read when none are given: the first of the two files of the training split of Conceptual Captions
(CC3M, Sharma et al., ACL 2018; about 1.66 million web image captions, column `caption`), the caption set the EMCID
authors sampled their 100,000 statistics captions from. A parquet file: reading it needs `pyarrow`."""
CAPTIONS_ENV_VAR = "EMCID_CAPTIONS"
"""Replaces `DEFAULT_CAPTIONS`: any caption source `load_captions` reads, e.g. `hf://datasets/me/captions/all.txt`."""
DEFAULT_CAPTION_COLUMN = "caption"
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
        caption_set: the name of the caption set (`StatisticsStore.caption_set`).
        num_captions: the number of captions.
        positions: the positions they cover (`StatisticsStore.positions_label`).
        checked_regularization: the regularization with which `check_conditioning` last passed, if it did.
    """

    covariances: dict[int, torch.Tensor]
    num_tokens: int
    model_fingerprint: str
    caption_set: str = ""
    num_captions: int = 0
    positions: str = ""
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
            f"The key statistics come from {self.num_tokens} tokens, fewer than the {intermediate_size} key "
            "dimensions, so C is rank-deficient and stage 2 cannot preserve unrelated prompts (its system is "
            "singular). Compute statistics on more captions (the paper used 100,000)."
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
                f"The key statistics of {component} layer {layer} are numerically singular: their smallest "
                f"eigenvalue is {float(eigenvalues[0]):.3g}, {float(eigenvalues[0]) / mean:.2g} of the mean eigenvalue "
                f"{mean:.3g} (the limit is {MIN_EIGENVALUE_FRACTION:g}), and {int((eigenvalues < floor).sum())} of "
                f"{len(eigenvalues)} eigenvalues lie below it. Stage 2 would write unbounded updates along those "
                f"directions. Compute the statistics on more, and more varied, captions (they come from "
                f"{self.num_tokens} positions; the paper used 100,000 captions), or, where few distinct keys exist "
                f"by design, set EMCIDConfig.statistics_regularization (now {regularization:g}) to a small ridge "
                f"such as 1e-4."
            )
        self.checked_regularization = regularization


def default_captions() -> str:
    """The caption source used when none is given: `$EMCID_CAPTIONS`, else `DEFAULT_CAPTIONS`."""
    return os.environ.get(CAPTIONS_ENV_VAR) or DEFAULT_CAPTIONS


def download_hub_captions(url: str) -> Path:
    """Downloads the caption file `hf://datasets/{owner}/{name}[@{revision}]/{path}` of a Hub dataset repo (with a
    progress bar; cached by `huggingface_hub`) and returns its local path. The revision may be percent-encoded
    (`@refs%2Fconvert%2Fparquet`).

    Raises:
        ValueError: for a URL of another form.
    """
    parts = url.removeprefix(HUB_URL_PREFIX).split("/", 2)
    if not url.startswith(HUB_URL_PREFIX) or len(parts) < 3 or not all(parts):
        raise ValueError(
            f"{url!r} does not name a file of a Hub dataset; write {HUB_URL_PREFIX}OWNER/NAME/PATH "
            f"(or NAME@REVISION), e.g. {DEFAULT_CAPTIONS}."
        )
    owner, name, filename = parts
    name, _, revision = name.partition("@")
    return Path(hf_hub_download(f"{owner}/{name}", filename, repo_type="dataset", revision=unquote(revision) or None))


def read_caption_file(path: Path, column: str | None = None) -> list:
    """The rows of a caption file: `.txt` (one caption a line), `.json` (a list), `.jsonl`, `.csv`/`.tsv` (with a
    header) or `.parquet` (read with `pyarrow`); a row of a table or JSON object gives its `column` (default
    `"caption"`).

    Raises:
        ValueError: if rows have no such column.
        ImportError: for a parquet file without `pyarrow`.
    """
    key = column or DEFAULT_CAPTION_COLUMN
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError as error:
            raise ImportError(
                f"Reading the parquet caption file {path.name} needs pyarrow: pip install pyarrow. Or give captions "
                f"as a list or a .txt/.json/.jsonl/.csv file (a local path or an {HUB_URL_PREFIX}... URL, also in "
                f"${CAPTIONS_ENV_VAR})."
            ) from error
        names = parquet.read_schema(path).names
        if key not in names:
            raise ValueError(
                f"{path.name} has no column {key!r}; its columns are {names}. Pass column=... to name "
                "the caption column."
            )
        return parquet.read_table(path, columns=[key]).column(key).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ","))
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(text)
    else:
        return text.splitlines()
    if not isinstance(rows, list) or not all(
        isinstance(row, str) or isinstance(row, dict) and key in row for row in rows
    ):
        raise ValueError(
            f"The rows of {path.name} are not captions or objects with a {key!r} field; pass "
            "column=... to name the caption field."
        )
    return [row if isinstance(row, str) else row[key] for row in rows]


def load_captions(captions: CaptionSource | None = None, column: str | None = None, split: str = "train") -> list[str]:
    """Reads captions from a list, a file, a Hub dataset's caption file, or a Hugging Face dataset.

    Args:
        captions: a list of strings; a caption file (see `read_caption_file`), local or on the Hub as
            `hf://datasets/{owner}/{name}[@{revision}]/{path}`; or, with `column` given and no such file, the name
            of a `datasets` dataset. `None` reads `$EMCID_CAPTIONS`, else `DEFAULT_CAPTIONS`.
        column: the field holding the caption in JSON, CSV, parquet or dataset rows (default `"caption"`).
        split: the dataset split.

    Raises:
        ValueError: if no caption can be read.
    """
    if captions is None:
        captions = default_captions()
        logger.info("Reading the default statistics captions from %s.", captions)
    if isinstance(captions, str) and captions.startswith("hf://"):
        loaded = read_caption_file(download_hub_captions(captions), column)
    elif isinstance(captions, (str, os.PathLike)):
        path = Path(captions)
        if path.is_file():
            loaded = read_caption_file(path, column)
        elif column is not None:
            try:
                import datasets
            except ImportError as error:
                raise ImportError(
                    "Reading captions from a Hugging Face dataset needs `datasets`: "
                    "pip install 'diffusers-emcid[datasets]'."
                ) from error
            loaded = list(datasets.load_dataset(str(captions), split=split)[column])
        else:
            raise ValueError(
                f"Captions {str(captions)!r} is not a file. Pass a list of captions, a .txt/.json/.jsonl/.csv/.parquet "
                f"file, an {HUB_URL_PREFIX}OWNER/NAME/FILE URL, or a dataset name together with column='caption'."
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
    def positions_label(config: EMCIDConfig) -> str:
        """The positions setting of `config` as statistics depend on it: `"paper"`, or `"pipeline"` followed by the
        padding weight (`"pipeline1"`)."""
        positions = config.statistics_positions
        if positions == "pipeline":
            positions += f"{config.statistics_padding_weight:g}"
        return positions

    @classmethod
    def _prefix(cls, model_fingerprint: str, layer: int, config: EMCIDConfig) -> str:
        return f"{model_fingerprint[:32]}-layer{layer}-{cls.positions_label(config)}-"

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
                layout,
                tokenizer,
                captions,
                layers,
                config.statistics_batch_size,
                progress,
                config.statistics_positions,
                config.statistics_padding_weight,
            )
            statistics = KeyStatistics(
                covariances, count, model_fingerprint, caption_set, len(captions), self.positions_label(config)
            )
            self.add(component, statistics, config)
        self.known[component] = statistics
        return statistics

    def add(self, component: str, statistics: KeyStatistics, config: EMCIDConfig) -> None:
        """Caches the statistics of a text encoder, computed or loaded under the positions setting of `config`, and
        makes them its current ones."""
        for layer, covariance in statistics.covariances.items():
            key = self._prefix(statistics.model_fingerprint, layer, config) + statistics.caption_set
            self.cache.save(
                "statistics",
                key,
                {"mom2": covariance},
                {
                    "num_captions": str(statistics.num_captions),
                    "num_tokens": str(statistics.num_tokens),
                    "layer": str(layer),
                },
            )
        self.known[component] = statistics

    def _load(
        self, layers: Sequence[int], model_fingerprint: str, caption_set: str, config: EMCIDConfig
    ) -> KeyStatistics | None:
        """The cached statistics of one caption set, if every layer has them."""
        entries = {
            layer: self.cache.load("statistics", self._prefix(model_fingerprint, layer, config) + caption_set)
            for layer in layers
        }
        if any(entry is None for entry in entries.values()):
            return None
        count = min(int(entry[1].get("num_tokens", 0)) for entry in entries.values())
        num_captions = min(int(entry[1].get("num_captions", 0)) for entry in entries.values())
        return KeyStatistics(
            {layer: entry[0]["mom2"] for layer, entry in entries.items()},
            count,
            model_fingerprint,
            caption_set,
            num_captions,
            self.positions_label(config),
        )

    def find(self, component: str, layers: Sequence[int], model_fingerprint: str, config: EMCIDConfig) -> KeyStatistics:
        """The statistics of a text encoder: from memory, else from the newest cached caption set that covers every
        layer (layers never mix caption sets).

        Raises:
            ValueError: if there are none, naming both ways to get them.
        """
        known = self.known.get(component)
        if (
            known is not None
            and known.model_fingerprint == model_fingerprint
            and known.positions == self.positions_label(config)
            and set(layers) <= set(known.covariances)
        ):
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
            f"No key statistics for layers {list(layers)} of this {component} (from one caption set, with "
            f"statistics_positions={config.statistics_positions!r}). Either compute them once: "
            "editor.compute_statistics() reads 100,000 Conceptual Captions from the Hub as the paper did, "
            "editor.compute_statistics(captions) takes your own (a list of strings, a caption file or an "
            "hf://datasets/... URL); or load statistics shared for this base model: "
            "editor.load_statistics(repo_id_or_folder). Either way they are cached under "
            f"{self.cache.root / 'statistics'} and found again by later runs."
        )
