"""Shared fixtures: tiny models built once per test session, data files, and an in-process finetune.py runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "conversations.json"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory):
    """A private datasets cache, so tests neither read nor leave cached tokenizations elsewhere."""
    path = tmp_path_factory.mktemp("hf-datasets-cache")
    os.environ["HF_DATASETS_CACHE"] = str(path)
    import datasets

    datasets.config.HF_DATASETS_CACHE = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny Qwen2 chat model with a locally trained BPE tokenizer and the ChatML template."""
    from tools.make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A tiny base model: no chat template, no ChatML tokens."""
    from tools.make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-base", chat=False)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """A HF tokenizer over Qwen's real vocabulary, with the ChatML template."""
    from tools.make_tiny_model import build_tokenizer

    return build_tokenizer("qwen", chat=True)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from tools.make_tiny_model import build_tokenizer

    return build_tokenizer("bpe", chat=True)


def write_records(path: Path, records, jsonl: bool = False) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False)
    return path


def chat_record(*turns: str, system: str | None = None, id: str | None = None) -> dict:
    """A Qwen-format record from alternating user/assistant texts."""
    conversation = [{"from": "system", "value": system}] if system else []
    conversation += [{"from": "user" if i % 2 == 0 else "assistant", "value": t} for i, t in enumerate(turns)]
    record = {"conversations": conversation}
    if id is not None:
        record["id"] = id
    return record


@pytest.fixture
def run_finetune(datasets_cache):
    """Run finetune.py's main() in this process with the given flags; returns the Trainer it trained with."""
    import finetune

    def run(*flags):
        return finetune.main([str(f) for f in flags])

    return run


def assert_reloads_and_generates(out: Path) -> None:
    """Load a saved run (adapter or full model) with plain PEFT/transformers and generate a few tokens."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loader = AutoPeftModelForCausalLM if (out / "adapter_config.json").exists() else AutoModelForCausalLM
    model = loader.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
