"""The run resolved once (llmft/plan.py): each mode, each sharding, a quantized base, added tokens, frozenness, and
that the model builder reads the plan without writing into the TrainingArguments."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers.training_args import FSDPOption

from llmft.config import parse_args
from llmft.distributed import sharding_of
from llmft.kernels import LIGER_DEFAULT, Kernels
from llmft.model import build_model, load_training_tokenizer
from llmft.plan import QuantizeOnLoad, apply_plan_to_training_args, describe_plan, resolve_plan
from llmft.saving import describe_run
from tests.conftest import argv, chat_record, write_records

REPO = Path(__file__).resolve().parent.parent


def settings(tmp_path, model, *flags):
    data = tmp_path / "train.json"
    if not data.exists():
        write_records(data, [chat_record("Hi?", "Hello.")])
    return parse_args(
        [
            *argv(
                "--model_name_or_path {model} --data_path {data} --output_dir {out} --use_cpu True --report_to none",
                "--max_steps 1",
                model=model,
                data=data,
                out=tmp_path / "out",
            ),
            *map(str, flags),
        ]
    )


def plan_of(tmp_path, model, *flags):
    return resolve_plan(*settings(tmp_path, model, *flags))


def quantized_checkpoint(model, dest, method):
    """A folder whose config.json says the weights are stored quantized by `method`: all the plan reads of a base."""
    dest.mkdir()
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    "flags, mode, on_load",
    [
        ([], "full", None),
        (["--use_lora", "True"], "lora", None),
        (["--use_lora", "True", "--q_lora", "True"], "qlora-4bit", QuantizeOnLoad(4, "nf4", True, torch.uint8)),
        (
            ["--use_lora", "True", "--q_lora", "True", "--quant_type", "fp4", "--double_quant", "False"],
            "qlora-4bit",
            QuantizeOnLoad(4, "fp4", False, torch.uint8),
        ),
        (
            ["--use_lora", "True", "--q_lora", "True", "--quant_bits", "8"],
            "qlora-8bit",
            QuantizeOnLoad(8, None, False, None),
        ),
    ],
)
def test_each_mode(tiny_chat_model, tmp_path, flags, mode, on_load):
    plan = plan_of(tmp_path, tiny_chat_model, *flags)
    assert (plan.mode, plan.quantize_on_load, plan.base_quantization) == (mode, on_load, None)
    assert plan.uses_lora is (mode != "full")
    assert plan.quantized is (on_load is not None)
    assert plan.base_model == str(tiny_chat_model)


def test_the_defaults_on_one_cpu_process(tiny_chat_model, tmp_path):
    plan = plan_of(tmp_path, tiny_chat_model, "--use_lora", "True")
    assert plan.compute_dtype == torch.float32
    assert (plan.sharding, plan.offloaded, plan.shards_parameters) == ("none", (), False)
    assert (plan.gradient_checkpointing, dict(plan.gradient_checkpointing_kwargs)) == (False, {"use_reentrant": False})
    # packing on the CPU: SDPA with a block-diagonal mask; no Liger off CUDA
    assert plan.kernels == Kernels(attention="sdpa", pad_packed_to=None, liger=False, liger_config=None)
    assert (plan.packing, plan.added_tokens, plan.train_embeddings) == (True, (), False)
    assert describe_plan(plan) == (
        "plan: lora, float32; sharding none; activation checkpointing off; attention sdpa "
        "(packed samples kept apart); Liger off; embeddings as the mode trains them"
    )


@pytest.mark.parametrize("flags, dtype", [(["--bf16", "True"], torch.bfloat16), (["--fp16", "True"], torch.float16)])
def test_compute_dtype_from_the_precision_flags(tiny_chat_model, tmp_path, flags, dtype):
    assert plan_of(tmp_path, tiny_chat_model, *flags).compute_dtype == dtype


def test_checkpointing_and_kernel_flags(tiny_chat_model, tmp_path):
    plan = plan_of(
        tmp_path,
        tiny_chat_model,
        *argv(
            "--gradient_checkpointing True --gradient_checkpointing_kwargs '{\"use_reentrant\": true}'",
            "--packing False --use_liger_kernel True",
        ),
    )
    assert (plan.gradient_checkpointing, dict(plan.gradient_checkpointing_kwargs)) == (True, {"use_reentrant": True})
    assert plan.kernels == Kernels(attention=None, pad_packed_to=None, liger=True, liger_config=None)
    assert describe_plan(plan) == (
        "plan: full, float32; sharding none; activation checkpointing on use_reentrant=True; "
        "attention (transformers' default); Liger on; embeddings as the mode trains them"
    )


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_a_base_stored_quantized(tiny_chat_model, tmp_path, method):
    base = quantized_checkpoint(tiny_chat_model, tmp_path / method, method)
    plan = plan_of(tmp_path, base, "--use_lora", "True")
    assert (plan.mode, plan.base_quantization, plan.quantize_on_load) == (f"lora-on-{method}", method, None)
    assert plan.quantized and plan.uses_lora
    run = describe_run(plan)
    assert (run["mode"], run["base_quantization"], run["base_model"]) == ("lora", {"method": method}, str(base))


@pytest.mark.parametrize(
    "flags, record",
    [
        ([], ("full", None)),
        (["--use_lora", "True"], ("lora", None)),
        (["--use_lora", "True", "--q_lora", "True"], ("qlora", {"method": "bitsandbytes", "bits": 4, "type": "nf4"})),
        (
            ["--use_lora", "True", "--q_lora", "True", "--quant_bits", "8"],
            ("qlora", {"method": "bitsandbytes", "bits": 8, "type": "int8"}),
        ),
    ],
)
def test_the_run_record_says_what_the_plan_says(tiny_chat_model, tmp_path, flags, record):
    run = describe_run(plan_of(tmp_path, tiny_chat_model, *flags))
    assert (run["mode"], run["base_quantization"]) == record
    assert run["added_tokens"] == [] and run["base_fingerprint"].startswith("sha256-all:")


@pytest.mark.parametrize(
    "config, sharding, offloaded",
    [
        ("zero2.json", "zero2", ()),
        ("zero2_offload.json", "zero2", ("optimizer",)),
        ("zero3.json", "zero3", ()),
        ("zero3_offload.json", "zero3", ("optimizer", "parameters")),
    ],
)
def test_deepspeed_sharding(tiny_chat_model, tmp_path, config, sharding, offloaded):
    plan = plan_of(tmp_path, tiny_chat_model, "--use_lora", "True", "--deepspeed", REPO / "ds_configs" / config)
    assert (plan.sharding, plan.offloaded, plan.shards_parameters) == (sharding, offloaded, sharding == "zero3")
    # the optimizer: DeepSpeed's own where the config has an "optimizer" section (the offload configs' AdamW)
    ds_optimizer = json.loads((REPO / "ds_configs" / config).read_text()).get("optimizer")
    assert plan.optimizer_from_deepspeed == (ds_optimizer is not None)
    if ds_optimizer is not None:
        assert plan.optimizer == ds_optimizer.get("type", "adamw").lower()
    assert plan.lora_targets is not None  # the architecture built without weights, not partitioned by ZeRO-3


def test_qlora_under_zero3_stores_4bit_weights_in_the_compute_dtype(tiny_chat_model, tmp_path):
    plan = plan_of(
        tmp_path,
        tiny_chat_model,
        *argv(
            "--use_lora True --q_lora True --bf16 True --deepspeed {zero3}", zero3=REPO / "ds_configs" / "zero3.json"
        ),
    )
    assert plan.quantize_on_load == QuantizeOnLoad(4, "nf4", True, torch.bfloat16)
    assert describe_plan(plan).startswith("plan: qlora-4bit (nf4), bfloat16; sharding zero3; ")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (dict(fsdp=[], world_size=1), ("none", ())),
        (dict(fsdp=[], world_size=4), ("ddp", ())),
        (dict(fsdp=True, fsdp_config={"version": 2}, world_size=2), ("fsdp", ())),  # `--fsdp True`: the bare switch
        (dict(fsdp=True, fsdp_config={"cpu_offload": True}, world_size=2), ("fsdp", ("optimizer", "parameters"))),
        (dict(fsdp=[FSDPOption.FULL_SHARD, FSDPOption.AUTO_WRAP], world_size=2), ("fsdp", ())),
        (dict(fsdp=[FSDPOption.FULL_SHARD, FSDPOption.OFFLOAD], world_size=2), ("fsdp", ("optimizer", "parameters"))),
        (
            dict(fsdp=[FSDPOption.FULL_SHARD], fsdp_config={"cpu_offload": "true"}, world_size=2),
            ("fsdp", ("optimizer", "parameters")),
        ),
    ],
)
def test_sharding_without_deepspeed(arguments, expected):
    # several processes exist only under torchrun: the TrainingArguments' fields sharding_of reads stand in
    assert sharding_of(SimpleNamespace(**{"deepspeed": None, "fsdp_config": None, **arguments})) == expected


def test_added_tokens_complete_a_new_plan(tiny_base_model, tmp_path):
    model_args, data_args, lora_args, quant_args, training_args = settings(
        tmp_path, tiny_base_model, "--use_lora", "True"
    )
    plan = resolve_plan(model_args, data_args, lora_args, quant_args, training_args)
    _, added = load_training_tokenizer(model_args, data_args)
    completed = plan.with_added_tokens(added)
    assert completed.added_tokens == ("<|im_start|>", "<|im_end|>") and completed.train_embeddings
    assert plan.added_tokens == () and not plan.train_embeddings  # the first plan is left as it was
    assert dataclasses.replace(completed, added_tokens=()) == plan
    assert describe_plan(completed).endswith("embeddings trained in full for the added <|im_start|> <|im_end|>")
    assert describe_run(completed)["added_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_resolving_and_building_leave_the_training_arguments_alone(tiny_chat_model, tmp_path):
    model_args, data_args, lora_args, quant_args, training_args = settings(
        tmp_path, tiny_chat_model, "--use_lora", "True", "--gradient_checkpointing", "True"
    )
    before = training_args.to_dict()
    plan = resolve_plan(model_args, data_args, lora_args, quant_args, training_args)
    tokenizer, added = load_training_tokenizer(model_args, data_args)
    model = build_model(model_args, lora_args, training_args, tokenizer, plan.with_added_tokens(added))
    assert training_args.to_dict() == before
    assert model.peft_config["default"].r == 64  # built as planned: LoRA

    apply_plan_to_training_args(plan, training_args)
    after = training_args.to_dict()
    assert {k: (before[k], after[k]) for k in before if before[k] != after[k]} == {
        "use_liger_kernel": (None, False),
        "gradient_checkpointing_kwargs": (None, {"use_reentrant": False}),
        "activation_checkpointing_kwargs": (None, {"use_reentrant": False}),
    }


def test_liger_as_planned_reaches_the_training_arguments(tiny_chat_model, tmp_path):
    *_, training_args = arguments = settings(tmp_path, tiny_chat_model, "--use_lora", "True")
    plan = dataclasses.replace(resolve_plan(*arguments), kernels=Kernels("sdpa", None, True, LIGER_DEFAULT))
    apply_plan_to_training_args(plan, training_args)
    assert training_args.use_liger_kernel is True
    assert training_args.liger_kernel_config == dict(LIGER_DEFAULT)
    assert type(training_args.liger_kernel_config) is dict  # the Trainer's own type, not the plan's read-only view


def test_what_the_kernels_cannot_serve_joins_the_one_list_of_problems(tiny_chat_model, tmp_path):
    """A kernel this machine cannot train with is one problem among the others, before anything loads."""
    from llmft.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        settings(
            tmp_path,
            tiny_chat_model,
            "--attn_implementation",
            "flex_attention",
            "--use_lora",
            "True",
            "--lora_dropout",
            "2",
        )
    problems = raised.value.problems
    assert any(p.startswith("--attn_implementation flex_attention trains on CUDA only") for p in problems), problems
    assert "--lora_dropout must be in [0, 1)" in problems


def test_the_plan_carries_the_optimizer_and_the_micro_batch(tiny_chat_model, tmp_path):
    plan = plan_of(tmp_path, tiny_chat_model, "--per_device_train_batch_size", "3", "--model_max_length", "100")
    assert (plan.optimizer, plan.optimizer_from_deepspeed) == ("adamw_torch_fused", False)
    assert (plan.micro_batch_tokens, plan.micro_batch_rows) == (320, 1)  # 300 packed tokens, padded to 64's multiple
    plan = plan_of(
        tmp_path,
        tiny_chat_model,
        "--per_device_train_batch_size",
        "3",
        "--model_max_length",
        "100",
        "--packing",
        "False",
    )
    assert (plan.micro_batch_tokens, plan.micro_batch_rows) == (300, 3)
    plan = plan_of(tmp_path, tiny_chat_model, "--max_tokens_per_batch", "1000", "--model_max_length", "100")
    assert (plan.micro_batch_tokens, plan.micro_batch_rows) == (1024, 1)
    assert (
        plan.model.config["model_type"] == json.loads((Path(tiny_chat_model) / "config.json").read_text())["model_type"]
    )


def test_lora_targets_are_resolved_and_checked_before_the_weights_load(tiny_chat_model, tmp_path, monkeypatch):
    import transformers

    from llmft.errors import ConfigError

    loads = []
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: loads.append(a)))
    plan = plan_of(tmp_path, tiny_chat_model, "--use_lora", "True")
    assert set(plan.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert plan_of(
        tmp_path, tiny_chat_model, "--use_lora", "True", "--lora_target_modules", "default"
    ).lora_targets == (
        "q_proj",
        "v_proj",
    )
    assert plan_of(tmp_path, tiny_chat_model).lora_targets is None  # full fine-tuning
    # a dotted name matches as PEFT matches it: by its last components
    settings(tmp_path, tiny_chat_model, "--use_lora", "True", "--lora_target_modules", "self_attn.q_proj", "v_proj")
    with pytest.raises(ConfigError) as raised:
        settings(tmp_path, tiny_chat_model, "--use_lora", "True", "--lora_target_modules", "q_prj", "--lora_r", "0")
    problems = raised.value.problems
    assert any(p.startswith("--lora_target_modules q_prj: the model has no module of that name") for p in problems)
    assert "--lora_r and --lora_alpha must be positive" in problems  # in the same list
    assert loads == []  # no weights were read
