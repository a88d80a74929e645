"""Memory preflight: the per-GPU memory a run will need, estimated from its settings before any weight loads.

`estimate(shape, setup)` is pure arithmetic on the model's config.json (`ModelShape`) and the run's settings
(`MemorySetup`); `setup_from_args` reads the settings from the run's plan (llmft/plan.py) and the few arguments it
does not resolve (LoRA rank and targets, batch sizes, optimizer), and `preflight` is
what llmft/train.py calls: it logs the table, and stops the run (exit 2) with concrete advice when the estimate is
above the GPU's memory. Every figure is bytes per GPU; the table shows GiB (2**30 bytes).

What the model loads as (llmft/model.py): every weight in the compute dtype (bf16 with --bf16, fp16 with --fp16, fp32
otherwise), so `--bf16` full fine-tuning without DeepSpeed keeps bf16 weights, bf16 gradients and AdamW states in bf16
(torch's AdamW allocates its states like the parameter): 2 + 2 + 4 = 8 bytes a parameter, and no fp32 master copy.
LoRA adapters are fp32 (PEFT's autocast_adapter_dtype upcasts bf16/fp16 adapters): 4 + 4 + 8 = 16 bytes each.
DeepSpeed with bf16/fp16 keeps 16-bit weights and gradients and, per partition, an fp32 master copy and the optimizer
states in fp32: 2 + 2 + (4 + 8) bytes, the last two divided over the GPUs from ZeRO-1 on, the gradients from ZeRO-2,
the weights from ZeRO-3; offload_optimizer moves master and states to the CPU, offload_param the weights. FSDP2
(accelerate) upcasts trainable weights to fp32 under mixed precision and shards weights, gradients and states: (4 + 4
+ 8) / GPUs. 8-bit optimizers (bitsandbytes, paged or not) keep 2 bytes of state a parameter.

Quantized bases: NF4/FP4 stores half a byte a weight plus one fp32 absmax per block of 64 (double quantization: one
byte per block plus one fp32 per 256 blocks); 8-bit one byte a weight plus an fp32 scale per output row; GPTQ `bits`/8
a weight plus, per group of `group_size` inputs and output column, an fp16 scale and a packed zero, and an int32
group index per input. Only the decoder's linear layers are quantized; embeddings, norms, biases and the output head
stay in the compute dtype (fp32 outside bf16 runs: PEFT's prepare_model_for_kbit_training casts them).

Activations: see `activation_bytes_per_token_layer`. Logits: see `logit_bytes`.

Preference objectives (--objective, llmft/objectives/): a micro-batch holds pairs (the plan counts their tokens:
twice the samples' length). The output head scores them a chunk of rows at a time (`chunked_head`, see
`logit_bytes`). Where the reference model runs at every step (LoRA's adapters switched off, and KTO's KL row) its
no-grad forward comes while the policy's activations are held: its own activations live one layer at a time, its
logits one chunk at a time, less than the policy's chunk in backward. Full fine-tuning's reference is computed before
training, not at the peak.

The peak: weights + optimizer states + the larger of two moments. At the end of the forward pass: activations +
logits + the gradients still held from the previous micro-batch (when accumulating, and always under DeepSpeed and
FSDP, whose gradient buffers live from the first step on). At the end of backward: all gradients + the first layer's
activations (used now, or recomputed under checkpointing) + the embedding's gradient before it is added in. With one
micro-batch a step under plain PyTorch the gradients grow during backward as the activations are freed, so the two do
not add up. The optimizer states exist from the first optimizer step on: the estimate is the peak of the second step
onwards.

Not modelled: mixture-of-experts layers (refused), transformers' activation_checkpointing_kwargs (every_n_layers:
the estimate assumes every layer checkpointed), optimizer-step temporaries (torch's fused AdamW
makes none), bitsandbytes' one dequantized weight at a time, LoRA dropout's copy of each adapted layer's input (off
by default), and NCCL's own buffers beyond the fixed allowance.

How far the estimate is from measured peaks is in BENCHMARKS.md (`bash tools/run_benchmarks.sh memory` measures the
estimate beside the peak).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmft.distributed import shards_parameters
from llmft.errors import ConfigError
from llmft.kernels import padded

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from llmft.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments
    from llmft.plan import RunPlan

logger = logging.getLogger(__name__)

GIB = 2**30
# Outside torch's allocated memory, so in the fit check and not in `allocated`: the CUDA context (about 0.5 GiB with
# PyTorch 2.x), cuBLAS workspaces and NCCL communicators (together a fixed allowance), and the caching allocator's
# fragmentation, memory reserved but not allocated, taken as a share of what is allocated (an assumption: the
# benchmark's peak_reserved_gib beside peak_gib measures it)
FIXED_OVERHEAD_BYTES = int(1.0 * GIB)
ALLOCATOR_SLACK = 0.05
MIN_SAVING_BYTES = GIB // 20  # advice names only changes that save at least this much
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")  # PEFT's default LoRA targets for Llama / Qwen2 / Mistral
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size; double quantization groups 256 blocks' absmax
DOUBLE_QUANT_GROUP = 256


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a dense decoder-only transformer (Llama / Qwen2 / Qwen3 / Mistral layout), from its config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool = False  # Qwen2: q, k and v have biases
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and k

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """Read from a config.json dict; a ConfigError when it lacks a size or describes a mixture of experts."""
        config = config.get("text_config") or config  # multimodal checkpoints nest the language model's
        if any(config.get(key) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise ConfigError(
                [
                    "memory preflight: mixture-of-experts models are not modelled; pass --preflight False "
                    "to train without the estimate"
                ]
            )
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            sizes = dict(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                [
                    f"memory preflight: the model's config.json has no usable {e}; pass --preflight False "
                    "to train without the estimate"
                ]
            ) from None
        model_type = config.get("model_type", "")
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            **sizes,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type in ("qwen2",) or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_weights(self) -> int:
        """Weights of the decoder's linear layers, all layers (what bitsandbytes and GPTQ quantize)."""
        return self.num_layers * sum(n_in * n_out for n_in, n_out in self.linears().values())

    def other_parameters(self) -> int:
        """Everything but the decoder's linear weights: embeddings, output head, norms, biases."""
        h = self.hidden_size
        per_layer = 2 * h  # input and post-attention RMSNorm
        per_layer += (self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias
        per_layer += (2 * self.intermediate_size + h) * self.mlp_bias + 2 * self.head_dim * self.qk_norm
        head = 0 if self.tied_embeddings else self.vocab_size * h
        return self.vocab_size * h + head + h + self.num_layers * per_layer

    def parameters(self) -> int:
        return self.linear_weights() + self.other_parameters()

    def embedding_parameters(self) -> int:
        """The input embeddings and, when not tied to them, the output head."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def lora_parameters(self, r: int, targets: tuple[str, ...]) -> int:
        """A (r x in) and B (out x r) of every targeted linear layer of every decoder layer."""
        return self.num_layers * sum(
            r * (n_in + n_out) for name, (n_in, n_out) in self.linears().items() if name in targets
        )


@dataclass(frozen=True)
class MemorySetup:
    """The settings memory depends on. `mode`: full, lora or qlora, in the words of the run's plan
    (llmft.plan.RunPlan.coarse_mode: qlora for a base bitsandbytes quantizes on load); how the base is stored is
    `quantization`, and only full fine-tuning or not changes the estimate. `tokens`: tokens of one micro-batch;
    `rows`: the sequences they are laid out in (1 when packed), each of `row_tokens`, the span attention covers."""

    mode: str = "full"
    dtype: str = "bf16"  # the compute dtype: bf16, fp16 or fp32
    quantization: str | None = None  # nf4, fp4, int8, gptq
    double_quant: bool = True
    gptq_bits: int = 4
    gptq_group_size: int = 128
    lora_r: int = 64
    lora_targets: tuple[str, ...] = LINEAR_NAMES
    train_embeddings: bool = False  # LoRA trains the embeddings and head in full too (tokens added to the vocabulary)
    optimizer: str = "adamw_torch"
    sharding: str = "none"  # none (one GPU or DDP), zero1, zero2, zero3, fsdp
    offload_optimizer: bool = False
    offload_params: bool = False
    gpus: int = 1
    tokens: int = 8192
    rows: int = 1
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # checkpointed layer inputs held in host memory (llmft.activation_offload)
    lean_recompute: bool = False  # the recomputed layer's MLP runs a chunk of tokens at a time (llmft.recompute)
    fused_loss: bool = False  # Liger's fused linear cross-entropy
    chunked_head: bool = False  # preference objectives: the head scores a chunk of rows at a time (objectives.forward)
    reference_forward: bool = False  # a no-grad forward at every step: the reference (adapters off), KTO's KL row
    attention: str = "flash_attention_2"  # eager stores the attention probabilities
    accumulation_steps: int = 1

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def row_tokens(self) -> int:
        return math.ceil(self.tokens / self.rows)

    @property
    def deepspeed(self) -> bool:
        return self.sharding.startswith("zero")


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of each part of a run's peak memory; see the module docstring for how they add up."""

    setup: MemorySetup
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    sharding_buffers: int
    gradients_held: int  # the part of `gradients` alive while activations are (accumulation, DeepSpeed, FSDP)
    backward_working: int  # besides the gradients at the end of backward: the first layer's activations (being
    # used, or recomputed under checkpointing), SDPA's mask, the embedding's gradient before it is added in
    gpu_memory: int | None = None  # bytes of the GPU checked against, when known
    notes: tuple[str, ...] = field(default=())

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should read at the peak."""
        end_of_forward = self.activations + self.logits + self.gradients_held
        end_of_backward = self.gradients + self.backward_working
        return self.weights + self.optimizer + self.sharding_buffers + max(end_of_forward, end_of_backward)

    @property
    def overhead(self) -> int:
        return FIXED_OVERHEAD_BYTES + int(ALLOCATOR_SLACK * self.allocated)

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def table(self) -> str:
        """A short table of the components, in GiB."""
        s = self.setup
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
        ]
        if self.sharding_buffers:
            rows.append(("sharding buffers", self.sharding_buffers))
        rows += [
            ("peak allocated", self.allocated),
            ("CUDA context, allocator", self.overhead),
            ("total per GPU", self.total),
        ]
        sharding = {"none": "no sharding", "fsdp": "FSDP"}.get(s.sharding, f"ZeRO-{s.sharding[-1]}")
        offload = " + ".join(w for w, on in (("optimizer", s.offload_optimizer), ("weights", s.offload_params)) if on)
        head = (
            f"memory preflight: {_mode_name(s)}, {_count(self.parameters)} parameters "
            f"({_count(self.trainable)} trained), {sharding}{' offload ' + offload if offload else ''} "
            f"on {s.gpus} GPU{'s' if s.gpus > 1 else ''}, {s.tokens:,} tokens a micro-batch"
            f"{', gradient checkpointing' if s.gradient_checkpointing else ''}"
            f"{' (inputs offloaded)' if s.gradient_checkpointing and s.offload_activations else ''}"
            f"{', fused loss' if s.fused_loss else ''}, {s.optimizer}"
        )
        lines = [head] + [f"  {name:<24}{value / GIB:>8.2f} GiB" for name, value in rows]
        if self.gpu_memory is not None:
            lines.append(
                f"  {'GPU memory':<24}{self.gpu_memory / GIB:>8.2f} GiB{'' if self.fits else '  -> does not fit'}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _mode_name(s: MemorySetup) -> str:
    if s.mode == "full":
        return f"full fine-tuning in {s.dtype}"
    base = {"nf4": "NF4", "fp4": "FP4", "int8": "8-bit", "gptq": f"GPTQ {s.gptq_bits}-bit"}.get(
        s.quantization or "", s.dtype
    )
    return f"LoRA r={s.lora_r} on a {base} base"


def optimizer_state_bytes(optimizer: str, param_bytes: int) -> float:
    """Bytes of optimizer state per trained parameter whose weight takes `param_bytes`. torch's optimizers allocate
    states like the parameter; bitsandbytes' 8-bit ones one byte per state (paged or not; tensors under 4096 elements
    stay 32-bit, a rounding error here), its 32-bit ones four."""
    name = optimizer.lower()
    states = 1 if "lion" in name else 0 if (name.startswith("sgd") or "adafactor" in name) else 2
    if "8bit" in name:
        return states * 1
    if "4bit" in name:
        return states * 0.5
    if "32bit" in name:
        return states * 4
    return states * param_bytes


def activation_bytes_per_token_layer(shape: ModelShape, setup: MemorySetup) -> int:
    """Bytes one decoder layer keeps for backward per token (b = the compute dtype's bytes, h hidden, q = heads x
    head_dim, kv = kv heads x head_dim, i intermediate), from what autograd saves in transformers' Llama/Qwen2 layer:

    - each of the two RMSNorms: its input upcast to fp32 (4h, saved by pow) and the normalized value cast back
      (b h, saved by the multiply with the weight): 2 x (4h + b h);
    - the input of q/k/v (b h, one tensor shared) and of gate/up (b h);
    - attention: q, k, v after RoPE (b (q + 2 kv)), its output (b q), the o_proj input the output's transposed
      contiguous copy (b q), and the fp32 log-sum-exp per head (4 heads); eager attention adds its probabilities,
      see `attention_score_bytes`;
    - MLP: gate's output (b i, saved by SiLU), SiLU's output and up's output (2 b i, saved by the product), and the
      product (b i, down_proj's input): 4 b i;
    - LoRA: each adapted linear saves A's output (b r) for B; A's input is the tensor the frozen base layer got
      (lora_dropout 0 makes no copy), already counted.

    Total without LoRA: 8h + b (4h + 3q + 2kv + 4i) + 4 heads; for Qwen2.5-7B in bf16 (h 3584, i 18944, kv 512, 28
    heads): 8*3584 + 2*(4*3584 + 3*3584 + 2*512 + 4*18944) + 4*28 = 232,560 bytes, 0.22 MiB a token a layer."""
    b, h, i = setup.dtype_bytes, shape.hidden_size, shape.intermediate_size
    total = 8 * h + b * (4 * h + 3 * shape.q_size + 2 * shape.kv_size + 4 * i) + 4 * shape.num_heads
    if setup.mode != "full":
        total += b * setup.lora_r * sum(1 for name in shape.linears() if name in setup.lora_targets)
    return total


def attention_score_bytes(shape: ModelShape, setup: MemorySetup) -> int:
    """Bytes one layer's eager attention keeps per micro-batch: the fp32 softmax and its cast to the compute dtype,
    heads x row_tokens**2 each (flash, flex and SDPA's fused kernels keep none: only the log-sum-exp counted per
    token). The longest row decides this, not the token count: one 8k-token sample costs 64 times a 1k one."""
    if setup.attention != "eager":
        return 0
    return setup.rows * shape.num_heads * setup.row_tokens**2 * (4 + setup.dtype_bytes)


def logit_bytes(shape: ModelShape, setup: MemorySetup) -> int:
    """The loss over the vocabulary. transformers' ForCausalLMLoss upcasts the logits to fp32, and the backward of
    cross-entropy holds the saved fp32 log-softmax, its incoming gradient and its outgoing one at once:
    tokens x vocab x 12 bytes (the forward's compute-dtype logits + fp32 copy + log-softmax, b + 8, is less).
    Liger's fused linear cross-entropy computes head and loss in chunks of about tokens x hidden / vocab rows (rounded
    up to a power of two: at most twice that), fp32 logits and their gradient per chunk, and the gradient of the head's
    input: about tokens x hidden x (2 x 8 + b) bytes, the vocabulary-wide tensors never exist.
    The preference objectives' chunked head (llmft.objectives.forward.head_log_probs) holds, for the chunk being
    remade in backward, its logits in the compute dtype and in fp32, their fp32 gradient and its cast back: chunk x
    vocab x (2b + 8) bytes, with the scored rows' hidden states and their gradient, tokens x hidden x 2b."""
    tokens, vocab, h, b = setup.tokens, shape.vocab_size, shape.hidden_size, setup.dtype_bytes
    if setup.chunked_head:
        from llmft.objectives.forward import head_chunk_rows

        return min(tokens, head_chunk_rows(vocab)) * vocab * (2 * b + 8) + tokens * h * 2 * b
    reference = tokens * vocab * b if setup.reference_forward else 0  # see the module docstring, Preference
    if setup.fused_loss:
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / h)))))
        return chunk * vocab * 8 + tokens * h * b + reference
    return tokens * vocab * 12 + reference


