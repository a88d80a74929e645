"""Building the tokenizer and the model a run trains: precision, quantization, ChatML tokens and LoRA.

Modes, as the run's plan (llmft/plan.py) names them:
- full: every weight trains, loaded in the compute dtype (bf16 / fp16 / fp32 from the precision flags);
- lora: adapters on a frozen base in the compute dtype;
- qlora-4bit / qlora-8bit: adapters on a base that bitsandbytes quantizes on load (NF4/FP4 4-bit, or 8-bit);
- lora-on-gptq: adapters on a GPTQ checkpoint (quantized offline; loaded through transformers' GPTQModel
  integration).
A base tokenizer without the ChatML tokens gets them added, the embeddings are resized, and the input embeddings and
output head train with the adapter (PEFT modules_to_save), since the new rows start untrained.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llmft.attention import VARLEN, register_varlen_attention
from llmft.chat_template import IM_END, IM_START, choose_chat_template, end_of_turn_token, generation_stops, uses_chatml
from llmft.model_folder import quant_method
from llmft.distributed import init_deepspeed_on_cpu_ranks, quantized_weights_device_map
from llmft.errors import ConfigError
from llmft.kernels import PAD_MULTIPLE
from llmft.quiet import without_unused_gptqmodel

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from llmft.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments
    from llmft.plan import RunPlan

logger = logging.getLogger(__name__)


def load_training_tokenizer(
    model_args: ModelArguments, data_args: DataArguments
) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """(tokenizer, added tokens): the run's tokenizer loaded from --model_name_or_path and made ready for training. It
    has right padding, a pad token, the chosen chat template, ChatML tokens where they were missing (returned as
    added), and the end-of-turn token as EOS so that anything generating from the saved tokenizer stops after one
    answer."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        model_max_length=data_args.model_max_length,
        padding_side="right",
    )
    template = choose_chat_template(tokenizer, model_args.chat_template)
    tokenizer.chat_template = template
    missing = []
    if uses_chatml(template):
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
            logger.warning(
                "the tokenizer had no %s: added them; embeddings and lm_head will be resized and trained",
                " ".join(missing),
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.eos_token = end_of_turn_token(tokenizer)
    return tokenizer, missing


def quantization_config(plan: RunPlan) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for Q-LoRA, or None. Under ZeRO-3 the packed 4-bit weights are stored in the compute
    dtype, so DeepSpeed can partition them like any other parameter (the plan's `storage_dtype`)."""
    on_load = plan.quantize_on_load
    if on_load is None:
        return None
    if on_load.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=on_load.quant_type,
        bnb_4bit_use_double_quant=on_load.double_quant,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        bnb_4bit_quant_storage=on_load.storage_dtype,
    )


def build_model(
    model_args: ModelArguments,
    lora_args: LoraArguments,
    training_args: TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    plan: RunPlan,
) -> PreTrainedModel | PeftModel:
    """The model ready for the Trainer, as `plan` says: loaded with the attention kernel it chose (None:
    transformers' default), resized for added tokens, prepared for k-bit training and wrapped in LoRA. With added
    tokens, LoRA also trains the embeddings and output head in full: the new rows start untrained (a checkpoint's
    spare padding rows are as untrained as freshly resized ones). `training_args` are read, never written: what the
    Trainer needs of the plan there is llmft.plan.apply_plan_to_training_args's to write."""
    init_deepspeed_on_cpu_ranks(training_args)
    if plan.kernels.attention == VARLEN:
        register_varlen_attention()
    load_options = {}
    if plan.quantize_on_load is not None:  # passing quantization_config=None would override a GPTQ checkpoint's own
        load_options["quantization_config"] = quantization_config(plan)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        dtype=plan.compute_dtype,
        device_map=quantized_weights_device_map(plan.sharding) if plan.quantized else None,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=plan.kernels.attention,
        **load_options,
    )
    model.config.use_cache = False  # the KV cache is useless while training and costs memory
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_MULTIPLE)
    _stop_at_end_of_turn(model, tokenizer)

    if plan.quantized:
        model = _prepare_quantized_base(model, plan)
    if plan.uses_lora:
        model = apply_lora(model, lora_args, train_embeddings=plan.train_embeddings)
        if plan.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def _prepare_quantized_base(model: PreTrainedModel, plan: RunPlan) -> PreTrainedModel:
    """A quantized base made ready for adapter training: frozen, with gradient checkpointing as asked.

    PEFT's prepare_model_for_kbit_training also casts every weight that is not quantized (norms, embeddings, output
    head) to fp32. fp16 training needs that for stability, and gets it. Under bf16 it only turns the hidden states
    fp32 from the embeddings on, so every elementwise op and every quantized matmul's input runs in fp32; bf16 runs
    keep the weights in bf16, as bf16 LoRA does."""
    gc_kwargs = dict(plan.gradient_checkpointing_kwargs)
    if plan.compute_dtype != torch.bfloat16:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    for param in model.parameters():
        param.requires_grad_(False)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return model


