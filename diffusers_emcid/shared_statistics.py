"""Key statistics of an editor (`StatisticsMixin`): computed from captions, or shared as files, a folder or Hub
dataset repo that `EMCIDEditor.load_statistics` reads.

The statistics of a base model are the same for everyone who edits it, so one person computes them (100,000 captions,
about an hour) and everyone else downloads them. A folder holds:

- `{component}.layer{l:02d}.safetensors` per edited text encoder and layer, e.g. `text_encoder_2.layer07.safetensors`:
  one tensor `covariance`, C (d_ff, d_ff) float32, and in the header metadata what C depends on (the text encoder's
  fingerprint and dtype, the positions setting and padding weight), what it was computed from (the caption set's
  digest and size, the number of tokens), the format and package versions, and a digest of all of it with C's bytes;
- `README.md`: a dataset card.

One file per layer, so that a download fetches only the layers an editor edits (each is d_ff^2 * 4 bytes: 38 MB for
CLIP ViT-L, 105 MB for OpenCLIP bigG), and a file's layout is checked on its own header before its data is read.
Loading refuses statistics of other base weights (or tokenizer, or dtype) and of other positions settings, naming
the mismatch and the fix, and files with another layout, shape, a damaged digest or non-finite values.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from huggingface_hub import DatasetCardData, snapshot_download

from .cache import digest, fingerprint_tensors, text_encoder_fingerprint
from .card import CITATION
from .config import EMCIDConfig
from .encoders import EditedEncoder
from .errors import BaseModelMismatchError, EMCIDFormatError, EMCIDNumericalError
from .key_statistics import CaptionSource, KeyStatistics, StatisticsStore, load_captions, sample_captions
from .serialization import CARD_NAME, atomic_folder_write, push_folder, read_header, read_tensors, safetensors_bytes
from .version import __version__

logger = logging.getLogger(__name__)

STATISTICS_FILE_FORMAT = "emcid-key-statistics"
STATISTICS_FILE_VERSION = 1
TENSOR_NAME = "covariance"
DIGEST_KEY = "emcid_digest"
FILE_PATTERN = "*.layer*.safetensors"


def statistics_file_name(component: str, layer: int) -> str:
    """The file of one layer's statistics in a folder or repo: `text_encoder.layer03.safetensors`."""
    return f"{component}.layer{layer:02d}.safetensors"


def statistics_digest(metadata: dict[str, str], covariance: torch.Tensor) -> str:
    """The digest a file records of its metadata (all of it but the digest) and its tensor C (d_ff, d_ff)."""
    described = {key: value for key, value in metadata.items() if key != DIGEST_KEY}
    return digest(described, fingerprint_tensors([(TENSOR_NAME, covariance)]))


def _settings(config: EMCIDConfig) -> dict[str, str]:
    return {
        "statistics_positions": config.statistics_positions,
        "statistics_padding_weight": repr(float(config.statistics_padding_weight)),
    }


def _positions_label(metadata: dict[str, str]) -> str | None:
    """`StatisticsStore.positions_label` of the settings in a file's metadata (`None` if they do not parse)."""
    positions = metadata.get("statistics_positions")
    if positions != "pipeline":
        return positions
    try:
        return f"pipeline{float(metadata.get('statistics_padding_weight', '')):g}"
    except ValueError:
        return None


def _describe_settings(metadata: dict[str, str]) -> str:
    positions = metadata.get("statistics_positions")
    if positions == "pipeline":
        return f"statistics_positions='pipeline', statistics_padding_weight={metadata.get('statistics_padding_weight')}"
    return f"statistics_positions={positions!r}"


def file_metadata(
    component: str, layer: int, statistics: KeyStatistics, config: EMCIDConfig, dtype: str, base_model: str | None
) -> dict[str, str]:
    """The header metadata of one layer's file, digest excluded (see the module docstring)."""
    metadata = {
        "format": "pt",
        "emcid_format": STATISTICS_FILE_FORMAT,
        "emcid_format_version": str(STATISTICS_FILE_VERSION),
        "library_version": __version__,
        "component": component,
        "layer": str(layer),
        "model_fingerprint": statistics.model_fingerprint,
        "model_dtype": dtype,
        "caption_set": statistics.caption_set,
        "num_captions": str(statistics.num_captions),
        "num_tokens": str(statistics.num_tokens),
        **_settings(config),
    }
    if base_model:
        metadata["base_model"] = base_model
    return metadata


