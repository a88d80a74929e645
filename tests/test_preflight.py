"""The memory preflight (llmft/preflight.py): figures for known cases against values computed by hand here, the
table and the advice, and `--preflight_only` / `--preflight` through finetune.py on the tiny model.

Shapes are Qwen2.5's (config.json of Qwen/Qwen2.5-0.5B, -1.5B, -7B); their parameter counts are the published ones
(494,032,768; 1,543,714,304; 7,615,616,512). Every expected figure below is written as the arithmetic that gives it.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmft.errors import ConfigError
from llmft.preflight import (
    GIB,
    LINEAR_NAMES,
    MemorySetup,
    ModelShape,
    advice,
    combined_advice,
    estimate,
    setup_from_args,
)
from tests.conftest import EXAMPLES, REPO, argv, run_script

QWEN = {"model_type": "qwen2", "vocab_size": 151936}
CONFIGS = {
    "0.5b": {
        **QWEN,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "1.5b": {
        **QWEN,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "7b": {
        **QWEN,
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
}
SHAPE_7B = ModelShape.from_config(CONFIGS["7b"])
P_7B = 7_615_616_512
# 7B linear weights a layer: q and o 3584 x 3584, k and v 3584 x 512 (4 kv heads x 128), gate, up, down 3584 x 18944
LINEAR_7B = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)  # 6,525,288,448
# LoRA r=64 on all 7 linears: r x (in + out) each
LORA_7B = 28 * 64 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))  # 161,480,704
T = 8192  # tokens a micro-batch
# bytes a token a layer kept for backward in bf16 (activation_bytes_per_token_layer): 8h + 2 (4h + 3q + 2kv + 4i) +
# 4 heads, h = q = 3584, kv = 512, i = 18944, 28 heads
PER_TOKEN_LAYER_7B = 8 * 3584 + 2 * (4 * 3584 + 3 * 3584 + 2 * 512 + 4 * 18944) + 4 * 28  # 232,560


# --- parameters ---------------------------------------------------------------------------------------------------


def test_parameter_counts_are_the_published_ones():
    # 0.5B: embeddings 151936 x 896 (tied: no separate head); a layer: q 896x896 + 896 bias, k and v 896x128 + 128,
    # o 896x896, gate/up/down 3 x 896 x 4864, two norms of 896; 24 layers; the final norm
    layer = (896 * 896 + 896) + 2 * (896 * 128 + 128) + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert ModelShape.from_config(CONFIGS["0.5b"]).parameters() == 151936 * 896 + 24 * layer + 896 == 494_032_768
    layer = (1536 * 1536 + 1536) + 2 * (1536 * 256 + 256) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    assert ModelShape.from_config(CONFIGS["1.5b"]).parameters() == 151936 * 1536 + 28 * layer + 1536 == 1_543_714_304
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert SHAPE_7B.parameters() == 2 * 152064 * 3584 + 28 * layer + 3584 == P_7B  # untied: embeddings and head
    assert SHAPE_7B.linear_weights() == LINEAR_7B
    assert SHAPE_7B.lora_parameters(64, LINEAR_NAMES) == LORA_7B == 161_480_704


def test_parameter_count_of_the_tiny_model_is_exactly_what_transformers_builds(tiny_chat_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_chat_model / "config.json").read_text())
    shape = ModelShape.from_config(config)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    assert shape.parameters() == model.num_parameters()
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert shape.lora_parameters(8, LINEAR_NAMES) == trainable


def test_mixture_of_experts_and_incomplete_configs_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="mixture-of-experts.*--preflight False"):
        ModelShape.from_config({**CONFIGS["7b"], "num_experts": 64})
    with pytest.raises(ConfigError, match="no usable 'intermediate_size'"):
        ModelShape.from_config({k: v for k, v in CONFIGS["7b"].items() if k != "intermediate_size"})


# --- the known cases ----------------------------------------------------------------------------------------------


def test_full_bf16_adamw_on_one_gpu():
    setup = MemorySetup(
        mode="full",
        dtype="bf16",
        optimizer="adamw_torch",
        tokens=T,
        gradient_checkpointing=True,
        attention="flash_attention_2",
    )
    e = estimate(SHAPE_7B, setup)
    # bf16 weights, bf16 gradients, AdamW's two states in the parameter's dtype: 2 + 2 + 4 bytes, no fp32 master
    assert (e.weights, e.gradients, e.optimizer) == (2 * P_7B, 2 * P_7B, 4 * P_7B)
    # checkpointing: each of 28 layers keeps its bf16 input (T x 2 x 3584), one layer is recomputed in full, plus the
    # final norm and the head's input (4h + 2 x 2h a token)
    layer = T * PER_TOKEN_LAYER_7B
    assert e.activations == 28 * T * 2 * 3584 + layer + T * (4 * 3584 + 4 * 3584) == 3_784_179_712
    assert e.logits == T * 152064 * 12 == 14_948_499_456  # fp32 log-softmax, its gradient in and out
    # the peak: end of forward (activations + logits, no gradient held with one micro-batch a step) against end of
    # backward (all gradients + the first layer's activations + the embedding's gradient, 152064 x 3584 x 2)
    end_of_forward = 3_784_179_712 + 14_948_499_456
    end_of_backward = 2 * P_7B + layer + 152064 * 3584 * 2
    assert end_of_forward > end_of_backward
    assert e.allocated == 2 * P_7B + 4 * P_7B + end_of_forward == 64_426_378_240
    assert e.total == e.allocated + GIB + int(0.05 * e.allocated)  # fixed allowance and allocator slack


def test_fused_loss_removes_the_vocabulary_wide_logits():
    setup = MemorySetup(tokens=T, fused_loss=True)
    # chunks of 2**ceil(log2(8192 / ceil(152064 / 3584))) = 2**ceil(log2(190.5)) = 256 rows of fp32 logits and their
    # gradient, and the head input's gradient in bf16
    assert estimate(SHAPE_7B, setup).logits == 256 * 152064 * 8 + T * 3584 * 2 == 370_147_328


def test_lean_recompute_holds_one_chunk_of_the_recomputed_mlp():
    from llmft.recompute import CHUNK_TOKENS

    tokens = 16384
    setup = MemorySetup(mode="lora", tokens=tokens, gradient_checkpointing=True, offload_activations=True)
    plain = estimate(SHAPE_7B, setup).activations
    lean = estimate(SHAPE_7B, dataclasses.replace(setup, lean_recompute=True)).activations
    # the gate, SiLU, up and product tensors (4 b i a token) for one chunk of tokens instead of all of them
    assert plain - lean == (tokens - CHUNK_TOKENS) * 4 * 2 * 18944
    short = dataclasses.replace(setup, tokens=CHUNK_TOKENS // 2)  # a micro-batch within one chunk: no change
    assert (
        estimate(SHAPE_7B, short).activations
        == estimate(SHAPE_7B, dataclasses.replace(short, lean_recompute=True)).activations
    )


def test_lora_r64_all_linear_on_a_bf16_base():
    setup = MemorySetup(mode="lora", lora_r=64, tokens=T, gradient_checkpointing=False)
    e = estimate(SHAPE_7B, setup)
    assert e.trainable == LORA_7B
    # the base frozen in bf16, the adapters in fp32 (PEFT upcasts them): weights 2 P + 4 A, gradients 4 A, AdamW 8 A
    assert (e.weights, e.gradients, e.optimizer) == (2 * P_7B + 4 * LORA_7B, 4 * LORA_7B, 8 * LORA_7B)
    # no checkpointing: every layer keeps its activations, plus A's output (r values in bf16) of each of 7 linears
    per_layer = T * (PER_TOKEN_LAYER_7B + 7 * 2 * 64)
    assert e.activations == 28 * per_layer + T * (4 * 3584 + 4 * 3584)


def test_qlora_nf4_with_double_quantization():
    setup = MemorySetup(
        mode="qlora",
        quantization="nf4",
        double_quant=True,
        optimizer="paged_adamw_8bit",
        tokens=T,
        gradient_checkpointing=True,
    )
    e = estimate(SHAPE_7B, setup)
    # NF4: half a byte a weight; double quantization: one byte of absmax per block of 64 and an fp32 per 256 blocks;
    # embeddings, head, norms and biases stay bf16 (P - LINEAR); adapters fp32
    nf4 = LINEAR_7B * (0.5 + 1 / 64 + 4 / (64 * 256))
    assert e.weights == int(nf4 + (P_7B - LINEAR_7B) * 2 + 4 * LORA_7B)
    assert e.optimizer == 2 * LORA_7B  # paged 8-bit AdamW: two 1-byte states
    no_dq = estimate(SHAPE_7B, dataclasses.replace(setup, double_quant=False))
    assert no_dq.weights == int(LINEAR_7B * (0.5 + 4 / 64) + (P_7B - LINEAR_7B) * 2 + 4 * LORA_7B)
    # under ZeRO-3 the packed weights are stored in bf16 elements of the same bytes, partitioned like the rest
    zero3 = estimate(SHAPE_7B, dataclasses.replace(setup, sharding="zero3", gpus=4))
    assert zero3.weights == int((nf4 + (P_7B - LINEAR_7B) * 2 + 2 * LORA_7B) / 4)  # DeepSpeed's 16-bit adapters


def test_lora_on_gptq_and_8bit_bases():
    gptq = estimate(SHAPE_7B, MemorySetup(mode="qlora", quantization="gptq", gptq_bits=4, gptq_group_size=128))
    # 4-bit packed weights, per group of 128 inputs and output column an fp16 scale and a 4-bit zero, an int32 group
    # index per input of each linear (in features a layer: 5 x 3584 + 3584 + 18944)
    g_idx = 28 * 4 * (5 * 3584 + 3584 + 18944)
    assert gptq.weights == int(LINEAR_7B * (0.5 + 2.5 / 128) + g_idx + (P_7B - LINEAR_7B) * 2 + 4 * LORA_7B)
    int8 = estimate(SHAPE_7B, MemorySetup(mode="qlora", quantization="int8"))
    scales = 28 * 4 * (2 * 3584 + 2 * 512 + 2 * 18944 + 3584)  # an fp32 scale per output row of each linear
    assert int8.weights == LINEAR_7B + scales + (P_7B - LINEAR_7B) * 2 + 4 * LORA_7B


def test_zero2_on_four_gpus():
    e = estimate(SHAPE_7B, MemorySetup(sharding="zero2", gpus=4, tokens=T, gradient_checkpointing=True))
    # 16-bit weights whole on every GPU; 16-bit gradients and the fp32 master + AdamW's fp32 states (4 + 8) a quarter
    assert (e.weights, e.gradients, e.optimizer) == (2 * P_7B, 2 * P_7B // 4, 12 * P_7B // 4)
    assert e.sharding_buffers == 2 * 200_000_000 * 2  # ds_configs/zero2.json's allgather and reduce buckets
    assert e.gradients_held == e.gradients  # DeepSpeed's gradient partitions live through the forward pass
    lora = estimate(SHAPE_7B, MemorySetup(mode="lora", sharding="zero2", gpus=4))
    assert lora.sharding_buffers == 2 * LORA_7B * 2  # 161M adapter parameters: buckets no larger than that


def test_zero3_on_eight_gpus_with_offload():
    e = estimate(
        SHAPE_7B,
        MemorySetup(
            sharding="zero3", gpus=8, offload_optimizer=True, offload_params=True, tokens=T, gradient_checkpointing=True
        ),
    )
    assert (e.weights, e.gradients, e.optimizer) == (0, 2 * P_7B // 8, 0)  # weights, master and states on the CPU
    # gathered on the GPU when used: two layers' linear weights (the current and the prefetched) and the embeddings
    assert e.sharding_buffers == 2 * (LINEAR_7B // 28) * 2 + 152064 * 3584 * 2
    no_offload = estimate(SHAPE_7B, MemorySetup(sharding="zero3", gpus=8, tokens=T, gradient_checkpointing=True))
    assert (no_offload.weights, no_offload.optimizer) == (2 * P_7B // 8, 12 * P_7B // 8)


def test_fp32_and_8bit_optimizers_and_fsdp():
    fp32 = estimate(SHAPE_7B, MemorySetup(dtype="fp32"))
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * P_7B, 4 * P_7B, 8 * P_7B)
    eight = estimate(SHAPE_7B, MemorySetup(optimizer="adamw_bnb_8bit"))
    assert eight.optimizer == 2 * P_7B
    # FSDP2 upcasts trained weights to fp32 and shards weights, gradients and AdamW's fp32 states
    fsdp = estimate(SHAPE_7B, MemorySetup(sharding="fsdp", gpus=8))
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (4 * P_7B // 8, 4 * P_7B // 8, 8 * P_7B // 8)


def test_attention_that_materialises_scores_or_masks_grows_with_the_longest_row():
    flash = estimate(SHAPE_7B, MemorySetup(tokens=T, gradient_checkpointing=True))
    sdpa = estimate(SHAPE_7B, MemorySetup(tokens=T, gradient_checkpointing=True, attention="sdpa"))
    assert sdpa.activations - flash.activations == T * T * (1 + 2)  # the packed row's boolean mask and its bf16 bias
    eager = estimate(SHAPE_7B, MemorySetup(tokens=T, gradient_checkpointing=True, attention="eager"))
    assert eager.activations - flash.activations == 28 * T * T * (4 + 2)  # one layer's fp32 softmax + bf16 copy
    # eight rows of 1024 tokens (padded batches of 8) keep an eighth of one 8192-token row's scores
    rows = estimate(SHAPE_7B, MemorySetup(tokens=T, rows=8, gradient_checkpointing=True, attention="eager"))
    assert rows.activations - flash.activations == 8 * 28 * 1024 * 1024 * 6


# --- table and advice ---------------------------------------------------------------------------------------------


def test_table_rows():
    e = estimate(SHAPE_7B, MemorySetup(tokens=T, gradient_checkpointing=True), gpu_memory=60 * GIB)
    lines = e.table().splitlines()
    assert lines[0] == (
        "memory preflight: full fine-tuning in bf16, 7.62B parameters (7.62B trained), no sharding on "
        "1 GPU, 8,192 tokens a micro-batch, gradient checkpointing, adamw_torch"
    )
    names = [line[:26].strip() for line in lines[1:]]
    assert names == [
        "weights",
        "gradients",
        "optimizer states",
        "activations",
        "logits",
        "peak allocated",
        "CUDA context, allocator",
        "total per GPU",
        "GPU memory",
    ]
    assert lines[1] == f"  {'weights':<24}{2 * P_7B / GIB:>8.2f} GiB" == "  weights                    14.19 GiB"
    assert lines[-1] == "  GPU memory                 60.00 GiB  -> does not fit"
    assert e.fits is False
    assert "sharding buffers" in estimate(SHAPE_7B, MemorySetup(sharding="zero2", gpus=4)).table()


def test_advice_is_ordered_and_each_figure_is_the_estimate_of_that_change():
    setup = MemorySetup(tokens=16384, sharding="none", gpus=4, optimizer="adamw_torch_fused")
    e = estimate(SHAPE_7B, setup, gpu_memory=80 * GIB)
    assert not e.fits
    tips = advice(SHAPE_7B, e, model_max_length=8192)
    assert [t.change for t in tips] == [
        "--gradient_checkpointing True",
        "--max_tokens_per_batch 8192 --gradient_accumulation_steps 2",
        "--deepspeed ds_configs/zero3.json",
        "--deepspeed ds_configs/zero2_offload.json",
        "--optim paged_adamw_8bit",
        "--use_lora True",
        "--use_lora True --q_lora True",
    ]
    expected = [
        dataclasses.replace(setup, gradient_checkpointing=True),
        dataclasses.replace(setup, tokens=8192, accumulation_steps=2),
        dataclasses.replace(setup, sharding="zero3"),
        dataclasses.replace(setup, sharding="zero2", offload_optimizer=True, optimizer="adamw"),
        dataclasses.replace(setup, optimizer="paged_adamw_8bit"),
        dataclasses.replace(setup, mode="lora"),
        dataclasses.replace(setup, mode="qlora", quantization="nf4"),
    ]
    for tip, changed in zip(tips, expected):
        assert tip.estimate.total == estimate(SHAPE_7B, changed).total
        assert tip.estimate.total < e.total
        assert tip.line() == (
            f"{tip.change} -> {tip.estimate.total / GIB:.1f} GiB "
            f"({'fits' if tip.estimate.total <= 80 * GIB else 'still too much'})"
        )
    # halving below --model_max_length lowers it too; one GPU: ZeRO-3 alone shards nothing
    one_gpu = advice(SHAPE_7B, estimate(SHAPE_7B, dataclasses.replace(setup, tokens=8192, gpus=1), 80 * GIB), 8192)
    assert "--max_tokens_per_batch 4096 --gradient_accumulation_steps 2 --model_max_length 4096" in [
        t.change for t in one_gpu
    ]
    assert "--deepspeed ds_configs/zero3.json" not in [t.change for t in one_gpu]
    # checkpointed on one GPU: offloading the checkpointed inputs comes first, and saves layers x tokens x hidden x 2
    checkpointed = dataclasses.replace(setup, gpus=1, gradient_checkpointing=True)
    first = advice(SHAPE_7B, estimate(SHAPE_7B, checkpointed, 80 * GIB))[0]
    assert first.change == "--offload_activations True"
    saved = estimate(SHAPE_7B, checkpointed).activations - first.estimate.activations
    assert saved == SHAPE_7B.num_layers * 16384 * SHAPE_7B.hidden_size * 2
    assert first.estimate.total < estimate(SHAPE_7B, checkpointed).total
    # a change that saves nothing is not offered: LoRA on a model no larger than its adapters
    tiny = ModelShape(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=32,
        tied_embeddings=True,
    )
    small = estimate(tiny, MemorySetup(tokens=128, gradient_checkpointing=True), gpu_memory=GIB // 2)
    assert not small.fits and [t.change for t in advice(tiny, small)] == []  # the fixed 1 GiB allowance is most
    # padded batches of several samples: halve the batch, double the accumulation
    padded = estimate(SHAPE_7B, MemorySetup(mode="lora", tokens=4 * 2048, rows=4), 40 * GIB)
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 2" in [
        t.change for t in advice(SHAPE_7B, padded)
    ]
    # accumulating holds full fine-tuning's gradients through the next forward pass: halving the micro-batch of a
    # run whose peak is its gradients costs more than it saves, and is not offered
    full = MemorySetup(tokens=8192, gradient_checkpointing=True)
    halved = estimate(SHAPE_7B, dataclasses.replace(full, tokens=4096, accumulation_steps=2))
    assert halved.gradients_held == 2 * P_7B and halved.total > estimate(SHAPE_7B, full).total
    assert not any(
        t.change.startswith("--max_tokens_per_batch")
        for t in advice(SHAPE_7B, estimate(SHAPE_7B, full, 40 * GIB), 8192)
    )


def test_when_no_change_fits_alone_they_are_combined_in_order_until_one_does():
    setup = MemorySetup(tokens=16384, optimizer="adamw_torch_fused", fused_loss=True)
    e = estimate(SHAPE_7B, setup, gpu_memory=40 * GIB)  # 151 GiB; the best single change, checkpointing: 65 GiB
    assert not any(t.estimate.fits for t in advice(SHAPE_7B, e, 8192))
    together = combined_advice(SHAPE_7B, e, 8192)
    assert together.change == (
        "--gradient_checkpointing True --max_tokens_per_batch 8192 "
        "--gradient_accumulation_steps 2 --deepspeed ds_configs/zero2_offload.json"
    )
    combined = dataclasses.replace(
        setup,
        gradient_checkpointing=True,
        tokens=8192,
        accumulation_steps=2,
        sharding="zero2",
        offload_optimizer=True,
        optimizer="adamw",
    )
    assert together.estimate.total == estimate(SHAPE_7B, combined).total <= 40 * GIB
    # on 12 GiB it takes adapters on a 4-bit base too; "--use_lora True" is not repeated
    together = combined_advice(SHAPE_7B, estimate(SHAPE_7B, setup, gpu_memory=12 * GIB), 8192)
    assert together.change.endswith("--deepspeed ds_configs/zero2_offload.json --use_lora True --q_lora True")
    assert together.estimate.fits
    # nothing to combine when one change fits alone
    assert combined_advice(SHAPE_7B, estimate(SHAPE_7B, setup, gpu_memory=70 * GIB), 8192) is None


# --- from finetune.py's flags -------------------------------------------------------------------------------------


def setup_of(args, plan_changes=None, **kwargs):
    """setup_from_args for parse_args' settings, through their plan (with `plan_changes` made to it)."""
    from llmft.plan import resolve_plan

    _, _, lora_args, _, training_args = args
    plan = dataclasses.replace(resolve_plan(*args), **(plan_changes or {}))
    return setup_from_args(lora_args, training_args, plan, **kwargs)


