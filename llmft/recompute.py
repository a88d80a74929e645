"""A leaner recompute of a checkpointed decoder layer in backward (`--lean_recompute`), for llmft's own checkpoint
function (llmft.activation_offload).

Under gradient checkpointing each decoder layer's backward recomputes the layer's forward, then back-propagates
through it. In a pre-norm decoder layer whose MLP output goes straight into the residual sum that the layer returns
(`h = x + attn(norm1(x))`, `out = h + mlp(norm2(h))`: the layers in `RESIDUAL_MLP_LAYERS`), backward never reads the
value of that MLP output, only the gradient that reaches it. So during the recompute the MLP computes nothing in
forward (`_DeferredMLP` hands the residual sum an uncomputed tensor of the right shape) and does its work in its
backward, once the gradient of the layer output is known, `CHUNK_TOKENS` tokens at a time: the chunk's forward,
then its backward. Two savings:
- memory: the MLP's intermediate activations (the gate and up projections and their product, tokens x intermediate
  size each, the largest tensors of the layer) exist for one chunk of tokens at a time, not the whole micro-batch;
- time: the down projection's own product is skipped there too (its value, again, feeds only the layer output);
  only what its backward needs is computed (`_GradientOnlyLinear`): the gradient of its input from the weight
  (dequantized for a 4-bit base), and of its weight when that trains. Adapters on it (plain LoRA) run as usual.
The gradients are plain checkpointing's, up to the order in which each chunk's weight gradients are summed.

A layer's MLP is deferred only when nothing in it draws random numbers (dropout would draw other masks chunk by
chunk than the forward did: LoRA dropout must be 0); the down projection's product is skipped only on an
`nn.Linear` or bitsandbytes 4-bit base with at most plain LoRA on it (DoRA and the other variants read the base's
output), and is computed as usual otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

# decoder layers whose forward ends `return residual + self.mlp(self.post_attention_layernorm(residual))`
RESIDUAL_MLP_LAYERS = frozenset({"Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer"})
CHUNK_TOKENS = 4096  # tokens of one MLP chunk in backward: large enough to keep the products efficient


class LeanRecompute:
    """One decoder layer's lean recompute: `recomputing()` wraps the layer's recompute in backward."""

    def __init__(self, mlp: torch.nn.Module, chunk_tokens: int) -> None:
        self.mlp, self.chunk_tokens = mlp, chunk_tokens
        self.down_base = _gradient_only_base(getattr(mlp, "down_proj", None))

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """The MLP's forward deferred to its backward (see the module docstring) while the layer is recomputed."""
        with _swapped_forward(self.mlp, functools.partial(_deferred_mlp_forward, self, self.mlp.forward)):
            yield

    @contextlib.contextmanager
    def down_for_gradient_only(self) -> Iterator[None]:
        """The down projection's base computes no product in forward, only its gradients in backward."""
        if self.down_base is None:
            yield
            return
        base = self.down_base
        with _swapped_forward(base, functools.partial(_gradient_only_forward, base)):
            yield


def lean_recompute_for(layer: torch.nn.Module, chunk_tokens: int | None = None) -> LeanRecompute | None:
    """The lean recompute of a decoder layer, in chunks of `chunk_tokens` (default `CHUNK_TOKENS`), or None where it
    does not apply (see the module docstring)."""
    mlp = getattr(layer, "mlp", None)
    if type(layer).__name__ not in RESIDUAL_MLP_LAYERS or mlp is None:
        return None
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in mlp.modules()):
        return None
    return LeanRecompute(mlp, chunk_tokens or CHUNK_TOKENS)


@contextlib.contextmanager
def _swapped_forward(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    own = module.__dict__.get("forward")  # an instance's own forward (Liger patches some), else the class's
    module.forward = forward
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            del module.forward


def _deferred_mlp_forward(lean: LeanRecompute, forward: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    if args or kwargs or not torch.is_grad_enabled():
        return forward(x, *args, **kwargs)
    return _DeferredMLP.apply(x, forward, lean)


class _DeferredMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward: Callable, lean: LeanRecompute) -> torch.Tensor:
        ctx.forward, ctx.lean = forward, lean
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        ctx.save_for_backward(x)
        return x.new_empty(x.shape)  # never read: only the residual sum takes it, and backward reads no value there

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        flat = x.detach().reshape(-1, x.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1])
        needs_input_grad = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(flat) if needs_input_grad else None
        enabled, dtype = ctx.autocast
        autocast = torch.autocast(x.device.type, dtype=dtype) if enabled else contextlib.nullcontext()
        with torch.enable_grad(), autocast, ctx.lean.down_for_gradient_only():
            for start in range(0, flat.shape[0], ctx.lean.chunk_tokens):
                chunk = flat[start : start + ctx.lean.chunk_tokens].detach().requires_grad_(needs_input_grad)
                out = ctx.forward(chunk)
                torch.autograd.backward(out, grad[start : start + chunk.shape[0]].to(out.dtype))
                if needs_input_grad:
                    grad_x[start : start + chunk.shape[0]] = chunk.grad
        return (grad_x.view(x.shape) if needs_input_grad else None), None, None


def _gradient_only_base(down: torch.nn.Module | None) -> torch.nn.Module | None:
    """The linear layer under `down` whose product can be skipped: down itself, or the base of plain LoRA on it."""
    if down is None:
        return None
    base = down
    if hasattr(down, "base_layer") and hasattr(down, "lora_A"):  # PEFT's LoRA layer
        if getattr(down, "lora_variant", None) or getattr(down, "merged", False) or down.disable_adapters:
            return None
        base = down.base_layer
    if type(base) is torch.nn.Linear or _is_bnb_4bit(base):
        return base
    return None


def _is_bnb_4bit(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def _gradient_only_forward(base: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    weight = base.weight
    bias = base.bias if base.bias is not None and base.bias.requires_grad else None
    return _GradientOnlyLinear.apply(x, weight if weight.requires_grad else None, bias, base)


def _dense_weight(base: torch.nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): a 4-bit base's dequantized, as bitsandbytes' own backward does."""
    if _is_bnb_4bit(base):
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    return base.weight


class _GradientOnlyLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, base: torch.nn.Module
    ) -> torch.Tensor:
        ctx.base = base
        ctx.save_for_backward(x if weight is not None else None)
        return x.new_empty((*x.shape[:-1], base.out_features))  # never read (see the module docstring)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        base = ctx.base
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _dense_weight(base).to(grad.dtype)
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = (flat.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(base.weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat.sum(0).to(base.bias.dtype)
        return grad_x, grad_weight, grad_bias, None