def render_statistics_card(
    statistics: dict[str, KeyStatistics], dtypes: dict[str, str], config: EMCIDConfig, base_model: str | None
) -> str:
    """README.md of a statistics folder: YAML front matter valid for a Hub dataset repo, what the files hold, and how
    to load them."""
    tags = ["emcid", "diffusers-emcid", "key-statistics", "text-to-image", "stable-diffusion"]
    data = DatasetCardData(pretty_name="EMCID key statistics", tags=tags, viewer=False)
    rows = "\n".join(
        f"| `{component}` | {sorted(s.covariances)} | {next(iter(s.covariances.values())).shape[0]} | "
        f"{dtypes[component]} | {s.num_captions:,} | {s.num_tokens:,} | `{s.caption_set}` | "
        f"`{s.model_fingerprint[:16]}` |"
        for component, s in statistics.items()
    )
    model = f"`{base_model}`" if base_model else "a Stable Diffusion pipeline"
    settings = _describe_settings(_settings(config))
    return f"""---
{data.to_yaml()}
---

# EMCID key statistics

The key statistics C = E[k k^T] of the inputs k of the MLP `fc2` layers of the text encoder(s) of {model}, for
concept editing with [diffusers-emcid](https://pypi.org/project/diffusers-emcid/) (EMCID, Xiong et al., ECCV 2024).
They depend only on the base weights, so everyone who edits this model can load them instead of computing them.

| text encoder | layers | d_ff | dtype | captions | tokens | caption set | fingerprint |
|---|---|---|---|---|---|---|---|
{rows}

Computed with `{settings}` by diffusers-emcid {__version__}.

## Use

```python
from diffusers_emcid import EMCIDEditor

editor = EMCIDEditor(pipe)  # the same base weights and dtype, and the settings above
editor.load_statistics("<this repo or folder>")
edits = editor.edit([("dog", "cat")])
```

or `emcid stats --model <model> --load <this repo or folder>`, after which `emcid edit` finds them in its cache.
Statistics of other base weights, another dtype or other settings are refused.

## Files

`{{component}}.layer{{l:02d}}.safetensors` holds one layer's C (d_ff, d_ff) float32 as the tensor `covariance`; its
header metadata records the text encoder's fingerprint (weights and tokenizer) and dtype, the caption set's digest
and size, the token count, the positions setting, the package version and a digest of the file's content.

## Citation

```bibtex
{CITATION}
```
"""


def write_statistics_folder(
    folder: str | os.PathLike,
    statistics: dict[str, KeyStatistics],
    dtypes: dict[str, str],
    config: EMCIDConfig,
    base_model: str | None = None,
) -> Path:
    """Writes statistics to a folder atomically (see the module docstring); statistics files of other layers that
    an earlier write left in it are removed.

    Args:
        statistics: {component: its statistics}, computed under the positions setting of `config`.
        dtypes: {component: the dtype of the text encoder, e.g. `"float32"`}.
        base_model: the Hub id of the base model, for the card and the metadata.

    Raises:
        EMCIDNumericalError: for non-finite statistics (nothing is written).
    """
    for component, component_statistics in statistics.items():
        for layer, covariance in component_statistics.covariances.items():
            if not torch.isfinite(covariance).all():
                raise EMCIDNumericalError(
                    f"Refusing to write the key statistics of {component} layer {layer}: they "
                    "contain NaN or inf. Compute them again."
                )
    card = render_statistics_card(statistics, dtypes, config, base_model)

    def write(staging: Path) -> None:  # one file in memory at a time (105 MB a layer for OpenCLIP bigG)
        for component, component_statistics in statistics.items():
            for layer, covariance in component_statistics.covariances.items():
                covariance = covariance.detach().to("cpu", torch.float32).contiguous()
                metadata = file_metadata(component, layer, component_statistics, config, dtypes[component], base_model)
                metadata[DIGEST_KEY] = statistics_digest(metadata, covariance)
                data = safetensors_bytes({TENSOR_NAME: covariance}, metadata)
                (staging / statistics_file_name(component, layer)).write_bytes(data)
        (staging / CARD_NAME).write_text(card, encoding="utf-8")

    folder = Path(folder)
    atomic_folder_write(folder, write)
    written = {folder / statistics_file_name(c, layer) for c, s in statistics.items() for layer in s.covariances}
    for stale in set(folder.glob(FILE_PATTERN)) - written:
        stale.unlink()
    return folder


