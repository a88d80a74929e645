"""tools/run_gptq.py: calibration rendered like training, 4-bit GPTQ on CPU through GPTQModel, an output that plain
transformers loads and generates with, the quality report, and LoRA training on the quantized model.

The quantizing tests are marked slow (one tiny quantization, shared, takes seconds of CPU plus imports).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmft.chat_template import IM_END
from llmft.data.records import load_conversations
from llmft.data.render import render_conversation
from llmft.errors import ConfigError, LlmftError
from llmft.inference import generate_reply, load_for_inference
from llmft.tools.merge import merge_lora
from llmft.tools.quantize import GptqSettings, render_samples, run_gptq, split_data
from llmft.tools.tiny_model import CORPUS
from tests.conftest import argv, assistant_token_loss

REPO = Path(__file__).resolve().parent.parent
NUM_RECORDS, EVAL_SAMPLES = 24, 4


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """Qwen-format conversations built from the tiny tokenizer's corpus, so calibration sees known tokens."""
    records = []
    for i in range(NUM_RECORDS):
        question = CORPUS[i % len(CORPUS)]
        answer = f"{CORPUS[(7 * i + 3) % len(CORPUS)]} {CORPUS[(5 * i + 1) % len(CORPUS)]}"
        records.append(
            {
                "id": f"r{i}",
                "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}],
            }
        )
    path = tmp_path_factory.mktemp("data") / "chat.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="session")