def activation_bytes(shape: ModelShape, setup: MemorySetup) -> int:
    """Activations of one micro-batch. Without checkpointing every layer keeps `activation_bytes_per_token_layer`;
    with gradient checkpointing (one checkpoint per decoder layer, as transformers places them) each layer keeps only
    its input hidden state (b h a token) and one layer at a time is recomputed in full during backward. Outside the
    layers: the final norm and the head's input (4h + 2 b h a token)."""
    h, b, layers, tokens = shape.hidden_size, setup.dtype_bytes, shape.num_layers, setup.tokens
    per_layer = layer_activation_bytes(shape, setup)
    outside = tokens * (4 * h + 2 * b * h) + attention_mask_bytes(setup)
    if setup.gradient_checkpointing:
        # offloaded, the layer inputs live in host memory; the one being copied back and recomputed is in per_layer
        held = 0 if setup.offload_activations else layers * tokens * b * h
        if setup.lean_recompute:  # the MLP's 4 b i a token (activation_bytes_per_token_layer) for one chunk only
            from llmft.recompute import CHUNK_TOKENS

            per_layer -= (tokens - min(tokens, CHUNK_TOKENS)) * 4 * b * shape.intermediate_size
        return held + per_layer + outside
    return layers * per_layer + outside


def layer_activation_bytes(shape: ModelShape, setup: MemorySetup) -> int:
    """What one decoder layer keeps for backward over one micro-batch (checkpointed or not: while it is recomputed)."""
    return setup.tokens * activation_bytes_per_token_layer(shape, setup) + attention_score_bytes(shape, setup)