def _positive_int(metadata: dict[str, str], key: str, path: Path) -> int:
    value = metadata.get(key, "")
    if not (value.isascii() and value.isdigit() and len(value) < 20 and int(value) > 0):
        raise EMCIDFormatError(f"{path} has an invalid {key} {value[:40]!r}; it is not a valid key statistics file.")
    return int(value)


def read_statistics_file(
    path: Path, component: str, layer: int, fingerprint: str, intermediate_size: int, dtype: str, config: EMCIDConfig
) -> tuple[torch.Tensor, dict[str, str]]:
    """Reads and checks one layer's file: its header's layout before its data is read, then its content against
    the digest it records, and only then what it says it holds.

    Returns:
        `(C (d_ff, d_ff) float32, the file's metadata)`.

    Raises:
        EMCIDFormatError: for a file that is not a valid statistics file of this component and layer (unreadable,
            newer format, other tensors, dtype or shape, a digest that does not match, non-finite values).
        BaseModelMismatchError: for statistics of other base weights, tokenizer or dtype.
        ValueError: for statistics of other positions settings than `config`'s.
    """
    if not path.is_file():
        raise BaseModelMismatchError(
            f"There are no key statistics of {component} layer {layer} (no file {path.name} in {path.parent}); the "
            "shared statistics cover other layers than this editor edits. Edit the layers they cover, or compute "
            "statistics with editor.compute_statistics()."
        )
    metadata, layout = read_header(path)
    if metadata.get("emcid_format") != STATISTICS_FILE_FORMAT:
        raise EMCIDFormatError(
            f"{path} is not a diffusers-emcid key statistics file (its header has no "
            f"emcid_format={STATISTICS_FILE_FORMAT!r})."
        )
    version = _positive_int(metadata, "emcid_format_version", path)
    if version > STATISTICS_FILE_VERSION:
        raise EMCIDFormatError(
            f"{path} was written in statistics format version {version} by diffusers-emcid "
            f"{metadata.get('library_version', '?')[:40]}; this version reads up to {STATISTICS_FILE_VERSION}. "
            "Upgrade: pip install -U diffusers-emcid."
        )
    shape, dtype_name = layout.get(TENSOR_NAME, ([], ""))
    if len(layout) != 1 or dtype_name != "F32" or len(shape) != 2 or shape[0] != shape[1]:
        raise EMCIDFormatError(
            f"{path} holds {_describe_layout(layout)}; expected one F32 tensor {TENSOR_NAME!r} of "
            f"shape {[intermediate_size] * 2} (d_ff x d_ff of {component})."
        )
    if (metadata.get("component"), metadata.get("layer")) != (component, str(layer)):
        raise EMCIDFormatError(
            f"{path} says it holds {metadata.get('component', '?')[:40]} layer "
            f"{metadata.get('layer', '?')[:10]}, not {component} layer {layer}; was it renamed?"
        )
    covariance = read_tensors(path)[TENSOR_NAME]
    if metadata.get(DIGEST_KEY) != statistics_digest(metadata, covariance):
        raise EMCIDFormatError(
            f"{path} does not match the digest in its header: it was damaged or modified after "
            "it was written. Download or copy it again."
        )
    if metadata.get("model_fingerprint") != fingerprint:
        theirs = metadata.get("base_model") or "another model"
        raise BaseModelMismatchError(
            f"The key statistics in {path.parent} were computed on other base weights than this pipeline's "
            f"{component}: {theirs[:100]} in {metadata.get('model_dtype', '?')[:20]} (fingerprint "
            f"{metadata.get('model_fingerprint', '?')[:16]}), this one is in {dtype} (fingerprint {fingerprint[:16]}). "
            "Statistics hold only for the exact weights, tokenizer and dtype they were computed on: load statistics "
            "of this model in this dtype (or load the pipeline in their dtype if it is the same model), or compute "
            "them with editor.compute_statistics()."
        )
    if _positions_label(metadata) != StatisticsStore.positions_label(config):
        raise ValueError(
            f"The key statistics in {path.parent} were computed with {_describe_settings(metadata)[:200]}, but this "
            f"editor uses {_describe_settings(_settings(config))}. Build the editor with those settings to use them "
            "(EMCIDConfig.from_preset(..., statistics_positions=...)), or compute statistics for yours with "
            "editor.compute_statistics()."
        )
    if shape != [intermediate_size] * 2:
        raise EMCIDFormatError(f"{path} holds C of shape {shape}, but d_ff of {component} is {intermediate_size}.")
    for key in ("num_captions", "num_tokens"):
        _positive_int(metadata, key, path)
    if not torch.isfinite(covariance).all():
        raise EMCIDFormatError(f"{path} holds NaN or inf; these statistics are unusable. Compute them again.")
    return covariance, metadata


