"""Content-addressed on-disk caches of stage-1 vectors and key statistics.

A file's name is a digest of everything its content depends on, so a changed model, prompt, seed,
image or setting never finds a stale entry, and an interrupted run finds every entry it finished.
Writes go to a temporary file that is renamed into place, so a file is either whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from huggingface_hub import constants
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

CACHE_FORMAT_VERSION = 1
CACHE_ENV_VAR = "EMCID_CACHE"


def atomic_file_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Writes the file `path` atomically: `write(temporary)` fills a temporary file in the same folder, which one rename
    then moves to `path`, so that an interrupted write leaves the previous file (or none) and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def default_cache_dir() -> Path:
    """`$EMCID_CACHE`, else `emcid/` under the Hugging Face cache home (`$HF_HOME`)."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path(constants.HF_HOME) / "emcid")


def digest(*parts: Any) -> str:
    """sha256 hex digest of a canonical JSON rendering of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of named tensors, in the order given."""
    hasher = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def fingerprint_module(module: nn.Module) -> str:
    """Fingerprint of a module's base weights.

    PEFT adapter weights are skipped and `base_layer.` is dropped from names, so a module with an
    (unfused) adapter has the fingerprint of its base model.
    """
    state = module.state_dict()
    return fingerprint_tensors(
        (name.replace("base_layer.", ""), state[name]) for name in sorted(state) if "lora_" not in name
    )


class ModuleFingerprints:
    """Fingerprints of modules, recomputed only when a weight tensor was replaced or modified in place.

    PyTorch bumps a tensor's version counter on every in-place change, so (storage pointer, version)
    of every weight tells whether a fingerprint taken earlier still holds, without reading the weights.
    """

    def __init__(self) -> None:
        self._known: dict[int, tuple[tuple, str]] = {}

    def __call__(self, module: nn.Module) -> str:
        stamp = tuple((name, t.data_ptr(), t._version, t.device.type) for name, t in module.state_dict().items())
        known = self._known.get(id(module))
        if known is None or known[0] != stamp:
            known = (stamp, fingerprint_module(module))
            self._known[id(module)] = known
        return known[1]


def tokenizer_digest(tokenizer: Any) -> str:
    """How a tokenizer splits text: its full definition where it has one, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return digest(sorted(tokenizer.get_vocab().items()))
    definition = json.loads(backend.to_str())  # parsed, so that digest sorts its maps (written in hash order)
    return digest({k: v for k, v in definition.items() if k not in ("truncation", "padding")})  # per-call settings


def text_encoder_fingerprint(fingerprints: ModuleFingerprints, model: nn.Module, tokenizer: Any) -> str:
    """What key statistics depend on: a text encoder's weights and its tokenizer."""
    return digest(fingerprints(model), tokenizer_digest(tokenizer))


def pipeline_digest(
    pipe: Any, text_encoders: dict[str, tuple[nn.Module, Any]], fingerprints: ModuleFingerprints
) -> str:
    """Everything of a pipeline that a stage-1 vector depends on: the weights of the edited text encoders
    (`{component: (model, tokenizer)}`), UNet and VAE, their configs, the scheduler and the tokenizers."""
    modules = {name: model for name, (model, _) in text_encoders.items()} | {"unet": pipe.unet, "vae": pipe.vae}
    weights = {name: fingerprints(module) for name, module in modules.items()}
    configs = [dict(module.config) for module in (pipe.unet, pipe.vae, pipe.scheduler)]
    configs = [{k: v for k, v in c.items() if k != "_use_default_values"} for c in configs]  # its order varies
    encoders = [(model.config.to_dict(), tokenizer_digest(tokenizer)) for model, tokenizer in text_encoders.values()]
    return digest(weights, configs, type(pipe.scheduler).__name__, encoders)


class TensorCache:
    """A folder of safetensors files addressed by key, one subfolder per kind of entry.

    Args:
        root: the cache folder; `None` means `default_cache_dir()`.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def load(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """Returns `(tensors, metadata)` of an entry, or `None` if it is absent or unreadable."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}
        except (SafetensorError, OSError, ValueError):
            return None

    def save(
        self, kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> Path:
        """Writes an entry atomically (`atomic_file_write`) and returns its path."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        header = {"format_version": str(CACHE_FORMAT_VERSION), **(metadata or {})}
        return atomic_file_write(self.path(kind, key), lambda temporary: save_file(tensors, temporary, metadata=header))

    def find(self, kind: str, prefix: str) -> list[Path]:
        """Entries of `kind` whose key starts with `prefix`, oldest first."""
        folder = self.root / kind
        if not folder.is_dir():
            return []
        return sorted(folder.glob(f"{prefix}*.safetensors"), key=lambda p: p.stat().st_mtime)