def attention_mask_bytes(setup: MemorySetup) -> int:
    """SDPA is handed a mask when samples are packed (block-diagonal) or padded: rows x row_tokens**2 booleans, and
    the additive bias in the compute dtype its memory-efficient kernel turns it into; flash and flex attention take
    the sample boundaries instead (flex's block mask is (tokens / 128)**2 entries: nothing here), eager attention's
    mask is counted with its scores. Again the longest row decides, not the token count."""
    if setup.attention != "sdpa":
        return 0
    return setup.rows * setup.row_tokens**2 * (1 + setup.dtype_bytes)


def _quantized_weight_bytes(shape: ModelShape, setup: MemorySetup) -> float:
    """Bytes of the decoder's linear weights, all layers, as the base stores them."""
    weights = shape.linear_weights()
    if setup.quantization in ("nf4", "fp4"):
        absmax = (1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_GROUP)) if setup.double_quant else 4 / NF4_BLOCK
        return weights * (0.5 + absmax)
    if setup.quantization == "int8":
        return weights + shape.num_layers * sum(4 * n_out for _, n_out in shape.linears().values())
    if setup.quantization == "gptq":
        g, bits = setup.gptq_group_size, setup.gptq_bits
        per_group = 2 + bits / 8  # fp16 scale and packed zero per group and output column
        return weights * (bits / 8 + per_group / g) + shape.num_layers * sum(
            4 * n_in for n_in, _ in shape.linears().values()
        )
    return weights * setup.dtype_bytes


