"""Which attention kernel and fused kernels a run uses, decided once before the model loads (`choose_kernels`, a
field of the run's plan, llmft/plan.py, which logs the choice and hands Liger's to the Trainer); what keeps the
choice from serving the run is listed by `kernel_problems`, among the settings checks (llmft/checks.py).

Attention: the flag `--attn_implementation` when given. Otherwise, for packed training, the fastest kernel that keeps
packed samples apart and needs no compile before the first step: flash attention 2 when installed, else on a CUDA
GPU that runs it PyTorch's own variable-length flash kernel (`llmft_varlen`, llmft.attention); both are handed the
sample boundaries and compute nothing across them. Else SDPA (a block-diagonal mask materialised per micro-batch, and
attention computed over the whole row). Flex attention (a block-sparse document mask) keeps samples apart too, but
transformers compiles it with max-autotune for training, minutes before the first step on an empty kernel cache:
it is used only when asked for. Without packing, transformers' own default.

Packing is exact only for models whose attention masks come from transformers' `masking_utils`, which is where
restarting position ids are read as sample boundaries; any other model (remote code, older architectures) would let
packed samples attend to each other, and is refused with the way out (`--packing False`).

Liger-Kernel: `--use_liger_kernel` when given. Unset, llmft turns on Liger's fused linear + cross-entropy (the
output head and the loss computed in chunks, so the logits over a 151k vocabulary are never materialised) and its
RMSNorm, SwiGLU and RoPE kernels (`LIGER_DEFAULT`; BENCHMARKS.md has what each choice measured), on CUDA with
liger-kernel installed, and not under ZeRO-3 or FSDP, where the output head's weight is sharded outside the module
call Liger bypasses.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import transformers

from llmft.attention import VARLEN, varlen_available
from llmft.model_folder import model_folder

if TYPE_CHECKING:
    from llmft.args import DataArguments, ModelArguments, TrainingArguments

# Packed rows and a vocabulary that grows are padded to a multiple of this many tokens (`padded`): shapes that the
# GPU's matrix units, and compiled kernels' caches, take without a remainder.
PAD_MULTIPLE = 64


def padded(length: int) -> int:
    """`length` rounded up to a multiple of PAD_MULTIPLE."""
    return math.ceil(length / PAD_MULTIPLE) * PAD_MULTIPLE


# Liger's kernels llmft turns on by default: the fused output head + loss (which replaces its plain cross-entropy),
# RMSNorm, SwiGLU and RoPE
LIGER_DEFAULT = MappingProxyType(
    {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": True, "rms_norm": True, "swiglu": True}
)


@dataclass(frozen=True)
class Kernels:
    attention: str | None  # what from_pretrained gets as attn_implementation; None: transformers' default
    pad_packed_to: int | None  # packed rows padded to this fixed length (compiled kernels), None: `padded`
    liger: bool = False  # the Trainer applies Liger-Kernel (its `use_liger_kernel`)
    liger_config: Mapping | None = None  # the Trainer's `liger_kernel_config`: which Liger kernels; None: all

    def describe(self, packing: bool) -> str:
        """The choice in words, as the run's log line (llmft.plan.describe_plan) shows it."""
        liger = "off"
        if self.liger:
            liger = "fused loss, RMSNorm, SwiGLU, RoPE" if self.liger_config == LIGER_DEFAULT else "on"
        attention = self.attention or "(transformers' default)"
        return f"attention {attention}{' (packed samples kept apart)' if packing else ''}; Liger {liger}"

    @property
    def takes_sample_boundaries(self) -> bool:
        """The attention kernel reads packed samples' offsets from the batch (llmft.data.packing.PackedCollator)."""
        return self.attention == VARLEN  # transformers' flash attention finds them from the positions itself


def on_cuda(training_args: TrainingArguments) -> bool:
    """Whether the run computes on a CUDA GPU."""
    return torch.cuda.is_available() and not training_args.use_cpu


def choose_kernels(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, sharded: bool
) -> Kernels:
    """The kernels of this run (see the module docstring); `sharded`: whether each rank holds only a shard of every
    parameter (the plan's `shards_parameters`). Reads the arguments and changes none of them; a choice that cannot
    serve the run is `kernel_problems`' to report."""
    cuda = on_cuda(training_args)
    attention = model_args.attn_implementation
    if attention is None and data_args.packing:
        attention = _packing_attention(cuda)
    pad_to = (data_args.max_tokens_per_batch or None) if attention == "flex_attention" else None

    liger, config = training_args.use_liger_kernel, training_args.liger_kernel_config
    if liger is None:
        liger = cuda and not sharded and importlib.util.find_spec("liger_kernel") is not None
        config = LIGER_DEFAULT if liger else None
    if config is not None and not isinstance(config, MappingProxyType):
        config = MappingProxyType(dict(config))
    return Kernels(attention, pad_to, bool(liger), config)


def kernel_problems(
    kernels: Kernels, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> list[str]:
    """Why `kernels` (the plan's) cannot serve this run: an attention kernel this machine cannot train with, or
    packing for a model whose attention masks would let packed samples attend to each other."""
    problems = []
    cuda = on_cuda(training_args)
    if data_args.packing and (problem := _packing_isolation_problem(model_args)) is not None:
        problems.append(problem)
    if kernels.attention == "flex_attention" and not cuda:
        problems.append(
            "--attn_implementation flex_attention trains on CUDA only (PyTorch's flex attention has "
            "no backward pass on CPU): use sdpa or eager"
        )
    if kernels.attention == VARLEN and not (cuda and varlen_available()):
        problems.append(
            f"--attn_implementation {VARLEN} needs a CUDA GPU of compute capability 8.0 or newer and a PyTorch "
            "with torch.nn.attention.varlen (2.10 or newer): use sdpa"
        )
    return problems


def _packing_attention(cuda: bool) -> str:
    from transformers.utils import is_flash_attn_2_available

    if cuda and is_flash_attn_2_available():
        return "flash_attention_2"
    if cuda and varlen_available():
        return VARLEN
    return "sdpa"


def _packing_isolation_problem(model_args: ModelArguments) -> str | None:
    """Packing refused for a model whose attention masks do not come from transformers' masking_utils."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = model_folder(model_args.model_name_or_path).config
    if config is None:
        return None  # a Hub id not in the cache: loading reports it
    model_type = config.get("model_type")
    remote = model_args.trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {})
    class_name = None if remote else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    model_class = getattr(transformers, class_name, None) if class_name else None
    module = sys.modules.get(model_class.__module__) if model_class is not None else None
    if module is None or not hasattr(module, "create_causal_mask"):
        what = "the model's remote code" if remote else f"model type {model_type!r}"
        return (
            f"--packing True: {what} does not build its attention masks with transformers' "
            "masking_utils, so packed samples could attend to each other; use --packing False"
        )
    return None