def test_setup_from_flags(tiny_chat_model, tmp_path):
    from llmft.config import parse_args

    base = argv(
        "--model_name_or_path {model} --data_path {examples} --output_dir {out} --use_cpu True",
        model=tiny_chat_model,
        examples=EXAMPLES,
        out=tmp_path / "out",
    )
    args = parse_args(
        base
        + argv(
            "--use_lora True --q_lora True --lora_r 16 --lora_target_modules q_proj v_proj --bf16 True",
            "--max_tokens_per_batch 8200 --gradient_checkpointing True --optim paged_adamw_8bit",
            "--gradient_accumulation_steps 3",
        )
    )
    setup = setup_of(args)
    assert setup == MemorySetup(
        mode="qlora",
        dtype="bf16",
        quantization="nf4",
        double_quant=True,
        lora_r=16,
        lora_targets=("q_proj", "v_proj"),
        optimizer="paged_adamw_8bit",
        tokens=8256,
        rows=1,
        gradient_checkpointing=True,
        fused_loss=False,
        attention="sdpa",
        accumulation_steps=3,
    )  # 8200 tokens padded to a multiple of 64
    # no token budget: per-device batch x model_max_length, the worst case; unpacked: that many rows
    args = parse_args(base + argv("--per_device_train_batch_size 3 --model_max_length 1000 --packing False"))
    setup = setup_of(args)
    assert (setup.mode, setup.dtype, setup.tokens, setup.rows, setup.row_tokens) == ("full", "fp32", 3000, 3, 1000)
    args = parse_args(base + argv("--per_device_train_batch_size 3 --model_max_length 1000"))
    assert (setup_of(args).tokens, setup_of(args).rows) == (3008, 1)  # packed in one row
    # a GPTQ checkpoint's bits and group size come from its config.json (group_size -1: one group a row)
    args = parse_args(base + argv("--use_lora True --bf16 True"))
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": -1}, "hidden_size": 896}
    setup = setup_of(args, {"base_quantization": "gptq", "mode": "lora-on-gptq"}, model_config=gptq)
    # the plan's coarse mode: a base stored quantized trains as lora, told apart by its quantization
    assert (setup.mode, setup.quantization, setup.gptq_bits, setup.gptq_group_size) == ("lora", "gptq", 8, 896)
    # DeepSpeed's stage and offload are read from its config
    for config, expected in [
        ("zero2.json", ("zero2", False, False)),
        ("zero3.json", ("zero3", False, False)),
        ("zero3_offload.json", ("zero3", True, True)),
        ("zero2_offload.json", ("zero2", True, False)),
    ]:
        args = parse_args(base + argv("--bf16 True --deepspeed {config}", config=REPO / "ds_configs" / config))
        setup = setup_of(args)
        assert (setup.sharding, setup.offload_optimizer, setup.offload_params) == expected, config
        assert setup.optimizer == ("adamw" if "offload" in config else "adamw_torch_fused"), config


