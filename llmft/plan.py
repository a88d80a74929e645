"""The run resolved once: what is trained (the mode), the model folder read, how the base is stored and loaded, how
the ranks share the model, the optimizer, the micro-batch's size, activation checkpointing and the kernels, as one
frozen `RunPlan` that the settings checks, the model builder, the saver, the memory preflight and the Trainer's
settings read instead of each deriving it again from the flags.

`resolve_plan(...)` builds it from the parsed arguments, before anything heavy loads and before the settings checks
(llmft/checks.py), which read it; llmft.config.parse_run does both. It never raises: what keeps a plan from serving
the run is for the checks to list. Whether the embeddings train is known only once the tokenizer has loaded
(ChatML tokens it lacked are added), and `RunPlan.with_added_tokens` returns the completed plan, a new frozen one.
`describe_plan` is the run's one log line for it (`log_plan`). `apply_plan_to_training_args` is the one place where
the plan writes into TrainingArguments: the settings the Trainer reads from there.

Modes (`RunPlan.mode`):
- `full`: every weight trains, in the compute dtype;
- `lora`: LoRA adapters on a frozen base in the compute dtype;
- `qlora-4bit`, `qlora-8bit`: adapters on a base that bitsandbytes quantizes on load (--q_lora True, --quant_bits);
- `lora-on-<method>` (`lora-on-gptq`, `lora-on-awq`, ...): adapters on a base stored quantized, as its config.json's
  quantization_config says (llmft.model_folder).
What is written down for later readers uses the coarser words of `RunPlan.coarse_mode` (full, lora, qlora).

Objectives (`RunPlan.objective`, --objective): sft, or a preference objective (llmft/objectives/preference.py), whose
`reference` says where the reference model's log-probabilities come from: `adapters-off` (the same model with its
adapters switched off: no second copy), `precomputed` (full fine-tuning: computed once before the first step and kept
in the run folder), or None (SFT, SimPO and ORPO need none).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from llmft.compile_cache import log_compile_plan
from llmft.distributed import bnb_4bit_storage_dtype, deepspeed_optimizer, shards_parameters, sharding_of
from llmft.kernels import Kernels, choose_kernels, padded
from llmft.model_folder import ModelFolder, model_folder

if TYPE_CHECKING:
    from llmft.args import (
        DataArguments,
        LoraArguments,
        ModelArguments,
        PreferenceArguments,
        QuantizationArguments,
        TrainingArguments,
    )

logger = logging.getLogger(__name__)

# what activation checkpointing passes to torch.utils.checkpoint unless --gradient_checkpointing_kwargs says
# otherwise: the non-reentrant implementation, which works with frozen inputs (a LoRA base) and with PEFT
DEFAULT_CHECKPOINTING_KWARGS = MappingProxyType({"use_reentrant": False})


@dataclass(frozen=True)
class QuantizeOnLoad:
    """bitsandbytes quantization of the base as it loads (Q-LoRA)."""

    bits: int  # 4 or 8
    quant_type: str | None  # nf4 / fp4 for 4 bits; None for 8 (LLM.int8)
    double_quant: bool  # 4 bits: the quantization constants quantized too
    storage_dtype: torch.dtype | None  # 4 bits: what the packed weights are stored in (llmft.distributed)


@dataclass(frozen=True)
class RunPlan:
    """One training run, resolved (see the module docstring). Mappings are read-only views."""

    mode: str  # full, lora, qlora-4bit, qlora-8bit, lora-on-<method>
    base_model: str  # --model_name_or_path as parse_args left it (a local folder made absolute)
    model: ModelFolder  # what --model_name_or_path holds, as read when the plan was made (llmft.model_folder)
    base_quantization: str | None  # how the base is stored quantized (gptq, awq, ...; llmft.model_folder); None: not
    quantize_on_load: QuantizeOnLoad | None  # Q-LoRA's bitsandbytes settings; None otherwise
    compute_dtype: torch.dtype  # bf16 / fp16 / fp32 from the precision flags
    sharding: str  # none, ddp, zero0..zero3, fsdp (llmft.distributed.sharding_of)
    offloaded: tuple[str, ...]  # optimizer and/or parameters held on the CPU; empty for none
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: Mapping  # what torch.utils.checkpoint gets
    kernels: Kernels  # attention kernel, packed rows' padding, Liger (llmft.kernels)
    packing: bool  # --packing: what the attention kernel was chosen for
    optimizer: str  # what builds the optimizer: --optim's name, or DeepSpeed's own (`optimizer_from_deepspeed`)
    optimizer_from_deepspeed: bool  # the --deepspeed config's "optimizer" section replaces --optim
    micro_batch_tokens: int  # tokens of one micro-batch at most, padding included (the memory preflight's worst case)
    micro_batch_rows: int  # the sequences those tokens are laid out in (1 when packed)
    # the base's module names (dotted paths), from its architecture built without weights; None where it cannot be
    # built so (remote code, no config.json at hand): what --lora_target_modules is checked against
    model_modules: frozenset[str] | None = None
    # the module names (last component) LoRA adapts: --lora_target_modules with all-linear (the linear layers but
    # the output head) and default (PEFT's choice for the architecture) resolved; None without LoRA, or where it
    # cannot be told before the weights load
    lora_targets: tuple[str, ...] | None = None
    offload_activations: bool = False  # checkpointed layer inputs held in host memory (llmft.activation_offload)
    lean_recompute: bool = False  # llmft's checkpoint function with the lean recompute (llmft.recompute)
    added_tokens: tuple[str, ...] = ()  # ChatML tokens the tokenizer lacked and got (`with_added_tokens`)
    objective: str = "sft"  # --objective: sft, dpo, simpo, orpo, kto
    reference: str | None = None  # adapters-off, precomputed, or None: no reference model (see the module docstring)

    @property
    def uses_lora(self) -> bool:
        return self.mode != "full"

    @property
    def coarse_mode(self) -> str:
        """`mode` in the run record's words (llmft_run.json and model cards, llmft.saving.describe_run; the memory
        preflight's MemorySetup): full, lora, or qlora for a base bitsandbytes quantizes on load. A base stored
        quantized trains as lora there, told apart by its `base_quantization`."""
        if not self.uses_lora:
            return "full"
        return "qlora" if self.quantize_on_load is not None else "lora"

    @property
    def quantized(self) -> bool:
        """The base is quantized, stored so or on load: loaded with a device map, prepared for k-bit training."""
        return self.quantize_on_load is not None or self.base_quantization is not None

    @property
    def shards_parameters(self) -> bool:
        """Each rank holds only a shard of every parameter (ZeRO-3 or FSDP: llmft.distributed.shards_parameters)."""
        return shards_parameters(self.sharding)

    @property
    def train_embeddings(self) -> bool:
        """With added tokens the input embeddings and output head train in full with LoRA: their new rows start
        untrained (full fine-tuning trains them anyway)."""
        return bool(self.added_tokens)

    def with_added_tokens(self, added_tokens: Sequence[str]) -> RunPlan:
        """This plan completed with the tokens the tokenizer was given (llmft.model.load_training_tokenizer)."""
        return dataclasses.replace(self, added_tokens=tuple(added_tokens))


def compute_dtype(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def resolve_plan(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    quant_args: QuantizationArguments,
    training_args: TrainingArguments,
    preference_args: PreferenceArguments | None = None,
) -> RunPlan:
    """The plan of a run from its parsed arguments (no `preference_args`: SFT); reads them and changes none of them,
    and never raises (the settings checks, llmft/checks.py, list what keeps it from serving the run)."""
    model = model_folder(model_args.model_name_or_path)
    base_quantization = model.quant_method
    dtype = compute_dtype(training_args)
    sharding, offloaded = sharding_of(training_args)
    quantize_on_load = None
    if quant_args.q_lora:
        four = quant_args.quant_bits == 4
        quantize_on_load = QuantizeOnLoad(
            bits=quant_args.quant_bits,
            quant_type=quant_args.quant_type if four else None,
            double_quant=quant_args.double_quant if four else False,
            storage_dtype=bnb_4bit_storage_dtype(sharding, dtype) if four else None,
        )
    if not lora_args.use_lora:
        mode = "full"
    elif quantize_on_load is not None:
        mode = f"qlora-{quantize_on_load.bits}bit"
    elif base_quantization is not None:
        mode = f"lora-on-{base_quantization}"
    else:
        mode = "lora"
    kwargs = training_args.gradient_checkpointing_kwargs or DEFAULT_CHECKPOINTING_KWARGS
    from_deepspeed = deepspeed_optimizer(training_args)
    objective = preference_args.objective if preference_args is not None else "sft"
    tokens, rows = _micro_batch(data_args, training_args, objective)
    modules, linears = _architecture_modules(model, model_args.trust_remote_code)
    targets = _lora_targets(lora_args, model, linears) if mode != "full" else None
    return RunPlan(
        mode=mode,
        base_model=model_args.model_name_or_path,
        model=model,
        base_quantization=base_quantization,
        quantize_on_load=quantize_on_load,
        compute_dtype=dtype,
        sharding=sharding,
        offloaded=offloaded,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        gradient_checkpointing_kwargs=MappingProxyType(dict(kwargs)),
        kernels=choose_kernels(model_args, data_args, training_args, sharded=shards_parameters(sharding)),
        packing=data_args.packing,
        optimizer=from_deepspeed or str(getattr(training_args.optim, "value", training_args.optim)),
        optimizer_from_deepspeed=from_deepspeed is not None,
        micro_batch_tokens=tokens,
        micro_batch_rows=rows,
        model_modules=modules,
        lora_targets=targets,
        offload_activations=_offloads_activations(training_args, sharding, mode),
        lean_recompute=_recomputes_lean(training_args, sharding, mode, lora_args),
        objective=objective,
        reference=_reference(objective, mode),
    )


def _reference(objective: str, mode: str) -> str | None:
    """Where the objective's reference log-probabilities come from (see the module docstring)."""
    from llmft.objectives.preference import REFERENCE_OBJECTIVES

    if objective not in REFERENCE_OBJECTIVES:
        return None
    return "precomputed" if mode == "full" else "adapters-off"


