"""Code shipped with a model runs only with `--trust_remote_code True`, in every tool and in finetune.py.

The model here is the tiny chat model plus what a hostile one adds: `auto_map` entries in its config.json that point
at its own `evil.py`, which writes a marker file when imported. With the model type transformers knows (`qwen2`)
transformers itself would not import the file, but GPTQModel's loader does; with an unknown one (`evilnet`) loading
cannot work without it. Either way each command must stop with exit status 2 and a message naming the flag, and the
marker must never appear. A control run with the flag on shows the marker does appear once code is trusted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO, argv, chat_record, write_records

FLAG = "--trust_remote_code True"


def make_evil_model(model: Path, dest: Path, marker: Path, model_type: str) -> Path:
    shutil.copytree(model, dest)
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "evil.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        f"class EvilConfig(Qwen2Config):\n    model_type = {model_type!r}\n"
        "class EvilForCausalLM(Qwen2ForCausalLM):\n    config_class = EvilConfig\n"
    )
    return dest


@pytest.fixture(params=["qwen2", "evilnet"])
def evil(request, tiny_chat_model, tmp_path, monkeypatch):
    """(model folder, marker path). transformers copies remote code into its modules cache before importing it:
    a private one per test, so no test sees another's import."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "MARKER"
    return make_evil_model(tiny_chat_model, tmp_path / "evil-model", marker, request.param), marker


def refused(capsys, main, argv) -> str:
    """Run a CLI main in this process: it must exit 2 with one `error:` message; returns the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    return err[err.index("error: ") :]


@pytest.mark.slow
def test_run_gptq_refuses_model_code_without_the_flag(evil, tmp_path):
    """Through the real script: GPTQModel.load imported evil.py here before the fix."""
    model, marker = evil
    proc = subprocess.run(
        argv(
            "{python} tools/run_gptq.py --model_name_or_path {model} --data_path {examples} --out_path {out}",
            "--num_samples 4 --eval_samples 2",
            python=sys.executable,
            model=model,
            examples=EXAMPLES,
            out=tmp_path / "out",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert FLAG in proc.stderr and str(model) in proc.stderr and "evil.EvilForCausalLM" in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_chat_refuses_model_code_without_the_flag(evil, capsys):
    from llmft.tools.chat import main

    model, marker = evil
    message = refused(capsys, main, ["--model", model, "--prompt", "hi", "--temperature", "0"])
    assert FLAG in message and f"--model {model}" in message
    assert not marker.exists()


def test_chat_runs_model_code_with_the_flag(evil, capsys):
    """The control: the same folder with the flag on does import evil.py, so the refusals above are real."""
    from llmft.tools.chat import main

    model, marker = evil
    main(argv("--model {model} --prompt hi --temperature 0 --max_new_tokens 2 --trust_remote_code True", model=model))
    assert marker.read_text() == "imported"


def test_merge_lora_refuses_a_base_with_code_without_the_flag(evil, tmp_path, capsys):
    from llmft.tools.merge import main

    model, marker = evil
    adapter = tmp_path / "adapter"
    adapter.mkdir()  # all merge_lora reads before it refuses the base the adapter records
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(model), "peft_type": "LORA"})
    )
    message = refused(capsys, main, ["--adapter", adapter, "--output", tmp_path / "out"])
    assert FLAG in message and str(model) in message
    message = refused(capsys, main, ["--adapter", adapter, "--output", tmp_path / "out", "--base", model])
    assert FLAG in message and f"--base {model}" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_finetune_refuses_model_code_without_the_flag(evil, run_finetune, tmp_path, capsys):
    model, marker = evil
    data = write_records(tmp_path / "train.jsonl", [chat_record("Who are you?", "I am Pico.")], jsonl=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_finetune(
            *argv(
                "--model_name_or_path {model} --data_path {data} --output_dir {out} --max_steps 1 --report_to none",
                "--use_cpu True",
                model=model,
                data=data,
                out=tmp_path / "out",
            ),
        )
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err and FLAG in err and f"--model_name_or_path {model}" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_tool_flag_takes_true_false_and_bare():
    from llmft.tools.chat import parse_args

    assert parse_args(["--model", "m"]).trust_remote_code is False
    assert parse_args(["--model", "m", "--trust_remote_code"]).trust_remote_code is True
    assert parse_args(["--model", "m", "--trust_remote_code", "True"]).trust_remote_code is True
    assert parse_args(["--model", "m", "--trust_remote_code", "False"]).trust_remote_code is False
