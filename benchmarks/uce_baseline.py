"""UCE, the baseline of `bench_massive.py`: Unified Concept Editing (Gandikota et al., "Unified Concept Editing in
Diffusion Models", WACV 2024), written for the benchmark from the paper, not part of the package.

UCE edits the UNet's cross-attention key and value projections W (to_k, to_v of every `attn2`) in closed form.
For edited text vectors c_i with targets v_i* = W_old c_i* (c_i* the destination's vector) and preserved vectors
c_j, it minimises

    sum_i |W c_i - v_i*|^2 + p sum_j |W c_j - W_old c_j|^2 + lambda |W - W_old|^2,

whose solution is

    W = (sum_i v_i* c_i^T + p sum_j W_old c_j c_j^T + lambda W_old) (sum_i c_i c_i^T + p sum_j c_j c_j^T + lambda I)^-1.

The text vectors of a prompt are the text encoder's outputs from the concept's last token to the end of the
padded prompt (its end-of-text and padding states included); a source prompt's vectors are paired with the
destination prompt's at the same distance from their concept's last token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from diffusers import StableDiffusionPipeline

from diffusers_emcid.evaluation import pipeline_conditioning


def _concept_vectors(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Per prompt, its conditioning from its last word's last token on, (L_i, d), in float64.

    The prompts of the benchmark end with the concept, so its last token is the one before end-of-text.
    """
    conditioning = pipeline_conditioning(pipe, prompts).double()
    ids = pipe.tokenizer(
        list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True
    ).input_ids
    return [states[row.index(pipe.tokenizer.eos_token_id) - 1 :] for states, row in zip(conditioning, ids)]


def _paired(source: torch.Tensor, destination: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    length = min(source.shape[0], destination.shape[0])
    return source[:length], destination[:length]


@dataclass
class UCEEdit:
    """A UCE edit of a pipeline's cross-attention projections; `apply`/`remove` swap the weights in and out.

    Attributes:
        weights: per module name (`...attn2.to_k`, `...attn2.to_v`), the edited weight.
    """

    weights: dict[str, torch.Tensor]
    _saved: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        pipe: StableDiffusionPipeline,
        edits: Sequence[tuple[str, str]],
        preserved: Sequence[str],
        preservation_scale: float = 1.0,
        regularization: float = 0.1,
    ) -> "UCEEdit":
        """The closed-form edit.

        Args:
            edits: `(source prompt, destination prompt)` pairs, each ending with its concept.
            preserved: prompts whose conditioning must keep its keys and values, each ending with its concept.
            preservation_scale: p, the weight of the preserved vectors.
            regularization: lambda, the pull towards the old weights.
        """
        sources = _concept_vectors(pipe, [s for s, _ in edits])
        destinations = _concept_vectors(pipe, [d for _, d in edits])
        pairs = [_paired(s, d) for s, d in zip(sources, destinations)]
        edited = torch.cat([s for s, _ in pairs])  # (N_e, d)
        targets = torch.cat([d for _, d in pairs])  # (N_e, d), mapped by W_old below
        kept = torch.cat(_concept_vectors(pipe, list(preserved))) if preserved else edited.new_zeros(0, edited.shape[1])
        dim = edited.shape[1]
        keys = edited.T @ edited + preservation_scale * kept.T @ kept + regularization * torch.eye(dim).double()
        weights = {}
        for name, module in pipe.unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                old = module.weight.double().cpu()
                values = (old @ targets.T) @ edited + preservation_scale * (old @ kept.T) @ kept + regularization * old
                weights[name] = torch.linalg.solve(keys, values.T).T.to(module.weight.dtype)
        return cls(weights)

    def apply(self, pipe: StableDiffusionPipeline, name: str | None = None) -> None:
        """Writes the edited weights into `pipe`'s UNet (`name` is accepted as `ConceptEdits.apply` takes it)."""
        modules = dict(pipe.unet.named_modules())
        for path, weight in self.weights.items():
            module = modules[path]
            self._saved[path] = module.weight.detach().clone()
            module.weight.data.copy_(weight.to(module.weight.device))

    def remove(self, pipe: StableDiffusionPipeline, name: str | None = None) -> None:
        """Puts the weights saved by `apply` back."""
        modules = dict(pipe.unet.named_modules())
        for path, weight in self._saved.items():
            modules[path].weight.data.copy_(weight)
        self._saved.clear()
