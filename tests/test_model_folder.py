"""llmft.model_folder: what a model path or Hub id is, answered once, with one rule for finetune.py and every tool.

The folders are built here from literal files (configs, small safetensors files); nothing is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import llmft.model_folder as checkpoint
from llmft.model_folder import FolderError, model_folder, quant_method, require_adapter, require_model
from llmft.errors import ConfigError, LlmftError
from tests.conftest import argv, chat_record, write_records

OFFLINE_MISS = "no such directory, and no Hub model of that name in the local cache (HF_HUB_OFFLINE is set)"


def folder_with(path: Path, **files) -> Path:
    """A folder holding `files`: name (dots as `__`) -> a dict (written as JSON), a str or bytes."""
    path.mkdir(parents=True)
    for name, content in files.items():
        name = name.replace("__", ".")
        if isinstance(content, dict):
            content = json.dumps(content)
        if isinstance(content, str):
            content = content.encode()
        (path / name).write_bytes(content)
    return path


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A private, empty Hugging Face cache; `hub.offline(flag)`, `hub.cache(repo_id, config)`."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    class Hub:
        @staticmethod
        def offline(flag: bool):
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", flag)

        @staticmethod
        def cache(repo_id: str, config: dict) -> Path:
            repo = cache / ("models--" + repo_id.replace("/", "--"))
            snapshot = repo / "snapshots" / "0123abcd"
            snapshot.mkdir(parents=True)
            (snapshot / "config.json").write_text(json.dumps(config), encoding="utf-8")
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text("0123abcd", encoding="utf-8")
            return snapshot

    return Hub


@pytest.fixture
def json_reads(monkeypatch):
    """The config files llmft.model_folder parses, in order (file names only)."""
    reads = []
    read = checkpoint._read_json

    def counting(file):
        reads.append(Path(file).name)
        return read(file)

    monkeypatch.setattr(checkpoint, "_read_json", counting)
    checkpoint.clear_cache()
    return reads


# --- what a folder is --------------------------------------------------------------------------------------------


def test_model_folder(tmp_path):
    path = folder_with(
        tmp_path / "model",
        config__json={"model_type": "qwen2", "vocab_size": 320},
        tokenizer_config__json={"model_max_length": 512},
    )
    save_file({"model.norm.weight": torch.ones(4)}, str(path / "model.safetensors"))
    folder = model_folder(path)
    assert (folder.name, folder.folder, folder.is_hub_id, folder.missing) == (str(path), path, False, None)
    assert (folder.is_model, folder.is_adapter, folder.adapter_base) == (True, False, None)
    assert (folder.quant_method, folder.vocab_size, folder.has_tokenizer) == (None, 320, True)
    assert (folder.remote_code, folder.weight_problems, folder.unreadable) == ((), (), ())
    assert folder.problems("--model_name_or_path") == []
    assert require_model(path, "--base") == folder


def test_adapter_with_recorded_base(tmp_path):
    path = folder_with(
        tmp_path / "adapter",
        adapter_config__json={
            "base_model_name_or_path": "/models/base",
            "peft_type": "LORA",
            "modules_to_save": ["embed_tokens", "lm_head"],
        },
    )
    save_file(
        {
            "base_model.model.model.embed_tokens.weight": torch.zeros(384, 8),
            "base_model.model.lm_head.weight": torch.zeros(384, 8),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
        },
        str(path / "adapter_model.safetensors"),
    )
    folder = model_folder(path)
    assert (folder.is_model, folder.is_adapter, folder.adapter_base) == (False, True, "/models/base")
    assert (folder.quant_method, folder.vocab_size, folder.has_tokenizer) == (None, None, False)
    assert folder.saved_embedding_rows(["embed_tokens", "lm_head"]) == 384
    assert folder.saved_embedding_rows(["wte"]) is None  # rows are looked up by the names the model gives
    assert folder.problems("--model", adapter=True) == []
    assert require_adapter(path, "--adapter").adapter_base == "/models/base"
    assert folder.problems("--model_name_or_path") == [
        f"--model_name_or_path {path}: the directory holds a PEFT adapter (adapter_config.json), not a model: give "
        "its base (/models/base), or merge the adapter into it first (llmft merge)"
    ]


def test_adapter_without_a_recorded_base(tmp_path):
    path = folder_with(tmp_path / "adapter", adapter_config__json={"peft_type": "LORA"})
    with pytest.raises(LlmftError) as info:
        require_adapter(path, "--adapter")
    assert str(info.value) == (
        f"--adapter {path}: its adapter_config.json names no base_model_name_or_path: pass the base model explicitly"
    )


def test_a_model_folder_is_not_an_adapter(tmp_path):
    path = folder_with(tmp_path / "model", config__json={"model_type": "qwen2"})
    with pytest.raises(LlmftError) as info:
        require_adapter(path, "--adapter")
    assert str(info.value) == f"--adapter {path}: not a PEFT adapter folder: it has no adapter_config.json"


@pytest.mark.parametrize(
    "quantization, method",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
        ({"quant_method": "AWQ", "bits": 4}, "awq"),
        (None, None),
    ],
    ids=["gptq", "bnb", "awq-upper-case", "none"],
)
def test_quantization_method(tmp_path, quantization, method):
    config = {"model_type": "qwen2"} | ({"quantization_config": quantization} if quantization else {})
    assert model_folder(folder_with(tmp_path / "model", config__json=config)).quant_method == method


def test_quantization_method_of_a_loaded_models_config():
    """The rule model.py applies to a loaded model (an enum in a QuantizationConfig), the same as for config.json."""
    from transformers import BitsAndBytesConfig, GPTQConfig

    assert quant_method(SimpleNamespace(quantization_config=BitsAndBytesConfig(load_in_4bit=True))) == "bitsandbytes"
    assert quant_method(SimpleNamespace(quantization_config=GPTQConfig(bits=4))) == "gptq"
    assert quant_method(SimpleNamespace(quantization_config=None)) is None


def test_folder_without_config(tmp_path):
    path = folder_with(tmp_path / "empty", tokenizer__json="{}")
    folder = model_folder(path)
    assert folder.problems("--base") == [f"--base {path}: the directory holds no model (no config.json)"]
    assert folder.problems("--model", adapter=True) == [
        f"--model {path}: the directory holds no model (no config.json) and no adapter (no adapter_config.json)"
    ]
    with pytest.raises(FolderError) as info:
        require_model(path, "--base")
    assert str(info.value) == f"--base {path}: the directory holds no model (no config.json)"
    assert isinstance(info.value, ConfigError) and info.value.problems == [str(info.value)]


def test_unreadable_config(tmp_path):
    path = folder_with(tmp_path / "half-downloaded", config__json="")
    assert model_folder(path).problems("--model_name_or_path") == [
        f"--model_name_or_path {path}: cannot read {path / 'config.json'}: Expecting value: line 1 column 1 (char 0)"
    ]


def test_cut_safetensors_file(tmp_path):
    path = folder_with(tmp_path / "model", config__json={"model_type": "qwen2"})
    weights = path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(weights))  # 64 bytes of data after the header
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: header + 10])
    assert model_folder(path).weight_problems == (
        f"{weights} is truncated: tensor w ends at byte 64 of the data, the file holds 10; copy or download it again",
    )
    (path / "model.safetensors").write_bytes(b"\x05")
    assert model_folder(path).problems("--model") == [
        f"--model {path}: {weights} is not a safetensors file (only 1 bytes)"
    ]


def test_auto_map_is_remote_code(tmp_path):
    path = folder_with(
        tmp_path / "model",
        config__json={"model_type": "evilnet", "auto_map": {"AutoModelForCausalLM": "evil.EvilForCausalLM"}},
        tokenizer_config__json={"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}},
    )
    folder = model_folder(path)
    assert folder.remote_code == (
        "config.json: AutoModelForCausalLM -> evil.EvilForCausalLM",
        "tokenizer_config.json: AutoTokenizer -> evil.EvilTokenizer",
    )
    assert folder.problems("--model") == [
        f"--model {path} ships its own Python code (config.json: AutoModelForCausalLM -> evil.EvilForCausalLM, "
        "tokenizer_config.json: AutoTokenizer -> evil.EvilTokenizer), which would run when the model loads: llmft "
        "runs it only with --trust_remote_code True; pass that if you trust this model's code"
    ]
    assert folder.problems("--model", trust_remote_code=True) == []


# --- where a name points: one rule -------------------------------------------------------------------------------


def test_one_part_hub_id_offline_not_cached(hub):
    hub.offline(True)
    folder = model_folder("gpt2")
    assert (folder.is_hub_id, folder.folder, folder.missing) == (True, None, OFFLINE_MISS)
    assert folder.problems("--model_name_or_path") == [f"--model_name_or_path gpt2: {OFFLINE_MISS}"]


def test_one_part_hub_id_online_is_taken_on_trust(hub):
    hub.offline(False)
    folder = model_folder("gpt2")
    assert (folder.is_hub_id, folder.folder, folder.missing, folder.config) == (True, None, None, None)
    assert folder.problems("--model") == []


def test_hub_id_in_the_cache_is_read_like_a_folder(hub):
    hub.offline(True)
    snapshot = hub.cache(
        "gpt2", {"model_type": "gpt2", "vocab_size": 50257, "quantization_config": {"quant_method": "gptq"}}
    )
    folder = model_folder("gpt2")
    assert (folder.is_hub_id, folder.folder, folder.missing) == (True, snapshot, None)
    assert (folder.vocab_size, folder.quant_method) == (50257, "gptq")
    assert folder.problems("--model_name_or_path") == []


@pytest.mark.parametrize(
    "name, expected",
    [
        ("./absent-model", "no such directory"),
        ("../absent-model", "no such directory"),
        ("~/absent-model", "no such directory"),
        ("{tmp}/absent-model", "no such directory"),
        ("models/org/absent-model", "no such directory"),  # three parts: no Hub id
        ("org//absent-model", "no such directory"),
        ("my model", "no such directory, and not a valid Hub model id"),
        ("{tmp}/a-file", "not a directory"),
    ],
    ids=["dot", "parent", "home", "absolute", "three-parts", "empty-part", "space", "file"],
)
def test_path_looking_names(tmp_path, monkeypatch, hub, name, expected):
    hub.offline(False)  # online: only a Hub id could be fetched, none of these is one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    name = name.format(tmp=tmp_path)
    folder = model_folder(name)
    assert (folder.missing, folder.is_hub_id) == (expected, False)
    with pytest.raises(FolderError) as info:
        require_model(name, "--base")
    assert str(info.value) == f"--base {name}: {expected}"


def test_launcher_uses_the_same_path_rule(tmp_path, monkeypatch):
    from llmft.launch.launcher import LAUNCHERS, UsageError, parse_options

    monkeypatch.chdir(tmp_path)
    data = write_records(tmp_path / "train.json", [chat_record("Hi?", "Hello.")])
    launcher = next(iter(LAUNCHERS.values()))
    for name in ("~/absent-model", "models/org/absent-model", ".absent-model"):  # the launcher let these through
        with pytest.raises(UsageError, match=f"model folder '{name}' does not exist"):
            parse_options(launcher, ["-m", name, "-d", str(data)], {})
    assert parse_options(launcher, ["-m", "gpt2", "-d", str(data)], {}).model == "gpt2"


# --- finetune.py and the tools agree ------------------------------------------------------------------------------


def user_error(main, argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    return err


def model_line(err: str, name: str) -> str:
    """The message about `--model_name_or_path name`, without its `error: ` or `  - ` lead."""
    [line] = [line for line in err.splitlines() if f"--model_name_or_path {name}:" in line]
    return line[line.index("--model_name_or_path") :]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2", OFFLINE_MISS),
        ("./absent-model", "no such directory"),
        ("models/org/absent-model", "no such directory"),
        ("my model", "no such directory, and not a valid Hub model id"),
    ],
    ids=["one-part-hub-id-offline", "dot-relative", "three-parts", "invalid-id"],
)
def test_finetune_and_quantize_say_the_same(run_finetune, tmp_path, monkeypatch, hub, capsys, name, expected):
    """Before llmft.model_folder, finetune.py said `no such directory, ...` and the tools `no such model folder`."""
    from llmft.tools.quantize import main as quantize

    hub.offline(True)
    monkeypatch.chdir(tmp_path)
    data = write_records(tmp_path / "train.json", [chat_record("Hi?", "Hello.")] * 4)
    finetune_err = user_error(
        lambda argv: run_finetune(*argv),
        ["--model_name_or_path", name, "--data_path", data, "--output_dir", tmp_path / "out"],
        capsys,
    )
    quantize_err = user_error(
        quantize,
        ["--model_name_or_path", name, "--data_path", data, "--output_dir", tmp_path / "q", "--eval_samples", "1"],
        capsys,
    )
    assert (
        model_line(finetune_err, name) == model_line(quantize_err, name) == (f"--model_name_or_path {name}: {expected}")
    )


def test_one_part_hub_id_reaches_loading_in_finetune_and_in_chat(hub, tmp_path, monkeypatch, capsys):
    """`gpt2` online is a Hub id for both: finetune.py's settings accept it, and chat goes on to load it."""
    import transformers

    from llmft.config import parse_args
    from llmft.tools.chat import main as chat

    hub.offline(False)
    data = write_records(tmp_path / "train.json", [chat_record("Hi?", "Hello.")])
    model_args, *_ = parse_args(
        ["--model_name_or_path", "gpt2", "--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    )
    assert model_args.model_name_or_path == "gpt2"

    def reached(name, **kwargs):
        raise LlmftError(f"loading {name}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reached)
    err = user_error(chat, ["--model", "gpt2", "--prompt", "hi"], capsys)
    assert err.strip().splitlines()[-1] == "error: loading gpt2"


# --- read once ----------------------------------------------------------------------------------------------------


def test_second_look_reads_nothing_and_a_rewrite_is_read_anew(tmp_path, json_reads):
    path = folder_with(tmp_path / "model", config__json={"model_type": "qwen2"})
    assert model_folder(path).quant_method is None
    assert model_folder(str(path) + "/").quant_method is None and model_folder(path).vocab_size is None
    assert json_reads == ["config.json"]
    (path / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "quantization_config": {"quant_method": "gptq"}}), encoding="utf-8"
    )
    assert model_folder(path).quant_method == "gptq"
    assert json_reads == ["config.json", "config.json"]


def test_a_training_run_reads_config_json_once(tiny_chat_model, tmp_path, monkeypatch, json_reads):
    """The settings check (path, weights, remote code, context length, quantization), the plan, the model
    build and the run record used to read config.json eight times between them; now once. The run gives the model
    relative, which parse_args makes absolute: still the same folder."""
    from llmft.config import parse_args
    from llmft.model import build_model, load_training_tokenizer
    from llmft.plan import resolve_plan
    from llmft.saving import describe_run

    monkeypatch.chdir(tiny_chat_model.parent)
    data = write_records(tmp_path / "train.json", [chat_record("Hi?", "Hello.")])
    model_args, data_args, lora_args, quant_args, training_args = parse_args(
        argv(
            "--model_name_or_path {name} --data_path {data} --output_dir {out} --use_lora True --use_cpu True",
            "--report_to none --max_steps 1",
            name=tiny_chat_model.name,
            data=data,
            out=tmp_path / "out",
        )
    )
    plan = resolve_plan(model_args, data_args, lora_args, quant_args, training_args)
    tokenizer, added = load_training_tokenizer(model_args, data_args)
    plan = plan.with_added_tokens(added)
    build_model(model_args, lora_args, training_args, tokenizer, plan)
    run = describe_run(plan)
    assert run["base_fingerprint"].startswith("sha256-all:")
    assert json_reads.count("config.json") == 1, json_reads
    assert json_reads == ["config.json", "tokenizer_config.json"]