def _describe_layout(layout: dict[str, tuple[list[int], str]]) -> str:
    items = list(layout.items())
    described = ", ".join(f"{name[:40]!r} {dtype} {shape}" for name, (shape, dtype) in items[:4])
    return f"{len(items)} tensor(s) ({described}{', ...' if len(items) > 4 else ''})"


def read_statistics_folder(
    folder: Path, expected: dict[str, tuple[str, list[int], int, str]], config: EMCIDConfig
) -> dict[str, KeyStatistics]:
    """Reads the statistics of the edited layers from a folder, all checked before any is returned.

    Args:
        expected: {component: (fingerprint, layers, d_ff, dtype)} of each edited text encoder.

    Returns:
        {component: its statistics of those layers}.

    Raises:
        EMCIDFormatError, BaseModelMismatchError, ValueError: see `read_statistics_file`; `EMCIDFormatError` also
            for layers of one text encoder from different caption sets.
    """
    if not any(folder.glob(FILE_PATTERN)):
        raise EMCIDFormatError(
            f"{folder} holds no key statistics files ({FILE_PATTERN}); give a folder that "
            "save_statistics wrote or a Hub dataset repo that push_statistics wrote."
        )
    loaded = {}
    for component, (fingerprint, layers, intermediate_size, dtype) in expected.items():
        covariances, sets = {}, set()
        for layer in layers:
            covariances[layer], metadata = read_statistics_file(
                folder / statistics_file_name(component, layer),
                component,
                layer,
                fingerprint,
                intermediate_size,
                dtype,
                config,
            )
            sets.add(tuple(metadata[key] for key in ("caption_set", "num_captions", "num_tokens")))
        if len(sets) > 1:
            raise EMCIDFormatError(
                f"The {component} statistics in {folder} mix caption sets {sorted(sets)} between "
                "layers; save or push them again from one editor."
            )
        ((caption_set, num_captions, num_tokens),) = sets
        loaded[component] = KeyStatistics(
            covariances,
            int(num_tokens),
            fingerprint,
            caption_set,
            int(num_captions),
            StatisticsStore.positions_label(config),
        )
    return loaded


