"""Stage-2 updates as PEFT LoRA adapters on a text encoder's fc2 layers."""

from __future__ import annotations

import re
import warnings
from typing import Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

from .encoders import TextEncoderLayout, fc2_module_path
from .stage2 import LowRankDelta


def check_adapter_name(name: object) -> None:
    """Raises a ValueError unless `name` can name a PEFT adapter (letters, digits, `_` and `-`, and not an
    attribute of the module dicts that hold adapter weights)."""
    if not isinstance(name, str):
        raise TypeError(f"An adapter name must be a str, got {type(name).__name__} {name!r}.")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or hasattr(torch.nn.ModuleDict(), name):
        raise ValueError(
            f"{name!r} cannot name an adapter: use letters, digits, '_' and '-' only, and not a name that "
            "nn.ModuleDict "
            "already uses (such as 'update', 'keys', 'to'); e.g. 'concept_edits'."
        )


def adapter_names(model: torch.nn.Module) -> set[str]:
    """Names of the PEFT adapters injected into `model`."""
    return set(getattr(model, "peft_config", {}) or {})


def lora_config(deltas: Mapping[int, LowRankDelta]) -> LoraConfig:
    """The PEFT `LoraConfig` of one text encoder's updates (layer index -> delta): each fc2 gets its own rank and
    alpha = rank (scale 1). Injected by `inject_lora_deltas`, and written in files for diffusers to load."""
    ranks = {fc2_module_path(layer): delta.rank for layer, delta in deltas.items()}
    return LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        rank_pattern=ranks,
        alpha_pattern=ranks,
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        init_lora_weights=False,
    )


def _tuner_layers(model: torch.nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def inject_lora_deltas(layout: TextEncoderLayout, deltas: Mapping[int, LowRankDelta], adapter_name: str) -> None:
    """Adds `deltas` to a text encoder as the LoRA adapter `adapter_name` (alpha = rank: scale 1).

    Every layer keeps the active adapters it had; the new adapter is active where it lives.

    Raises:
        ValueError: if the text encoder already has an adapter of that name.
    """
    model = layout.model
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"The text encoder already has an adapter named {adapter_name!r}; pass another name or remove it first."
        )
    active = _active_adapters(model)
    state_dict = {}
    for layer, delta in deltas.items():
        path = layout.fc2_path(layer)
        state_dict[f"{path}.lora_A.weight"], state_dict[f"{path}.lora_B.weight"] = delta.down, delta.up
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject_adapter_in_model(lora_config(deltas), model, adapter_name=adapter_name)
            result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise RuntimeError(f"PEFT did not place the adapter weights {result.unexpected_keys[:4]}.")
    except Exception:
        delete_lora_adapter(model, adapter_name)
        _restore_active_adapters(model, active)
        raise
    _restore_active_adapters(model, active, add=adapter_name)


def _active_adapters(model: torch.nn.Module) -> dict[str, list[str]]:
    return {path: list(layer.active_adapters) for path, layer in _tuner_layers(model)}


def _restore_active_adapters(
    model: torch.nn.Module, active: dict[str, list[str]], add: str | None = None, drop: str | None = None
) -> None:
    """Sets each LoRA layer's active adapters to those it had (PEFT's inject and delete change them), plus `add`
    where that adapter lives, minus `drop`."""
    for path, layer in _tuner_layers(model):
        names = [name for name in active.get(path, []) if name != drop]
        if add is not None and add in getattr(layer, "lora_A", {}):
            names.append(add)
        layer.set_adapter(sorted(set(names)))


def delete_lora_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Removes the adapter `adapter_name`; a layer left with no adapter becomes its original module again, and
    every other layer keeps exactly the active adapters it had."""
    active = _active_adapters(model)
    for path, layer in _tuner_layers(model):
        if adapter_name not in getattr(layer, "lora_A", {}):
            continue
        if adapter_name in layer.merged_adapters:
            layer.unmerge()  # PEFT's delete would leave a merged update in the base weights
        layer.delete_adapter(adapter_name)
        if not layer.lora_A:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, layer.get_base_layer())
    _restore_active_adapters(model, active, drop=adapter_name)
    config = getattr(model, "peft_config", None)
    if config is not None:
        config.pop(adapter_name, None)
        if not config:
            del model.peft_config
            if getattr(model, "_hf_peft_config_loaded", False):
                model._hf_peft_config_loaded = False  # transformers' flag, set when diffusers loaded a LoRA through it


def layers_with_adapter(model: torch.nn.Module, adapter_name: str) -> list[tuple[str, BaseTunerLayer]]:
    """The LoRA layers of `model` that hold the adapter `adapter_name`."""
    return [(path, layer) for path, layer in _tuner_layers(model) if adapter_name in getattr(layer, "lora_A", {})]


def adapter_state(model: torch.nn.Module, adapter_name: str) -> tuple[bool, float | None, bool]:
    """(active in every layer that holds it, its scale if the same in all of them else None, merged anywhere)."""
    layers = [layer for _, layer in layers_with_adapter(model, adapter_name)]
    scales = {float(layer.scaling[adapter_name]) for layer in layers}
    return (
        bool(layers) and all(adapter_name in layer.active_adapters for layer in layers),
        scales.pop() if len(scales) == 1 else None,
        any(adapter_name in getattr(layer, "merged_adapters", []) for layer in layers),
    )


def set_adapter_active(model: torch.nn.Module, adapter_name: str, active: bool) -> None:
    """Switches one adapter on or off, leaving the other adapters of each layer as they are."""
    for _, layer in layers_with_adapter(model, adapter_name):
        names = set(layer.active_adapters) - {adapter_name} | ({adapter_name} if active else set())
        layer.set_adapter(sorted(names))


def set_adapter_strength(model: torch.nn.Module, adapter_name: str, strength: float) -> None:
    """Scales one adapter's update by `strength` (its alpha equals its rank, so the scaling is `strength`)."""
    for _, layer in layers_with_adapter(model, adapter_name):
        layer.set_scale(adapter_name, strength)
