"""Packed-sample attention with PyTorch's own variable-length flash kernel (`torch.nn.attention.varlen`), registered
with transformers under the name `VARLEN` ("llmft_varlen").

A packed row holds whole samples end to end, positions restarting at 0 for each (llmft.data.packing). The kernel is
handed the samples' boundaries (cumulative offsets, `cu_seq_lens`) and computes causal attention inside each sample
and nothing across them: no mask is materialised and no work is spent on blocks between samples. Unlike flex
attention it is a precompiled kernel, so the first training step starts without a kernel compile.

The boundaries come with the batch when the packing collator computed them on the host (`cu_seq_lens_q`,
`max_length_q`: transformers passes a batch's extra keys down to every attention call), so no layer waits on the
GPU; otherwise they are derived once per forward pass from `position_ids`. Needs CUDA and a GPU the flash kernel
supports (compute capability 8.0 or newer); the varlen API exists from PyTorch 2.10 on, and its keyword arguments
differ between releases (GQA and causality are passed as each release takes them).
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable

VARLEN = "llmft_varlen"  # the name transformers knows this attention by (attn_implementation)


def varlen_available() -> bool:
    """Whether this PyTorch build has the variable-length flash kernel and a CUDA GPU that runs it."""
    return _varlen_kernel() is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@functools.cache
def _varlen_kernel() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _kernel_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(_varlen_kernel()).parameters)


def register_varlen_attention() -> None:
    """Make `VARLEN` a valid `attn_implementation` (idempotent). Its mask function builds no mask: the kernel keeps
    samples apart from their boundaries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _no_mask)


def _no_mask(*args: object, **kwargs: object) -> None:
    return None


def sample_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample offsets (int32, starting 0, ending at the token count) and the longest sample's length, of
    the rows in `position_ids` read as one sequence of tokens whose samples start where positions are 0."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:  # a row that does not start a sample: it starts one regardless
        starts = torch.cat([starts.new_zeros(1), starts])
    offsets = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, T, D), key and value (B, H_kv, T, D) -> (B, T, H, D), no
    weights. The B rows are read as one token sequence cut at the sample boundaries (see the module docstring)."""
    if attention_mask is not None:
        raise ValueError(f"{VARLEN} attention takes packed rows without an attention mask (llmft.data.packing)")
    if dropout:
        raise ValueError(f"{VARLEN} attention has no attention dropout; the model asked for {dropout}")
    offsets, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if offsets is None or longest is None:
        offsets, longest = sample_boundaries(kwargs["position_ids"])
    batch, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * tokens, heads, dim)
    k = key.transpose(1, 2).reshape(batch * tokens, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * tokens, kv_heads, dim)
    offsets = offsets.to(device=q.device, dtype=torch.int32)
    out = _call_kernel(q, k, v, offsets, int(longest), scaling, sliding_window)
    return out.view(batch, tokens, heads, dim), None


def _call_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    longest: int,
    scale: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal varlen attention, with the keyword arguments this PyTorch release's kernel takes."""
    parameters = _kernel_parameters()
    options: dict[str, object] = {}
    if "scale" in parameters:
        options["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"this PyTorch's varlen attention takes no scale; the model asks for {scale}")
    if "window_size" in parameters:
        options["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif "is_causal" in parameters and sliding_window is None:
        options["is_causal"] = True
    else:
        what = "sliding-window" if sliding_window is not None else "causal"
        raise ValueError(f"this PyTorch's varlen attention cannot compute {what} attention")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:  # grouped-query attention spelt out: each key/value head repeated for its group of query heads
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return _varlen_kernel()(q, k, v, offsets, offsets, longest, longest, **options)
