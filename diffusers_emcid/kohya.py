"""The kohya (sd-scripts) LoRA format of concept edits: one safetensors file that diffusers, ComfyUI, AUTOMATIC1111
and Forge all load.

Keys are `{prefix}_text_model_encoder_layers_{l}_mlp_fc2.lora_{down,up}.weight`, with the prefix `lora_te` in a
family with one text encoder (SD 1.x/2.x) and `lora_te1`, `lora_te2`, ... in one with several (SD-XL), in the
family's encoder order. What the loaders do with the factors decides the rest:
- there are no `.alpha` tensors: AUTOMATIC1111, Forge, ComfyUI, kohya's scripts and diffusers then apply
  `up @ down` at scale 1 (alpha = rank). diffusers refuses `.alpha` next to a `lora_adapter_metadata` header, and
  turns per-layer alphas into an `alpha_pattern` that matches no module of transformers 5's flattened
  `CLIPTextModel` (a rank-3 layer next to rank-2 ones got scale 2/3 in diffusers 0.42);
- every layer has the same rank, zero-padded to the largest one (exact: the padded directions are zero): diffusers
  before 0.40 gave a checkpoint without alphas one `lora_alpha` per text encoder, the first layer's rank, so layers
  of another rank got scale `lora_alpha / rank`;
- the factors are balanced by an SVD (`stage2.balanced_factors`), stored or not in 16 bits: AUTOMATIC1111
  multiplies them in float16, where an unbalanced pair can overflow.

The header holds what AUTOMATIC1111 and kohya's tools read (`ss_network_module`, `ss_network_dim`,
`ss_network_alpha` = dim, `ss_base_model_version`, `ss_v2`; AUTOMATIC1111 hides an SD-XL LoRA unless
`ss_base_model_version` starts with `sdxl_`, and tells SD 2.x by `ss_v2`) and the edits' manifest.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import atomic_file_write
from .encoders import fc2_module_path
from .errors import EMCIDNumericalError
from .families import FAMILIES, family_of_components
from .serialization import MANIFEST_HEADER_KEY, Manifest, safetensors_bytes
from .stage2 import LowRankDelta, balanced_factors

KOHYA_WEIGHTS_NAME = "emcid_kohya.safetensors"
"""The kohya-format file of a pushed Hub repo, next to the diffusers-format folder."""
NETWORK_MODULE = "networks.lora"
"""kohya's `ss_network_module` of a plain LoRA."""


def kohya_prefixes(components: Iterable[str]) -> dict[str, str]:
    """Component -> the start of its keys: `lora_te` in a family with one text encoder, else `lora_te{i}` for the
    i-th encoder (1-based), as kohya names SD-XL's.

    Raises:
        ValueError: if no family has exactly these text encoders.
    """
    components = set(components)
    family = family_of_components(components)
    if family is not None:
        slots = [slot.component for slot in family.text_encoders]
        if len(slots) == 1:
            return {slots[0]: "lora_te"}
        return {component: f"lora_te{index}" for index, component in enumerate(slots, start=1)}
    known = "; ".join(f"{f.description}: {[s.component for s in f.text_encoders]}" for f in FAMILIES.values())
    raise ValueError(
        f"Edits of the text encoders {sorted(components)} fit no supported family, whose edits change all of its "
        f"text encoders ({known}); edits that an EMCIDEditor made always do."
    )


def kohya_key_prefix(prefix: str, layer: int) -> str:
    """The start of the keys of a layer's factors, `{...}.lora_down.weight` and `{...}.lora_up.weight`:
    `lora_te_text_model_encoder_layers_3_mlp_fc2` for `prefix="lora_te"`, `layer=3`."""
    return f"{prefix}_text_model_{fc2_module_path(layer).replace('.', '_')}"


def base_model_version(deltas: dict[str, dict[int, LowRankDelta]]) -> str:
    """kohya's `ss_base_model_version` of the edited model: its family's (`PipelineFamily.kohya_version`), or that of
    the family's variant with the first text encoder's width.

    Raises:
        ValueError: if no family has exactly the edited text encoders.
    """
    kohya_prefixes(deltas)  # refuses components of no family
    family = family_of_components(deltas)
    first = deltas[family.text_encoders[0].component]
    return family.kohya_versions_by_width.get(next(iter(first.values())).up.shape[0], family.kohya_version)


