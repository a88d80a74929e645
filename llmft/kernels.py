"""Which attention kernel and fused kernels a run uses, decided once before the model loads.

Attention: the flag `--attn_implementation` when given. Otherwise, for packed training, the fastest kernel that keeps
packed samples apart and is installed: flash attention 2 (varlen: it is handed the sample boundaries and computes
nothing across them), else on CUDA flex attention (a block-sparse document mask: blocks across samples are skipped),
else SDPA (a block-diagonal mask materialised per micro-batch, and attention computed over the whole row). Without
packing, transformers' own default.

Packing is exact only for models whose attention masks come from transformers' `masking_utils`, which is where
restarting position ids are read as sample boundaries; any other model (remote code, older architectures) would let
packed samples attend to each other, and is refused with the way out (`--packing False`).

Liger-Kernel: `--use_liger_kernel` when given. Unset, llmft turns on only Liger's fused linear + cross-entropy (the
output head and the loss computed in chunks, so the logits over a 151k vocabulary are never materialised), on CUDA
with liger-kernel installed, and not under ZeRO-3 or FSDP, where the output head's weight is sharded outside the
module call Liger bypasses.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from llmft.distributed import shards_parameters
from llmft.errors import ConfigError

logger = logging.getLogger(__name__)

# Liger's fused output head + loss, and none of its other kernels: on an H200 it made full fine-tuning of a 1.5B shape
# 4.5% faster and cut its peak memory from 38.0 to 13.8 GiB (README, Speed); the others were not measured here
FUSED_LOSS_ONLY = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": False, "rms_norm": False,
                   "swiglu": False}


@dataclass(frozen=True)
class Kernels:
    attention: str | None  # what from_pretrained gets as attn_implementation; None: transformers' default
    pad_packed_to: int | None  # packed rows padded to this fixed length (compiled kernels), None: a multiple of 64


def choose_kernels(model_args, data_args, training_args) -> Kernels:
    """The kernels of this run (see the module docstring). Liger is the Trainer's to apply: its flags in
    `training_args` are set to the choice."""
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    attention = model_args.attn_implementation
    if attention is None and data_args.packing:
        attention = _packing_attention(cuda)
    if data_args.packing:
        _check_packing_isolates(model_args)
    if attention == "flex_attention" and not cuda:
        raise ConfigError(["--attn_implementation flex_attention trains on CUDA only (PyTorch's flex attention has "
                           "no backward pass on CPU): use sdpa or eager"])
    pad_to = (data_args.max_tokens_per_batch or None) if attention == "flex_attention" else None

    liger, config = training_args.use_liger_kernel, training_args.liger_kernel_config
    if liger is None:
        sharded = shards_parameters(training_args)
        liger = cuda and not sharded and importlib.util.find_spec("liger_kernel") is not None
        config = FUSED_LOSS_ONLY if liger else None
    training_args.use_liger_kernel, training_args.liger_kernel_config = bool(liger), config
    kernels = Kernels(attention, pad_to)
    if training_args.should_log:
        logger.warning("kernels: attention %s%s; Liger %s", attention or "(transformers' default)",
                       " (packed samples kept apart)" if data_args.packing else "",
                       ("fused linear cross-entropy" if config == FUSED_LOSS_ONLY else "on") if liger else "off")
    return kernels


def _packing_attention(cuda: bool) -> str:
    from transformers.utils import is_flash_attn_2_available

    if cuda and is_flash_attn_2_available():
        return "flash_attention_2"
    if cuda:
        return "flex_attention"
    return "sdpa"


def _check_packing_isolates(model_args) -> None:
    """Refuse packing for a model whose attention masks do not come from transformers' masking_utils."""
    import sys

    import transformers

    from llmft.checkpoint import model_folder

    config = model_folder(model_args.model_name_or_path).config
    if config is None:
        return  # a Hub id not in the cache: loading reports it
    model_type = config.get("model_type")
    remote = model_args.trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {})
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = None if remote else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    model_class = getattr(transformers, class_name, None) if class_name else None
    module = sys.modules.get(model_class.__module__) if model_class is not None else None
    if module is None or not hasattr(module, "create_causal_mask"):
        what = "the model's remote code" if remote else f"model type {model_type!r}"
        raise ConfigError([f"--packing True: {what} does not build its attention masks with transformers' "
                           "masking_utils, so packed samples could attend to each other; use --packing False"])
