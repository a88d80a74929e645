"""`llmft export --format gguf`: llama.cpp's converter and quantizer on the tiny model, the Ollama Modelfile, and the
parity report of the GGUF in llama.cpp against the model in transformers, including exports broken on purpose.

Tests that run llama.cpp need `make gguf-deps`; without it they skip, unless LLMFT_REQUIRE_SYSTEM_TESTS=1 (.ci/run,
which installs it) makes that a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmft.errors import ConfigError, LlmftError
from llmft.tools import export
from tests.conftest import EXAMPLES, REPO

HELD_OUT = 6  # the last conversations of examples/conversations.json


def require_llama_cpp() -> None:
    if export.llama_cpp_available():
        return
    reason = "llama.cpp (llama-cpp-python and its converter) is not installed: make gguf-deps"
    if os.environ.get("LLMFT_REQUIRE_SYSTEM_TESTS") == "1":
        pytest.fail(f"LLMFT_REQUIRE_SYSTEM_TESTS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def exports(tiny_chat_model, tmp_path_factory):
    """Exports of the tiny chat model, one per quantization, made once: {quantization: ExportResult}."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("exports")
    made = {}

    def get(quantization: str) -> export.ExportResult:
        if quantization not in made:
            made[quantization] = export.export_gguf(
                str(tiny_chat_model),
                root / quantization,
                quantization=quantization,
                data_path=str(EXAMPLES),
                eval_samples=HELD_OUT,
            )
        return made[quantization]

    return get


def leftovers(folder: Path) -> list[str]:
    """Hidden staging folders an export may have left beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    values = {}
    for name in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.pre", "general.file_type"):
        field = reader.fields.get(name)
        if field is not None:
            values[name] = field.contents()
    return values


# ---------------------------------------------------------------- f16: the same model in llama.cpp


def test_f16_answers_as_transformers(exports, tiny_chat_model):
    result = exports("f16")
    report = result.report
    assert len(report.conversations) == HELD_OUT
    assert report.greedy_same == HELD_OUT  # every greedy continuation identical, token for token
    assert all(len(c.greedy_reference) > 0 for c in report.conversations)
    assert report.mean_logprob_diff < 1e-3
    assert report.answer_tokens > 50
    assert report.prompts_compared == HELD_OUT and report.prompts_matching == HELD_OUT
    assert report.engine_stops_at_end_of_turn and report.eos_is_end_of_turn
    assert report.engine_eos_token == "<|im_end|>"
    assert report.problems() == []


def test_f16_export_files(exports, tiny_chat_model):
    from transformers import AutoTokenizer

    result = exports("f16")
    out = result.output_dir
    files = ["Modelfile", "README.md", "model-f16.gguf", "parity_report.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "llmft_written.json"])
    assert set(files) <= set(json.loads((out / "llmft_written.json").read_text())["written"])  # what overwrite removes
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and "llama-cli -m PATH/model-f16.gguf" in card
    assert "| type | f16 |" in card and "| same greedy answer |" in card
    assert leftovers(out.parent) == []
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    metadata = gguf_metadata(result.gguf)
    assert metadata["tokenizer.chat_template"] == tokenizer.chat_template  # the template, embedded as trained
    assert metadata["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert metadata["tokenizer.ggml.pre"] == "qwen2"  # the tiny tokenizer's pre-tokenizer, recognised by structure
    saved = json.loads((out / "parity_report.json").read_text())
    assert saved["greedy_same"] == HELD_OUT and saved["problems"] == []
    assert saved["mean_logprob_diff"] == pytest.approx(result.report.mean_logprob_diff)
    assert len(saved["conversations"]) == HELD_OUT and "examples/conversations.json" in saved["held_out"]


def test_modelfile_serves_chatml_with_its_stop(exports):
    modelfile = (exports("f16").output_dir / "Modelfile").read_text()
    lines = modelfile.splitlines()
    assert lines[0] == "FROM ./model-f16.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == export.OLLAMA_CHATML_TEMPLATE
    assert "<|im_start|>{{ .Role }}" in template and "<|im_start|>assistant" in template


# ---------------------------------------------------------------- quantized: drift reported


def test_quantized_exports_report_their_drift(exports):
    f16, q8, q4 = (exports(q).report for q in ("f16", "q8_0", "q4_k_m"))
    assert gguf_metadata(exports("q8_0").gguf)["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert gguf_metadata(exports("q4_k_m").gguf)["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert f16.mean_logprob_diff < q8.mean_logprob_diff < q4.mean_logprob_diff
    assert q4.max_logprob_diff > 1e-2
    for report in (q8, q4):  # weights change, the template and stops do not
        assert report.prompts_matching == report.prompts_compared == HELD_OUT
        assert report.problems() == []
    assert (
        exports("q4_k_m").gguf.stat().st_size < exports("q8_0").gguf.stat().st_size < exports("f16").gguf.stat().st_size
    )


def test_drift_over_the_threshold_fails_and_writes_nothing(tiny_chat_model, tmp_path, capsys):
    require_llama_cpp()
    out = tmp_path / "gguf"
    with pytest.raises(SystemExit) as exit_:
        export.main(
            ["--model_name_or_path", str(tiny_chat_model), "--output_dir", str(out), "--quantization", "q4_k_m"]
            + ["--data_path", str(EXAMPLES), "--eval_samples", "2", "--max_logprob_drift", "0.001"]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: the export is not fit to serve" in err and "--max_logprob_drift 0.001" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_export_keeps_the_previous_output(tiny_chat_model, tmp_path):
    require_llama_cpp()
    from llmft.run_folder import WRITTEN_FILE, record_written

    out = tmp_path / "gguf"
    out.mkdir()
    record_written(out, "keep.txt")  # a previous llmft result, as its record says
    (out / "keep.txt").write_text("previous export")
    with pytest.raises(LlmftError, match="max_logprob_drift"):
        export.export_gguf(
            str(tiny_chat_model),
            out,
            quantization="q4_k_m",
            eval_samples=1,
            max_logprob_drift=0.0,
            overwrite_output_dir=True,
        )
    assert sorted(p.name for p in out.iterdir()) == sorted(["keep.txt", WRITTEN_FILE]) and leftovers(tmp_path) == []
    assert (out / "keep.txt").read_text() == "previous export"


# ---------------------------------------------------------------- broken exports are caught


def rewrite_gguf(source: Path, target: Path, *flags: str) -> Path:
    """A copy of a GGUF with its metadata changed by gguf-py's own gguf_new_metadata script."""
    command = [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(source), str(target), "--force", *flags]
    subprocess.run(command, check=True, capture_output=True)
    return target


