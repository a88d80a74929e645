"""LoRA variants PEFT implements, through finetune.py on the tiny model: DoRA, rsLoRA, Gaussian / PiSSA / OLoRA
initialisation and LoRA+. Each trains, records itself in adapter_config.json, reloads with plain PEFT onto the
original base with the trained model's logits, and merges (tools/merge_lora.py) into a model with those logits; the
settings PEFT cannot run are refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmft.config import parse_args
from llmft.errors import ConfigError
from tests.conftest import EXAMPLES, chat_record, write_records
from tests.conftest import ANSWER, TRAIN, argv, assert_loss_falls, sample_inputs

LORA_R, LORA_ALPHA = 8, 16
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LOGITS_ATOL = 1e-4  # float32 tiny model: reload and merge reorder a few sums, nothing more


@pytest.fixture(scope="module")
def repeated_data(tmp_path_factory):
    return write_records(
        tmp_path_factory.mktemp("data") / "repeated.json",
        [chat_record("Who are you?", ANSWER, id=f"r{i}") for i in range(16)],
    )


def train(run_finetune, model, data, out, flags: str, steps=8):
    """A LoRA run of rank LORA_R with these extra flags."""
    lora = f"--max_steps {steps} --learning_rate 5e-3 --use_lora True --lora_r {LORA_R} --lora_alpha {LORA_ALPHA}"
    return run_finetune(*argv(TRAIN, lora, flags, model=model, data=data, out=out))


def logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**sample_inputs(tokenizer)).logits.float()


def assert_same_logits(expected: torch.Tensor, model, tokenizer):
    difference = (expected - logits(model, tokenizer)).abs().max().item()
    assert difference < LOGITS_ATOL, difference


def adapted_modules(model) -> set[str]:
    return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}


def assert_reloads_and_merges(trainer, out, tmp_path, base):
    """Plain PEFT puts the saved adapter on the original base (the folder training read, untouched) with the
    trained model's logits; merge_lora makes a standalone model with them too; and the adapter did something."""
    from peft import AutoPeftModelForCausalLM

    from llmft.tools.merge import merge_lora

    tokenizer = AutoTokenizer.from_pretrained(out)
    trained = logits(trainer.model, tokenizer)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    assert_same_logits(trained, reloaded, tokenizer)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert (trained - logits(original, tokenizer)).abs().max() > 1e-2  # the adapter changed the model

    result = merge_lora(out, tmp_path / "merged")
    assert result.max_abs_diff < LOGITS_ATOL and result.argmax_agreement == 1.0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert_same_logits(trained, merged, tokenizer)
    return tmp_path / "merged"


@pytest.mark.slow
def test_dora_trains_magnitudes_and_merges(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    out = tmp_path / "dora"
    trainer = train(run_finetune, tiny_chat_model, repeated_data, out, "--use_dora True", steps=12)
    assert_loss_falls(trainer)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == LORA_R
    saved = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in saved.items() if "lora_magnitude_vector" in k}
    assert len(magnitudes) == 2 * 7  # one per adapted projection of the 2 layers
    # DoRA starts each magnitude at its base weight's row norms: training moved them
    base = load_file(str(tiny_chat_model / "model.safetensors"))
    for key, magnitude in magnitudes.items():
        module = key.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
        assert not torch.allclose(magnitude, base[module + ".weight"].norm(dim=1)), key
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert_reloads_and_merges(trainer, out, tmp_path, tiny_chat_model)