def _architecture_modules(
    model: ModelFolder, trust_remote_code: bool
) -> tuple[frozenset[str] | None, tuple[str, ...] | None]:
    """(every module's dotted name, the linear layers' last name components but the output head's) of the base's
    architecture built on the meta device from its config.json: no weights are read and no memory is taken. (None,
    None) for remote code (llmft runs none of it before the weights load), a model without a local config.json, or
    an architecture transformers cannot build so."""
    config = model.config
    if config is None or model.folder is None or (trust_remote_code and config.get("auto_map")):
        return None, None
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        architecture = transformers.AutoConfig.for_model(
            **{k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
        )
        # the class itself, not from_config: under ZeRO-3 that would partition the model (deepspeed.zero.Init)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(architecture)]
        with torch.device("meta"):
            built = model_class(architecture)
    except Exception:  # an architecture this transformers does not know: loading the weights will say so
        return None, None
    head = built.get_output_embeddings()
    names = frozenset(name for name, _ in built.named_modules() if name)
    linears = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in built.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )
    return names, tuple(linears)


def _lora_targets(
    lora_args: LoraArguments, model: ModelFolder, linears: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """--lora_target_modules as the module names LoRA adapts (see RunPlan.lora_targets)."""
    given = list(lora_args.lora_target_modules)
    if given == ["all-linear"]:
        return linears
    if given == ["default"]:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get((model.config or {}).get("model_type"))
        return tuple(default) if default else None
    return tuple(given)


def matches_module(target: str, module: str) -> bool:
    """Whether LoRA target name `target` adapts the module of dotted name `module`, as PEFT matches a list of
    target names: the whole name, or its last components."""
    return module == target or module.endswith("." + target)


def _micro_batch(data_args: DataArguments, training_args: TrainingArguments, objective: str) -> tuple[int, int]:
    """(tokens, rows) of a micro-batch at most: --max_tokens_per_batch when set, in one packed row; else
    --per_device_train_batch_size samples of up to --model_max_length tokens, in one packed row or one row each.
    Packed rows are padded (llmft.kernels.padded). A preference objective's sample is a pair of sequences (KTO: an
    answer and its KL sequence), packed always, so twice the tokens."""
    if data_args.max_tokens_per_batch:
        return padded(data_args.max_tokens_per_batch), 1
    rows = training_args.per_device_train_batch_size
    tokens = rows * data_args.model_max_length
    if objective != "sft":
        return padded(2 * tokens), 1
    return (padded(tokens), 1) if data_args.packing else (tokens, rows)


def _offloads_activations(training_args: TrainingArguments, sharding: str, mode: str) -> bool:
    """--offload_activations as given (checked: checkpointing, one process); unset, on for checkpointed adapter
    training on CUDA in one process without DeepSpeed or FSDP. Not for full fine-tuning: its peak comes with the
    gradients and optimizer states, not the activations, so offloading would cost time and save nothing there."""
    if training_args.offload_activations is not None:
        return bool(training_args.offload_activations)
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    one_process = sharding == "none" and training_args.world_size == 1
    return cuda and bool(training_args.gradient_checkpointing) and one_process and mode != "full"


def _recomputes_lean(training_args: TrainingArguments, sharding: str, mode: str, lora_args: LoraArguments) -> bool:
    """--lean_recompute as given (checked: checkpointing, one process, no LoRA dropout); unset, on for checkpointed
    adapter training (LoRA, Q-LoRA) on CUDA in one process without DeepSpeed or FSDP and without LoRA dropout, where
    the MLP's intermediate activations are a large share of the peak. Full fine-tuning's peak is its gradients and
    optimizer states, and its own weight gradients, summed chunk by chunk, take longer there."""
    if training_args.lean_recompute is not None:
        return bool(training_args.lean_recompute)
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    one_process = sharding == "none" and training_args.world_size == 1
    no_dropout = not (lora_args.use_lora and lora_args.lora_dropout > 0)
    return cuda and bool(training_args.gradient_checkpointing) and one_process and no_dropout and mode != "full"


def describe_plan(plan: RunPlan) -> str:
    """The plan as one log line."""
    base = plan.mode
    if plan.quantize_on_load is not None and plan.quantize_on_load.quant_type:
        base += f" ({plan.quantize_on_load.quant_type})"
    dtype = str(plan.compute_dtype).removeprefix("torch.")
    sharding = plan.sharding + (f", {' and '.join(plan.offloaded)} offloaded to the CPU" if plan.offloaded else "")
    checkpointing = "off"
    if plan.offload_activations:
        checkpointing = "on, layer inputs offloaded to host memory"
    elif plan.gradient_checkpointing:
        checkpointing = "on " + ", ".join(f"{k}={v}" for k, v in plan.gradient_checkpointing_kwargs.items())
    if plan.lean_recompute:
        checkpointing += ", lean recompute"
    embeddings = (
        f"trained in full for the added {' '.join(plan.added_tokens)}"
        if plan.train_embeddings and plan.uses_lora
        else "as the mode trains them"
    )
    if plan.objective != "sft":
        base += f", {plan.objective}" + (f" (reference: {plan.reference})" if plan.reference else "")
    return (
        f"plan: {base}, {dtype}; sharding {sharding}; activation checkpointing {checkpointing}; "
        f"{plan.kernels.describe(plan.packing)}; embeddings {embeddings}"
    )


def log_plan(plan: RunPlan, training_args: TrainingArguments) -> None:
    """The plan's one line in the log, from the ranks that log, and what it compiles before the first step."""
    if not training_args.should_log:
        return
    logger.warning("%s", describe_plan(plan))
    if plan.kernels.attention == "flex_attention":
        log_compile_plan("flex attention's forward and backward kernels (max-autotune: minutes with an empty cache)")
    if plan.kernels.liger:
        log_compile_plan("Liger-Kernel's Triton kernels, on first use", cache_dir=os.environ.get("TRITON_CACHE_DIR"))


def apply_plan_to_training_args(plan: RunPlan, training_args: TrainingArguments) -> None:
    """Write into `training_args` what the Trainer reads there and the plan decided; call it before the Trainer is
    built, and nothing else writes these:
    - Liger: the Trainer applies Liger-Kernel to the model from `use_liger_kernel` / `liger_kernel_config`;
    - activation checkpointing's kwargs: the Trainer enables checkpointing on the model again when training starts,
      with the kwargs in `activation_checkpointing_kwargs` (transformers 5; `gradient_checkpointing_kwargs` is its
      deprecated alias, kept equal to it as TrainingArguments.__post_init__ does), so they must be the plan's for the
      model to be checkpointed as llmft.model.build_model prepared it."""
    training_args.use_liger_kernel = plan.kernels.liger
    config = plan.kernels.liger_config
    training_args.liger_kernel_config = dict(config) if config is not None else None
    kwargs = dict(plan.gradient_checkpointing_kwargs)
    training_args.gradient_checkpointing_kwargs = kwargs
    if hasattr(training_args, "activation_checkpointing_kwargs"):
        training_args.activation_checkpointing_kwargs = kwargs