class StatisticsMixin:
    """The key statistics of `EMCIDEditor`: `compute_statistics`, `has_statistics`, and `save_statistics`,
    `push_statistics` and `load_statistics` to share them; built on its `pipe`, `encoders`, `config`, `statistics`
    (the store), `progress` and `_base_model`."""

    def compute_statistics(
        self,
        captions: CaptionSource | None = None,
        *,
        column: str | None = None,
        split: str = "train",
        num_samples: int | None = None,
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Computes (or loads from the cache) C = E[k k^T] of every edited layer on the unedited model.

        Args:
            captions: a list of captions, a caption file (local or `hf://datasets/...`), or a `datasets` name (with
                `column`); by default `$EMCID_CAPTIONS`, else Conceptual Captions (`key_statistics.DEFAULT_CAPTIONS`).
            column: the caption field of JSON rows or dataset rows.
            split: the dataset split.
            num_samples: how many captions to use; defaults to `config.statistics_num_samples`.

        Returns:
            {text-encoder component: {layer: C (d_ff, d_ff) float32}}.
        """
        texts = sample_captions(
            load_captions(captions, column, split), num_samples or self.config.statistics_num_samples
        )
        computed = {}
        with self._base_model():
            for encoder in self.encoders:
                statistics = self.statistics.compute(
                    encoder.component,
                    encoder.layout,
                    encoder.tokenizer,
                    encoder.layers,
                    self._encoder_fingerprint(encoder),
                    texts,
                    self.config,
                    self.progress,
                )
                message = statistics.rank_deficiency(encoder.layout.intermediate_size)
                if message:
                    logger.warning("%s: %s", encoder.component, message)
                computed[encoder.component] = dict(statistics.covariances)
        return computed

    def _encoder_fingerprint(self, encoder: EditedEncoder) -> str:
        return text_encoder_fingerprint(self._fingerprint, encoder.layout.model, encoder.tokenizer)

    def _statistics_of(self, encoder: EditedEncoder) -> KeyStatistics:
        return self.statistics.find(encoder.component, encoder.layers, self._encoder_fingerprint(encoder), self.config)

    def has_statistics(self) -> bool:
        """Whether key statistics of every edited layer are known (computed or cached) for this model."""
        try:
            for encoder in self.encoders:
                self._statistics_of(encoder)
        except ValueError:
            return False
        return True

    def _checked_statistics(self) -> dict[str, KeyStatistics]:
        """The statistics of every edited encoder, refused if rank-deficient or numerically singular."""
        statistics = {encoder.component: self._statistics_of(encoder) for encoder in self.encoders}
        for encoder in self.encoders:
            statistics[encoder.component].check_rank(encoder.layout.intermediate_size)
            statistics[encoder.component].check_conditioning(encoder.component, self.config.statistics_regularization)
        return statistics

    def _dtypes(self) -> dict[str, str]:
        return {e.component: str(next(e.layout.model.parameters()).dtype).removeprefix("torch.") for e in self.encoders}

    def _edited_statistics(self) -> dict[str, KeyStatistics]:
        """The statistics of the edited layers of every edited text encoder (see `_statistics_of`)."""
        statistics = {}
        for encoder in self.encoders:
            found = self._statistics_of(encoder)
            statistics[encoder.component] = dataclasses.replace(
                found, covariances={layer: found.covariances[layer] for layer in encoder.layers}
            )
        return statistics

    def save_statistics(self, save_directory: str | os.PathLike, base_model: str | None = None) -> Path:
        """Writes the key statistics of the edited layers (computed, cached or loaded) to a folder that
        `load_statistics` reads, atomically (see `shared_statistics`).

        Args:
            save_directory: the folder (created if needed).
            base_model: the Hub id of the base model, named in the card.

        Returns:
            The folder.

        Raises:
            ValueError: if there are no statistics to save.
        """
        return write_statistics_folder(
            save_directory, self._edited_statistics(), self._dtypes(), self.config, base_model
        )

    def push_statistics(
        self,
        repo_id: str,
        base_model: str | None = None,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Uploads the key statistics of the edited layers (one file per text encoder and layer, and a dataset card)
        to a Hub dataset repo in one commit, created if needed; statistics files of other layers an earlier push
        left there are deleted.

        Args:
            repo_id: the dataset repo, e.g. `"me/sd15-emcid-statistics"`.
            base_model: the Hub id of the base model, named in the card.
            revision: a branch (created if needed).

        Returns:
            The URL of the commit.
        """
        return push_folder(
            lambda staging: self.save_statistics(staging / "statistics", base_model),
            repo_id,
            "dataset",
            commit_message or "Add EMCID key statistics",
            private,
            token,
            revision,
            delete_patterns=[FILE_PATTERN],
        )

    def load_statistics(
        self,
        repo_or_dir: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> dict[str, dict[int, torch.Tensor]]:
        """Loads shared key statistics from a folder or a Hub dataset repo (only the files of the edited layers are
        downloaded) and makes them the editor's: `edit` uses them, and they are cached like computed ones.

        Every file is checked before any statistics are taken (see `read_statistics_file`).

        Returns:
            {text-encoder component: {layer: C (d_ff, d_ff) float32}}.

        Raises:
            BaseModelMismatchError: for statistics of other base weights, tokenizer or dtype, or without the edited
                layers.
            ValueError: for statistics of other positions settings.
            EMCIDFormatError: for malformed, damaged or non-finite files.
        """
        dtypes = self._dtypes()
        expected = {
            e.component: (self._encoder_fingerprint(e), e.layers, e.layout.intermediate_size, dtypes[e.component])
            for e in self.encoders
        }
        folder = Path(repo_or_dir)
        if not folder.is_dir():
            names = [statistics_file_name(e.component, layer) for e in self.encoders for layer in e.layers]
            folder = Path(
                snapshot_download(
                    str(repo_or_dir),
                    repo_type="dataset",
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    force_download=force_download,
                    allow_patterns=names,
                )
            )
        loaded = read_statistics_folder(folder, expected, self.config)
        for component, statistics in loaded.items():
            self.statistics.add(component, statistics, self.config)
        return {component: dict(statistics.covariances) for component, statistics in loaded.items()}
