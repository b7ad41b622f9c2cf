"""Stage 2: write all concepts into several fc2 layers at once, in closed form (`docs/algorithm.md`, section 4).

For the edited layers l_0 < l_1 < ... < l_{L-1}, in ascending order, with the model already carrying
the updates of the earlier layers:

    K = fc2 inputs at each concept's subject token, averaged over its prompts      (d_ff, N)
        (or one column per prompt, with `keys_per="prompt"`; see `compute_stage2_deltas`)
    R = (z - V) / (L - i)   with V = fc2 outputs ("paper") or z-layer states ("memit")   (d, N)
    dW = alpha R K^T ((1 - alpha) lambda C + alpha K K^T)^-1                        (d, d_ff)

solved in float64 by a Cholesky factorisation (`torch.linalg.solve` if the system is not positive
definite). dW = up @ down with up = alpha R and down = (M^-1 K)^T, which are kept as exact LoRA factors
of rank N (or of full rank min(d, d_ff), split evenly by an SVD, when N exceeds it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import Stage2Keys
from .encoders import TextEncoderLayout, module_device
from .errors import EMCIDNumericalError
from .hooks import captured_outputs, layers_skipped_to, run_until_stopped
from .requests import ConceptEdit
from .tokens import TokenizedPrompts, subject_token_positions


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
    factor, info = torch.linalg.cholesky_ex(system)  # the system is symmetric positive definite when C has full rank
    if info == 0:
        down = torch.cholesky_solve(keys, factor).T
    else:
        try:
            down = torch.linalg.solve(system, keys).T
        except torch.linalg.LinAlgError as error:
            raise EMCIDNumericalError(
                f"the stage-2 system is singular ({error}); compute the key statistics on more captions."
            ) from error
    delta = LowRankDelta(up=edit_weight * residuals, down=down)
    if not (torch.isfinite(delta.up).all() and torch.isfinite(delta.down).all()):
        raise EMCIDNumericalError("the stage-2 update is not finite; check the stage-1 vectors and the key statistics.")
    if delta.rank > min(residuals.shape[0], keys.shape[0]):
        delta = balanced_factors(delta)
    return delta


@dataclass
class _PromptChunk:
    """A batch of stage-2 prompts, cut after their subject token, and its residual stream.

    Attributes:
        tokens: (B, T) the prompts up to and including their subject token (the encoder is causal, so the
            tokens after it cannot change the subject token's states), padded to the longest.
        positions: (B,) subject-token index per prompt.
        owners: (B,) the concept each prompt belongs to.
        columns: (B,) the index of each prompt among all prompts, in request and template order.
        states: (B, T, d) the output of the layer the stream has reached, edits of the layers up to it
            included; `None` before the first layer.
    """

    tokens: TokenizedPrompts
    positions: torch.Tensor
    owners: torch.Tensor
    columns: torch.Tensor
    states: torch.Tensor | None = None


def _prompt_chunks(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[ConceptEdit], batch_size: int, device: torch.device
) -> list[_PromptChunk]:
    """Every source prompt of every request, cut after its subject token, in length-sorted batches."""
    rows = []
    for owner, request in enumerate(requests):
        ids = tokenizer(request.source_prompts, truncation=True).input_ids
        for prompt_ids, position in zip(
            ids, subject_token_positions(tokenizer, request.source_prompts, request.source)
        ):
            rows.append((prompt_ids[: position + 1], position, owner, len(rows)))
    rows.sort(key=lambda row: len(row[0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunks = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        length = max(len(row[0]) for row in batch)
        input_ids = torch.tensor([row[0] + [pad_id] * (length - len(row[0])) for row in batch])
        attention_mask = torch.tensor([[1] * len(row[0]) + [0] * (length - len(row[0])) for row in batch])
        chunks.append(
            _PromptChunk(
                TokenizedPrompts(input_ids, attention_mask).to(device),
                torch.tensor([row[1] for row in batch], device=device),
                torch.tensor([row[2] for row in batch]),
                torch.tensor([row[3] for row in batch]),
            )
        )
    return chunks


@torch.no_grad()
def _clean_subject_states(
    layout: TextEncoderLayout, chunks: list[_PromptChunk], z_layer: int, num_prompts: int
) -> torch.Tensor:
    """h0 of every prompt: the unedited z-layer state at its subject token, (num_prompts, d) float64, by column."""
    states = torch.zeros(num_prompts, layout.hidden_size, dtype=torch.float64)
    z_module = layout.layers[z_layer]
    for chunk in chunks:
        with captured_outputs({"z": z_module}, stop_at=z_module) as captured:
            run_until_stopped(
                layout.model, input_ids=chunk.tokens.input_ids, attention_mask=chunk.tokens.attention_mask
            )
        rows = torch.arange(len(chunk.positions), device=chunk.positions.device)
        states[chunk.columns] = captured["z"][rows, chunk.positions].double().cpu()
    return states


@torch.no_grad()
def _advance_to_layer(
    layout: TextEncoderLayout,
    chunk: _PromptChunk,
    reached: int,
    layer: int,
    value_layer: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs one chunk's residual stream from the output of layer `reached` (-1: the embeddings) through `layer`.

    Returns:
        `(keys (B, T, d_ff), output of layer (B, T, d), key at the subject (B, d_ff), value at the subject (B, d))`,
        the value being the fc2 output of `layer` (`value_layer=None`) or the output of `value_layer`.
    """
    fc2 = layout.fc2(layer)
    watched = {"fc2": fc2, "layer": layout.layers[layer]}
    if value_layer is not None:
        watched["value"] = layout.layers[value_layer]
    last = layout.layers[max(layer, value_layer if value_layer is not None else layer)]
    with contextlib.ExitStack() as stack:
        if chunk.states is not None:
            stack.enter_context(layers_skipped_to(layout, reached, chunk.states))
        keys = stack.enter_context(captured_outputs({"key": fc2}, capture_inputs=True))
        outputs = stack.enter_context(captured_outputs(watched, stop_at=last))
        run_until_stopped(layout.model, input_ids=chunk.tokens.input_ids, attention_mask=chunk.tokens.attention_mask)
    rows = torch.arange(chunk.positions.shape[0], device=chunk.positions.device)
    value = outputs["fc2" if value_layer is None else "value"]
    return keys["key"], outputs["layer"], keys["key"][rows, chunk.positions], value[rows, chunk.positions]


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
    keys_per: Stage2Keys = "concept",
) -> dict[int, LowRankDelta]:
    """Runs stage 2 on the live text encoder, whose weights stay untouched.

    The prompts' residual streams are carried from one edited layer to the next: each layer runs once per
    prompt, its keys and values are read in that pass, and its update `dW` is added to the stream as
    `k @ dW^T` (the change of its fc2 output), so the next layer sees the keys of the edited model.

    Args:
        vectors: Z, the stage-1 vectors, (N, d).
        layers: the edited layers; they are processed in ascending order.
        covariances: C per edited layer, (d_ff, d_ff).
        keys_per: `"concept"` (the paper's): one column per concept, its keys and values averaged over its
            prompts, with target z. `"prompt"`: one column per prompt, with its own key, value and target
            h0_p + delta (h0_p: the prompt's own clean z-layer state; delta = z - h0 of prompt 0), each column
            weighted by 1 / sqrt(P) so that a concept weighs as much as one averaged column.

    Returns:
        {layer: update of its fc2} with float32 factors.
    """
    layers = sorted(layers)
    targets = vectors.double().cpu()
    counts = torch.tensor([len(request.templates) for request in requests], dtype=torch.float64)[:, None]
    chunks = _prompt_chunks(tokenizer, requests, batch_size, module_device(layout.model))
    per_prompt = keys_per == "prompt"
    if per_prompt:
        owners = torch.cat([torch.full((len(r.templates),), n) for n, r in enumerate(requests)])
        first = torch.cumsum(counts[:, 0].long(), 0) - counts[:, 0].long()  # the column of each concept's prompt 0
        clean = _clean_subject_states(layout, chunks, z_layer, len(owners))
        targets = clean + (targets - clean[first])[owners]  # h0_p + delta, (N * P, d)
        weights = counts[owners].rsqrt()  # (N * P, 1)
    deltas: dict[int, LowRankDelta] = {}
    reached = -1
    for i, layer in enumerate(tqdm(layers, desc="EMCID stage 2", unit="layer", disable=not progress)):
        num_columns = len(targets)
        keys = torch.zeros(num_columns, layout.intermediate_size, dtype=torch.float64)
        values = torch.zeros(num_columns, layout.hidden_size, dtype=torch.float64)
        streams = []
        for chunk in chunks:
            all_keys, output, key, value = _advance_to_layer(
                layout, chunk, reached, layer, None if residual == "paper" else z_layer
            )
            index = chunk.columns if per_prompt else chunk.owners
            keys.index_add_(0, index, key.double().cpu())
            values.index_add_(0, index, value.double().cpu())
            streams.append((all_keys, output))
        if per_prompt:
            keys, residuals = weights * keys, weights * (targets - values) / (len(layers) - i)
        else:
            keys, residuals = keys / counts, (targets - values / counts) / (len(layers) - i)
        try:
            delta = solve_layer_update(keys.T, residuals.T, covariances[layer], edit_weight, preservation_weight)
        except EMCIDNumericalError as error:
            raise EMCIDNumericalError(f"Layer {layer}: {error}") from error
        deltas[layer] = delta.to(torch.float32)
        for chunk, (all_keys, output) in zip(chunks, streams):
            up, down = deltas[layer].up.to(output), deltas[layer].down.to(output)
            chunk.states = output + (all_keys @ down.T) @ up.T
        reached = layer
    return deltas