def kohya_factors(deltas: dict[str, dict[int, LowRankDelta]], dtype: torch.dtype) -> dict[str, dict[int, LowRankDelta]]:
    """The factors as stored: balanced, zero-padded to the largest rank of all layers and cast to `dtype`.

    Args:
        deltas: component -> layer -> update, `up` (d, r_l) and `down` (r_l, d_ff).
        dtype: the storage precision.

    Returns:
        The same layers, each with `up` (d, R) and `down` (R, d_ff) for one R.

    Raises:
        EMCIDNumericalError: for updates with NaN or inf, or too large for `dtype`.
    """
    if not all(torch.isfinite(t).all() for layers in deltas.values() for d in layers.values() for t in (d.up, d.down)):
        raise EMCIDNumericalError("Refusing to write concept edits that contain NaN or inf.")
    balanced = {c: {layer: balanced_factors(d) for layer, d in layers.items()} for c, layers in deltas.items()}
    rank = max([1, *(d.rank for layers in balanced.values() for d in layers.values())])
    stored: dict[str, dict[int, LowRankDelta]] = {}
    for component, layers in balanced.items():
        for layer, delta in layers.items():
            extra = rank - delta.rank
            padded = LowRankDelta(F.pad(delta.up, (0, extra)), F.pad(delta.down, (0, 0, 0, extra))).to(dtype)
            if not (torch.isfinite(padded.up).all() and torch.isfinite(padded.down).all()):
                raise EMCIDNumericalError(
                    f"The update of {component} layer {layer} is too large for {str(dtype).removeprefix('torch.')} "
                    "even with balanced factors; export it with dtype=torch.float32."
                )
            stored.setdefault(component, {})[layer] = padded
    return stored


def kohya_state_dict(factors: dict[str, dict[int, LowRankDelta]]) -> dict[str, torch.Tensor]:
    """The factors under kohya's key names: `{key prefix}.lora_down.weight` (R, d_ff), `.lora_up.weight` (d, R)."""
    prefixes = kohya_prefixes(factors)
    tensors = {}
    for component, layers in factors.items():
        for layer, delta in layers.items():
            key = kohya_key_prefix(prefixes[component], layer)
            tensors[f"{key}.lora_down.weight"] = delta.down.contiguous()
            tensors[f"{key}.lora_up.weight"] = delta.up.contiguous()
    return tensors


def kohya_header(factors: dict[str, dict[int, LowRankDelta]], manifest: Manifest) -> dict[str, str]:
    """The safetensors header of the file: kohya's `ss_*` fields and the manifest."""
    rank = str(next(iter(next(iter(factors.values())).values())).rank)
    version = base_model_version(factors)
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": rank,
        "ss_network_alpha": rank,  # alpha = dim: scale 1, what every loader assumes without `.alpha` tensors
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        MANIFEST_HEADER_KEY: manifest.to_json(),
    }


def _checked_path(path: str | os.PathLike) -> Path:
    """The file to write, as a `Path`: a `.safetensors` name that is no folder.

    Raises:
        ValueError: for a name without the `.safetensors` suffix (the UIs list only those), or an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a folder; give the path of the file to write, e.g. {str(path / KOHYA_WEIGHTS_NAME)!r}."
        )
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{str(path)!r} is not a .safetensors file name; the UIs list LoRAs by it: give e.g. "
            f"{str(path.with_suffix('.safetensors'))!r}."
        )
    return path


def write_kohya_file(path: str | os.PathLike, factors: dict[str, dict[int, LowRankDelta]], manifest: Manifest) -> Path:
    """Writes stored factors (`kohya_factors`) as a kohya LoRA file, atomically: a temporary file in the same folder,
    then one rename, so that an interrupted write leaves the previous file (or none).

    Returns:
        The file.
    """
    path = _checked_path(path).absolute()
    data = safetensors_bytes(kohya_state_dict(factors), kohya_header(factors, manifest))
    return atomic_file_write(path, lambda temporary: temporary.write_bytes(data))
