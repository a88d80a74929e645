"""Activation checkpointing with each decoder layer's input kept in host memory (`--offload_activations`).

Under gradient checkpointing a decoder layer keeps only its input hidden state for backward, and recomputes the rest
there; over all layers those inputs are most of the activation memory left (layers x tokens x hidden x 2 bytes: 3.3
GB for a 7B shape at 16,384 tokens). `offloaded_checkpoint` is a checkpoint function that copies the input to pinned
host memory on a side stream as the layer's forward starts (the copy overlaps the layer's compute), lets the GPU copy
go once the copy is done, and in backward brings it back, recomputes the layer under the forward's autocast and
random-number state, and back-propagates through it. The gradients equal those of plain checkpointing.

The plan turns it on by default for adapter training (LoRA, Q-LoRA) on one CUDA GPU, where those inputs are a large
share of the peak; full fine-tuning peaks with its gradients and optimizer states instead (llmft.plan).
`ActivationOffloadCallback` installs it when training begins, after the Trainer has enabled gradient checkpointing
(which sets transformers' own checkpoint function on every checkpointed layer). It is for one process without
parameter sharding (the plan decides, llmft.plan): the backward pass inside backward is the reentrant pattern, which
DDP's and ZeRO's gradient hooks are not written for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, function: Callable, hidden_states: torch.Tensor, *args: Any) -> Any:
        ctx.function, ctx.args = function, args
        ctx.device, ctx.input_requires_grad = hidden_states.device, hidden_states.requires_grad
        ctx.autocast = _autocast_state(hidden_states.device)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden_states.device) if hidden_states.is_cuda else None
        if hidden_states.is_cuda:
            stream = _copy_stream(hidden_states.device)
            stream.wait_stream(torch.cuda.current_stream(hidden_states.device))
            host = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(hidden_states, non_blocking=True)
            hidden_states.record_stream(stream)  # its memory is reused only once the copy is done
            ctx.copied = stream.record_event()
        else:
            host, ctx.copied = hidden_states.detach().clone(), None
        ctx.host = host
        with torch.no_grad():
            return function(hidden_states, *args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple:
        if ctx.copied is not None:  # the copy out finished before the copy back reads the host buffer
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
        hidden_states = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(ctx.input_requires_grad)
        ctx.host = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), _autocast(ctx.device, ctx.autocast):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            outputs = ctx.function(hidden_states, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if torch.is_tensor(o) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, hidden_states.grad if ctx.input_requires_grad else None) + (None,) * len(ctx.args)


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    kind = device.type
    return torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _autocast(device: torch.device, state: tuple[bool, torch.dtype]) -> contextlib.AbstractContextManager:
    enabled, dtype = state
    return torch.autocast(device.type, dtype=dtype) if enabled else contextlib.nullcontext()


def offloaded_checkpoint(function: Callable, hidden_states: torch.Tensor, *args: Any, **ignored: Any) -> Any:
    """A drop-in for the checkpoint function transformers calls per layer (`function(hidden_states, *args)`, other
    inputs bound in `function`); torch.utils.checkpoint's options (`use_reentrant`, ...) do not apply and are
    ignored."""
    return _OffloadedCheckpoint.apply(function, hidden_states, *args)


def install_offloaded_checkpointing(model: torch.nn.Module) -> int:
    """Every checkpointed layer of `model` (transformers' GradientCheckpointingLayer, the decoder layers) checkpoints
    with `offloaded_checkpoint`; returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = offloaded_checkpoint
            count += 1
    return count


class ActivationOffloadCallback(TrainerCallback):
    """Installs `offloaded_checkpoint` when training begins (see the module docstring)."""

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is not None and install_offloaded_checkpointing(model) == 0:
            raise RuntimeError("--offload_activations: the model has no checkpointed layers to offload")
