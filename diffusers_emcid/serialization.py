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

`Manifest` builds, checks and parses the manifest. Only safetensors is read or written. Every check of
a file happens before any tensor reaches a pipeline, and a malformed file raises `EMCIDFormatError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .adapters import lora_config
from .cache import digest
from .config import EMCIDConfig
from .encoders import fc2_module_path
from .errors import EMCIDFormatError, EMCIDNumericalError
from .families import text_encoder_components
from .requests import ConceptEdit
from .stage2 import LowRankDelta, balanced_factors
from .version import __version__

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MANIFEST_NAME = "emcid_manifest.json"
VECTORS_NAME = "emcid_vectors.safetensors"
CARD_NAME = "README.md"
FILE_NAMES = (WEIGHTS_NAME, MANIFEST_NAME, VECTORS_NAME, CARD_NAME)
MANIFEST_HEADER_KEY = "emcid_manifest"
LORA_METADATA_HEADER_KEY = "lora_adapter_metadata"
FORMAT_NAME = "diffusers-emcid"
FORMAT_VERSION = 1
COMPONENTS = text_encoder_components()
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_KEY_PATTERN = re.compile(
    rf"(?P<component>{'|'.join(map(re.escape, COMPONENTS))})\.text_model\."
    r"encoder\.layers\.(?P<layer>0|[1-9][0-9]{0,3})\.mlp\.fc2\.lora_linear_layer\.(?P<factor>down|up)\.weight",
    re.ASCII,
)
FLOAT_DTYPES = ("F32", "F16", "BF16")
LORA_METADATA_FIELDS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "lora_dropout",
    "init_lora_weights",
)
"""The `LoraConfig` fields written per component in the `lora_adapter_metadata` header."""
_CONCEPT_KEYS = ("source", "destination", "templates", "seed", "num_images", "text_alignment", "use_real_noise")


def _warn_unknown_keys(keys: Iterable[Any], known: Iterable[str], where: str) -> None:
    """Logs a warning naming the `keys` outside `known`, which the reader ignores (a newer version may write them)."""
    unknown = sorted({str(key) for key in keys} - set(known))
    if unknown:
        logger.warning(
            "Ignoring unknown keys %s of %s; it was probably written by a newer diffusers-emcid (upgrade with: "
            "pip install -U diffusers-emcid).",
            unknown,
            where,
        )


def _of_type(value: Any, kind: type | tuple[type, ...]) -> Any:
    """`value` if it is a `kind` (and not a bool), else None: for the entries that only inform."""
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _request(concept: dict[str, Any]) -> ConceptEdit:
    """The request a manifest's concept entry describes (its images are not stored, its seed is)."""
    return ConceptEdit(
        concept["source"],
        concept["destination"],
        tuple(concept["templates"]),
        concept["seed"],
        None,
        bool(concept.get("text_alignment", True)),
        bool(concept.get("use_real_noise", False)),
    )


@dataclass
class ComponentManifest:
    """What a manifest records of one edited text encoder.

    Attributes:
        layers: the edited layers.
        hidden_size: d, the width of fc2's output.
        intermediate_size: d_ff, the width of fc2's input.
        base_fingerprint: the fingerprint of the base weights of the edited fc2 modules, if known.
    """

    layers: list[int]
    hidden_size: int
    intermediate_size: int
    base_fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike) -> ComponentManifest:
        """Checks and parses a component entry of the manifest read from `source`; unknown keys are logged and
        ignored.

        Raises:
            EMCIDFormatError: for an entry without a list of int layers and positive sizes.
        """
        if not (
            isinstance(data, dict)
            and isinstance(data.get("layers"), list)
            and all(isinstance(layer, int) and not isinstance(layer, bool) for layer in data["layers"])
            and all(isinstance(data.get(k), int) and data[k] > 0 for k in ("hidden_size", "intermediate_size"))
        ):
            raise EMCIDFormatError(f"The manifest in {source} has no valid 'components' description.")
        _warn_unknown_keys(data, [f.name for f in dataclasses.fields(cls)], f"a component in the manifest in {source}")
        fingerprint = data.get("base_fingerprint")
        return cls(
            list(data["layers"]),
            data["hidden_size"],
            data["intermediate_size"],
            fingerprint if isinstance(fingerprint, str) else None,
        )


@dataclass
class Manifest:
    """The description of concept edits stored with their weights (`emcid_manifest.json` and the weights header).

    Attributes:
        concepts: one entry per request, as `ConceptEdit.to_dict` gives it.
        config: the settings of the run.
        z_layers: component -> the layer whose output its stage-1 vectors live at.
        components: component -> what was edited in it.
        base_model: the name or path of the pipeline the edits were computed on, if known.
        library_version: the diffusers-emcid version that wrote it.
        storage_dtype: the precision of the stored factors.
        storage_max_abs_error: the largest error of a weight update that this precision causes.
    """

    concepts: list[dict[str, Any]]
    config: EMCIDConfig
    z_layers: dict[str, int]
    components: dict[str, ComponentManifest]
    base_model: str | None = None
    library_version: str | None = None
    storage_dtype: str | None = None
    storage_max_abs_error: float | None = None

    @classmethod
    def build(
        cls,
        requests: Sequence[ConceptEdit],
        config: EMCIDConfig,
        z_layers: dict[str, int],
        deltas: dict[str, dict[int, LowRankDelta]],
        base_model: str | None,
        base_fingerprints: dict[str, str],
        storage_dtype: str = "float32",
        storage_max_abs_error: float = 0.0,
    ) -> Manifest:
        """The manifest of edits: `deltas` gives each component's layers and sizes, `base_fingerprints` its base
        weights' fingerprint."""
        components = {}
        for component, layers in deltas.items():
            any_delta = next(iter(layers.values()))
            components[component] = ComponentManifest(
                sorted(layers), any_delta.up.shape[0], any_delta.down.shape[1], base_fingerprints.get(component)
            )
        return cls(
            concepts=[request.to_dict() for request in requests],
            config=config,
            z_layers=z_layers,
            components=components,
            base_model=base_model,
            library_version=__version__,
            storage_dtype=storage_dtype,
            storage_max_abs_error=storage_max_abs_error,
        )

    @property
    def base_fingerprints(self) -> dict[str, str]:
        """Component -> the fingerprint of its edited base weights, where known."""
        return {name: c.base_fingerprint for name, c in self.components.items() if c.base_fingerprint is not None}

    def requests(self) -> list[ConceptEdit]:
        """The concepts as requests, with their recorded seeds (images are not stored)."""
        return [_request(concept) for concept in self.concepts]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "base_model": self.base_model,
            "concepts": [dict(concept) for concept in self.concepts],
            "config": self.config.to_dict(),
            "z_layers": dict(self.z_layers),
            "components": {name: component.to_dict() for name, component in self.components.items()},
            "storage_dtype": self.storage_dtype,
            "storage_max_abs_error": self.storage_max_abs_error,
        }

    def to_json(self) -> str:
        """The manifest as written in files: indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike) -> Manifest:
        """Checks and parses a manifest read from `source` (named in errors); unknown keys, here and in the config,
        concepts and components, are logged and ignored.

        Raises:
            EMCIDFormatError: for another format, a newer format version, or invalid concepts, components, z layers
                or settings.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise EMCIDFormatError(f"The manifest in {source} is not a {FORMAT_NAME} manifest.")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise EMCIDFormatError(f"The manifest in {source} has an invalid format_version {version!r}.")
        if version > FORMAT_VERSION:
            raise EMCIDFormatError(
                f"{source} was written in format version {version} by diffusers-emcid {data.get('library_version')}, "
                f"newer than this one (format {FORMAT_VERSION}); upgrade with: pip install -U diffusers-emcid."
            )
        _warn_unknown_keys(
            data, ["format", "format_version", *(f.name for f in dataclasses.fields(cls))], f"the manifest in {source}"
        )
        concepts = data.get("concepts")
        if (
            not isinstance(concepts, list)
            or not concepts
            or not all(
                isinstance(c, dict)
                and isinstance(c.get("source"), str)
                and isinstance(c.get("destination"), str)
                and isinstance(c.get("templates"), list)
                and all(isinstance(t, str) for t in c["templates"])
                and isinstance(c.get("seed"), int)
                for c in concepts
            )
        ):
            raise EMCIDFormatError(f"The manifest in {source} has no valid 'concepts' list.")
        _warn_unknown_keys(
            (key for c in concepts for key in c), _CONCEPT_KEYS, f"the concepts of the manifest in {source}"
        )
        concepts = [{key: value for key, value in c.items() if key in _CONCEPT_KEYS} for c in concepts]
        components = data.get("components")
        if not isinstance(components, dict) or not components or not set(components) <= set(COMPONENTS):
            raise EMCIDFormatError(f"The manifest in {source} has no valid 'components' description.")
        components = {name: ComponentManifest.from_dict(info, source) for name, info in components.items()}
        known = [f.name for f in dataclasses.fields(EMCIDConfig)]
        try:
            settings = dict(data.get("config") or {})
            _warn_unknown_keys(settings, known, f"the config in the manifest in {source}")
            config = EMCIDConfig(**{k: v for k, v in settings.items() if k in known})
            for concept in concepts:
                _request(concept)  # every entry must make a valid request
        except (TypeError, ValueError) as error:
            raise EMCIDFormatError(
                f"The manifest in {source} describes invalid concepts or settings: {error}"
            ) from error
        z_layers = data.get("z_layers")
        if (
            not isinstance(z_layers, dict)
            or set(z_layers) != set(components)
            or not all(isinstance(z, int) and not isinstance(z, bool) for z in z_layers.values())
        ):
            raise EMCIDFormatError(f"The manifest in {source} has no valid z_layers for {sorted(components)}.")
        return cls(
            concepts=concepts,
            config=config,
            z_layers=dict(z_layers),
            components=components,
            base_model=_of_type(data.get("base_model"), str),
            library_version=_of_type(data.get("library_version"), str),
            storage_dtype=_of_type(data.get("storage_dtype"), str),
            storage_max_abs_error=_of_type(data.get("storage_max_abs_error"), (int, float)),
        )

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike) -> Manifest:
        """Parses the JSON text of a manifest read from `source` (see `from_dict`).

        Raises:
            EMCIDFormatError: for text that is not JSON, or not a valid manifest.
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, too-long integers, too deep nesting
            raise EMCIDFormatError(
                f"The manifest in {source} is not valid JSON ({type(error).__name__}: {str(error)[:200]})."
            ) from error
        return cls.from_dict(data, source)


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


def lora_key_prefix(component: str, layer: int) -> str:
    """The start of the keys of a layer's LoRA factors in files, `{prefix}.{down,up}.weight`."""
    return f"{component}.text_model.{fc2_module_path(layer)}.lora_linear_layer"


def deltas_to_state_dict(deltas: dict[str, dict[int, LowRankDelta]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LoRA factors under diffusers' key names, cast to `dtype`."""
    tensors = {}
    for component, layers in deltas.items():
        for layer, delta in layers.items():
            prefix = lora_key_prefix(component, layer)
            tensors[f"{prefix}.down.weight"] = delta.down.to(dtype).contiguous()
            tensors[f"{prefix}.up.weight"] = delta.up.to(dtype).contiguous()
    return tensors


def lora_adapter_metadata(deltas: dict[str, dict[int, LowRankDelta]]) -> dict[str, Any]:
    """The `LORA_METADATA_FIELDS` of each component's `lora_config`, flattened as diffusers writes
    `peft_config.to_dict()` (`"text_encoder.r"`, ...)."""
    metadata: dict[str, Any] = {}
    for component, layers in deltas.items():
        config = lora_config(layers).to_dict()
        config["target_modules"] = sorted(config["target_modules"])  # a set in LoraConfig
        metadata.update({f"{component}.{key}": config[key] for key in LORA_METADATA_FIELDS})
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


def push_folder(
    write: Callable[[Path], Path],
    repo_id: str,
    repo_type: str,
    commit_message: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    delete_patterns: list[str] | None = None,
) -> str:
    """Writes a folder with `write(staging_dir) -> folder` and uploads it to a Hub repo in one commit, creating the
    repo (and the branch `revision`) if needed; files matching `delete_patterns` that the commit does not bring are
    deleted. Returns the URL of the commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
    with tempfile.TemporaryDirectory() as staging:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=write(Path(staging)),
            repo_type=repo_type,
            revision=revision,
            delete_patterns=delete_patterns,
            commit_message=commit_message,
        )
    return info.commit_url


def atomic_folder_write(folder: Path, write: Callable[[Path], None]) -> None:
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
    manifest: Manifest,
    card: str,
    dtype: torch.dtype,
) -> None:
    """Writes the four files of a concept-edit folder atomically (see the module docstring)."""
    tensors = deltas_to_state_dict(deltas, dtype)
    if not all(torch.isfinite(t).all() for t in [*tensors.values(), *vectors.values()]):
        raise EMCIDNumericalError("Refusing to write concept edits that contain NaN or inf.")
    vector_tensors = {name: vector.float().contiguous() for name, vector in vectors.items()}
    manifest_json = manifest.to_json()
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

    atomic_folder_write(Path(folder), write)


def read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
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


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise EMCIDFormatError(f"{path} could not be read ({error}).") from error


def read_adapter_folder(
    folder: str | os.PathLike,
) -> tuple[dict[str, dict[int, LowRankDelta]], dict[str, torch.Tensor] | None, Manifest]:
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
    metadata, layout = read_header(weights_path)
    if MANIFEST_HEADER_KEY not in metadata:
        raise EMCIDFormatError(
            f"{weights_path} has no '{MANIFEST_HEADER_KEY}' header: it is not a diffusers-emcid adapter."
        )
    manifest = Manifest.from_json(metadata[MANIFEST_HEADER_KEY], weights_path)
    num_concepts = len(manifest.concepts)

    factors: dict[str, dict[int, dict[str, tuple[list[int], str]]]] = {}
    for key, (shape, dtype) in layout.items():
        match = _KEY_PATTERN.fullmatch(key)
        if match is None:
            raise EMCIDFormatError(f"{weights_path} holds an unexpected tensor {key!r}.")
        if dtype not in FLOAT_DTYPES or len(shape) != 2:
            raise EMCIDFormatError(
                f"Tensor {key!r} of {weights_path} is {dtype} of shape {shape}; expected a 2-d float matrix."
            )
        factors.setdefault(match["component"], {}).setdefault(int(match["layer"]), {})[match["factor"]] = (shape, dtype)
    expected = {name: sorted(info.layers) for name, info in manifest.components.items()}
    found = {name: sorted(layers) for name, layers in factors.items()}
    if found != expected:
        raise EMCIDFormatError(f"{weights_path} holds updates of layers {found} but its manifest lists {expected}.")
    for component, layers in factors.items():
        info = manifest.components[component]
        for layer, pair in layers.items():
            if set(pair) != {"down", "up"}:
                raise EMCIDFormatError(
                    f"{weights_path} lacks the {'up' if 'down' in pair else 'down'} factor of {component} "
                    f"layer {layer}."
                )
            (rank, d_in), (d_out, rank_up) = pair["down"][0], pair["up"][0]
            sizes = (info.intermediate_size, info.hidden_size)
            if (d_in, d_out) != sizes or rank != rank_up or not 0 < rank <= num_concepts:
                raise EMCIDFormatError(
                    f"The factors of {component} layer {layer} in {weights_path} have shapes {pair['down'][0]} and "
                    f"{pair['up'][0]}, inconsistent with d = {info.hidden_size}, d_ff = {info.intermediate_size} and "
                    f"{num_concepts} concepts."
                )

    tensors = read_tensors(weights_path)
    deltas: dict[str, dict[int, LowRankDelta]] = {}
    for component, layers in factors.items():
        for layer in layers:
            prefix = lora_key_prefix(component, layer)
            up, down = tensors[f"{prefix}.up.weight"].float(), tensors[f"{prefix}.down.weight"].float()
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise EMCIDFormatError(
                    f"The factors of {component} layer {layer} in {weights_path} contain NaN or inf."
                )
            deltas.setdefault(component, {})[layer] = LowRankDelta(up=up, down=down)

    vectors = None
    vectors_path = folder / VECTORS_NAME
    if vectors_path.is_file():
        vector_metadata, vector_layout = read_header(vectors_path)
        if vector_metadata.get("emcid_companion_digest") != metadata.get("emcid_companion_digest"):
            raise EMCIDFormatError(
                f"{vectors_path} does not belong to {weights_path} (an interrupted save into an existing folder?); "
                "save again."
            )
        for name, (shape, dtype) in vector_layout.items():
            info = manifest.components.get(name)
            if info is None or shape != [num_concepts, info.hidden_size] or dtype not in FLOAT_DTYPES:
                raise EMCIDFormatError(
                    f"{vectors_path} holds {name!r} of shape {shape} and type {dtype}, which does not fit the manifest."
                )
        vectors = read_tensors(vectors_path)
        if not all(torch.isfinite(v).all() for v in vectors.values()):
            raise EMCIDFormatError(f"{vectors_path} contains NaN or inf.")
    return deltas, vectors, manifest
