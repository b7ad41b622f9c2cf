"""Stage 2: write all concepts into several fc2 layers at once, in closed form (spec section 3).

For the edited layers l_0 < l_1 < ... < l_{L-1}, in ascending order, with the model already carrying
the updates of the earlier layers:

    K = fc2 inputs at each concept's subject token, averaged over its prompts      (d_ff, N)
    R = (z - V) / (L - i)   with V = fc2 outputs ("paper") or z-layer states ("memit")   (d, N)
    dW = alpha R K^T ((1 - alpha) lambda C + alpha K K^T)^-1                        (d, d_ff)

solved in float64 with `torch.linalg.solve`. dW = up @ down with up = alpha R and
down = (M^-1 K)^T, which are kept as exact LoRA factors of rank N (or of full rank min(d, d_ff),
split evenly by an SVD, when N exceeds it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .encoders import TextEncoderLayout, module_device
from .errors import EMCIDNumericalError
from .hooks import captured_outputs, low_rank_output_offsets, run_until_stopped
from .requests import ConceptEdit
from .tokens import subject_token_positions, tokenize


@dataclass
class LowRankDelta:
    """A weight update `up @ down` of one linear layer.

    Attributes:
        up: (d_out, r), the LoRA B factor.
        down: (r, d_in), the LoRA A factor.
    """

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def dense(self) -> torch.Tensor:
        """The (d_out, d_in) update."""
        return self.up @ self.down

    def to(self, *args: object, **kwargs: object) -> "LowRankDelta":
        return LowRankDelta(self.up.to(*args, **kwargs), self.down.to(*args, **kwargs))


def balanced_factors(delta: LowRankDelta) -> LowRankDelta:
    """Refactors `delta` as `(U sqrt(S)) (sqrt(S) V^T)` from its SVD, dropping zero directions.

    The SVD is taken of the small core of the factors' QR decompositions, in float64, so the rank
    becomes at most min(r, d_out, d_in) and both factors have the same scale.
    """
    q_up, r_up = torch.linalg.qr(delta.up.double())
    q_down, r_down = torch.linalg.qr(delta.down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    tolerance = s.max() * max(delta.up.shape[0], delta.down.shape[1]) * torch.finfo(s.dtype).eps
    keep = s > tolerance
    root = s[keep].sqrt()
    up = (q_up @ u[:, keep]) * root
    down = root[:, None] * (vh[keep] @ q_down.T)
    return LowRankDelta(up.to(delta.up.dtype), down.to(delta.down.dtype))


def solve_layer_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    covariance: torch.Tensor,
    edit_weight: float,
    preservation_weight: float,
) -> LowRankDelta:
    """The closed-form update of one layer, in float64.

    Args:
        keys: K, (d_ff, N).
        residuals: R, already divided by the layers left, (d, N).
        covariance: C, (d_ff, d_ff).
        edit_weight: alpha in (0, 1).
        preservation_weight: lambda > 0.

    Returns:
        `dW = alpha R K^T ((1 - alpha) lambda C + alpha K K^T)^-1` as float64 factors.
    """
    keys, residuals, covariance = keys.double(), residuals.double(), covariance.double()
    system = (1 - edit_weight) * preservation_weight * covariance + edit_weight * keys @ keys.T
    try:
        down = torch.linalg.solve(system, keys).T
    except torch.linalg.LinAlgError as error:
        raise EMCIDNumericalError(f"the stage-2 system is singular ({error}); compute the key statistics on more captions.") from error
    delta = LowRankDelta(up=edit_weight * residuals, down=down)
    if not (torch.isfinite(delta.up).all() and torch.isfinite(delta.down).all()):
        raise EMCIDNumericalError("the stage-2 update is not finite; check the stage-1 vectors and the key statistics.")
    if delta.rank > min(residuals.shape[0], keys.shape[0]):
        delta = balanced_factors(delta)
    return delta


@torch.no_grad()
def gather_keys_and_values(
    layout: TextEncoderLayout,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[ConceptEdit],
    layer: int,
    value_layer: int | None,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (fc2 inputs) and values at each concept's subject token, averaged over its prompts.

    Args:
        layer: the layer whose fc2 input is the key.
        value_layer: `None` for the fc2 output of `layer` as the value ("paper"), or the index of the
            layer whose output (the residual stream) is the value ("memit").

    Returns:
        `(K (N, d_ff), V (N, d))` in float64.
    """
    device = module_device(layout.model)
    prompts = [prompt for request in requests for prompt in request.source_prompts]
    owners = torch.tensor([n for n, request in enumerate(requests) for _ in request.templates])
    positions = torch.tensor([p for r in requests for p in subject_token_positions(tokenizer, r.source_prompts, r.source)])
    fc2 = layout.fc2(layer)
    value_module = fc2 if value_layer is None else layout.layers[value_layer]
    keys = torch.zeros(len(requests), layout.intermediate_size, dtype=torch.float64)
    values = torch.zeros(len(requests), layout.hidden_size, dtype=torch.float64)
    with captured_outputs({"key": fc2}, capture_inputs=True) as captured_keys, \
            captured_outputs({"value": value_module}, stop_at=value_module) as captured_values:
        for start in range(0, len(prompts), batch_size):
            batch = tokenize(tokenizer, prompts[start : start + batch_size]).to(device)
            run_until_stopped(layout.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            rows = torch.arange(batch.input_ids.shape[0])
            index = positions[start : start + batch_size]
            keys.index_add_(0, owners[start : start + batch_size], captured_keys["key"][rows, index].double().cpu())
            values.index_add_(0, owners[start : start + batch_size], captured_values["value"][rows, index].double().cpu())
    counts = torch.tensor([len(request.templates) for request in requests], dtype=torch.float64)[:, None]
    return keys / counts, values / counts


def compute_stage2_deltas(
    layout: TextEncoderLayout,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[ConceptEdit],
    vectors: torch.Tensor,
    layers: Sequence[int],
    z_layer: int,
    covariances: dict[int, torch.Tensor],
    edit_weight: float,
    preservation_weight: float,
    residual: Literal["paper", "memit"] = "paper",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[int, LowRankDelta]:
    """Runs stage 2 on the live text encoder, whose weights stay untouched (updates act through hooks).

    Args:
        vectors: Z, the stage-1 vectors, (N, d).
        layers: the edited layers; they are processed in ascending order.
        covariances: C per edited layer, (d_ff, d_ff).

    Returns:
        {layer: update of its fc2} with float32 factors.
    """
    layers = sorted(layers)
    targets = vectors.double().cpu()
    deltas: dict[int, LowRankDelta] = {}
    modules = {str(layer): layout.fc2(layer) for layer in layers}
    with low_rank_output_offsets(modules) as offsets:
        for i, layer in enumerate(tqdm(layers, desc="EMCID stage 2", unit="layer", disable=not progress)):
            keys, values = gather_keys_and_values(
                layout, tokenizer, requests, layer, None if residual == "paper" else z_layer, batch_size
            )
            residuals = (targets - values) / (len(layers) - i)
            try:
                delta = solve_layer_update(keys.T, residuals.T, covariances[layer], edit_weight, preservation_weight)
            except EMCIDNumericalError as error:
                raise EMCIDNumericalError(f"Layer {layer}: {error}") from error
            deltas[layer] = delta.to(torch.float32)
            offsets[str(layer)] = (deltas[layer].up, deltas[layer].down)
    return deltas
