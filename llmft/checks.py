"""The settings checks of a training run, in one place: `validate` collects every problem with the parsed settings
and the run's plan (llmft/plan.py), as messages naming the flags, and llmft.config.parse_run raises them together in
one ConfigError before anything heavy loads. The checks read the flags as given, contradictions included, and what
the plan resolved from them (the base's quantization, the sharding, the optimizer, the kernels: kernel_problems)
instead of working it out again.

What they probe on disk: the base model folder (through llmft.model_folder) and the data files; what --output_dir
and the checkpoint to resume from allow is llmft.run_folder's (`output_dir_problems`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from llmft.attention import VARLEN
from llmft.data.reading import data_file_problem
from llmft.kernels import kernel_problems
from llmft.model_folder import model_folder
from llmft.objectives.preference import preference_problems
from llmft.plan import matches_module

if TYPE_CHECKING:
    from llmft.args import (
        DataArguments,
        LoraArguments,
        ModelArguments,
        PreferenceArguments,
        QuantizationArguments,
        TrainingArguments,
    )
    from llmft.plan import RunPlan


def validate(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    quant_args: QuantizationArguments,
    training_args: TrainingArguments | None,
    plan: RunPlan | None,
    preference_args: PreferenceArguments | None = None,
) -> list[str]:
    """Every problem with these settings and their plan, as messages naming the flags; empty when the run can start.
    `training_args` and `plan` may be None (the training arguments failed their own checks, so there is no plan):
    the other settings are still checked. No `preference_args`: an SFT run."""
    model = model_folder(model_args.model_name_or_path)  # the plan's, read once (cached), named as it was given
    problems = model.problems("--model_name_or_path", trust_remote_code=model_args.trust_remote_code)
    for flag in ("data_path", "eval_data_path"):
        path = getattr(data_args, flag)
        if path is not None and (problem := data_file_problem(path)) is not None:
            problems.append(f"--{flag} {path}: {problem}")
    if data_args.model_max_length < 16:
        problems.append("--model_max_length must be at least 16")
    # Above the model's context is warned, not refused: the default is above many models' context, and a run whose
    # samples are all shorter than the context is fine. rope_scaling (YaRN, Llama 3's) extends the context.
    config = model.config or {}
    context, rope = config.get("max_position_embeddings"), config.get("rope_scaling")
    if isinstance(context, int) and isinstance(rope, dict) and isinstance(rope.get("factor"), (int, float)):
        original = rope.get("original_max_position_embeddings")
        context = max(context, int((original if isinstance(original, int) else context) * rope["factor"]))
    if isinstance(context, int) and data_args.model_max_length > context:
        logging.getLogger(__name__).warning(
            "--model_max_length %d is above the model's context of %d tokens (max_position_embeddings in its "
            "config.json): samples longer than %d tokens would train positions the model never learned; lower "
            "--model_max_length to %d, or extend the context with rope_scaling in the model's config",
            data_args.model_max_length,
            context,
            context,
            context,
        )
    problems += _batching_problems(model_args, data_args)
    if data_args.lazy_preprocess and data_args.overlong_samples == "drop":
        problems.append(
            "--lazy_preprocess tokenizes samples as they are used, so it cannot drop over-long ones: "
            "use --overlong_samples truncate, or eager preprocessing"
        )

    if quant_args.q_lora and not lora_args.use_lora:
        problems.append("--q_lora True trains LoRA adapters on a quantized base: add --use_lora True")
    if quant_args.quant_bits == 8 and quant_args.quant_type != "nf4":
        problems.append("--quant_type applies to 4-bit quantization only; leave it out with --quant_bits 8")
    if lora_args.use_lora and plan is not None:
        problems += _lora_target_problems(lora_args, plan)
    if lora_args.use_lora:
        if lora_args.lora_r <= 0 or not (math.isfinite(lora_args.lora_alpha) and lora_args.lora_alpha > 0):
            problems.append("--lora_r and --lora_alpha must be positive")
        if not 0 <= lora_args.lora_dropout < 1:
            problems.append("--lora_dropout must be in [0, 1)")
        if lora_args.lora_dropout > 0 and training_args is not None and training_args.lean_recompute:
            problems.append(
                "--lean_recompute True recomputes the MLP in chunks, which would draw other dropout masks than the "
                "forward did: use --lora_dropout 0, or --lean_recompute False"
            )

    quant_method = plan.base_quantization if plan is not None else model.quant_method
    if quant_method == "gptq":
        if not lora_args.use_lora:
            problems.append(
                "the base model is GPTQ-quantized: its weights cannot be fine-tuned in full; add --use_lora True"
            )
        if quant_args.q_lora:
            problems.append("the base model is already GPTQ-quantized: --q_lora would quantize it again; drop --q_lora")
    elif quant_method is not None and (quant_args.q_lora or not lora_args.use_lora):
        problems.append(
            f"the base model is already quantized ({quant_method}): only --use_lora True without --q_lora can train it"
        )
    problems += _lora_variant_problems(lora_args, quant_args, training_args, plan, quant_method)
    if training_args is not None and plan is not None:
        problems += kernel_problems(plan.kernels, model_args, data_args, training_args)
        problems += _report_to_problems(training_args)
        problems += _training_problems(data_args, quant_args, training_args, plan)
        if training_args.fsdp:
            problems += _fsdp_problems(lora_args, quant_args, training_args)
    if preference_args is not None:
        problems += preference_problems(preference_args)
        if preference_args.objective != "sft":
            problems += _preference_training_problems(
                preference_args.objective, data_args, lora_args, training_args, plan
            )
    return problems


def _preference_training_problems(
    objective: str,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: TrainingArguments | None,
    plan: RunPlan | None,
) -> list[str]:
    """Settings of SFT training that a preference objective cannot serve (llmft.data.preference, its collators)."""
    problems, flag = [], f"--objective {objective}"
    if not data_args.packing:
        problems.append(
            f"{flag} packs each micro-batch's sequences into one row (there is no padded preference collator): "
            "drop --packing False"
        )
    if data_args.lazy_preprocess:
        problems.append(f"{flag} renders its preference data up front: drop --lazy_preprocess")
    if data_args.train_turns != "all":
        problems.append(
            f"--train_turns {data_args.train_turns} is SFT's: with {flag} the answers' turns are trained and the "
            "prompt's never are"
        )
    budget = data_args.max_tokens_per_batch
    if budget and budget >= data_args.model_max_length and budget < 2 * data_args.model_max_length:
        problems.append(
            f"--max_tokens_per_batch {budget} is below twice --model_max_length {data_args.model_max_length}: a "
            f"micro-batch of {flag} holds whole pairs (KTO: an answer and its KL sequence), two sequences of up to "
            "--model_max_length tokens each; raise it or lower --model_max_length"
        )
    # the policy is compared with the reference (and with itself, in SimPO and ORPO): dropout would make that
    # comparison noise, which is why TRL's preference trainers turn dropout off by default
    if lora_args.use_lora and lora_args.lora_dropout > 0:
        problems.append(
            f"--lora_dropout {lora_args.lora_dropout}: {flag} compares log-probabilities of the policy and the "
            "reference, which dropout would blur with noise (TRL turns it off for preference training): use "
            "--lora_dropout 0"
        )
    if plan is not None and plan.reference == "adapters-off" and lora_args.changes_base_weights:
        problems.append(
            f"--lora_init {lora_args.lora_init} changes the base weights as training starts, so the base with its "
            f"adapters off is no longer the reference model {flag} needs: use --lora_init default or gaussian"
        )
    if training_args is not None and training_args.neftune_noise_alpha:
        problems.append(
            f"--neftune_noise_alpha adds noise to the embeddings of every forward, the reference's included, which "
            f"{flag} compares the policy with: drop it"
        )
    if training_args is not None and training_args.label_smoothing_factor:
        problems.append(
            f"--label_smoothing_factor smooths SFT's token loss, which {flag} does not compute: for flipped "
            "preferences use --label_smoothing (with --loss_type robust for dpo)"
        )
    return problems


def _lora_target_problems(lora_args: LoraArguments, plan: RunPlan) -> list[str]:
    """Target names the base has no module for, checked against its architecture before the weights load (the
    plan's `model_modules`). As PEFT does, a run is refused only when no name matches any module (PEFT would fail
    once the model had loaded); names that match nothing beside others that do are named in a warning."""
    given = list(lora_args.lora_target_modules)
    if plan.model_modules is None or given in (["all-linear"], ["default"]):
        return []
    unmatched = [name for name in given if not any(matches_module(name, m) for m in plan.model_modules)]
    if not unmatched:
        return []
    known = sorted({last for m in plan.model_modules if not (last := m.rsplit(".", 1)[-1]).isdigit()})
    if len(unmatched) == len(given):
        return [
            f"--lora_target_modules {' '.join(given)}: the model has no module of that name; its modules include "
            f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''} (or use all-linear, or default)"
        ]
    logging.getLogger(__name__).warning(
        "--lora_target_modules: the model has no module named %s; LoRA adapts %s only",
        ", ".join(unmatched),
        ", ".join(n for n in given if n not in unmatched),
    )
    return []


LORA_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora")
# transformers optimizers that build their own parameter groups (GaLore, APOLLO: projected ones; LOMO: the whole model)
LORAPLUS_INCOMPATIBLE_OPTIM = ("galore", "apollo", "lomo")


def _lora_variant_problems(
    lora_args: LoraArguments,
    quant_args: QuantizationArguments,
    training_args: TrainingArguments | None,
    plan: RunPlan | None,
    quant_method: str | None,
) -> list[str]:
    """DoRA, rsLoRA, PiSSA/OLoRA initialisation and LoRA+ against each other and against the base and sharding,
    as PEFT 0.21 supports them."""
    problems = []
    init = lora_args.lora_init
    niter = init.removeprefix("pissa_niter_")
    if init not in LORA_INITS and not (init.startswith("pissa_niter_") and niter.isdigit()):
        problems.append(f"--lora_init {init}: choose one of {', '.join(LORA_INITS)} (N a whole number of iterations)")
    ratio = lora_args.loraplus_lr_ratio
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        problems.append(
            f"--loraplus_lr_ratio {ratio}: must be a positive number (the B matrices' learning rate over A's)"
        )
    variants = [
        flag
        for flag, on in (
            ("--use_dora True", lora_args.use_dora),
            ("--use_rslora True", lora_args.use_rslora),
            (f"--lora_init {init}", init != "default"),
            (f"--loraplus_lr_ratio {ratio}", ratio is not None),
        )
        if on
    ]
    if variants and not lora_args.use_lora:
        problems.append(f"{', '.join(variants)} configure LoRA adapters: add --use_lora True")
        return problems
    if lora_args.use_dora and quant_method == "gptq":
        problems.append(
            "--use_dora True on a GPTQ base: PEFT's LoRA layer for GPTQ weights does not implement DoRA "
            "(DoRA needs the dequantized weight's norms); train plain LoRA on it, or DoRA on the "
            "unquantized model (with --q_lora True if memory is short: PEFT supports DoRA on bitsandbytes)"
        )
    if lora_args.changes_base_weights:
        name = "PiSSA" if init.startswith("pissa") else "OLoRA"
        if quant_method is not None:
            problems.append(
                f"--lora_init {init} on a {quant_method}-quantized base: {name} decomposes the base's "
                "float weights and stores the residual back into them, which packed quantized weights "
                "cannot take; start from the unquantized model"
            )
        elif quant_args.q_lora and init.startswith("pissa"):
            problems.append(
                f"--lora_init {init} with --q_lora True: PEFT runs PiSSA's SVD only on float weights "
                "(bitsandbytes has already quantized them on load); train PiSSA on the bf16/fp16 base, "
                "or use --lora_init olora, which PEFT supports on a 4-/8-bit base"
            )
        if plan is not None and plan.shards_parameters:
            problems.append(
                f"--lora_init {init} cannot be sharded with ZeRO-3 or FSDP: {name} needs each whole base "
                "weight where the adapter is created, and the final save compares the whole adapter "
                "with its starting point to convert it for the original base; use --deepspeed "
                "ds_configs/zero2.json or plain DDP"
            )
    if ratio is not None and training_args is not None and plan is not None:
        if any(name in plan.optimizer for name in LORAPLUS_INCOMPATIBLE_OPTIM):
            problems.append(
                f"--loraplus_lr_ratio with --optim {plan.optimizer}: that optimizer builds its own parameter "
                "groups, so LoRA+'s learning rate for the B matrices would be lost; choose an AdamW, "
                "Lion, SGD, ... optimizer"
            )
        if plan.optimizer_from_deepspeed:
            problems.append(
                f"--loraplus_lr_ratio with --deepspeed {training_args.deepspeed}: that config defines "
                "its own optimizer, which DeepSpeed builds over one group of all trainable weights, so "
                'the B matrices would not get their learning rate; use a config without an "optimizer" '
                "section (ds_configs/zero2.json, zero3.json), whose optimizer comes from --optim"
            )
    return problems


# --report_to backends llmft documents (README, Logging), with the package each needs
REPORT_TO_PACKAGES = {
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "wandb": ("wandb", "is_wandb_available"),
}


def _report_to_problems(training_args: TrainingArguments) -> list[str]:
    """A logging backend whose package is missing fails only when the Trainer is built, after the model has loaded."""
    import transformers.integrations as integrations

    problems = []
    for backend in training_args.report_to or []:
        package, available = REPORT_TO_PACKAGES.get(backend, (None, None))
        if package is not None and not getattr(integrations, available)():
            problems.append(
                f"--report_to {backend}: the {package} package is not installed (pip install {package}; "
                "see README, Logging), or choose --report_to none"
            )
    return problems


PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", VARLEN, "flex_attention", "sdpa", "eager")


def _batching_problems(model_args: ModelArguments, data_args: DataArguments) -> list[str]:
    problems = []
    attention = model_args.attn_implementation
    if data_args.packing and attention is not None and attention not in PACKING_ATTENTION:
        problems.append(
            f"--packing True keeps packed samples apart through transformers' attention masks, which "
            f"--attn_implementation {attention} does not use: choose one of "
            f"{', '.join(PACKING_ATTENTION)}, or --packing False"
        )
    budget = data_args.max_tokens_per_batch
    if budget is not None and budget < 0:
        problems.append(
            "--max_tokens_per_batch must be positive (or 0: micro-batches of --per_device_train_batch_size samples)"
        )
    elif budget:
        if not data_args.packing:
            problems.append(
                "--max_tokens_per_batch needs --packing True: padded micro-batches would cost far more "
                "than their token budget"
            )
        if data_args.lazy_preprocess:
            problems.append(
                "--max_tokens_per_batch packs by sample length, which --lazy_preprocess only learns when "
                "a sample is used: use eager preprocessing, or --per_device_train_batch_size"
            )
        if budget < data_args.model_max_length:
            problems.append(
                f"--max_tokens_per_batch {budget} is below --model_max_length "
                f"{data_args.model_max_length}: the longest samples would fit no micro-batch; raise it or "
                "lower --model_max_length"
            )
    if data_args.packing_window < 1:
        problems.append("--packing_window must be at least 1")
    return problems


def _training_problems(
    data_args: DataArguments,
    quant_args: QuantizationArguments,
    training_args: TrainingArguments,
    plan: RunPlan,
) -> list[str]:
    problems = []
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        problems.append("set --num_train_epochs or --max_steps to a positive value")
    if training_args.eval_strategy != "no" and data_args.eval_data_path is None:
        problems.append(f"--eval_strategy {training_args.eval_strategy.value} needs --eval_data_path")
    if training_args.fsdp_config is not None and not training_args.fsdp:
        problems.append("--fsdp_config is read only with --fsdp True")
    # both replace the checkpoint function inside one process's backward
    for flag, effect in (
        ("offload_activations", "offloads checkpointed inputs"),
        ("lean_recompute", "changes the checkpointed recompute"),
    ):
        if not getattr(training_args, flag):
            continue
        if not training_args.gradient_checkpointing:
            problems.append(f"--{flag} True {effect}: add --gradient_checkpointing True")
        if training_args.deepspeed or training_args.fsdp or training_args.world_size > 1:
            problems.append(
                f"--{flag} True runs in one process without DeepSpeed or FSDP (their gradient hooks do not expect "
                "the backward pass it runs inside backward): drop it, or train on one GPU"
            )
    if plan.base_quantization == "gptq" and plan.shards_parameters:
        problems.append(
            "LoRA on a GPTQ base cannot be sharded with ZeRO-3 or FSDP: the base's packed int4 weights "
            "are buffers, not parameters, and both shard only parameters, so every rank would hold the "
            "whole base anyway; train it with --deepspeed ds_configs/zero2.json or plain DDP"
        )
    return problems + _number_problems(data_args, training_args)


def _number_problems(data_args: DataArguments, training_args: TrainingArguments) -> list[str]:
    """Values transformers accepts and fails on only later (a ZeroDivisionError, numpy's seed range) or trains
    nonsense with (a negative or NaN learning rate)."""
    import math

    problems = []
    lr = training_args.learning_rate
    if not (math.isfinite(lr) and lr >= 0):
        problems.append(f"--learning_rate {lr}: must be a finite number, 0 or more")
    if not data_args.max_tokens_per_batch and training_args.per_device_train_batch_size < 1:
        problems.append(
            f"--per_device_train_batch_size {training_args.per_device_train_batch_size}: must be at least 1"
        )
    if data_args.eval_data_path is not None and training_args.per_device_eval_batch_size < 1:
        problems.append(f"--per_device_eval_batch_size {training_args.per_device_eval_batch_size}: must be at least 1")
    if training_args.gradient_accumulation_steps < 1:
        problems.append(
            f"--gradient_accumulation_steps {training_args.gradient_accumulation_steps}: must be at least 1"
        )
    memory = training_args.preflight_gpu_memory
    if memory is not None and not (math.isfinite(memory) and memory > 0):
        problems.append(f"--preflight_gpu_memory {memory}: must be a positive number of GiB")
    for flag in ("seed", "data_seed"):
        value = getattr(training_args, flag)
        if value is not None and not 0 <= value < 2**32:
            problems.append(f"--{flag} {value}: must be in [0, 2**32 - 1]")
    return problems


# Optimizer and schedule settings that transformers passes on unchecked: NaN trains an all-NaN model with exit 0, and
# an epsilon of 0 or a beta of 1 fail (or divide by zero) only once the model has loaded. Each must be finite and at
# least 0; those named in UNIT_INTERVAL below 1 as well.
TRAINING_NUMBERS = (
    "num_train_epochs",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "warmup_steps",
    "label_smoothing_factor",
    "neftune_noise_alpha",
    "logging_steps",
    "save_steps",
    "eval_steps",
    "eval_delay",
)
UNIT_INTERVAL = ("adam_beta1", "adam_beta2", "label_smoothing_factor")


def training_number_problems(values: dict) -> list[str]:
    """The TRAINING_NUMBERS among `values` (flag name -> parsed value) that are not finite or out of range. Called
    on the parsed flags before TrainingArguments is built: its own checks fail with an OverflowError on inf."""
    problems = []
    for flag in TRAINING_NUMBERS:
        value = values.get(flag)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if flag in UNIT_INTERVAL and not 0 <= value < 1:  # False for NaN too
            problems.append(f"--{flag} {value}: must be in [0, 1)")
        elif not (math.isfinite(value) and value >= 0):
            problems.append(f"--{flag} {value}: must be a finite number, 0 or more")
        elif flag == "adam_epsilon" and value == 0:
            problems.append(f"--{flag} {value}: must be above 0 (it keeps Adam's update from dividing by zero)")
    return problems


def _fsdp_problems(
    lora_args: LoraArguments, quant_args: QuantizationArguments, training_args: TrainingArguments
) -> list[str]:
    """Settings that contradict --fsdp, or that would leave a final save that is not a complete checkpoint."""
    from transformers.training_args import ParallelMode

    problems = []
    config = training_args.fsdp_config or {}
    if training_args.deepspeed:
        problems.append("--fsdp and --deepspeed are both set: each shards the model its own way; choose one")
    elif config.get("xla"):
        pass  # XLA FSDP runs in one process per host
    elif training_args.parallel_mode != ParallelMode.DISTRIBUTED:
        problems.append(
            "--fsdp shards the model over several processes: start them with torchrun, or with "
            "finetune/finetune_ds.sh or finetune_lora_ds.sh --fsdp fsdp"
        )
    if quant_args.q_lora:
        problems.append(
            "--q_lora cannot be combined with --fsdp: llmft quantizes the base with bitsandbytes on load, "
            "packed in uint8 and placed whole on each rank, which FSDP cannot shard; use DeepSpeed "
            "(finetune/finetune_qlora_ds.sh; --deepspeed zero3 shards the 4-bit weights)"
        )
    state_dict_type = (training_args.fsdp_plugin_args or {}).get("state_dict_type", "FULL_STATE_DICT")
    if state_dict_type != "FULL_STATE_DICT":
        problems.append(
            f"--fsdp_config state_dict_type {state_dict_type}: the final save would write no weights "
            "(transformers saves a model under FSDP only from a FULL_STATE_DICT); use FULL_STATE_DICT, "
            "as ds_configs/fsdp.json does"
        )
    if str(config.get("activation_checkpointing", False)).lower() == "true":
        if training_args.gradient_checkpointing:
            problems.append(
                "--gradient_checkpointing True and the --fsdp_config's activation_checkpointing both "
                "checkpoint activations: keep one (--gradient_checkpointing False to keep FSDP's)"
            )
        if lora_args.use_lora:
            problems.append(
                "--use_lora True with the --fsdp_config's activation_checkpointing would save an empty "
                "adapter (PEFT does not find LoRA layers inside FSDP's checkpoint wrappers): set it to "
                "false and use --gradient_checkpointing True"
            )
    return problems
