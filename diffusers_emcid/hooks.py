"""Forward hooks and module state changes that always undo themselves (context managers)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

if TYPE_CHECKING:
    from .encoders import TextEncoderLayout


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed has been captured."""


def _hidden_state(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden_state(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def residual_addition(layer: nn.Module, positions: torch.Tensor, delta: torch.Tensor) -> Iterator[None]:
    """Adds `delta` to the residual stream that `layer` outputs, at one token per prompt.

    Args:
        layer: a transformer layer whose output (or its element 0) is the (B, T, d) hidden state.
        positions: (B,) token index per prompt.
        delta: (d,) vector (the same for every prompt) or (B, d), kept in the autograd graph.
    """

    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        hidden = _hidden_state(output)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        addition = torch.zeros_like(hidden).index_put(
            (rows, positions.to(hidden.device)), delta.to(hidden.dtype).expand(hidden.shape[0], -1)
        )
        return _with_hidden_state(output, hidden + addition)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def layers_skipped_to(layout: "TextEncoderLayout", layer: int, states: torch.Tensor) -> Iterator[None]:
    """Runs the text encoder from the output of `layer` on, with `states` as that output.

    Layers `0..layer` are taken out of the encoder and the embeddings' output is replaced by `states`,
    so a forward pass computes only the later layers, the final norm and the pooled outputs (which
    still find the end-of-text token from `input_ids`). Exact for causal encoders such as CLIP's,
    given states computed from the same tokens.

    Args:
        layout: the text encoder.
        layer: the last layer whose output `states` holds.
        states: (B, T, d), the output of `layer` for the tokens the model is called with; may carry gradients.
    """
    handle = layout.embeddings.register_forward_hook(lambda module, args, output: states.to(output.dtype))
    layout.encoder.layers = nn.ModuleList(layout.layers[layer + 1 :])
    try:
        yield
    finally:
        layout.encoder.layers = layout.layers
        handle.remove()


@contextlib.contextmanager
def captured_outputs(
    modules: Mapping[str, nn.Module], capture_inputs: bool = False, stop_at: nn.Module | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Records what each module outputs (or receives, with `capture_inputs`) on the next forward passes.

    Args:
        modules: name -> module to watch; the captured (B, T, width) tensor is stored under the name.
        capture_inputs: record the first positional input instead of the output.
        stop_at: raise `StopForward` after this module has run, so the rest of the model is skipped.

    Yields:
        A dict name -> tensor of the latest pass, filled as the forward runs.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple, name: str = name) -> None:
            captured[name] = args[0] if capture_inputs else _hidden_state(output)

        handles.append(module.register_forward_hook(hook))
    if stop_at is not None:

        def stop(module: nn.Module, args: tuple, output: object) -> None:
            raise StopForward

        handles.append(stop_at.register_forward_hook(stop))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_until_stopped(model: nn.Module, *args: object, **kwargs: object) -> None:
    """Runs `model(*args, **kwargs)` and swallows the `StopForward` a capture hook may raise."""
    try:
        model(*args, **kwargs)
    except StopForward:
        pass


@contextlib.contextmanager
def low_rank_output_offsets(modules: Mapping[str, nn.Linear]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Adds `x @ down.T @ up.T` to the outputs of linear modules, as if `W += up @ down`, weights untouched.

    Yields:
        A dict name -> (up (d_out, r), down (r, d_in)) that may be filled while the context is open; a
        module without an entry is left as it is.
    """
    offsets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in modules.items():

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> torch.Tensor:
            if name not in offsets:
                return output
            up, down = offsets[name]
            return output + (args[0] @ down.to(args[0]).T) @ up.to(args[0]).T

        handles.append(module.register_forward_hook(hook))
    try:
        yield offsets
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Puts modules in eval mode with `requires_grad=False` and restores both flags afterwards."""
    training = [(m, m.training) for module in modules for m in module.modules()]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for module in modules:
            module.eval().requires_grad_(False)
        yield
    finally:
        for module, mode in training:
            module.training = mode
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def adapters_disabled(*modules: nn.Module) -> Iterator[None]:
    """Switches off every PEFT adapter inside `modules` (so they compute with base weights), then back on."""
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    states = [(layer, layer.disable_adapters) for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in states:
            layer.enable_adapters(not disabled)


@contextlib.contextmanager
def base_networks(modules: list[nn.Module], device: str | torch.device | None = None) -> Iterator[torch.device]:
    """`modules` frozen, with their adapters off, on `device` (default: the first module's); all restored afterwards.

    Raises:
        ValueError: if a module has fused LoRA weights, which would make its base weights the edited ones.
    """
    fused = [
        name for m in modules for name, layer in m.named_modules() if isinstance(layer, BaseTunerLayer) and layer.merged
    ]
    if fused:
        raise ValueError(
            f"The pipeline has fused LoRA weights (e.g. {fused[0]}); EMCID edits the base model. Call "
            "pipe.unfuse_lora() (or unfuse_concept_edits()) first."
        )
    homes = [next(module.parameters()).device for module in modules]
    work_device = torch.device(device) if device else homes[0]
    with frozen(*modules), adapters_disabled(*modules):  # frozen outermost: it restores what PEFT's toggles change
        try:
            for module in modules:
                module.to(work_device)
            yield work_device
        finally:
            for module, home in zip(modules, homes):
                module.to(home)
