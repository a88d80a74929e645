"""Settings of a training run: one dataclass per concern, each field's help written once beside it.

Declarations only: llmft/config.py parses them from flags and config files and runs the checks (llmft/checks.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import transformers


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local directory or Hub id of the model to fine-tune."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the checkpoint. Off unless you trust it."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel: flash_attention_2, llmft_varlen, flex_attention, sdpa, eager, ... (default: "
            "chosen for packing, see llmft/kernels.py; without packing, transformers' choice)."
        },
    )
    chat_template: str = field(
        default="auto",
        metadata={
            "help": "auto: the tokenizer's own chat template, ChatML when it has none; chatml: always ChatML; "
            "tokenizer: the tokenizer's own or fail; or a path to a .jinja file."
        },
    )


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "Training conversations: a JSON list or JSONL file (see README, Data)."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation conversations, same formats."})
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "Tokenize each sample when the trainer asks for it, keeping memory flat on large files."},
    )
    model_max_length: int = field(default=8192, metadata={"help": "Longest sample in tokens; see overlong_samples."})
    overlong_samples: Literal["truncate", "drop"] = field(
        default="truncate",
        metadata={
            "help": "What to do with samples over model_max_length: truncate keeps the whole turns that fit; drop "
            "leaves them out. Either way the count is logged."
        },
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System prompt for conversations that have none of their own."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the data (eager mode)."}
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Lay each micro-batch's samples end to end in one row, with position ids restarting per sample "
            "and attention kept inside each sample, instead of padding every sample to the longest: the same loss "
            "and gradients, without the padding's compute. Needs an attention kernel that isolates packed samples "
            "(flash_attention_2/3, llmft_varlen, flex_attention, sdpa, eager); the one used is named in the log."
        },
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches by tokens instead of samples: every epoch the samples are shuffled and bin-packed "
            "(best-fit decreasing, in windows of --packing_window samples) into micro-batches of at most this many "
            "tokens, so short samples no longer leave the GPU idle; --per_device_train_batch_size is then unused. "
            "Needs --packing True and at least --model_max_length. 0: off (overrides a launcher's recipe)."
        },
    )
    packing_window: int = field(
        default=4096,
        metadata={
            "help": "Samples bin-packed together with --max_tokens_per_batch: larger windows waste less of the token "
            "budget, smaller ones keep each micro-batch's samples closer to a uniform shuffle."
        },
    )
    train_turns: Literal["all", "last"] = field(
        default="all",
        metadata={
            "help": 'Which assistant turns carry loss when a message does not say (its own "train": true/false or '
            '"loss_weight": 1/0 decides otherwise): all of them, or only the last of each conversation.'
        },
    )


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on the LoRA input. Off by default, as in most LoRA recipes: it slows Q-LoRA "
            "(BENCHMARKS.md)."
        },
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules to adapt: names (q_proj v_proj ...), all-linear (every linear layer but the output "
            "head), or default (PEFT's choice for the architecture)."
        },
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (added automatically for new tokens)."},
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA: each adapted weight is split into a magnitude (a trained vector) and a direction "
            "(LoRA on top of the base). Costs some speed while training; merge_lora folds it into plain "
            "weights."
        },
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rsLoRA: scale the adapter by lora_alpha / sqrt(lora_r) instead of / lora_r."}
    )
    lora_init: str = field(
        default="default",
        metadata={
            "help": "How the adapter starts: default (B = 0, A random), gaussian (A Gaussian), pissa (A and B from the "
            "base weights' top singular vectors, the base keeps the residual), pissa_niter_N (PiSSA through N "
            "iterations of a fast randomized SVD, e.g. pissa_niter_4: seconds instead of minutes on a 7B model), or "
            "olora (A and B from a QR decomposition of the base weights). PiSSA and OLoRA change the base while "
            "training; the saved adapter is converted to one of twice the rank that applies to the original base."
        },
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+: train the B matrices at this multiple of --learning_rate (the paper suggests 16); "
            "the optimizer is still the one --optim names."
        },
    )

    @property
    def changes_base_weights(self) -> bool:
        """PiSSA and OLoRA start the adapter from a decomposition of the base weights and train on the residual."""
        return self.lora_init.startswith("pissa") or self.lora_init == "olora"


@dataclass
class QuantizationArguments:
    q_lora: bool = field(
        default=False, metadata={"help": "Q-LoRA: quantize the base with bitsandbytes on load and train LoRA on it."}
    )
    quant_bits: Literal[4, 8] = field(default=4, metadata={"help": "bitsandbytes bits for Q-LoRA: 4 or 8."})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit quantization constants too."})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """All of transformers' TrainingArguments, plus the output-directory guard they no longer carry, and three of
    theirs declared so that the flags take every value transformers documents."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir, replacing what a previous run saved there."},
    )
    offload_activations: bool | None = field(
        default=None,
        metadata={
            "help": "Under --gradient_checkpointing True, keep each decoder layer's checkpointed input in pinned host "
            "memory until backward, copied on a side stream (llmft/activation_offload.py). Unset: on for LoRA and "
            "Q-LoRA CUDA runs of one process without DeepSpeed or FSDP (full fine-tuning's peak is elsewhere); True "
            "there (or on the CPU) only."
        },
    )
    lean_recompute: bool | None = field(
        default=None,
        metadata={
            "help": "Under --gradient_checkpointing True, recompute each decoder layer in backward with llmft's own "
            "checkpoint function, which runs the MLP a chunk of tokens at a time once its output gradient is known and "
            "skips the down projection's forward product, whose value backward never reads (llmft/recompute.py). "
            "Unset: on for LoRA and Q-LoRA CUDA runs of one process without DeepSpeed or FSDP; needs --lora_dropout 0."
        },
    )
    use_liger_kernel: bool | None = field(
        default=None,
        metadata={
            "help": "Liger-Kernel's fused Triton kernels (CUDA). Unset: llmft uses Liger's fused linear + "
            "cross-entropy (never materialises the vocabulary-wide logits), RMSNorm, SwiGLU and RoPE, on CUDA when "
            "liger-kernel is installed and parameters are not sharded; True: every Liger kernel (see "
            "--liger_kernel_config); False: none."
        },
    )
    liger_kernel_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Which Liger kernels --use_liger_kernel True applies, as JSON, e.g. "
            '\'{"rms_norm": true, "swiglu": false}\' (transformers declares it a dict, which a flag cannot '
            "give)."
        },
    )
    trust_checkpoint_pickles: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint even when its pickles import code that llmft, DeepSpeed and the "
            "Trainer never write there (llmft/checkpoint_pickles.py): DeepSpeed unpickles its files with "
            "weights_only=False, so only for a checkpoint from a source you trust."
        },
    )
    include_num_input_tokens_seen: str = field(
        default="no",
        metadata={"help": "Count the input tokens seen: all, non_padding or no (True means all, False no)."},
    )
    preflight: bool = field(
        default=True,
        metadata={
            "help": "Before the weights load, estimate the memory per GPU (llmft/preflight.py), log it as a "
            "table, and stop with advice when it will not fit; False: log it and train anyway."
        },
    )
    preflight_only: bool = field(
        default=False,
        metadata={
            "help": "Print the memory estimate and exit without loading weights or data (exit 2 when it does not fit)."
        },
    )
    preflight_gpu_memory: float | None = field(
        default=None,
        metadata={"help": "GiB per GPU to check the estimate against (default: the GPU's; none on CPU runs)."},
    )

    def __post_init__(self) -> None:
        value = str(self.include_num_input_tokens_seen)
        value = {"true": "all", "false": "no"}.get(value.lower(), value)
        if value not in ("all", "non_padding", "no"):
            raise ValueError(f"--include_num_input_tokens_seen {value}: use all, non_padding or no")
        self.include_num_input_tokens_seen = value
        if isinstance(self.liger_kernel_config, str):
            try:
                config = json.loads(self.liger_kernel_config)
            except ValueError as e:
                raise ValueError(f"--liger_kernel_config {self.liger_kernel_config}: not JSON ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(
                    f"--liger_kernel_config {self.liger_kernel_config}: give a JSON object of kernel "
                    "names and true/false"
                )
            self.liger_kernel_config = config
        super().__post_init__()


