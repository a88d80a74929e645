"""Activation checkpointing with each decoder layer's input kept in host memory (`--offload_activations`), and
llmft's own checkpoint function behind it, which also serves the lean recompute (`--lean_recompute`,
llmft.recompute) with the input kept on the GPU.

Under gradient checkpointing a decoder layer keeps only its input hidden state for backward, and recomputes the rest
there; over all layers those inputs are most of the activation memory left (layers x tokens x hidden x 2 bytes: 3.3
GB for a 7B shape at 16,384 tokens). `offloaded_checkpoint` is a checkpoint function that copies the input to pinned
host memory on a side stream as the layer's forward starts (the copy overlaps the layer's compute), lets the GPU copy
go once the copy is done, and in backward brings it back, recomputes the layer under the forward's autocast and
random-number state, and back-propagates through it. Each layer's backward first starts copying back, on the side
stream, the input of the layer before it (the next to run backward), so that copy overlaps this layer's recompute and
backward instead of stalling the next one: one more layer input on the GPU at a time. The gradients equal those of
plain checkpointing.

The plan turns offloading on by default for adapter training (LoRA, Q-LoRA) on one CUDA GPU, where those inputs are
a large share of the peak; full fine-tuning peaks with its gradients and optimizer states instead (llmft.plan).
`ActivationOffloadCallback` installs the function when training begins, after the Trainer has enabled gradient
checkpointing (which sets transformers' own checkpoint function on every checkpointed layer). It is for one process
without parameter sharding (the plan decides, llmft.plan): the backward pass inside backward is the reentrant
pattern, which DDP's and ZeRO's gradient hooks are not written for.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from llmft.recompute import LeanRecompute, lean_recompute_for

_streams: dict[torch.device, torch.cuda.Stream] = {}
# the input saved by the most recent checkpointed forward: the next one links to it, so that each layer's backward
# can fetch the input of the layer before it (next in backward) while it computes
_last_saved: weakref.ref | None = None


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class _SavedInput:
    """A checkpointed layer's input, held for its backward: in pinned host memory (offloaded; on the CPU, a copy),
    or as it is on the GPU. `previous` is the input of the layer that ran before it in forward, if still held."""

    __slots__ = ("host", "on_device", "copied_out", "copied_in", "previous", "__weakref__")

    def __init__(self, hidden_states: torch.Tensor, offload: bool) -> None:
        global _last_saved
        self.host = self.on_device = self.copied_out = self.copied_in = None
        if not offload:
            self.on_device = hidden_states.detach()
        elif hidden_states.is_cuda:
            stream = _copy_stream(hidden_states.device)
            stream.wait_stream(torch.cuda.current_stream(hidden_states.device))
            self.host = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(hidden_states, non_blocking=True)
            hidden_states.record_stream(stream)  # its memory is reused only once the copy is done
            self.copied_out = stream.record_event()
        else:
            self.host = hidden_states.detach().clone()
        self.previous, _last_saved = _last_saved, weakref.ref(self)

    def prefetch(self, device: torch.device) -> None:
        """Start copying an offloaded input back to the GPU on the side stream (after its copy out, which ran
        there first), so that it is there when its layer's backward starts."""
        if self.host is None or self.on_device is not None or not self.host.is_pinned():
            return
        stream = _copy_stream(device)
        with torch.cuda.stream(stream):
            self.on_device = self.host.to(device, non_blocking=True)
        self.copied_in = stream.record_event()

    def take(self, device: torch.device) -> torch.Tensor:
        """The input on `device`, for the recompute; the holder lets go of it."""
        if self.on_device is not None:
            tensor = self.on_device
            if self.copied_in is not None:  # prefetched on the side stream: used on this one
                current = torch.cuda.current_stream(device)
                current.wait_event(self.copied_in)
                tensor.record_stream(current)
        else:
            if self.copied_out is not None:  # the copy out finished before the copy back reads the host buffer
                torch.cuda.current_stream(device).wait_event(self.copied_out)
            tensor = self.host.to(device, non_blocking=True)
        self.host = self.on_device = None
        return tensor


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, function: Callable, offload: bool, lean: LeanRecompute | None, hidden_states: torch.Tensor, *args: Any
    ) -> Any:
        ctx.function, ctx.args, ctx.lean = function, args, lean
        ctx.device, ctx.input_requires_grad = hidden_states.device, hidden_states.requires_grad
        ctx.autocast = _autocast_state(hidden_states.device)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden_states.device) if hidden_states.is_cuda else None
        ctx.saved = _SavedInput(hidden_states, offload)
        with torch.no_grad():
            return function(hidden_states, *args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple:
        saved, ctx.saved = ctx.saved, None
        hidden_states = saved.take(ctx.device).requires_grad_(ctx.input_requires_grad)
        previous = saved.previous() if saved.previous is not None else None
        if previous is not None and ctx.device.type == "cuda":
            previous.prefetch(ctx.device)  # overlaps this layer's recompute and backward
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        lean = ctx.lean.recomputing() if ctx.lean is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), _autocast(ctx.device, ctx.autocast), lean:
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            outputs = ctx.function(hidden_states, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grad_input = hidden_states.grad if ctx.input_requires_grad else None
        return (None, None, None, grad_input) + (None,) * len(ctx.args)


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    kind = device.type
    return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _autocast(device: torch.device, state: tuple[bool, torch.dtype]) -> contextlib.AbstractContextManager:
    enabled, dtype = state
    return torch.autocast(device.type, dtype=dtype) if enabled else contextlib.nullcontext()


def offloaded_checkpoint(
    function: Callable,
    hidden_states: torch.Tensor,
    *args: Any,
    offload: bool = True,
    lean: LeanRecompute | None = None,
    **ignored: Any,
) -> Any:
    """A drop-in for the checkpoint function transformers calls per layer (`function(hidden_states, *args)`, other
    inputs bound in `function`): the input offloaded to host memory (`offload`, else kept on the GPU), the layer
    recomputed with `lean` (llmft.recompute) when given. torch.utils.checkpoint's options (`use_reentrant`, ...) do
    not apply and are ignored."""
    return _OffloadedCheckpoint.apply(function, offload, lean, hidden_states, *args)


def install_offloaded_checkpointing(model: torch.nn.Module, offload: bool = True, lean: bool = False) -> int:
    """Every checkpointed layer of `model` (transformers' GradientCheckpointingLayer, the decoder layers) checkpoints
    with `offloaded_checkpoint`: its input offloaded (`offload`), its recompute lean where the layer allows it
    (`lean`, llmft.recompute.lean_recompute_for); returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            recompute = lean_recompute_for(module) if lean else None
            module._gradient_checkpointing_func = functools.partial(
                offloaded_checkpoint, offload=offload, lean=recompute
            )
            count += 1
    return count


class ActivationOffloadCallback(TrainerCallback):
    """Installs `offloaded_checkpoint` when training begins (see the module docstring): inputs offloaded
    (`offload`), recompute lean (`lean`)."""

    def __init__(self, offload: bool = True, lean: bool = False) -> None:
        self.offload, self.lean = offload, lean

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is not None and install_offloaded_checkpointing(model, self.offload, self.lean) == 0:
            flag = "--offload_activations" if self.offload else "--lean_recompute"
            raise RuntimeError(f"{flag}: the model has no checkpointed layers")
