"""Each training mode through finetune.py on a tiny model: the loss falls, the right weights change, and the saved
output reloads with plain transformers/PEFT and gives the same logits as the model that was trained."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from transformers import TrainerCallback

from tests.conftest import (
    ANSWER,
    assert_loss_falls,
    chat_record,
    finetune,
    sample_inputs,
    TINY_LORA,
    TRAIN,
    argv,
    write_records,
)


@pytest.fixture(scope="module")
def repeated_data(tmp_path_factory):
    """One conversation, many times: a tiny model can learn it in a dozen steps."""
    return write_records(
        tmp_path_factory.mktemp("data") / "repeated.json",
        [chat_record("Who are you?", ANSWER, id=f"r{i}") for i in range(16)],
    )


def original_weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def assert_same_logits(trained, reloaded, tokenizer, atol=1e-4):
    inputs = sample_inputs(tokenizer)
    trained.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits.float()
        actual = reloaded(**inputs).logits.float()
    assert torch.allclose(expected, actual, atol=atol), (expected - actual).abs().max()


def assert_generation_stops_at_end_of_turn(out):
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert im_end == eos or im_end in eos


def test_full_fine_tuning_changes_every_weight_and_reloads(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    out = tmp_path / "full"
    trainer = run_finetune(
        *argv(TRAIN, "--max_steps 12 --learning_rate 2e-3", model=tiny_chat_model, data=repeated_data, out=out)
    )
    assert_loss_falls(trainer)
    before = original_weights(tiny_chat_model)
    after = load_file(str(out / "model.safetensors"))
    assert set(after) == set(before)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, unchanged
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert_same_logits(trainer.model, reloaded, tokenizer)
    assert_generation_stops_at_end_of_turn(out)
    generated = reloaded.generate(**sample_inputs(tokenizer), max_new_tokens=12, do_sample=False)
    assert generated.shape[1] > sample_inputs(tokenizer)["input_ids"].shape[1]


@pytest.mark.slow
def test_full_fine_tuning_in_bf16_saves_bf16(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    out = tmp_path / "full-bf16"
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 6 --learning_rate 2e-3 --bf16 True --use_cpu True",
            model=tiny_chat_model,
            data=repeated_data,
            out=out,
        )
    )
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}


def test_lora_trains_adapters_only_and_reloads(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "lora"
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 12 --learning_rate 5e-3 --use_lora True --lora_r 8 --lora_alpha 16",
            model=tiny_chat_model,
            data=repeated_data,
            out=out,
        )
    )
    assert_loss_falls(trainer)
    before = original_weights(tiny_chat_model)
    base = trainer.model.get_base_model().state_dict()
    for name, tensor in before.items():
        module, kind = name.rsplit(".", 1)
        wrapped = f"{module}.base_layer.{kind}"  # where PEFT keeps an adapted layer's own weight and bias
        assert torch.equal(base.get(wrapped, base.get(name)), tensor), name
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    # all-linear by default: every projection of every layer is adapted, the output head is not
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    assert_same_logits(trainer.model, reloaded, AutoTokenizer.from_pretrained(out))
    assert_generation_stops_at_end_of_turn(out)


def test_lora_target_modules_list_and_per_architecture_default(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 2 --learning_rate 5e-3 --use_lora True --lora_target_modules q_proj down_proj",
            model=tiny_chat_model,
            data=repeated_data,
            out=tmp_path / "a",
        )
    )
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "down_proj"}
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 2 --learning_rate 5e-3 --use_lora True --lora_target_modules default",
            model=tiny_chat_model,
            data=repeated_data,
            out=tmp_path / "b",
        )
    )
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}  # PEFT's default for Qwen2


@pytest.mark.slow
def test_qlora_nf4_quantizes_the_base_and_trains(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    import bitsandbytes as bnb
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "qlora"
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 12 --learning_rate 5e-3 --use_lora True --q_lora True --gradient_checkpointing True",
            model=tiny_chat_model,
            data=repeated_data,
            out=out,
        )
    )
    assert_loss_falls(trainer)
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14
    assert {m.weight.quant_type for m in quantized} == {"nf4"}
    assert all(m.weight.quant_state.nested for m in quantized)  # double quantization
    assert all(not m.weight.requires_grad for m in quantized)
    run = json.loads((out / "llmft_run.json").read_text())
    assert run["mode"] == "qlora" and run["base_quantization"] == {"method": "bitsandbytes", "bits": 4, "type": "nf4"}
    assert run["base_model"] == str(tiny_chat_model.resolve())
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)  # onto the unquantized base: loads and runs
    assert reloaded(**sample_inputs(AutoTokenizer.from_pretrained(out))).logits.isfinite().all()
    assert_generation_stops_at_end_of_turn(out)


@pytest.mark.slow
def test_lora_on_8bit_base(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    import bitsandbytes as bnb

    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 12 --learning_rate 5e-3 --use_lora True --q_lora True --quant_bits 8",
            model=tiny_chat_model,
            data=repeated_data,
            out=tmp_path / "q8",
        )
    )
    assert_loss_falls(trainer)
    assert len([m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]) == 14


def test_base_model_gets_chatml_tokens_and_trains_embeddings(tiny_base_model, repeated_data, tmp_path, run_finetune):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "base-lora"
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    assert "<|im_start|>" not in base_tokenizer.get_vocab()
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 12 --learning_rate 5e-3 --use_lora True",
            model=tiny_base_model,
            data=repeated_data,
            out=out,
        )
    )
    assert_loss_falls(trainer)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == len(base_tokenizer) + 2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    saved = load_file(str(out / "adapter_model.safetensors"))
    embedding_keys = [k for k in saved if "embed_tokens" in k]
    assert embedding_keys and saved[embedding_keys[0]].shape[0] >= len(tokenizer)
    # the new tokens' rows were trained: they differ from the rows the resize gave them
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_rows = saved[embedding_keys[0]][im_end]
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out)
    assert reloaded.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert torch.equal(reloaded.get_input_embeddings().weight[im_end], trained_rows)
    assert_same_logits(trainer.model, reloaded, tokenizer)
    assert_generation_stops_at_end_of_turn(out)


def test_resume_from_latest_checkpoint(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    out = tmp_path / "resume"
    paths = dict(model=tiny_chat_model, data=repeated_data, out=out)
    run = TRAIN + " --learning_rate 5e-3 --use_lora True --save_strategy steps --save_steps 2"  # overrides TRAIN's
    run_finetune(*argv(run, "--max_steps 4", **paths))
    assert (out / "checkpoint-4").is_dir()
    trainer = run_finetune(*argv(run, "--max_steps 6 --resume_from_checkpoint True", **paths))
    assert trainer.state.global_step == 6
    steps = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert steps[-2:] == [5, 6] and 4 in steps  # history carried over from the checkpoint, then two new steps


@pytest.mark.slow
def test_lora_on_gptq_base(tiny_gptq_model, repeated_data, tmp_path, run_finetune):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "gptq-lora"
    before = load_file(str(tiny_gptq_model / "model.safetensors"))
    assert any(name.endswith(".qweight") for name in before)
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 12 --learning_rate 5e-3 --use_lora True",
            model=tiny_gptq_model,
            data=repeated_data,
            out=out,
        )
    )
    assert_loss_falls(trainer)
    assert json.loads((out / "llmft_run.json").read_text())["base_quantization"] == {"method": "gptq"}
    quantized = {name: p for name, p in trainer.model.named_buffers() if name.endswith(".qweight")}
    assert len(quantized) == 14
    for name, packed in quantized.items():  # the packed int4 weights are exactly what was loaded
        original = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(packed, before[original]), name
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # GPTQ loads as bf16 otherwise
    tokenizer = AutoTokenizer.from_pretrained(out)
    # GPTQ keeps 16-bit scales, so two loads agree to about 1e-2; the adapter itself moves the logits far more
    assert_same_logits(trainer.model, reloaded, tokenizer, atol=2e-2)
    with reloaded.disable_adapter(), torch.no_grad():
        base_logits = reloaded(**sample_inputs(tokenizer)).logits
        trained_logits = trainer.model(**sample_inputs(tokenizer)).logits
    assert (base_logits - trained_logits).abs().max() > 0.2


def test_evaluation_on_eval_data(tiny_chat_model, repeated_data, tmp_path, run_finetune):
    trainer = run_finetune(
        *argv(
            TRAIN,
            "--max_steps 4 --learning_rate 5e-3 --use_lora True --eval_data_path examples/conversations.json",
            "--eval_strategy steps --eval_steps 2 --per_device_eval_batch_size 4",
            model=tiny_chat_model,
            data=repeated_data,
            out=tmp_path / "eval",
        )
    )
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert all(entry["eval_loss"] > 0 for entry in evaluations)


class PoisonAtTrainEnd(TrainerCallback):
    """Sets one trained LoRA weight to NaN after the last step, as a diverged run leaves it."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
        with torch.no_grad():
            param.view(-1)[0] = float("nan")


def test_final_save_refuses_nan_weights(tiny_chat_model, tmp_path, capsys):
    """Before, a run whose weights had turned NaN saved them with exit 0, as a result that predicts NaN."""
    out = tmp_path / "out"
    flags = argv(TINY_LORA, "--max_steps 2 --save_strategy steps --save_steps 1", model=tiny_chat_model, out=out)
    with pytest.raises(SystemExit) as info:
        finetune(*flags, callbacks=[PoisonAtTrainEnd()])
    assert info.value.code == 2
    assert "the trained weights hold NaN or infinite values (first in " in capsys.readouterr().err
    assert not (out / "adapter_model.safetensors").exists()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()  # the checkpoints stay
