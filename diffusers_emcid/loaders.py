"""Pipeline methods for concept edits: load, weight, toggle, fuse and unload them like LoRAs.

`import diffusers_emcid` adds these methods to diffusers' Stable Diffusion pipelines; subclass
`ConceptEditsLoaderMixin` to give them to a pipeline class of your own. The edits are PEFT LoRA
adapters on the text encoders, so diffusers' own LoRA controls (`set_adapters`, `disable_lora`,
`delete_adapters`, ...) act on them too, and other LoRAs loaded before or after coexist with them;
these methods touch only the concept-edit adapters.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .adapters import (
    adapter_names,
    adapter_state,
    delete_lora_adapter,
    layers_with_adapter,
    set_adapter_active,
    set_adapter_strength,
)
from .edits import ConceptEdits
from .families import all_pipeline_classes


@dataclass
class LoadedConceptEdits:
    """A concept-edit adapter loaded by `load_concept_edits`, and the base weights saved when it was fused."""

    edits: ConceptEdits
    fused_weights: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def fused(self) -> bool:
        return bool(self.fused_weights)


class ConceptEditsLoaderMixin:
    """Adds `load_concept_edits` and the controls of loaded edits to a diffusers pipeline.

    Whether an edit set is enabled and at what strength is read from its PEFT layers, so it stays true after
    diffusers' own controls (`set_adapters`, `load_lora_weights`, which makes a newly loaded LoRA the only
    active one) change them. While a set is fused, no other concept-edit set can be active (PEFT computes a
    fused layer without its other adapters), so enabling, loading or fusing another one is refused.
    """

    def _emcid_loaded(self) -> dict[str, LoadedConceptEdits]:
        """The loaded concept edits by adapter name (adapters deleted by other means are forgotten)."""
        state = self.__dict__.setdefault("_emcid_loaded_edits", {})
        for name in list(state):
            if not all(name in adapter_names(getattr(self, c)) for c in state[name].edits.deltas):
                del state[name]
        return state

    def _emcid_status(self, name: str) -> tuple[bool, float | dict[str, float | None]]:
        """(enabled in every component, strength: one number, or per component where they differ)."""
        states = {c: adapter_state(getattr(self, c), name) for c in self._emcid_loaded()[name].edits.deltas}
        strengths = {c: state[1] for c, state in states.items()}
        values = set(strengths.values())
        return all(state[0] for state in states.values()), values.pop() if len(values) == 1 else strengths

    def _emcid_refuse_while_fused(self, action: str) -> None:
        fused = [name for name, state in self._emcid_loaded().items() if state.fused]
        if fused:
            raise ValueError(
                f"The concept edits {fused[0]!r} are fused, so no other concept edits can be active; call "
                f"unfuse_concept_edits() before {action}."
            )

    def _emcid_select(self, adapter_names: str | Sequence[str] | None) -> list[str]:
        loaded = self._emcid_loaded()
        names = (
            list(loaded)
            if adapter_names is None
            else [adapter_names]
            if isinstance(adapter_names, str)
            else list(adapter_names)
        )
        unknown = [name for name in names if name not in loaded]
        if unknown:
            raise ValueError(f"No concept edits named {unknown} are loaded; loaded: {sorted(loaded)}.")
        return names

    def load_concept_edits(
        self,
        edits: ConceptEdits | str | os.PathLike,
        adapter_name: str | None = None,
        strength: float = 1.0,
        force: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> str:
        """Loads concept edits (a `ConceptEdits`, a local folder or a Hub repo id) as a LoRA adapter.

        Args:
            edits: what to load.
            adapter_name: the adapter's name; defaults to the folder or repo name.
            strength: the scale of the edits (1 is the edit as computed).
            force: load even if the edits were made on other base weights.
            revision, token, cache_dir, local_files_only: Hub download options.

        Returns:
            The adapter name.

        Raises:
            ConceptEditsLoadError: `EMCIDFormatError` for a malformed file, `BaseModelMismatchError` for edits that
                do not fit this pipeline. ValueError: for a taken name. The pipeline is unchanged in every case.
        """
        self._emcid_refuse_while_fused("loading more")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise TypeError(f"strength={strength!r} must be a finite number, e.g. 1.0.")
        if not isinstance(edits, ConceptEdits):
            source = edits
            edits = ConceptEdits.from_pretrained(
                source, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
            )
            default_name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(os.path.normpath(str(source))))
        else:
            default_name = "emcid"
        if hasattr(torch.nn.ModuleDict(), default_name) or not default_name:
            default_name = f"{default_name}_edits".lstrip("_")
        taken = set().union(
            *(adapter_names(getattr(self, c)) for c in edits.deltas if getattr(self, c, None) is not None)
        )
        if adapter_name is None:
            adapter_name, suffix = default_name, 2
            while adapter_name in taken:
                adapter_name, suffix = f"{default_name}_{suffix}", suffix + 1
        edits.apply(self, adapter_name, force=force)
        self._emcid_loaded()[adapter_name] = LoadedConceptEdits(edits)
        if strength != 1.0:
            self.set_concept_edits(adapter_name, strength)
        return adapter_name

    def set_concept_edits(self, adapter_names: str | Sequence[str], strengths: float | Sequence[float] = 1.0) -> None:
        """Sets the strength of loaded concept edits (and enables them); other adapters are left alone."""
        names = self._emcid_select(adapter_names)
        values = [strengths] * len(names) if isinstance(strengths, (int, float)) else list(strengths)
        if len(values) != len(names):
            raise ValueError(f"Got {len(values)} strengths for {len(names)} concept edits {names}.")
        self._emcid_refuse_while_fused("changing strengths")
        loaded = self._emcid_loaded()
        for name, value in zip(names, values):
            for component in loaded[name].edits.deltas:
                set_adapter_strength(getattr(self, component), name, float(value))
        self.enable_concept_edits(names)

    def _emcid_set_enabled(self, names: list[str], enabled: bool) -> None:
        loaded = self._emcid_loaded()
        for name in names:
            for component in loaded[name].edits.deltas:
                set_adapter_active(getattr(self, component), name, enabled)

    def enable_concept_edits(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Turns loaded concept edits on (all of them by default)."""
        names = [name for name in self._emcid_select(adapter_names) if not self._emcid_status(name)[0]]
        if names:
            self._emcid_refuse_while_fused(f"enabling {names}")
        self._emcid_set_enabled(names, True)

    def disable_concept_edits(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Turns loaded concept edits off (all of them by default); the pipeline then draws as without them."""
        names = self._emcid_select(adapter_names)
        loaded = self._emcid_loaded()
        fused = [name for name in names if loaded[name].fused]
        if fused:
            raise ValueError(
                f"The concept edits {fused[0]!r} are fused; call unfuse_concept_edits() before disabling them."
            )
        self._emcid_set_enabled(names, False)

    @contextlib.contextmanager
    def concept_edits_disabled(self, adapter_names: str | Sequence[str] | None = None) -> Iterator[None]:
        """Within the block, the (given or all) concept edits are off; afterwards they are as before."""
        names = [name for name in self._emcid_select(adapter_names) if self._emcid_status(name)[0]]
        self.disable_concept_edits(names)
        try:
            yield
        finally:
            self._emcid_set_enabled([name for name in names if name in self._emcid_loaded()], True)

    def fuse_concept_edits(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Merges the enabled concept edits among `adapter_names` into the text-encoder weights (faster inference);
        exactly undone by `unfuse_concept_edits`. Only one concept-edit set can be fused, and only while no other
        is active."""
        loaded = self._emcid_loaded()
        names = self._emcid_select(adapter_names)
        candidates = [n for n in names if not loaded[n].fused and self._emcid_status(n)[0]]
        if not candidates:
            return
        active_others = [n for n in loaded if n not in candidates and self._emcid_status(n)[0]]
        if len(candidates) > 1 or active_others:
            raise ValueError(
                f"Cannot fuse {candidates}: only one concept-edit set can be fused, and only while no other is active "
                f"(active: {sorted(set(candidates + active_others))}); merge sets with ConceptEdits.merge, or disable "
                "the others first."
            )
        (name,) = candidates
        layers = [
            (c, path, layer)
            for c in loaded[name].edits.deltas
            for path, layer in layers_with_adapter(getattr(self, c), name)
        ]
        busy = [
            f"{c}.{path}"
            for c, path, layer in layers
            if layer.merged or {a for a in layer.active_adapters if a in layer.lora_A} - {name}
        ]
        if busy:
            raise ValueError(
                f"Other adapters are active or fused in {busy[0]}; disable or unfuse them before fusing {name!r}."
            )
        for component, path, layer in layers:
            loaded[name].fused_weights[(component, path)] = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[name])

    def unfuse_concept_edits(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Undoes `fuse_concept_edits`, restoring the saved base weights bit for bit."""
        loaded = self._emcid_loaded()
        for name in self._emcid_select(adapter_names):
            state = loaded[name]
            for (component, path), weight in state.fused_weights.items():
                layer = getattr(self, component).get_submodule(path)
                if layer.merged:
                    layer.unmerge()
                with torch.no_grad():
                    layer.get_base_layer().weight.copy_(weight)
            state.fused_weights.clear()

    def unload_concept_edits(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Removes concept edits (all of them by default); the text encoders get their base weights back."""
        names = self._emcid_select(adapter_names)
        self.unfuse_concept_edits(names)
        loaded = self._emcid_loaded()
        for name in names:
            for component in loaded.pop(name).edits.deltas:
                delete_lora_adapter(getattr(self, component), name)

    def get_concept_edits(self) -> dict[str, dict[str, Any]]:
        """The loaded concept edits: {adapter name: {concepts, strength, enabled, fused, components, base_model}}.

        `strength` is one number, or one per text encoder where diffusers' `set_adapters` set them apart.
        """
        statuses = {name: self._emcid_status(name) for name in self._emcid_loaded()}
        return {
            name: {
                "concepts": state.edits.concepts,
                "strength": statuses[name][1],
                "enabled": statuses[name][0],
                "fused": state.fused,
                "components": sorted(state.edits.deltas),
                "base_model": state.edits.base_model,
            }
            for name, state in self._emcid_loaded().items()
        }


PIPELINES_WITH_CONCEPT_EDITS = tuple(all_pipeline_classes())
"""The pipeline classes of every family (`families.FAMILIES`), which get the concept-edit methods on import."""
_METHODS = [name for name in vars(ConceptEditsLoaderMixin) if not name.startswith("__")]


def add_concept_edit_methods(*pipeline_classes: type) -> None:
    """Gives pipeline classes the methods of `ConceptEditsLoaderMixin` (skipping names they already define)."""
    for cls in pipeline_classes:
        for name in _METHODS:
            if not hasattr(cls, name):
                setattr(cls, name, vars(ConceptEditsLoaderMixin)[name])