@dataclass
class PreferenceArguments:
    """What the run optimises: supervised fine-tuning, or a preference objective over pairs (DPO, SimPO, ORPO) or
    labelled answers (KTO); see llmft/objectives/preference.py. Checked by its `preference_problems`."""

    objective: Literal["sft", "dpo", "simpo", "orpo", "kto"] = field(
        default="sft",
        metadata={
            "help": "sft: the answers' likelihood; dpo, simpo, orpo: prefer each pair's chosen answer to its rejected "
            "one; kto: answers labelled desirable or not. Preference data: see README, Preference data."
        },
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "dpo and kto: how far the policy may move from the reference (higher: less); for --loss_type ipo "
            "the regulariser tau. simpo: the reward scale. orpo: lambda, the weight of the odds-ratio term."
        },
    )
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "conservative"] = field(
        default="sigmoid",
        metadata={
            "help": "The DPO loss: sigmoid (DPO), hinge (SLiC), ipo (IPO, log-ratios averaged per token), robust "
            "(rDPO: unbiased for preferences flipped with probability --label_smoothing) or conservative (cDPO: "
            "the sigmoid loss with its labels smoothed by --label_smoothing)."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "The probability, in [0, 0.5), that a preference label is flipped: dpo with --loss_type robust "
            "or conservative, and simpo (conservative smoothing)."
        },
    )
    simpo_gamma: float = field(
        default=0.5,
        metadata={"help": "simpo: the target reward margin gamma (the loss subtracts gamma / beta from the margin)."},
    )
    desirable_weight: float = field(default=1.0, metadata={"help": "kto: the weight of the desirable answers' losses."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "kto: the weight of the undesirable answers' losses."}
    )


ARGUMENT_CLASSES = (
    ModelArguments,
    DataArguments,
    LoraArguments,
    QuantizationArguments,
    TrainingArguments,
    PreferenceArguments,
)
