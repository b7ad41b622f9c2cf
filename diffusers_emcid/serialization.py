"""The on-disk format of concept edits: one folder (or Hub repo) that plain diffusers can load too.

A folder holds:
- `pytorch_lora_weights.safetensors`: the stage-2 updates as LoRA factors under diffusers' key names,
  `{component}.text_model.encoder.layers.{l}.mlp.fc2.lora_linear_layer.{down,up}.weight` (the
  `text_model.` level is kept so that old and new transformers both load it), with the PEFT
  `LoraConfig` of each component in the `lora_adapter_metadata` header key (alpha = rank: scale 1)
  and our manifest in the `emcid_manifest` header key;
- `emcid_manifest.json`: the same manifest, for people to read;
- `emcid_vectors.safetensors`: the stage-1 vectors z, one (N, d) tensor per component, so that the
  concepts can be re-solved later without stage 1;
- `README.md`: the model card.

Only safetensors is read or written. Every check of a file happens before any tensor reaches a
pipeline, and a malformed file raises `EMCIDFormatError`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .cache import digest
from .errors import EMCIDFormatError, EMCIDNumericalError
from .stage2 import LowRankDelta, balanced_factors

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MANIFEST_NAME = "emcid_manifest.json"
VECTORS_NAME = "emcid_vectors.safetensors"
CARD_NAME = "README.md"
FILE_NAMES = (WEIGHTS_NAME, MANIFEST_NAME, VECTORS_NAME, CARD_NAME)
MANIFEST_HEADER_KEY = "emcid_manifest"
LORA_METADATA_HEADER_KEY = "lora_adapter_metadata"
FORMAT_NAME = "diffusers-emcid"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "text_encoder_2")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_KEY_PATTERN = re.compile(
    r"(?P<component>text_encoder(?:_2)?)\.text_model\.encoder\.layers\.(?P<layer>0|[1-9][0-9]{0,3})\.mlp\.fc2"
    r"\.lora_linear_layer\.(?P<factor>down|up)\.weight",
    re.ASCII,
)
FLOAT_DTYPES = ("F32", "F16", "BF16")


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose bytes depend only on its content.

    safetensors writes the header's metadata in hash-map order, which changes from call to call; the
    header JSON is re-serialised with sorted keys (and padded with spaces to 8 bytes, as safetensors
    does), so that equal edits give equal files and an unchanged push uploads nothing.
    """
    data = save(tensors, metadata=metadata)
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + length :]


def module_path(layer: int) -> str:
    """The fc2 path used in files and LoRA configs; PEFT matches it as a suffix with or without `text_model.`."""
    return f"encoder.layers.{layer}.mlp.fc2"


def deltas_to_state_dict(deltas: dict[str, dict[int, LowRankDelta]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LoRA factors under diffusers' key names, cast to `dtype`."""
    tensors = {}
    for component, layers in deltas.items():
        for layer, delta in layers.items():
            prefix = f"{component}.text_model.{module_path(layer)}.lora_linear_layer"
            tensors[f"{prefix}.down.weight"] = delta.down.to(dtype).contiguous()
            tensors[f"{prefix}.up.weight"] = delta.up.to(dtype).contiguous()
    return tensors


def lora_adapter_metadata(deltas: dict[str, dict[int, LowRankDelta]]) -> dict[str, Any]:
    """diffusers' flattened `LoraConfig` arguments per component (`"text_encoder.r"`, ...)."""
    metadata: dict[str, Any] = {}
    for component, layers in deltas.items():
        ranks = {module_path(layer): delta.rank for layer, delta in layers.items()}
        config = {
            "r": max(ranks.values()),
            "lora_alpha": max(ranks.values()),
            "rank_pattern": ranks,
            "alpha_pattern": ranks,
            "target_modules": sorted(ranks),
            "lora_dropout": 0.0,
            "init_lora_weights": False,
        }
        metadata.update({f"{component}.{key}": value for key, value in config.items()})
    return metadata


def storage_factors(delta: LowRankDelta, dtype: torch.dtype) -> LowRankDelta:
    """The factors as stored in `dtype`: unchanged in float32; for 16-bit types first split evenly by an SVD,
    so that neither factor leaves the 16-bit range."""
    if dtype == torch.float32:
        return delta
    return balanced_factors(delta).to(dtype)


def max_abs_error(deltas: dict[str, dict[int, LowRankDelta]], stored: dict[str, dict[int, LowRankDelta]]) -> float:
    """Largest absolute difference of any entry between the dense updates of two sets of factors."""
    return max(
        (stored[c][layer].to(torch.float64).dense() - delta.to(torch.float64).dense()).abs().max().item()
        for c, layers in deltas.items()
        for layer, delta in layers.items()
    )


def _atomic_folder_write(folder: Path, write: Callable[[Path], None]) -> None:
    """Writes the folder's files into a temporary sibling folder, then moves them in.

    A new folder appears whole by one rename. Into an existing folder each file is replaced by a
    rename, weights last, and the weights header names the digest of the other files' content, so a
    reader detects a mix of old and new files.
    """
    folder = folder.absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        write(staging)
        if not folder.exists():
            os.replace(staging, folder)
            return
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} exists and is not a folder; choose another path.")
        for name in sorted(os.listdir(staging), key=lambda n: n == WEIGHTS_NAME):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_adapter_folder(
    folder: str | os.PathLike,
    deltas: dict[str, dict[int, LowRankDelta]],
    vectors: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    card: str,
    dtype: torch.dtype,
) -> None:
    """Writes the four files of a concept-edit folder atomically (see the module docstring)."""
    tensors = deltas_to_state_dict(deltas, dtype)
    if not all(torch.isfinite(t).all() for t in [*tensors.values(), *vectors.values()]):
        raise EMCIDNumericalError("Refusing to write concept edits that contain NaN or inf.")
    vector_tensors = {name: vector.float().contiguous() for name, vector in vectors.items()}
    manifest_json = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False)
    companion = digest(manifest_json, {name: t.tolist() for name, t in vector_tensors.items()})
    header = {
        "format": "pt",
        LORA_METADATA_HEADER_KEY: json.dumps(lora_adapter_metadata(deltas), sort_keys=True),
        MANIFEST_HEADER_KEY: manifest_json,
        "emcid_companion_digest": companion,
    }

    def write(staging: Path) -> None:
        (staging / VECTORS_NAME).write_bytes(safetensors_bytes(vector_tensors, {"emcid_companion_digest": companion}))
        (staging / MANIFEST_NAME).write_text(manifest_json + "\n", encoding="utf-8")
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        (staging / WEIGHTS_NAME).write_bytes(safetensors_bytes(tensors, header))

    _atomic_folder_write(Path(folder), write)


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """The metadata and (shape, dtype) of each tensor of a safetensors file, without reading tensor data."""
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            layout = {}
            for key in file.keys():
                tensor_slice = file.get_slice(key)
                layout[key] = (list(tensor_slice.get_shape()), str(tensor_slice.get_dtype()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise EMCIDFormatError(f"{path} is not a readable safetensors file ({error}).") from error
    return metadata, layout


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise EMCIDFormatError(f"{path} could not be read ({error}).") from error


def _parse_manifest(text: str | None, path: Path) -> dict[str, Any]:
    if text is None:
        raise EMCIDFormatError(f"{path} has no '{MANIFEST_HEADER_KEY}' header: it is not a diffusers-emcid adapter.")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, too-long integers, too deep nesting
        raise EMCIDFormatError(f"The manifest in {path} is not valid JSON ({type(error).__name__}: {str(error)[:200]}).") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise EMCIDFormatError(f"The manifest in {path} is not a {FORMAT_NAME} manifest.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EMCIDFormatError(f"The manifest in {path} has an invalid format_version {version!r}.")
    if version > FORMAT_VERSION:
        raise EMCIDFormatError(
            f"{path} was written in format version {version} by diffusers-emcid {manifest.get('library_version')}, newer "
            f"than this one (format {FORMAT_VERSION}); upgrade with: pip install -U diffusers-emcid."
        )
    concepts = manifest.get("concepts")
    if not isinstance(concepts, list) or not concepts or not all(
        isinstance(c, dict) and isinstance(c.get("source"), str) and isinstance(c.get("destination"), str)
        and isinstance(c.get("templates"), list) and all(isinstance(t, str) for t in c["templates"])
        and isinstance(c.get("seed"), int) for c in concepts
    ):
        raise EMCIDFormatError(f"The manifest in {path} has no valid 'concepts' list.")
    components = manifest.get("components")
    if not isinstance(components, dict) or not components or not all(
        name in COMPONENTS and isinstance(info, dict) and isinstance(info.get("layers"), list)
        and all(isinstance(layer, int) and not isinstance(layer, bool) for layer in info["layers"])
        and all(isinstance(info.get(k), int) and info[k] > 0 for k in ("hidden_size", "intermediate_size"))
        for name, info in components.items()
    ):
        raise EMCIDFormatError(f"The manifest in {path} has no valid 'components' description.")
    return manifest


def read_adapter_folder(
    folder: str | os.PathLike,
) -> tuple[dict[str, dict[int, LowRankDelta]], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Reads and checks a concept-edit folder.

    Returns:
        `(deltas, vectors or None when the folder has none, manifest)`.

    Raises:
        EMCIDFormatError: for any malformed, inconsistent or newer-format content.
    """
    folder = Path(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise EMCIDFormatError(f"{folder} has no {WEIGHTS_NAME}; is it a diffusers-emcid adapter folder?")
    metadata, layout = _header(weights_path)
    manifest = _parse_manifest(metadata.get(MANIFEST_HEADER_KEY), weights_path)
    num_concepts = len(manifest["concepts"])

    factors: dict[str, dict[int, dict[str, tuple[list[int], str]]]] = {}
    for key, (shape, dtype) in layout.items():
        match = _KEY_PATTERN.fullmatch(key)
        if match is None:
            raise EMCIDFormatError(f"{weights_path} holds an unexpected tensor {key!r}.")
        if dtype not in FLOAT_DTYPES or len(shape) != 2:
            raise EMCIDFormatError(f"Tensor {key!r} of {weights_path} is {dtype} of shape {shape}; expected a 2-d float matrix.")
        factors.setdefault(match["component"], {}).setdefault(int(match["layer"]), {})[match["factor"]] = (shape, dtype)
    expected = {name: sorted(info["layers"]) for name, info in manifest["components"].items()}
    found = {name: sorted(layers) for name, layers in factors.items()}
    if found != expected:
        raise EMCIDFormatError(f"{weights_path} holds updates of layers {found} but its manifest lists {expected}.")
    for component, layers in factors.items():
        info = manifest["components"][component]
        for layer, pair in layers.items():
            if set(pair) != {"down", "up"}:
                raise EMCIDFormatError(f"{weights_path} lacks the {'up' if 'down' in pair else 'down'} factor of {component} layer {layer}.")
            (rank, d_in), (d_out, rank_up) = pair["down"][0], pair["up"][0]
            if (d_in, d_out) != (info["intermediate_size"], info["hidden_size"]) or rank != rank_up or not 0 < rank <= num_concepts:
                raise EMCIDFormatError(
                    f"The factors of {component} layer {layer} in {weights_path} have shapes {pair['down'][0]} and "
                    f"{pair['up'][0]}, inconsistent with d = {info['hidden_size']}, d_ff = {info['intermediate_size']} and "
                    f"{num_concepts} concepts."
                )

    tensors = _load_tensors(weights_path)
    deltas: dict[str, dict[int, LowRankDelta]] = {}
    for component, layers in factors.items():
        for layer in layers:
            prefix = f"{component}.text_model.{module_path(layer)}.lora_linear_layer"
            up, down = tensors[f"{prefix}.up.weight"].float(), tensors[f"{prefix}.down.weight"].float()
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise EMCIDFormatError(f"The factors of {component} layer {layer} in {weights_path} contain NaN or inf.")
            deltas.setdefault(component, {})[layer] = LowRankDelta(up=up, down=down)

    vectors = None
    vectors_path = folder / VECTORS_NAME
    if vectors_path.is_file():
        vector_metadata, vector_layout = _header(vectors_path)
        if vector_metadata.get("emcid_companion_digest") != metadata.get("emcid_companion_digest"):
            raise EMCIDFormatError(
                f"{vectors_path} does not belong to {weights_path} (an interrupted save into an existing folder?); save again."
            )
        for name, (shape, dtype) in vector_layout.items():
            info = manifest["components"].get(name)
            if info is None or shape != [num_concepts, info["hidden_size"]] or dtype not in FLOAT_DTYPES:
                raise EMCIDFormatError(f"{vectors_path} holds {name!r} of shape {shape} and type {dtype}, which does not fit the manifest.")
        vectors = _load_tensors(vectors_path)
        if not all(torch.isfinite(v).all() for v in vectors.values()):
            raise EMCIDFormatError(f"{vectors_path} contains NaN or inf.")
    return deltas, vectors, manifest