def parity_of(gguf_path: Path, model: Path) -> export.ParityReport:
    from llmft.data.records import load_conversations
    from llmft.inference import load_tokenizer

    return export.gguf_parity(gguf_path, str(model), load_tokenizer(model), load_conversations(str(EXAMPLES))[-3:])


LLAMA3_TEMPLATE = (
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_report_catches_a_wrong_chat_template(exports, tiny_chat_model, tmp_path):
    broken = rewrite_gguf(exports("f16").gguf, tmp_path / "wrong-template.gguf", "--chat-template", LLAMA3_TEMPLATE)
    report = parity_of(broken, tiny_chat_model)
    assert report.prompts_matching == 0 and report.prompts_compared == 3
    for conversation in report.conversations:  # llama.cpp's own code and the template itself both differ at once
        assert conversation.prompt_mismatches == {"llama.cpp's built-in template": 0, "embedded template": 0}
    assert report.greedy_same == 3  # the weights are fine: only the template is wrong
    [problem] = report.problems()
    assert "renders and tokenizes the prompt differently" in problem


def test_report_catches_a_default_system_prompt(exports, tiny_chat_model, tmp_path):
    """A ChatML template that adds a system turn the model never saw in training: still ChatML to llama.cpp's
    template detection, but the prompt differs from the first token."""
    from llmft.chat_template import CHATML_TEMPLATE

    with_system = (
        "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}" + CHATML_TEMPLATE
    )
    broken = rewrite_gguf(exports("f16").gguf, tmp_path / "system.gguf", "--chat-template", with_system)
    report = parity_of(broken, tiny_chat_model)
    assert report.prompts_matching == 0
    for conversation in report.conversations:  # llama.cpp's built-in ChatML is blind to it; the template is not
        assert conversation.prompt_mismatches == {"embedded template": 1}  # after <|im_start|>: "system"
    [problem] = report.problems()
    assert "embedded template from token 1" in problem


def test_report_catches_a_missing_stop_token(exports, tiny_chat_model, tmp_path):
    broken = tmp_path / "eos.gguf"
    shutil.copy(exports("f16").gguf, broken)
    export.set_gguf_eos(broken, 1024)  # <|endoftext|>: a server stopping at EOS runs on past <|im_end|>
    report = parity_of(broken, tiny_chat_model)
    assert report.engine_eos_token == "<|endoftext|>" and not report.eos_is_end_of_turn
    [problem] = report.problems()
    assert "EOS token is '<|endoftext|>', not the end-of-turn token '<|im_end|>'" in problem


# ---------------------------------------------------------------- an adapter: merged first, compared unmerged


@pytest.mark.slow
def test_adapter_export_merges_inside_the_output(tiny_chat_model, tmp_path, run_finetune):
    from tests.conftest import TINY_LORA, argv

    require_llama_cpp()
    adapter = tmp_path / "lora"
    run_finetune(*argv(TINY_LORA, "--max_steps 6 --learning_rate 1e-2", model=tiny_chat_model, out=adapter))
    out = tmp_path / "gguf"
    result = export.export_gguf(str(adapter), out, quantization="f16", data_path=str(EXAMPLES), eval_samples=3)
    # the training run's report and plot come along, so the export still tells how it was trained
    files = ["Modelfile", "README.md", "model-f16.gguf", "parity_report.json", "training_report.json"]
    files.append("training_report.png")
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "llmft_written.json"])
    assert set(files) <= set(json.loads((out / "llmft_written.json").read_text())["written"])  # what overwrite removes
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and "llama-cli -m PATH/model-f16.gguf" in card
    assert "| type | f16 |" in card and "| same greedy answer |" in card
    assert result.report.reference == str(adapter)  # the trained adapter, unmerged, is the reference
    assert result.report.greedy_same == 3 and result.report.mean_logprob_diff < 1e-3
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- bad input