def _stop_at_end_of_turn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The generation config the run saves stops where the tools' generation does (`generation_stops`)."""
    stops = generation_stops(tokenizer, model.generation_config.eos_token_id, model.config.eos_token_id)
    model.generation_config.eos_token_id = stops.eos_token_ids
    model.generation_config.pad_token_id = stops.pad_token_id


def lora_config(
    lora_args: LoraArguments, model: PreTrainedModel | None = None, train_embeddings: bool = False
) -> LoraConfig:
    """The PEFT LoraConfig for these arguments; new tokens add the embeddings and the output head to modules_to_save."""
    from peft import LoraConfig

    targets = lora_args.lora_target_modules
    if targets == ["default"]:
        targets = None  # PEFT's per-architecture default
    elif targets == ["all-linear"]:
        # PEFT's "all-linear" only recognises torch/bitsandbytes linear layers; GPTQ's packed layers are named here
        targets = _quantized_linear_names(model) if model is not None and _is_gptq(model) else "all-linear"
    modules_to_save = list(lora_args.lora_modules_to_save or [])
    if train_embeddings:
        for module in embedding_module_names(model):
            if module not in modules_to_save:
                modules_to_save.append(module)
    return LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        bias=lora_args.lora_bias,
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=bool(train_embeddings and model is not None and _ties_embeddings(model)),
        use_dora=lora_args.use_dora,
        use_rslora=lora_args.use_rslora,
        init_lora_weights=True if lora_args.lora_init == "default" else lora_args.lora_init,
        task_type="CAUSAL_LM",
    )


def apply_lora(model: PreTrainedModel, lora_args: LoraArguments, train_embeddings: bool = False) -> PeftModel:
    """The model wrapped in a PEFT LoRA adapter. With PiSSA / OLoRA initialisation the base weights now hold the
    residual of their decomposition: the starting adapter (`lora_weights`, taken before training) is what converts
    the final save into an adapter for the original base (llmft.saving.save_adapter_for_original_base)."""
    from peft import get_peft_model

    try:
        with without_unused_gptqmodel():
            model = get_peft_model(model, lora_config(lora_args, model, train_embeddings))
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ConfigError([f"--lora_target_modules {' '.join(lora_args.lora_target_modules)}: {e}"]) from None
    if lora_args.changes_base_weights:
        logger.warning(
            "--lora_init %s: the base weights now hold the residual of the decomposition; the saved "
            "adapter will be converted to rank %d so that it applies to the original base",
            lora_args.lora_init,
            2 * lora_args.lora_r,
        )
    if train_embeddings:
        logger.warning("training the input embeddings and output head in full (modules_to_save) for the new tokens")
    return model


def lora_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's lora_A / lora_B tensors as the adapter file names them, copied to the CPU."""
    from peft import get_peft_model_state_dict

    return {
        name: tensor.detach().to("cpu", copy=True)
        for name, tensor in get_peft_model_state_dict(model).items()
        if ".lora_A." in name or ".lora_B." in name
    }


def _is_gptq(model: PreTrainedModel) -> bool:
    return quant_method(model.config) == "gptq"


def _quantized_linear_names(model: PreTrainedModel) -> list[str]:
    """Names (last component) of the GPTQ-packed linear layers, the output head excepted."""
    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if hasattr(module, "qweight") and module is not head
        }
    )


def embedding_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of the model's input embeddings and, when it is another module, its output head: what
    training saves in full for added tokens, and what an adapter's saved rows are looked up by
    (`llmft.model_folder.ModelFolder.saved_embedding_rows`)."""
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    found = [names[model.get_input_embeddings()]]
    output = model.get_output_embeddings()
    if output is not None and names.get(output) not in found:
        found.append(names[output])
    return found


def _ties_embeddings(model: PreTrainedModel) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight
