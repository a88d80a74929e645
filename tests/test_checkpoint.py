"""llmft.checkpoint: what a model path or Hub id is, answered once, with one rule for finetune.py and every tool.

The folders are built here from literal files (configs, small safetensors files); nothing is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import llmft.checkpoint as checkpoint
from llmft.checkpoint import FolderError, model_folder, quant_method, require_adapter, require_model
from llmft.errors import ConfigError, LlmftError

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
    """The config files llmft.checkpoint parses, in order (file names only)."""
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
    path = folder_with(tmp_path / "model", config__json={"model_type": "qwen2", "vocab_size": 320},
                       tokenizer_config__json={"model_max_length": 512})
    save_file({"model.norm.weight": torch.ones(4)}, str(path / "model.safetensors"))
    folder = model_folder(path)
    assert (folder.name, folder.folder, folder.is_hub_id, folder.missing) == (str(path), path, False, None)
    assert (folder.is_model, folder.is_adapter, folder.adapter_base) == (True, False, None)
    assert (folder.quant_method, folder.vocab_size, folder.has_tokenizer) == (None, 320, True)
    assert (folder.remote_code, folder.weight_problems, folder.unreadable) == ((), (), ())
    assert folder.problems("--model_name_or_path") == []
    assert require_model(path, "--base") == folder


def test_adapter_with_recorded_base(tmp_path):
    path = folder_with(tmp_path / "adapter", adapter_config__json={
        "base_model_name_or_path": "/models/base", "peft_type": "LORA", "modules_to_save": ["embed_tokens", "lm_head"]})
    save_file({"base_model.model.model.embed_tokens.weight": torch.zeros(384, 8),
               "base_model.model.lm_head.weight": torch.zeros(384, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)},
              str(path / "adapter_model.safetensors"))
    folder = model_folder(path)
    assert (folder.is_model, folder.is_adapter, folder.adapter_base) == (False, True, "/models/base")
    assert (folder.quant_method, folder.vocab_size, folder.has_tokenizer) == (None, None, False)
    assert folder.saved_embedding_rows(["embed_tokens", "lm_head"]) == 384
    assert folder.saved_embedding_rows(["wte"]) is None  # rows are looked up by the names the model gives
    assert folder.problems("--model", adapter=True) == []
    assert require_adapter(path, "--adapter").adapter_base == "/models/base"
    assert folder.problems("--model_name_or_path") == [
        f"--model_name_or_path {path}: the directory holds a PEFT adapter (adapter_config.json), not a model: give "
        "its base (/models/base), or merge the adapter into it first (llmft merge)"]


def test_adapter_without_a_recorded_base(tmp_path):
    path = folder_with(tmp_path / "adapter", adapter_config__json={"peft_type": "LORA"})
    with pytest.raises(LlmftError) as info:
        require_adapter(path, "--adapter")
    assert str(info.value) == (f"--adapter {path}: its adapter_config.json names no base_model_name_or_path: pass "
                               "the base model explicitly")


def test_a_model_folder_is_not_an_adapter(tmp_path):
    path = folder_with(tmp_path / "model", config__json={"model_type": "qwen2"})
    with pytest.raises(LlmftError) as info:
        require_adapter(path, "--adapter")
    assert str(info.value) == f"--adapter {path}: not a PEFT adapter folder: it has no adapter_config.json"


@pytest.mark.parametrize("quantization, method", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bitsandbytes"),
    ({"quant_method": "AWQ", "bits": 4}, "awq"),
    (None, None),
], ids=["gptq", "bnb", "awq-upper-case", "none"])
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
        f"--model {path}: the directory holds no model (no config.json) and no adapter (no adapter_config.json)"]
    with pytest.raises(FolderError) as info:
        require_model(path, "--base")
    assert str(info.value) == f"--base {path}: the directory holds no model (no config.json)"
    assert isinstance(info.value, ConfigError) and info.value.problems == [str(info.value)]


def test_unreadable_config(tmp_path):
    path = folder_with(tmp_path / "half-downloaded", config__json="")
    assert model_folder(path).problems("--model_name_or_path") == [
        f"--model_name_or_path {path}: cannot read {path / 'config.json'}: Expecting value: line 1 column 1 (char 0)"]


def test_cut_safetensors_file(tmp_path):
    path = folder_with(tmp_path / "model", config__json={"model_type": "qwen2"})
    weights = path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(weights))  # 64 bytes of data after the header
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:header + 10])
    assert model_folder(path).weight_problems == (
        f"{weights} is truncated: tensor w ends at byte 64 of the data, the file holds 10; copy or download it again",)
    (path / "model.safetensors").write_bytes(b"\x05")
    assert model_folder(path).problems("--model") == [
        f"--model {path}: {weights} is not a safetensors file (only 1 bytes)"]


def test_auto_map_is_remote_code(tmp_path):
    path = folder_with(tmp_path / "model", config__json={"model_type": "evilnet",
                                                         "auto_map": {"AutoModelForCausalLM": "evil.EvilForCausalLM"}},
                       tokenizer_config__json={"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}})
    folder = model_folder(path)
    assert folder.remote_code == ("config.json: AutoModelForCausalLM -> evil.EvilForCausalLM",
                                  "tokenizer_config.json: AutoTokenizer -> evil.EvilTokenizer")
    assert folder.problems("--model") == [
        f"--model {path} ships its own Python code (config.json: AutoModelForCausalLM -> evil.EvilForCausalLM, "
        "tokenizer_config.json: AutoTokenizer -> evil.EvilTokenizer), which would run when the model loads: llmft "
        "runs it only with --trust_remote_code True; pass that if you trust this model's code"]
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
    snapshot = hub.cache("gpt2", {"model_type": "gpt2", "vocab_size": 50257,
                                  "quantization_config": {"quant_method": "gptq"}})
    folder = model_folder("gpt2")
    assert (folder.is_hub_id, folder.folder, folder.missing) == (True, snapshot, None)
    assert (folder.vocab_size, folder.quant_method) == (50257, "gptq")
    assert folder.problems("--model_name_or_path") == []


@pytest.mark.parametrize("name, expected", [
    ("./absent-model", "no such directory"),
    ("../absent-model", "no such directory"),
    ("~/absent-model", "no such directory"),
    ("{tmp}/absent-model", "no such directory"),
    ("models/org/absent-model", "no such directory"),  # three parts: no Hub id
    ("org//absent-model", "no such directory"),
    ("my model", "no such directory, and not a valid Hub model id"),
    ("{tmp}/a-file", "not a directory"),
], ids=["dot", "parent", "home", "absolute", "three-parts", "empty-part", "space", "file"])
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


# --- read once ----------------------------------------------------------------------------------------------------

def test_second_look_reads_nothing_and_a_rewrite_is_read_anew(tmp_path, json_reads):
    path = folder_with(tmp_path / "model", config__json={"model_type": "qwen2"})
    assert model_folder(path).quant_method is None
    assert model_folder(str(path) + "/").quant_method is None and model_folder(path).vocab_size is None
    assert json_reads == ["config.json"]
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "quantization_config":
                                                  {"quant_method": "gptq"}}), encoding="utf-8")
    assert model_folder(path).quant_method == "gptq"
    assert json_reads == ["config.json", "config.json"]
