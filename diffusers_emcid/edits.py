"""`ConceptEdits`: the result of an EMCID run, how it goes into and out of a pipeline, and how it is shared."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .adapters import adapter_names, check_adapter_name, delete_lora_adapter, inject_lora_deltas
from .cache import fingerprint_tensors
from .card import base_model_license, render_model_card
from .config import EMCIDConfig
from .encoders import TextEncoderLayout, find_text_encoder_layout
from .errors import BaseModelMismatchError
from .kohya import KOHYA_WEIGHTS_NAME, kohya_factors, write_kohya_file
from .requests import ConceptEdit
from .serialization import (
    FILE_NAMES,
    STORAGE_DTYPES,
    Manifest,
    max_abs_error,
    push_folder,
    read_adapter_folder,
    storage_factors,
    write_adapter_folder,
)
from .stage2 import LowRankDelta

logger = logging.getLogger(__name__)


def base_weights_fingerprint(layout: TextEncoderLayout, layers: Iterable[int]) -> str:
    """Fingerprint of the base weights of the fc2 modules of `layers` (adapters ignored; names by layer
    index, so it does not depend on the transformers version)."""
    return fingerprint_tensors(
        (f"layer{layer}.{name}", tensor)
        for layer in sorted(layers)
        for name, tensor in sorted(layout.fc2(layer).state_dict().items())
    )


def _shareable_model_id(base_model: str | None) -> str | None:
    """A Hub model id, or `None` for a local path (which must not leave the user's machine) or anything else that is
    no valid Hub id."""
    if not base_model or os.path.isabs(base_model) or os.path.exists(base_model) or base_model.startswith((".", "~")):
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def _storage_dtype_name(dtype: torch.dtype | str) -> str:
    """The `STORAGE_DTYPES` name of a storage precision given as a torch dtype or its name.

    Raises:
        ValueError: for another precision.
    """
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a storage precision; use one of {sorted(STORAGE_DTYPES)}.")
    return name


def _stage2_settings(config: EMCIDConfig) -> tuple:
    """What stage 2's result depends on besides the requests, vectors and statistics."""
    return (
        config.edit_weight,
        config.preservation_weight,
        config.preservation_weight_2,
        config.residual,
        config.stage2_keys,
    )


@dataclass
class ConceptEdits:
    """A set of concept edits: stage-1 vectors and the stage-2 updates of each edited text encoder.

    Attributes:
        requests: the N edited concepts.
        vectors: pipeline component -> the stage-1 vectors z, (N, d), one row per request.
        deltas: pipeline component (`"text_encoder"`) -> layer index -> `LowRankDelta` of that layer's fc2.
        config: the settings of the run.
        z_layers: component -> the layer whose output its vectors live at.
        base_model: the name or path of the pipeline the edits were computed on, if known.
        base_fingerprints: component -> fingerprint of the base weights of its edited fc2 modules.
    """

    requests: list[ConceptEdit]
    vectors: dict[str, torch.Tensor]
    deltas: dict[str, dict[int, LowRankDelta]]
    config: EMCIDConfig
    z_layers: dict[str, int]
    base_model: str | None = None
    base_fingerprints: dict[str, str] = field(default_factory=dict)
    stage1_losses: list[torch.Tensor] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.base_model, os.PathLike):  # a pipeline loaded from a `Path` is named by it
            self.base_model = os.fspath(self.base_model)

    def __len__(self) -> int:
        return len(self.requests)

    def __repr__(self) -> str:
        pairs = ", ".join(f"{r.source!r}->{r.destination!r}" for r in self.requests[:5])
        more = f", ... ({len(self)} in all)" if len(self) > 5 else ""
        layers = {component: sorted(d) for component, d in self.deltas.items()}
        return f"ConceptEdits([{pairs}{more}], layers={layers})"

    @property
    def concepts(self) -> list[tuple[str, str]]:
        """The (source, destination) pairs."""
        return [(request.source, request.destination) for request in self.requests]

    # ------------------------------------------------------------------ pipeline

    def check_fits(self, pipe: DiffusionPipeline, force: bool = False) -> None:
        """Raises `BaseModelMismatchError` if the edits do not fit `pipe` (components, layers, shapes), or were
        made on other base weights (fingerprint) unless `force`."""
        for component, deltas in self.deltas.items():
            if getattr(pipe, component, None) is None:
                raise BaseModelMismatchError(
                    f"These edits change a {component}, which {type(pipe).__name__} does not have."
                )
            layout = find_text_encoder_layout(getattr(pipe, component), component)
            for layer, delta in deltas.items():
                if not 0 <= layer < layout.num_layers:
                    raise BaseModelMismatchError(
                        f"These edits change layer {layer} of the {component}, which has only {layout.num_layers} "
                        "layers; they were made for another model."
                    )
                weight = layout.fc2(layer).weight
                if (delta.up.shape[0], delta.down.shape[1]) != tuple(weight.shape):
                    raise BaseModelMismatchError(
                        f"The update of {component} layer {layer} has shape {(delta.up.shape[0], delta.down.shape[1])} "
                        f"but its fc2 weight is {tuple(weight.shape)}; these edits were made for another model."
                    )
            expected = self.base_fingerprints.get(component)
            if expected and not force and base_weights_fingerprint(layout, deltas) != expected:
                raise BaseModelMismatchError(
                    f"These edits were made on other base weights of the {component} (base model "
                    f"{self.base_model or 'unknown'}); applying them elsewhere gives unpredictable results. Pass "
                    "force=True to apply them anyway."
                )

    def apply(self, pipe: DiffusionPipeline, name: str = "emcid", force: bool = False) -> None:
        """Adds the edits to `pipe` as the PEFT LoRA adapter `name` on the edited fc2 layers.

        Other active adapters stay active. Nothing is changed if the edits do not fit the pipeline or
        the name is taken.

        Args:
            pipe: the pipeline.
            name: the adapter name.
            force: apply even if the pipeline's base weights differ from those the edits were made on.
        """
        check_adapter_name(name)
        self.check_fits(pipe, force)
        for component in self.deltas:
            if name in adapter_names(getattr(pipe, component)):
                raise ValueError(f"The pipeline's {component} already has an adapter named {name!r}; use another name.")
        done: list[str] = []
        try:
            for component, deltas in self.deltas.items():
                inject_lora_deltas(find_text_encoder_layout(getattr(pipe, component), component), deltas, name)
                done.append(component)
        except Exception:
            for component in done:
                delete_lora_adapter(getattr(pipe, component), name)
            raise

    def remove(self, pipe: DiffusionPipeline, name: str = "emcid") -> None:
        """Deletes the adapter `name` that `apply` added; the text encoders are as before, bit for bit."""
        missing = [c for c in self.deltas if name not in adapter_names(getattr(pipe, c))]
        if missing:
            raise ValueError(f"The pipeline's {missing[0]} has no adapter named {name!r}; nothing to remove.")
        for component in self.deltas:
            delete_lora_adapter(getattr(pipe, component), name)

    # ------------------------------------------------------------------ combining

    def check_resolvable(self) -> None:
        """Raises `ValueError` unless the stage-1 vectors are at hand, so that stage 2 can be solved again."""
        if set(self.vectors) != set(self.deltas):
            raise ValueError(
                f"{self!r} carries no stage-1 vectors (its folder had no emcid_vectors.safetensors), so it cannot be "
                "re-solved."
            )

    def check_solvable_with(self, config: EMCIDConfig, z_layers: dict[str, int]) -> None:
        """Raises `ValueError` unless stage 2 under `config`, with vectors at `z_layers`, is the stage 2 of these edits
        (the same alpha, lambdas, residual and keys, the same layers)."""
        self.check_resolvable()
        if _stage2_settings(config) != _stage2_settings(self.config):
            raise ValueError(
                f"These edits were solved with other stage-2 settings (alpha, lambda, lambda_2, residual, keys: "
                f"{_stage2_settings(self.config)}, the editor has {_stage2_settings(config)}); re-solve them with an "
                "editor built with their config: EMCIDEditor(pipe, edits.config)."
            )
        if z_layers != self.z_layers:
            raise ValueError(
                f"These edits' vectors live at layers {self.z_layers}, but the editor's config gives {z_layers}."
            )

    def concatenate(self, other: "ConceptEdits") -> tuple[list[ConceptEdit], dict[str, torch.Tensor]]:
        """The requests and stage-1 vectors of both edit sets, for one joint stage 2 (`EMCIDEditor.merge`).

        Raises:
            ValueError: if either has no vectors, or they were solved with other stage-2 settings or layers.
        """
        self.check_resolvable()
        other.check_resolvable()
        if _stage2_settings(self.config) != _stage2_settings(other.config):
            raise ValueError(
                f"The two edit sets were solved with other stage-2 settings (alpha, lambda, lambda_2, residual, keys: "
                f"{_stage2_settings(self.config)} and {_stage2_settings(other.config)}); re-solve one with the other's "
                "config first."
            )
        layers = lambda edits: (edits.z_layers, {c: sorted(d) for c, d in edits.deltas.items()})  # noqa: E731
        if layers(self) != layers(other):
            raise ValueError(
                f"The two edit sets change different layers ({layers(self)} and {layers(other)}); they cannot be "
                "merged."
            )
        vectors = {c: torch.cat([self.vectors[c], other.vectors[c]]) for c in self.vectors}
        return self.requests + other.requests, vectors

    def select_without(self, sources: Iterable[str]) -> tuple[list[ConceptEdit], dict[str, torch.Tensor]]:
        """The requests and stage-1 vectors of the concepts whose source is not among `sources` (case-insensitive),
        for `EMCIDEditor.without`.

        Raises:
            ValueError: for a source these edits do not have, or if no concept would be left.
        """
        self.check_resolvable()
        drop = {" ".join(s.lower().split()) for s in sources}
        keep = [i for i, r in enumerate(self.requests) if " ".join(r.source.lower().split()) not in drop]
        unknown = drop - {" ".join(r.source.lower().split()) for r in self.requests}
        if unknown:
            raise ValueError(
                f"No concept with source(s) {sorted(unknown)} in these edits; they edit "
                f"{[r.source for r in self.requests]}."
            )
        if not keep:
            raise ValueError("Removing these sources leaves no concept; use remove()/unload instead.")
        return [self.requests[i] for i in keep], {c: v[keep] for c, v in self.vectors.items()}

    # ------------------------------------------------------------------ files and the Hub

    def manifest(
        self, storage_dtype: str = "float32", storage_error: float = 0.0, shareable: bool = False
    ) -> dict[str, Any]:
        """The JSON-ready description stored next to the weights (`Manifest.to_dict`)."""
        return self._manifest(storage_dtype, storage_error, shareable).to_dict()

    def _manifest(self, storage_dtype: str, storage_error: float, shareable: bool) -> Manifest:
        base_model = _shareable_model_id(self.base_model) if shareable else self.base_model
        return Manifest.build(
            self.requests,
            self.config,
            self.z_layers,
            self.deltas,
            base_model,
            self.base_fingerprints,
            storage_dtype=storage_dtype,
            storage_max_abs_error=storage_error,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> Path:
        """Writes the edits to a folder that `from_pretrained`, `pipe.load_concept_edits` and plain
        `pipe.load_lora_weights` read. The write is atomic: an interrupted save leaves no half-written adapter.
        The model card names the base model only by its Hub id, with that model's license (looked up on the Hub or
        in the local cache), never by a local path; the manifest keeps a local path, for its owner.
        `export_kohya` writes the file AUTOMATIC1111 and Forge load.

        Args:
            save_directory: the folder (created if needed).
            dtype: storage precision of the factors, `torch.float32` (exact), `float16` or `bfloat16`; the largest
                resulting error of a weight update is logged and recorded in the manifest.

        Returns:
            The folder.
        """
        return self._write(Path(save_directory), dtype, shareable=False)

    def _write(
        self,
        folder: Path,
        dtype: torch.dtype | str,
        shareable: bool,
        token: str | None = None,
        kohya_file: str | None = None,
    ) -> Path:
        """Writes the folder; its card names the base model only by Hub id (never a local path), with that model's
        license, and points to `kohya_file` if the caller adds one."""
        dtype_name = _storage_dtype_name(dtype)
        stored = {
            component: {layer: storage_factors(delta, STORAGE_DTYPES[dtype_name]) for layer, delta in ds.items()}
            for component, ds in self.deltas.items()
        }
        error = max_abs_error(self.deltas, stored) if dtype_name != "float32" else 0.0
        if error:
            logger.warning("Stored the edits in %s: largest absolute error of a weight update %.3g.", dtype_name, error)
        manifest = self._manifest(dtype_name, error, shareable)
        hub_id = _shareable_model_id(self.base_model)
        card = render_model_card(
            self.requests,
            hub_id,
            {c: sorted(d) for c, d in self.deltas.items()},
            base_model_license(hub_id, token),
            kohya_file,
        )
        write_adapter_folder(folder, stored, self.vectors, manifest, card, STORAGE_DTYPES[dtype_name])
        return folder

    def export_kohya(self, path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> Path:
        """Writes the edits as one kohya-format LoRA file, which AUTOMATIC1111, Forge, ComfyUI and diffusers'
        `load_lora_weights` all load (see `diffusers_emcid.kohya`). The write is atomic.

        Args:
            path: the `.safetensors` file; the UIs name the LoRA after it (`<lora:name:1>`).
            dtype: storage precision of the factors, `torch.float32` (default), `float16` or `bfloat16`; the factors
                are balanced in every case, so that 16-bit storage and the UIs' float16 arithmetic do not overflow.

        Returns:
            The file.
        """
        dtype_name = _storage_dtype_name(dtype)
        factors = kohya_factors(self.deltas, STORAGE_DTYPES[dtype_name])
        error = max_abs_error(self.deltas, factors)
        if dtype_name != "float32":
            logger.warning(
                "Exported the edits in %s: largest absolute error of a weight update %.3g.", dtype_name, error
            )
        return write_kohya_file(path, factors, self._manifest(dtype_name, error, shareable=True))

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> "ConceptEdits":
        """Reads edits from a local folder or a Hub model repo (safetensors only).

        Raises:
            EMCIDFormatError: for a malformed, incomplete or newer-format adapter.
        """
        folder = Path(repo_or_dir)
        if not folder.is_dir():
            folder = Path(
                snapshot_download(
                    str(repo_or_dir),
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    force_download=force_download,
                    allow_patterns=list(FILE_NAMES),
                )
            )
        deltas, vectors, manifest = read_adapter_folder(folder)
        return cls(
            requests=manifest.requests(),
            vectors=vectors or {},
            deltas=deltas,
            config=manifest.config,
            z_layers=manifest.z_layers,
            base_model=manifest.base_model,
            base_fingerprints=manifest.base_fingerprints,
        )

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        dtype: torch.dtype | str = torch.float32,
    ) -> str:
        """Uploads the edits (weights, manifest, vectors, model card, and the kohya-format file
        `emcid_kohya.safetensors` for AUTOMATIC1111 and Forge) to a Hub model repo in one commit.

        The repo (and the branch `revision`) is created if needed. Local paths are not written into the
        pushed manifest or card.

        Returns:
            The URL of the commit.
        """

        def write(staging: Path) -> Path:
            folder = self._write(staging / "edits", dtype, shareable=True, token=token, kohya_file=KOHYA_WEIGHTS_NAME)
            self.export_kohya(folder / KOHYA_WEIGHTS_NAME, dtype)
            return folder

        return push_folder(
            write,
            repo_id,
            "model",
            commit_message or f"Add {len(self)} EMCID concept edit(s)",
            private,
            token,
            revision,
        )