def test_unknown_quantization_type(tiny_chat_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export.main(
            ["--model_name_or_path", str(tiny_chat_model), "--output_dir", str(tmp_path / "o")]
            + ["--quantization", "q3_k_zz"]
        )
    assert exit_.value.code == 2
    assert "--quantization 'q3_k_zz': llama.cpp types here are f32, f16, bf16, q8_0, q4_k_m" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_adapter_without_its_base(tiny_chat_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    require_llama_cpp()
    base = tmp_path / "base"
    shutil.copytree(tiny_chat_model, base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(base)  # the base the adapter records is gone
    with pytest.raises(LlmftError, match=r"the base model recorded in .*adapter_config.json .*base"):
        export.export_gguf(str(tmp_path / "adapter"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_architecture_the_converter_does_not_support(tiny_chat_model, tmp_path):
    require_llama_cpp()
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["TinyMadeUpForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="llama.cpp's converter does not support the architecture TinyMadeUp"):
        export.export_gguf(str(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_the_converter_does_not_know(tiny_chat_model, tmp_path):
    """A BPE pre-tokenizer that is neither known to the converter by hash nor Qwen2's: refused, nothing written."""
    require_llama_cpp()
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert export.known_pre_tokenizer(model) is None and export.known_pre_tokenizer(tiny_chat_model) == "qwen2"
    with pytest.raises(LlmftError, match="llama.cpp's converter does not know the tokenizer"):
        export.export_gguf(str(model), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_without_llama_cpp_says_how_to_install(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "llama_cpp_available", lambda: False)
    with pytest.raises(ConfigError, match="make gguf-deps"):
        export.export_gguf(str(tiny_chat_model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_lists_export():
    result = subprocess.run([sys.executable, "-m", "llmft.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "export" in result.stdout and "GGUF" in result.stdout


def test_modelfile_of_a_template_that_is_not_chatml(tiny_chat_model):
    """No Go template is written for a template llmft cannot translate: Ollama then reads the GGUF's own."""
    from llmft.inference import load_tokenizer

    tokenizer = load_tokenizer(tiny_chat_model)
    chatml = export.ollama_modelfile("m.gguf", tokenizer)
    assert 'TEMPLATE """' in chatml and chatml.splitlines()[-1] == 'PARAMETER stop "<|im_end|>"'
    tokenizer.chat_template = LLAMA3_TEMPLATE
    other = export.ollama_modelfile("m.gguf", tokenizer)
    assert "TEMPLATE" not in other and other.splitlines()[0] == "FROM ./m.gguf"


def test_a_quantized_model_is_refused(tiny_chat_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"is quantized \(gptq\): export the unquantized model"):
        export.export_gguf(str(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()