@pytest.mark.slow
def test_rslora_scales_by_the_square_root_of_the_rank(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    out = tmp_path / "rslora"
    trainer = train(run_finetune, tiny_chat_model, repeated_data, out, "--use_rslora True")
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    layer = trainer.model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(LORA_ALPHA / LORA_R**0.5)
    assert adapted_modules(trainer.model) == PROJECTIONS
    assert_reloads_and_merges(trainer, out, tmp_path, tiny_chat_model)


def test_gaussian_init(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    out = tmp_path / "gaussian"
    trainer = train(run_finetune, tiny_chat_model, repeated_data, out, "--lora_init gaussian")
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"
    assert_reloads_and_merges(trainer, out, tmp_path, tiny_chat_model)


@pytest.mark.parametrize(
    "init",
    [pytest.param("pissa", marks=pytest.mark.slow), "pissa_niter_4", pytest.param("olora", marks=pytest.mark.slow)],
)
def test_decomposing_inits_save_an_adapter_for_the_original_base(
    init, tiny_chat_model, repeated_data, tmp_path, run_finetune
):
    """PiSSA and OLoRA train on the residual of the base weights; what llmft saves is PEFT's conversion into a
    plain adapter of twice the rank on the original weights (tiny_chat_model's folder is never rewritten)."""
    out = tmp_path / init
    base_before = load_file(str(tiny_chat_model / "model.safetensors"))
    trainer = train(run_finetune, tiny_chat_model, repeated_data, out, f"--lora_init {init}", steps=12)
    assert_loss_falls(trainer)
    # the base inside the trained model holds the residual: every adapted weight differs from the original
    residual = trainer.model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight
    assert not torch.allclose(residual, base_before["model.layers.0.mlp.up_proj.weight"])
    assert load_file(str(tiny_chat_model / "model.safetensors")).keys() == base_before.keys()

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 * LORA_R and config["lora_alpha"] == 2 * LORA_ALPHA  # the same scale, alpha / r
    assert config["init_lora_weights"] is True  # loading it must not decompose the base again
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == 2 * 7 * 2
    assert all(v.shape[0] == 2 * LORA_R for k, v in saved.items() if "lora_A" in k)
    assert_reloads_and_merges(trainer, out, tmp_path, tiny_chat_model)


@pytest.mark.slow
def test_pissa_with_dora_and_rslora_keeps_the_magnitudes(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    """PEFT's conversion writes only lora_A / lora_B; llmft puts DoRA's trained magnitudes back, and rsLoRA's alpha
    is rescaled by PEFT so that alpha / sqrt(r) stays the same."""
    out = tmp_path / "pissa-dora"
    trainer = train(
        run_finetune,
        tiny_chat_model,
        repeated_data,
        out,
        "--lora_init pissa_niter_4 --use_dora True --use_rslora True",
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True and config["r"] == 2 * LORA_R
    assert config["lora_alpha"] == pytest.approx(LORA_ALPHA * 2**0.5)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert sum("lora_magnitude_vector" in k for k in saved) == 2 * 7
    assert_reloads_and_merges(trainer, out, tmp_path, tiny_chat_model)


@pytest.mark.slow
def test_pissa_on_a_base_with_added_tokens_keeps_the_trained_embeddings(
    tiny_base_model, repeated_data, tmp_path, run_finetune
):
    out = tmp_path / "pissa-base"
    trainer = train(run_finetune, tiny_base_model, repeated_data, out, "--lora_init pissa_niter_4")
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any("embed_tokens" in k and "lora" not in k for k in saved)
    assert_reloads_and_merges(trainer, out, tmp_path, tiny_base_model)


@pytest.mark.slow
def test_loraplus_trains_b_faster_with_the_optimizer_optim_names(
    tiny_chat_model, repeated_data, tmp_path, run_finetune
):
    out = tmp_path / "loraplus"
    trainer = train(
        run_finetune,
        tiny_chat_model,
        repeated_data,
        out,
        "--loraplus_lr_ratio 16 --optim sgd --weight_decay 0.01",
        steps=12,
    )
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around the optimizer LoRA+ built
    assert type(optimizer) is torch.optim.SGD
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, param in trainer.model.named_parameters():
        if "lora_A" in name:
            assert lr_of[id(param)] == (pytest.approx(5e-3), 0.01), name
        elif "lora_B" in name:
            assert lr_of[id(param)] == (pytest.approx(16 * 5e-3), 0.01), name
    assert len(lr_of) == sum(p.requires_grad for p in trainer.model.parameters())
    assert_reloads_and_merges(trainer, out, tmp_path, tiny_chat_model)


@pytest.mark.slow
def test_gptq_quantizes_a_merged_dora_pissa_model(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    from llmft.tools.quantize import run_gptq

    out = tmp_path / "pissa-dora"
    trainer = train(run_finetune, tiny_chat_model, repeated_data, out, "--lora_init pissa_niter_4 --use_dora True")
    merged = assert_reloads_and_merges(trainer, out, tmp_path, tiny_chat_model)
    report = run_gptq(str(merged), str(EXAMPLES), tmp_path / "gptq", bits=4, num_samples=16, eval_samples=4)
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32)
    assert any(name.endswith(".qweight") for name, _ in quantized.named_buffers())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gptq")
    # 4-bit rounding moves the logits, the fine-tune's answer stays: mostly the same greedy next tokens
    expected, actual = logits(trainer.model, tokenizer), logits(quantized, tokenizer)
    assert (expected.argmax(-1) == actual.argmax(-1)).float().mean() > 0.8
    assert report.quantized.tokens > 0 and torch.isfinite(torch.tensor(report.quantized.loss))


# --- refused before anything loads ------------------------------------------------------------------------------


def problems_of(tmp_path, model, *flags) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_args(
            [
                *argv(
                    "--model_name_or_path {model} --data_path {examples} --output_dir {out} --report_to none",
                    "--max_steps 1",
                    model=model,
                    examples=EXAMPLES,
                    out=tmp_path / "out",
                ),
                *map(str, flags),
            ]
        )
    return info.value.problems


def fake_gptq_checkpoint(model, dest):
    """A folder whose config.json says GPTQ: all validate reads of a base."""
    dest.mkdir()
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_variant_flags_without_lora_are_refused(tiny_chat_model, tmp_path):
    problems = problems_of(
        tmp_path, tiny_chat_model, "--use_dora", "True", "--lora_init", "olora", "--loraplus_lr_ratio", "8"
    )
    assert problems == [
        "--use_dora True, --lora_init olora, --loraplus_lr_ratio 8.0 configure LoRA adapters: add --use_lora True"
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_init", "svd"], "--lora_init svd: choose one of default, gaussian, pissa, pissa_niter_N, olora"),
        (["--lora_init", "pissa_niter_x"], "--lora_init pissa_niter_x: choose one of"),
        (["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio 0.0: must be a positive number"),
        (["--loraplus_lr_ratio", "nan"], "--loraplus_lr_ratio nan: must be a positive number"),
        (
            ["--lora_init", "pissa", "--q_lora", "True"],
            "--lora_init pissa with --q_lora True: PEFT runs PiSSA's SVD only",
        ),
        (["--loraplus_lr_ratio", "8", "--optim", "galore_adamw"], "--loraplus_lr_ratio with --optim galore_adamw"),
        (
            ["--loraplus_lr_ratio", "8", "--deepspeed", "ds_configs/zero2_offload.json"],
            "--loraplus_lr_ratio with --deepspeed ds_configs/zero2_offload.json: that config defines its own optimizer",
        ),
        (
            ["--lora_init", "olora", "--deepspeed", "ds_configs/zero3.json"],
            "--lora_init olora cannot be sharded with ZeRO-3 or FSDP",
        ),
    ],
)
def test_contradictory_variant_settings_are_refused(flags, message, tiny_chat_model, tmp_path):
    problems = problems_of(tmp_path, tiny_chat_model, "--use_lora", "True", *flags)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_dora_and_decomposing_inits_are_refused_on_a_gptq_base(tiny_chat_model, tmp_path):
    gptq = fake_gptq_checkpoint(tiny_chat_model, tmp_path / "gptq")
    problems = problems_of(tmp_path, gptq, "--use_lora", "True", "--use_dora", "True", "--lora_init", "pissa")
    assert len(problems) == 2, problems
    assert problems[0].startswith("--use_dora True on a GPTQ base: PEFT's LoRA layer for GPTQ weights does not")
    assert problems[1].startswith("--lora_init pissa on a gptq-quantized base")


def test_accepted_variant_settings(tiny_chat_model, tmp_path):
    _, _, lora, _, _ = parse_args(
        argv(
            "--model_name_or_path {model} --data_path {examples} --output_dir {out} --max_steps 1 --use_lora True",
            "--use_dora True --use_rslora True --lora_init pissa_niter_16 --loraplus_lr_ratio 16",
            "--deepspeed ds_configs/zero2.json",
            model=tiny_chat_model,
            examples=EXAMPLES,
            out=tmp_path / "out",
        )
    )
    assert (lora.use_dora, lora.use_rslora, lora.lora_init, lora.loraplus_lr_ratio) == (
        True,
        True,
        "pissa_niter_16",
        16.0,
    )


# --- LoRA+ under DeepSpeed ----------------------------------------------------------------------------------------


def lora_b_norm(out) -> float:
    saved = load_file(str(out / "adapter_model.safetensors"))
    return sum(v.norm().item() for k, v in saved.items() if "lora_B" in k)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_loraplus_under_deepspeed_two_ranks(config, tiny_chat_model, tmp_path):
    """DeepSpeed configs without an optimizer of their own take the Trainer's, so LoRA+'s groups reach DeepSpeed:
    with Adam (steps of about the learning rate whatever the gradient) the B matrices, which start at zero, end
    about ratio times further out than in the same run without LoRA+."""
    from tests.conftest import launcher_env, run_launcher

    run = (
        "-m {model} -d {examples} -o {out} --deepspeed {config} -- --max_steps 3 --per_device_train_batch_size 1"
        " --max_tokens_per_batch 0 --model_max_length 128 --learning_rate 1e-4 --warmup_steps 0 --weight_decay 0"
        " --lr_scheduler_type constant --save_strategy no --seed 0 --report_to none"
    )
    norms = {}
    for name, extra in (("plain", ""), ("loraplus", "--loraplus_lr_ratio 16")):
        out = tmp_path / name
        env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / f"{name}-datasets")
        args = argv(run, extra, model=tiny_chat_model, examples=EXAMPLES, out=out, config=config)
        result = run_launcher("finetune_lora_ds.sh", *args, env=env, timeout=1200)
        assert result.returncode == 0, result.stderr[-6000:]
        norms[name] = lora_b_norm(out)
    assert "LoRA+: 14 tensors at learning rate 0.0001, 14 (B side) at 0.0016" in result.stderr
    assert 8 < norms["loraplus"] / norms["plain"] < 24, norms
