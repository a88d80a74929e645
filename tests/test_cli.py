"""The `llmft` command (llmft/cli.py): its help lists every subcommand, each subcommand answers --help with its own
flags, the common flag names and today's aliases parse alike, and finetune.py and tools/*.py are thin scripts that
run from anywhere once the package is installed (`make install`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmft import cli

REPO = Path(__file__).resolve().parent.parent
LLMFT = Path(sys.executable).parent / "llmft"  # the console script `make install` puts next to the venv's python
WRAPPERS = [REPO / "finetune.py", *sorted(p for p in (REPO / "tools").glob("*.py") if p.name != "__init__.py")]


def script_env() -> dict:
    """The environment without PYTHONPATH: what a user's shell has, so only the installed package is importable."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_help_lists_every_subcommand():
    assert LLMFT.is_file(), "no llmft console script: run `make install` (pip install -e .)"
    proc = subprocess.run([str(LLMFT), "--help"], capture_output=True, text=True, env=script_env(), cwd="/")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert list(listed) == ["train", "merge", "quantize", "chat", "check", "bench", "export", "make-tiny-model"]
    for name, module in cli.SUBCOMMANDS.items():
        assert listed[name].split(None, 1)[1] == cli.summary(module)


def test_unknown_subcommand_is_an_error(capsys):
    assert cli.main(["fine-tune"]) == 2
    assert "unknown subcommand 'fine-tune'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_each_subcommand_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llmft {name}")
    flag = {
        "train": "--learning_rate",
        "merge": "--adapter",
        "quantize": "--bits",
        "chat": "--temperature",
        "check": "--show",
        "bench": "--shape",
        "export": "--quantization",
        "make-tiny-model": "--hidden_size",
    }[name]
    assert flag in out


def test_merge_takes_the_common_flag_names_and_the_old_ones_alike(monkeypatch, tmp_path):
    import llmft.tools.merge as merge

    calls = []
    monkeypatch.setattr(merge, "merge_lora", lambda **kwargs: calls.append(kwargs))
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / "merged")
    assert cli.main(["merge", "--adapter", adapter, "--output_dir", out, "--overwrite_output_dir"]) == 0
    assert cli.main(["merge", "--adapter", adapter, "--output", out, "--force"]) == 0
    assert cli.main(["merge", "--adapter", adapter, "--output_dir", out, "--overwrite_output_dir", "True"]) == 0
    assert calls[0] == calls[1] == calls[2]
    assert calls[0]["output_dir"] == out and calls[0]["overwrite_output_dir"] is True
    assert cli.main(["merge", "--adapter", adapter, "--output", out, "--overwrite_output_dir", "False"]) == 0
    assert calls[3]["overwrite_output_dir"] is False


def test_quantize_and_chat_take_the_common_flag_names_and_the_old_ones_alike():
    from llmft.tools import chat, quantize

    common = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", "q", "--overwrite_output_dir"]
    old = ["--model_name_or_path", "m", "--data_path", "d.json", "--out_path", "q", "--force"]
    assert vars(quantize.parse_args(common)) == vars(quantize.parse_args(old))
    assert quantize.parse_args(common).output_dir == "q"
    assert vars(chat.parse_args(["--model_name_or_path", "m"])) == vars(chat.parse_args(["--model", "m"]))


@pytest.mark.parametrize("wrapper", WRAPPERS, ids=lambda p: p.name)
def test_entry_scripts_are_thin(wrapper):
    """finetune.py and tools/*.py import main from the package and call it: no code of their own, no sys.path."""
    source = wrapper.read_text()
    assert "sys.path" not in source
    assert "from llmft." in source
    assert len(source.splitlines()) <= 15


@pytest.mark.parametrize(
    "wrapper, library",
    [
        ("tools.make_tiny_model", "llmft.tools.tiny_model"),
        ("tools.run_gptq", "llmft.tools.quantize"),
        ("tools.merge_lora", "llmft.tools.merge"),
    ],
)
def test_tool_scripts_keep_the_names_they_exported(wrapper, library):
    """Code that imported from tools/*.py before the code moved to llmft/tools/ (the tests now import llmft.tools)
    keeps working: every name a wrapper exports is the library's own object."""
    import importlib

    module, target = importlib.import_module(wrapper), importlib.import_module(library)
    renamed = {"build_tokenizer": "make_tokenizer"}  # its old name, kept by the wrapper
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is getattr(target, renamed.get(name, name)), name


@pytest.mark.slow
def test_a_tool_script_runs_from_anywhere(tmp_path):
    """`python tools/make_tiny_model.py` from another folder, with no PYTHONPATH: the installed package serves it."""
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(out)],
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
