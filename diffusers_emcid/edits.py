"""`ConceptEdits`: the result of an EMCID run, and how it goes into (and out of) a pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline

from .adapters import adapter_names, delete_lora_adapter, inject_lora_deltas
from .config import EMCIDConfig
from .encoders import find_text_encoder_layout
from .requests import ConceptEdit
from .stage2 import LowRankDelta


@dataclass
class ConceptEdits:
    """A set of concept edits: stage-1 vectors and the stage-2 updates of each edited text encoder.

    Attributes:
        requests: the N edited concepts.
        vectors: the stage-1 vectors z, (N, d), one per request.
        deltas: pipeline component (`"text_encoder"`) -> layer index -> `LowRankDelta` of that layer's fc2.
        config: the settings of the run.
        z_layer: the layer whose output the vectors live at.
        base_model: the name or path of the pipeline the edits were computed on, if known.
    """

    requests: list[ConceptEdit]
    vectors: torch.Tensor
    deltas: dict[str, dict[int, LowRankDelta]]
    config: EMCIDConfig
    z_layer: int
    base_model: str | None = None
    stage1_losses: list[torch.Tensor] = field(default_factory=list, repr=False)

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

    def _check_fits(self, pipe: DiffusionPipeline) -> None:
        for component, deltas in self.deltas.items():
            layout = find_text_encoder_layout(getattr(pipe, component, None), component)
            for layer, delta in deltas.items():
                if not 0 <= layer < layout.num_layers:
                    raise ValueError(
                        f"These edits change layer {layer} of the {component}, which has only {layout.num_layers} layers; "
                        "they were made for another model."
                    )
                weight = layout.fc2(layer).weight
                if (delta.up.shape[0], delta.down.shape[1]) != tuple(weight.shape):
                    raise ValueError(
                        f"The update of {component} layer {layer} has shape {(delta.up.shape[0], delta.down.shape[1])} but its "
                        f"fc2 weight is {tuple(weight.shape)}; these edits were made for another model."
                    )

    def apply(self, pipe: DiffusionPipeline, name: str = "emcid") -> None:
        """Adds the edits to `pipe` as the PEFT LoRA adapter `name` on the edited fc2 layers.

        Other active adapters stay active. Nothing is changed if the edits do not fit the pipeline
        or the name is taken.
        """
        self._check_fits(pipe)
        for component in self.deltas:
            if name in adapter_names(getattr(pipe, component)):
                raise ValueError(f"The pipeline's {component} already has an adapter named {name!r}; use another name.")
        done: list[str] = []
        try:
            for component, deltas in self.deltas.items():
                layout = find_text_encoder_layout(getattr(pipe, component), component)
                inject_lora_deltas(layout, deltas, name)
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