def test_setup_reads_the_plans_liger_choice_not_the_training_arguments(tiny_chat_model, tmp_path):
    """Liger's fused loss is the plan's choice (CUDA with liger-kernel installed): the preflight runs before the plan
    is written into the TrainingArguments, whose use_liger_kernel is still the flag's None."""
    from llmft.config import parse_args
    from llmft.kernels import LIGER_DEFAULT, Kernels

    args = parse_args(
        argv(
            "--model_name_or_path {model} --data_path {examples} --output_dir {out} --use_cpu True",
            model=tiny_chat_model,
            examples=EXAMPLES,
            out=tmp_path / "out",
        )
    )
    assert args[-1].use_liger_kernel is None
    assert setup_of(args).fused_loss is False
    assert setup_of(args, {"kernels": Kernels("flex_attention", None, True, LIGER_DEFAULT)}).fused_loss is True
    assert (
        setup_of(args, {"kernels": Kernels("flex_attention", None, True, LIGER_DEFAULT)}).attention == "flex_attention"
    )


def test_preflight_gpu_memory_must_be_positive(tiny_chat_model, tmp_path):
    from llmft.config import parse_args

    with pytest.raises(ConfigError, match="--preflight_gpu_memory -1.0: must be a positive number of GiB"):
        parse_args(
            argv(
                "--model_name_or_path {model} --data_path {examples} --output_dir {out} --preflight_gpu_memory -1",
                model=tiny_chat_model,
                examples=EXAMPLES,
                out=tmp_path / "out",
            )
        )