def estimate(shape: ModelShape, setup: MemorySetup, gpu_memory: int | None = None) -> MemoryEstimate:
    """The per-GPU memory of `setup` on a model of `shape`; `gpu_memory` (bytes) to check against, when known."""
    gpus, b = max(1, setup.gpus), setup.dtype_bytes
    notes = []
    # what trains, as (parameters, bytes of each weight): everything in the compute dtype, or fp32 adapters (PEFT
    # upcasts them) and, for added tokens, whole copies of the embeddings and output head in the compute dtype
    # (modules_to_save; one copy when they are tied)
    if setup.mode == "full":
        groups, frozen_bytes = [(shape.parameters(), b)], 0.0
    else:
        groups = [(shape.lora_parameters(setup.lora_r, setup.lora_targets), 4)]
        if setup.train_embeddings:
            groups.append((shape.embedding_parameters(), b))
        # non-linear weights of a quantized base are fp32 outside bf16 runs (prepare_model_for_kbit_training)
        other_bytes = 4 if setup.quantization and setup.dtype != "bf16" else b
        frozen_bytes = _quantized_weight_bytes(shape, setup) + shape.other_parameters() * other_bytes
    trainable = sum(count for count, _ in groups)

    weights = frozen_bytes
    gradients = optimizer = 0.0
    for count, weight in groups:  # bytes per trained parameter: weight, gradient, optimizer states (+ fp32 master)
        if setup.deepspeed and b == 2:
            weight, grad, optim = 2, 2, 4 + optimizer_state_bytes(setup.optimizer, 4)
        elif setup.sharding == "fsdp":  # accelerate upcasts trained weights to fp32 for FSDP2 mixed precision
            weight, grad, optim = 4, 4, optimizer_state_bytes(setup.optimizer, 4)
        else:
            grad, optim = weight, optimizer_state_bytes(setup.optimizer, weight)
        weights, gradients, optimizer = weights + count * weight, gradients + count * grad, optimizer + count * optim

    shard_weights = gpus if shards_parameters(setup.sharding) else 1
    shard_grads = gpus if setup.sharding in ("zero2", "zero3", "fsdp") else 1
    shard_optim = gpus if setup.sharding != "none" else 1
    weights /= shard_weights
    if setup.offload_params:
        weights = 0
        notes.append("weights offloaded: each layer is gathered onto the GPU when used (in the sharding buffers)")
    gradients /= shard_grads
    optimizer = 0 if setup.offload_optimizer else optimizer / shard_optim

    layer_bytes = (shape.linear_weights() / shape.num_layers) * b
    if setup.sharding == "zero2" or setup.sharding == "zero1":
        # allgather and reduce buckets of 2e8 elements (ds_configs/zero2.json), no larger than what trains
        buffers = 2 * min(2e8, trainable) * b
    elif setup.sharding == "zero3":
        buffers = 2 * layer_bytes + shape.vocab_size * shape.hidden_size * b  # gathered layers (+ prefetch), embed
    elif setup.sharding == "fsdp":
        buffers = 2 * layer_bytes + shape.vocab_size * shape.hidden_size * b
    else:
        buffers = 0
    held = gradients if (setup.accumulation_steps > 1 or setup.sharding != "none") else 0
    embeddings_train = setup.mode == "full" or setup.train_embeddings
    embedding_gradient = shape.vocab_size * shape.hidden_size * b / shard_grads if embeddings_train else 0
    working = layer_activation_bytes(shape, setup) + attention_mask_bytes(setup) + embedding_gradient
    if setup.attention == "eager":
        notes.append(f"eager attention keeps heads x {setup.row_tokens:,}^2 scores a layer: the longest row decides")
    if setup.reference_forward:
        notes.append(
            "a no-grad forward at every step (the reference with adapters off, or KTO's KL row), its logits a chunk "
            "at a time"
        )
    return MemoryEstimate(
        setup=setup,
        parameters=shape.parameters(),
        trainable=trainable,
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(activation_bytes(shape, setup)),
        logits=int(logit_bytes(shape, setup)),
        sharding_buffers=int(buffers),
        gradients_held=int(held),
        backward_working=int(working),
        gpu_memory=gpu_memory,
        notes=tuple(notes),
    )