def quantized(tiny_chat_model, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    report = run_gptq(
        str(tiny_chat_model),
        str(chat_data),
        out,
        bits=4,
        group_size=128,
        max_len=128,
        num_samples=16,
        eval_samples=EVAL_SAMPLES,
    )
    return out, report


def test_calibration_is_rendered_like_training(tiny_chat_model, chat_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    settings = GptqSettings(max_len=24, num_samples=5)
    calibration, held_out = split_data(str(chat_data), None, settings, EVAL_SAMPLES)
    everything = load_conversations(str(chat_data))
    assert [c.id for c in calibration] == [c.id for c in everything[:5]]
    assert [c.id for c in held_out] == [c.id for c in everything[-EVAL_SAMPLES:]]

    samples = render_samples(calibration, tokenizer, settings.max_len)
    full = render_conversation(everything[0], tokenizer)
    assert samples[0].input_ids == full.input_ids[:24] and samples[0].labels == full.labels[:24]
    assert tokenizer.decode(samples[0].input_ids).startswith("<|im_start|>user\n" + everything[0].messages[0].content)


def test_separate_eval_file_and_too_little_data(chat_data, tmp_path):
    settings = GptqSettings(num_samples=100)
    calibration, held_out = split_data(str(chat_data), str(chat_data), settings, 3)
    assert len(calibration) == NUM_RECORDS and len(held_out) == 3
    with pytest.raises(LlmftError, match="has 24 conversations.*--eval_samples 24"):
        split_data(str(chat_data), None, settings, NUM_RECORDS)


def test_bad_settings_are_listed_at_once(tiny_chat_model, chat_data, tmp_path, capsys):
    from llmft.tools.quantize import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            argv(
                "--model_name_or_path {model} --data_path {chat_data} --out_path {out} --bits 3 --num_samples 0",
                model=tiny_chat_model,
                chat_data=chat_data,
                out=tmp_path / "out",
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid settings (2)")
    assert "--bits 3: GPTQ here writes 4 or 8 bits" in err and "--num_samples 0" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--bits 3"):
        run_gptq(str(tiny_chat_model), str(chat_data), tmp_path / "out", bits=3)


def test_refuses_non_empty_out_path(tiny_chat_model, chat_data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep")
    with pytest.raises(LlmftError, match="--output_dir .* is not empty"):
        run_gptq(str(tiny_chat_model), str(chat_data), tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "keep"


def test_a_model_with_nan_weights_is_refused_before_quantizing(tiny_chat_model, chat_data, tmp_path):
    """Before, it quantized with exit 0 and reported a loss increase of "+nan"."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_chat_model, model)
    tensors = load_file(model / "model.safetensors")
    name = sorted(k for k in tensors if "q_proj" in k)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmftError, match=r"--model_name_or_path .* holds NaN or infinite weights \(first in .*q_proj"):
        run_gptq(str(model), str(chat_data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quantized_model_reloads_and_generates(quantized):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out, _ = quantized
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 128)
    assert not list(out.parent.glob(".*"))  # no staging folder left

    model = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    assert hasattr(model.model.layers[0].mlp.down_proj, "qweight")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == IM_END
    assert GenerationConfig.from_pretrained(out).eos_token_id[0] == tokenizer.convert_tokens_to_ids(IM_END)
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=8)
    assert reply.token_ids and tokenizer.convert_tokens_to_ids(IM_END) not in reply.token_ids


@pytest.mark.slow
def test_quality_report(quantized, tiny_chat_model, chat_data):
    out, report = quantized
    saved = json.loads((out / "quantization_report.json").read_text())
    assert saved["bits"] == 4 and saved["eval_samples"] == EVAL_SAMPLES and saved["calibration_samples"] == 16
    # the held-out conversations (the data's last EVAL_SAMPLES) scored here with plain transformers
    held_out = [
        tuple(turn["value"] for turn in record["conversations"])
        for record in json.loads(chat_data.read_text())[-EVAL_SAMPLES:]
    ]
    references = {
        "original": assistant_token_loss(tiny_chat_model, held_out),
        "quantized": assistant_token_loss(out, held_out),
    }
    for which, (loss, tokens) in references.items():
        assert saved[which]["tokens"] == tokens > 50
        assert saved[which]["loss"] == pytest.approx(loss, rel=1e-4), which
        assert saved[which]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert saved["loss_increase"] == pytest.approx(references["quantized"][0] - references["original"][0], abs=1e-4)
    # A random tiny model sits near log(vocab); 4-bit weights must not move it by more than a fraction of a nat.
    assert abs(report.loss_increase) < 0.25
    assert report.original.loss == pytest.approx(math.log(1088), abs=0.5)


@pytest.mark.slow
def test_chat_cli_on_gptq_model_prints_only_the_reply(quantized):
    out, _ = quantized
    model, tokenizer = load_for_inference(out)
    expected = generate_reply(model, tokenizer, [{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=8)
    proc = subprocess.run(
        argv(
            "{python} tools/chat.py --model {out} --prompt hi --temperature 0 --max_new_tokens 8",
            python=sys.executable,
            out=out,
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.text + "\n"  # GPTQModel's banner and logs went to stderr


@pytest.mark.slow
def test_lora_trains_on_gptq_base_and_merges_into_original(quantized, tiny_chat_model, tmp_path):
    """LoRA on the GPTQ checkpoint loaded with plain transformers (as finetune.py loads it), a backward pass, then
    the merge, which must go into the unquantized model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = quantized
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map={"": "cpu"})
    qweight = model.model.layers[0].mlp.down_proj.qweight.clone()
    # "all-linear" finds nothing here: PEFT picks nn.Linear layers only, and GPTQ layers are GPTQModel's own class.
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    assert type(model.base_model.model.model.layers[0].mlp.down_proj).__name__ == "GPTQLoraLinear"
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert torch.equal(model.base_model.model.model.layers[0].mlp.down_proj.base_layer.qweight, qweight)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)

    chat_model, chat_tokenizer = load_for_inference(adapter)  # what tools/chat.py does with the adapter folder
    assert type(chat_model.base_model.model.model.layers[0].mlp.down_proj).__name__ == "GPTQLoraLinear"
    assert generate_reply(
        chat_model, chat_tokenizer, [{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=4
    ).token_ids

    with pytest.raises(LlmftError, match="GPTQ-quantized checkpoint"):
        merge_lora(adapter, tmp_path / "merged")
    result = merge_lora(adapter, tmp_path / "merged", base=str(tiny_chat_model))
    assert result.max_abs_diff < 1e-4 and result.argmax_agreement == 1.0