@pytest.mark.slow
def test_preflight_only_prints_the_table_and_exits_0_writing_and_loading_nothing(tiny_chat_model, tmp_path):
    out = tmp_path / "out"
    flags = argv(
        "--model_name_or_path {model} --data_path {examples} --output_dir {out} --use_cpu True",
        "--max_tokens_per_batch 4096 --model_max_length 1024 --preflight_only True",
        model=tiny_chat_model,
        examples=EXAMPLES,
        out=out,
    )
    done = run_script(*flags, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[0].startswith("memory preflight: full fine-tuning in fp32, 0.4M parameters")
    assert "4,096 tokens a micro-batch" in table[0]
    assert [line.split()[0] for line in table[1:]] == [
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "peak",
        "CUDA",
        "total",
    ]  # no GPU: no fit check
    assert not out.exists()
    assert "Traceback" not in done.stderr

    # an assumed GPU too small: the advice, how to override, exit 2, still nothing loaded or written
    done = run_script(*flags, "--preflight_gpu_memory", "0.5", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "error: invalid settings (1):" in done.stderr and "Traceback" not in done.stderr
    assert "the GPU has 0.5 GiB; each of these changes alone would bring it to:" in done.stderr
    assert (
        "      --max_tokens_per_batch 2048 --gradient_accumulation_steps 2 -> 1.1 GiB (still too much)\n" in done.stderr
    )
    assert "pass --preflight False to train anyway" in done.stderr
    assert "0.50 GiB  -> does not fit" in done.stdout
    assert not out.exists()
    done = run_script(*flags, "--preflight_gpu_memory", "0.5", "--preflight", "False", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--preflight False: training anyway" in done.stderr


def test_preflight_only_loads_no_weights_and_renders_no_data(
    tiny_chat_model, tmp_path, run_finetune, monkeypatch, capsys
):
    import transformers

    import llmft.train

    def refuse(*args, **kwargs):
        raise AssertionError("--preflight_only must not get this far")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(llmft.train, "build_datasets", refuse)  # the tokenizer is built (the vocabulary counts)
    assert (
        run_finetune(
            *argv(
                "--model_name_or_path {model} --data_path {examples} --output_dir {out} --use_cpu True",
                "--preflight_only True",
                model=tiny_chat_model,
                examples=EXAMPLES,
                out=tmp_path / "out",
            ),
        )
        is None
    )
    assert "total per GPU" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_run_that_will_not_fit_stops_before_loading_and_preflight_false_trains(
    tiny_chat_model, tmp_path, run_finetune, monkeypatch, capsys
):
    import transformers

    flags = argv(
        "--model_name_or_path {model} --data_path {examples} --output_dir {out} --use_cpu True",
        "--max_steps 1 --save_strategy no --report_to none --model_max_length 256 --preflight_gpu_memory 0.5",
        model=tiny_chat_model,
        examples=EXAMPLES,
        out=tmp_path / "out",
    )
    load = transformers.AutoModelForCausalLM.from_pretrained
    loads = []
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or load(*a, **k)
    )
    with pytest.raises(SystemExit) as stopped:
        run_finetune(*flags)
    assert stopped.value.code == 2 and loads == []
    assert "pass --preflight False to train anyway" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    trainer = run_finetune(*flags, "--preflight", "False")
    assert len(loads) == 1 and trainer.state.global_step == 1
    assert trainer.memory_estimate.fits is False  # kept for tools/benchmark.py


def test_benchmark_puts_the_estimate_beside_the_measured_peak():
    from llmft.tools.bench import memory_columns

    e = estimate(SHAPE_7B, MemorySetup(tokens=T, gradient_checkpointing=True))  # 64,426,378,240 B = 60.00 GiB
    assert memory_columns(e, peak_bytes=50 * GIB) == {
        "est_gib": round(64_426_378_240 / GIB, 2),
        "peak_gib": 50.0,
        "est_error_pct": round(100 * (64_426_378_240 / GIB - 50) / 50, 1),
    }  # 60.00 vs 50: +20.0%
    assert memory_columns(e, peak_bytes=50 * GIB)["est_error_pct"] == 20.0
    assert memory_columns(None, peak_bytes=50 * GIB) == {"est_gib": None, "peak_gib": 50.0, "est_error_pct": None}


@pytest.mark.parametrize(
    "model, flags",
    [
        ("tiny_chat_model", []),
        ("tiny_chat_model", ["--use_lora", "True", "--lora_r", "8"]),
        ("tiny_base_model", ["--use_lora", "True", "--lora_r", "8"]),  # ChatML tokens added: embeddings train too
    ],
    ids=["full", "lora", "lora-added-tokens"],
)
def test_estimated_weights_and_trained_parameters_are_those_of_the_built_model(model, flags, request, tmp_path):
    from llmft.config import parse_args
    from llmft.model import build_model, load_training_tokenizer
    from llmft.plan import resolve_plan
    from llmft.preflight import preflight

    path = request.getfixturevalue(model)
    model_args, data_args, lora_args, quant_args, training_args = parse_args(
        [
            str(f)
            for f in [
                *argv(
                    "--model_name_or_path {path} --data_path {examples} --output_dir {out} --use_cpu True",
                    "--model_max_length 256",
                    path=path,
                    examples=EXAMPLES,
                    out=tmp_path / "out",
                ),
                *flags,
            ]
        ]
    )
    plan = resolve_plan(model_args, data_args, lora_args, quant_args, training_args)
    tokenizer, added = load_training_tokenizer(model_args, data_args)
    assert bool(added) == (model == "tiny_base_model")
    plan = plan.with_added_tokens(added)
    e = preflight(model_args, data_args, lora_args, training_args, plan, tokenizer)
    built = build_model(model_args, lora_args, training_args, tokenizer, plan)
    params = list(built.parameters())  # each shared (tied) tensor once
    assert e.trainable == sum(p.numel() for p in params if p.requires_grad)
    assert e.weights == sum(p.numel() * p.element_size() for p in params)  # fp32 on CPU: 4 bytes each
    assert e.gradients == sum(p.numel() * p.element_size() for p in params if p.requires_grad)