# --- advice --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advice:
    change: str  # the flags to change, as a user types them
    estimate: MemoryEstimate

    def line(self) -> str:
        verdict = "fits" if self.estimate.fits else "still too much"
        return f"{self.change} -> {self.estimate.total / GIB:.1f} GiB ({verdict})"


def _changes(s: MemorySetup, model_max_length: int | None) -> list[tuple[str, MemorySetup]]:
    """The changes advice tries on `s`, as (flags, the setup they give), in the order a user should try them: what
    costs nothing in quality first (checkpointing, its inputs offloaded, smaller micro-batches with more accumulation,
    sharding, offload, an 8-bit optimizer), then adapters instead of full training, then a quantized base."""
    changes: list[tuple[str, MemorySetup]] = []
    if not s.gradient_checkpointing:
        changes.append(("--gradient_checkpointing True", dataclasses.replace(s, gradient_checkpointing=True)))
    elif not s.offload_activations and s.sharding == "none" and s.gpus == 1:
        changes.append(("--offload_activations True", dataclasses.replace(s, offload_activations=True)))
    half, accumulation = s.tokens // 2, 2 * s.accumulation_steps
    if s.rows == 1 and half >= 64:
        flags = f"--max_tokens_per_batch {half} --gradient_accumulation_steps {accumulation}"
        if model_max_length is not None and half < model_max_length:
            flags += f" --model_max_length {half}"
        changes.append((flags, dataclasses.replace(s, tokens=half, accumulation_steps=accumulation)))
    elif s.rows > 1:
        changes.append(
            (
                f"--per_device_train_batch_size {s.rows // 2} --gradient_accumulation_steps {accumulation}",
                dataclasses.replace(
                    s, tokens=s.row_tokens * (s.rows // 2), rows=s.rows // 2, accumulation_steps=accumulation
                ),
            )
        )
    if s.sharding in ("none", "zero1", "zero2") and s.gpus > 1 and s.quantization != "gptq":
        # DeepSpeed runs never offload activations (llmft.activation_offload), whatever the flags before said
        changes.append(
            ("--deepspeed ds_configs/zero3.json", dataclasses.replace(s, sharding="zero3", offload_activations=False))
        )
    if s.sharding != "fsdp" and not s.offload_optimizer:
        stage = "zero3" if s.sharding == "zero3" else "zero2"
        config = "zero3_offload.json" if stage == "zero3" else "zero2_offload.json"
        changes.append(
            (
                f"--deepspeed ds_configs/{config}",
                dataclasses.replace(
                    s,
                    sharding=stage,
                    offload_optimizer=True,
                    offload_params=stage == "zero3",
                    optimizer="adamw",
                    offload_activations=False,
                ),
            )
        )
    if "8bit" not in s.optimizer and not s.offload_optimizer:
        changes.append(("--optim paged_adamw_8bit", dataclasses.replace(s, optimizer="paged_adamw_8bit")))
    if s.mode == "full":
        changes.append(("--use_lora True", dataclasses.replace(s, mode="lora")))
    if s.quantization is None and s.sharding != "fsdp":
        flags = "--q_lora True" if s.mode == "lora" else "--use_lora True --q_lora True"
        changes.append((flags, dataclasses.replace(s, mode="qlora", quantization="nf4", double_quant=True)))
    return changes


def advice(shape: ModelShape, result: MemoryEstimate, model_max_length: int | None = None) -> list[Advice]:
    """Each change of `_changes` that lowers the estimate (by MIN_SAVING_BYTES at least), applied alone to `result`'s
    setup, in that order."""
    tries = [
        Advice(flags, estimate(shape, setup, result.gpu_memory))
        for flags, setup in _changes(result.setup, model_max_length)
    ]
    return [a for a in tries if _lowers(a.estimate, result)]


def _lowers(changed: MemoryEstimate, before: MemoryEstimate) -> bool:
    """By enough to show in the advice's one decimal of GiB."""
    return changed.total <= before.total - MIN_SAVING_BYTES


def combined_advice(shape: ModelShape, result: MemoryEstimate, model_max_length: int | None = None) -> Advice | None:
    """When no change fits alone: the changes of `_changes` applied one on top of the other, in that order, each
    kept only if it lowers the estimate, up to the first combination that fits (or all of them). None when a
    single change fits, or fewer than two lower the estimate."""
    if any(a.estimate.fits for a in advice(shape, result, model_max_length)):
        return None
    current, flags, done = result, [], set()
    while not current.fits:
        step = next(
            (
                (change, setup)
                for change, setup in _changes(current.setup, model_max_length)
                if change.split()[0] not in done and _lowers(estimate(shape, setup, result.gpu_memory), current)
            ),
            None,
        )
        if step is None:
            break
        done.add(step[0].split()[0])
        flags.append(step[0])
        current = estimate(shape, step[1], result.gpu_memory)
    if any(f.startswith("--deepspeed") for f in flags):  # DeepSpeed turned the offloading back off
        flags = [f for f in flags if f != "--offload_activations True"]
    return Advice(" ".join(flags), current) if len(flags) > 1 else None


# --- from finetune.py's settings -----------------------------------------------------------------------------------


def setup_from_args(
    lora_args: LoraArguments,
    training_args: TrainingArguments,
    plan: RunPlan,
    model_config: dict | None = None,
) -> MemorySetup:
    """The MemorySetup of a finetune.py run, converted from its plan (llmft/plan.py): mode, base quantization, dtype,
    sharding and offload, optimizer, tokens and rows per micro-batch, checkpointing, kernels, and whether LoRA trains
    the embeddings and head too (added tokens). `model_config`: the base's config.json, for a GPTQ base's bits and
    group size."""
    import torch

    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(plan.compute_dtype, "fp32")
    config = model_config or {}
    gptq = (config.get("quantization_config") or {}) if isinstance(config.get("quantization_config"), dict) else {}
    quantization = None
    options = {}
    if plan.base_quantization == "gptq":
        quantization = "gptq"
        group_size = int(gptq.get("group_size") or 128)
        # -1: one group over each whole input row (taken as hidden_size wide)
        options = dict(
            gptq_bits=int(gptq.get("bits", 4)),
            gptq_group_size=group_size if group_size > 0 else int(config.get("hidden_size", 128)),
        )
    elif (on_load := plan.quantize_on_load) is not None:
        quantization = "int8" if on_load.bits == 8 else on_load.quant_type
        options = dict(double_quant=on_load.double_quant) if on_load.bits == 4 else {}
    targets = plan.lora_targets  # None where the plan could not tell them before the weights load: the usual ones
    if targets is None:
        targets = {"all-linear": LINEAR_NAMES, "default": PEFT_DEFAULT_TARGETS}.get(
            " ".join(lora_args.lora_target_modules), tuple(lora_args.lora_target_modules)
        )

    # the estimate's sharding: DDP and ZeRO stage 0 keep a whole model on each GPU, as one process does
    sharding = plan.sharding if plan.sharding in ("zero1", "zero2", "zero3", "fsdp") else "none"
    return MemorySetup(
        mode=plan.coarse_mode,
        dtype=dtype,
        quantization=quantization,
        lora_r=lora_args.lora_r,
        lora_targets=targets,
        train_embeddings=plan.train_embeddings and plan.uses_lora,
        optimizer=plan.optimizer,
        sharding=sharding,
        offload_optimizer="optimizer" in plan.offloaded,
        offload_params="parameters" in plan.offloaded,
        gpus=max(1, training_args.world_size),
        tokens=plan.micro_batch_tokens,
        rows=plan.micro_batch_rows,
        gradient_checkpointing=plan.gradient_checkpointing,
        offload_activations=plan.offload_activations,
        lean_recompute=plan.lean_recompute,
        fused_loss=plan.kernels.liger and plan.objective == "sft",
        chunked_head=plan.objective != "sft" and sharding != "zero3",  # see objectives.forward.packed_log_probs
        reference_forward=plan.reference == "adapters-off" or plan.objective == "kto",
        attention=plan.kernels.attention or "sdpa",
        accumulation_steps=training_args.gradient_accumulation_steps,
        **options,
    )


def gpu_memory_bytes(training_args: TrainingArguments) -> int | None:
    """The memory to check against: --preflight_gpu_memory GiB when given, else the GPU's whole memory (what
    torch.cuda.mem_get_info reports as total; other processes' use is not subtracted), None on CPU runs."""
    if training_args.preflight_gpu_memory:
        return int(training_args.preflight_gpu_memory * GIB)
    import torch

    if training_args.use_cpu or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(training_args.device)[1]


def preflight(
    model_args: ModelArguments,
    data_args: DataArguments,
    lora_args: LoraArguments,
    training_args: TrainingArguments,
    plan: RunPlan,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> MemoryEstimate | None:
    """The memory preflight of a finetune.py run, before its weights load: the estimate's table (rank 0; printed to
    stdout with --preflight_only, logged otherwise), and a ConfigError with the advice when it does not fit the GPU,
    unless --preflight False (then only a warning). `plan`: the run's, completed with its added tokens (they make
    LoRA train the embeddings and head); `tokenizer` as llmft.model.load_training_tokenizer returns it: a vocabulary
    larger than the checkpoint's grows the embeddings (`padded`, as build_model resizes them).
    None when the model's config.json is not at hand (a Hub id not in the local cache), or is not modelled and
    --preflight False."""
    config = plan.model.config
    if config is None:
        logger.warning("memory preflight skipped: no config.json of %s at hand", model_args.model_name_or_path)
        return None
    try:
        shape = ModelShape.from_config(config)
    except ConfigError:
        if training_args.preflight or training_args.preflight_only:
            raise
        return None
    if tokenizer is not None and len(tokenizer) > shape.vocab_size:
        shape = dataclasses.replace(shape, vocab_size=padded(len(tokenizer)))
    setup = setup_from_args(lora_args, training_args, plan, config)
    result = estimate(shape, setup, gpu_memory_bytes(training_args))
    if training_args.should_log:
        if training_args.preflight_only:
            print(result.table(), flush=True)
        else:
            logger.warning("%s", result.table())
    if result.fits is False:
        tries = "".join(f"\n      {a.line()}" for a in advice(shape, result, data_args.model_max_length))
        combined = combined_advice(shape, result, data_args.model_max_length)
        together = f"\n    together: {combined.line()}" if combined is not None else ""
        message = (
            f"memory preflight: the run needs about {result.total / GIB:.1f} GiB per GPU and the GPU has "
            f"{result.gpu_memory / GIB:.1f} GiB; each of these changes alone would bring it to:{tries}"
            f"{together}\n"
            "    if you know the estimate is pessimistic for this run, pass --preflight False to train anyway"
        )
        if training_args.preflight:
            raise ConfigError([message])
        logger.warning("%s (--preflight False: training anyway)", message)
    return result
