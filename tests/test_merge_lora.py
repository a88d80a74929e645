"""tools/merge_lora.py: adapters (LoRA, added tokens with modules_to_save, Q-LoRA, GPTQ base) merge into a standalone
model whose logits match the unmerged adapter, written safely.

Adapters are made here with PEFT directly (a few optimizer steps on rendered conversations), not with finetune.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmft.chat_template import CHATML_TEMPLATE, IM_END, IM_START
from llmft.data.records import parse_record
from llmft.data.render import render_conversation
from llmft.errors import LlmftError
from llmft.run_folder import LOCK_FILE, WRITTEN_FILE, record_written
from llmft.tools.merge import merge_lora
from llmft.tools.tiny_model import make_tiny_model
from tests.conftest import argv

REPO = Path(__file__).resolve().parent.parent

CONVERSATIONS = [
    [("What is the capital of France?", "The capital of France is Paris.")],
    [
        ("Please write a short poem about the sea.", "The waves rise, the wind sings, and the gulls fly home."),
        ("Thank you!", "You're welcome!"),
    ],
]


def rendered(tokenizer):
    records = [
        {
            "messages": [
                m
                for user, answer in turns
                for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})
            ]
        }
        for turns in CONVERSATIONS
    ]
    return [render_conversation(parse_record(r), tokenizer) for r in records]


def train_steps(model, tokenizer, steps: int = 4, lr: float = 1e-2) -> None:
    """A few AdamW steps on the rendered conversations: enough to move every trainable tensor away from its init."""
    samples = rendered(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        for s in samples:
            model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def save_adapter(peft_model, tokenizer, path: Path) -> Path:
    peft_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **kwargs)


@pytest.fixture(scope="session")
def lora_adapter(tiny_chat_model, tmp_path_factory) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model), lora_config())
    train_steps(model, tokenizer)
    return save_adapter(model, tokenizer, tmp_path_factory.mktemp("adapters") / "lora")


@pytest.fixture(scope="session")
def merged(lora_adapter, tmp_path_factory):
    return merge_lora(lora_adapter, tmp_path_factory.mktemp("merged") / "model", max_shard_size="500KB")


@pytest.fixture(scope="session")
def added_tokens_adapter(tmp_path_factory) -> Path:
    """As training does for a base model without ChatML: tokens added past the embedding rows, rows grown to a
    multiple of 64, embeddings (tied to the head) trained in full as modules_to_save next to the LoRA."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # 1023 BPE tokens + <|endoftext|> fill exactly 1024 rows, so the two ChatML tokens need new ones.
    base = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-base-1024", chat=False, bpe_vocab_size=1023)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([IM_START, IM_END], special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.get_input_embeddings().weight.shape[0] < len(tokenizer)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    config = lora_config(modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    model = get_peft_model(model, config)
    train_steps(model, tokenizer)
    return save_adapter(model, tokenizer, tmp_path_factory.mktemp("adapters") / "added-tokens")


def logits_of(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def unmerged(adapter: Path, base: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def test_adapter_fixture_is_trained(lora_adapter):
    with safe_open(lora_adapter / "adapter_model.safetensors", framework="pt") as f:
        lora_b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)


def test_merged_logits_match_unmerged_adapter(merged, lora_adapter, tiny_chat_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert merged.max_abs_diff < 1e-4
    assert merged.argmax_agreement == 1.0
    assert merged.num_tokens > 20
    assert merged.base == str(tiny_chat_model)

    # Checked again here with plain transformers + PEFT, on a conversation the tool did not use.
    tokenizer = AutoTokenizer.from_pretrained(merged.output_dir)
    ids = rendered(tokenizer)[1].input_ids
    merged_model = AutoModelForCausalLM.from_pretrained(merged.output_dir).eval()
    reference = unmerged(lora_adapter, tiny_chat_model)
    assert (logits_of(merged_model, ids) - logits_of(reference, ids)).abs().max() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    assert (logits_of(merged_model, ids) - logits_of(base, ids)).abs().max() > 1e-3  # the delta is in there


def test_merged_folder_is_a_standalone_model(merged, lora_adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = merged.output_dir
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors.index.json").is_file()  # 500KB shards of a 1.7 MB model
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "chat_template.jinja").read_text() == (lora_adapter / "chat_template.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert GenerationConfig.from_pretrained(out).eos_token_id[0] == im_end
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not list(out.parent.glob(".*"))  # no staging folder left beside it


def test_added_tokens_and_modules_to_save_merge(added_tokens_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = merge_lora(added_tokens_adapter, tmp_path / "merged")
    assert result.max_abs_diff < 1e-4 and result.argmax_agreement == 1.0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert len(tokenizer) == 1026
    assert model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == 1088
    # The ChatML rows are the trained ones from the adapter, not the base's (which had no such rows).
    with safe_open(added_tokens_adapter / "adapter_model.safetensors", framework="pt") as f:
        key = next(k for k in f.keys() if "embed_tokens" in k and "modules_to_save" in k)
        trained = f.get_tensor(key)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert torch.equal(model.get_input_embeddings().weight[im_end], trained[im_end])
    assert torch.equal(model.get_output_embeddings().weight[im_end], trained[im_end])


def test_refuses_non_empty_output_without_force(lora_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LlmftError, match="not empty.*--overwrite_output_dir True"):
        merge_lora(lora_adapter, out)
    assert (out / "keep.txt").read_text() == "mine"

    # a result replaces the whole folder: one holding a file no llmft command wrote is not replaced
    with pytest.raises(LlmftError, match="holds keep.txt, which no llmft run or tool recorded writing"):
        merge_lora(lora_adapter, out, overwrite_output_dir=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    (out / "keep.txt").unlink()
    merge_lora(lora_adapter, out)
    merge_lora(lora_adapter, out, overwrite_output_dir=True)  # over its own earlier result, which it recorded
    assert (out / "config.json").is_file() and "config.json" in json.loads((out / WRITTEN_FILE).read_text())["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_around_its_inputs_is_refused(lora_adapter, tmp_path):
    """Issue 16.3: merging into a parent of the adapter replaced the folder, the adapter and the data in it."""
    project = tmp_path / "project"
    shutil.copytree(lora_adapter, project / "lora")
    (project / "data.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}]))
    before = sorted(str(p) for p in project.rglob("*"))
    with pytest.raises(LlmftError, match=f"--output_dir {project} contains --adapter {project / 'lora'}"):
        merge_lora(project / "lora", project, overwrite_output_dir=True)
    with pytest.raises(LlmftError, match=f"--output_dir {project / 'lora' / 'm'} lies inside --adapter"):
        merge_lora(project / "lora", project / "lora" / "m", overwrite_output_dir=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "data.json").symlink_to(project / "data.json")
    with pytest.raises(LlmftError, match="contains --data_path"):
        merge_lora(
            lora_adapter, project, data_path=str(tmp_path / "elsewhere" / "data.json"), overwrite_output_dir=True
        )
    assert sorted(str(p) for p in project.rglob("*")) == before


def test_failed_merge_leaves_output_untouched(lora_adapter, tmp_path, monkeypatch):
    import llmft.tools.merge as tool

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "compare_logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_lora(lora_adapter, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a partial folder

    (tmp_path / "old").mkdir()
    record_written(tmp_path / "old", "config.json")  # an earlier result of llmft's
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        merge_lora(lora_adapter, tmp_path / "old", overwrite_output_dir=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (tmp_path / "old" / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_cli_without_adapter_config_exits_2(tmp_path):
    (tmp_path / "not-an-adapter").mkdir()
    proc = subprocess.run(
        argv(
            "{python} tools/merge_lora.py --adapter {not_an_adapter} --output {out}",
            python=sys.executable,
            not_an_adapter=tmp_path / "not-an-adapter",
            out=tmp_path / "out",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "adapter_config.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def copy_adapter_with_base(adapter: Path, base: str, dest: Path) -> Path:
    shutil.copytree(adapter, dest)
    config = json.loads((dest / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (dest / "adapter_config.json").write_text(json.dumps(config))
    return dest


def test_missing_base_is_reported(lora_adapter, tmp_path):
    adapter = copy_adapter_with_base(lora_adapter, str(tmp_path / "gone"), tmp_path / "adapter")
    with pytest.raises(LlmftError, match="base model recorded in .*: no such directory$"):
        merge_lora(adapter, tmp_path / "out")
    with pytest.raises(LlmftError, match="--base .*: no such directory$"):
        merge_lora(lora_adapter, tmp_path / "out", base=str(tmp_path / "gone"))


def fake_gptq_checkpoint(model: Path, dest: Path, **config_changes) -> Path:
    """A folder whose config.json says GPTQ: all merge_lora reads before refusing it."""
    dest.mkdir()
    config = json.loads((model / "config.json").read_text())
    config.update(config_changes, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_adapter_on_gptq_base_needs_unquantized_base(lora_adapter, tiny_chat_model, tmp_path):
    gptq = fake_gptq_checkpoint(tiny_chat_model, tmp_path / "gptq")
    adapter = copy_adapter_with_base(lora_adapter, str(gptq), tmp_path / "adapter")
    with pytest.raises(LlmftError, match="GPTQ-quantized checkpoint.*--base"):
        merge_lora(adapter, tmp_path / "out")
    with pytest.raises(LlmftError, match="is itself quantized"):
        merge_lora(adapter, tmp_path / "out", base=str(gptq))
    other = fake_gptq_checkpoint(tiny_chat_model, tmp_path / "other", hidden_size=256)
    (other / "config.json").write_text(
        json.dumps({**json.loads((other / "config.json").read_text()), "quantization_config": None})
    )
    with pytest.raises(LlmftError, match="not the architecture.*hidden_size"):
        merge_lora(adapter, tmp_path / "out", base=str(other))

    result = merge_lora(adapter, tmp_path / "out", base=str(tiny_chat_model))
    assert result.base == str(tiny_chat_model) and result.max_abs_diff < 1e-4


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_unquantized_base(tiny_chat_model, tmp_path):
    """Q-LoRA on CPU (bitsandbytes NF4), then the merge into the float32 weights the adapter records."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_chat_model, quantization_config=quantization, device_map={"": "cpu"}
    )
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), lora_config())
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    train_steps(model, tokenizer)
    adapter = save_adapter(model, tokenizer, tmp_path / "qlora")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_chat_model)

    result = merge_lora(adapter, tmp_path / "merged")
    assert result.max_abs_diff < 1e-4 and result.argmax_agreement == 1.0
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged_model.dtype == torch.float32
    assert not hasattr(merged_model.config, "quantization_config")
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(merged_model.state_dict()[up], base.state_dict()[up])


# --- the base the adapter was trained on ------------------------------------------------------------------------


def adapter_recording_base(adapter: Path, base: Path, dest: Path) -> Path:
    """A copy of `adapter` with the llmft_run.json finetune.py writes for a LoRA run on `base`."""
    from llmft.saving import RUN_FILE, base_fingerprint

    shutil.copytree(adapter, dest)
    run = {
        "mode": "lora",
        "base_model": str(base),
        "base_quantization": None,
        "base_fingerprint": base_fingerprint(base),
        "added_tokens": [],
    }
    (dest / RUN_FILE).write_text(json.dumps(run))
    return dest


@pytest.fixture(scope="session")
def same_shape_model(tmp_path_factory) -> Path:
    """Another tiny chat model with exactly the tiny chat model's shapes and tokenizer, other random weights."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat-seed-1", seed=1)


def test_base_fingerprint_tells_same_shape_models_apart(tiny_chat_model, same_shape_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmft.saving import base_fingerprint

    assert (same_shape_model / "config.json").read_text() == (tiny_chat_model / "config.json").read_text()
    assert base_fingerprint(tiny_chat_model) != base_fingerprint(same_shape_model)
    copy = shutil.copytree(tiny_chat_model, tmp_path / "copy")
    assert base_fingerprint(copy) == base_fingerprint(tiny_chat_model)
    # re-saved by transformers in shards: other files, the same weights, the same fingerprint
    AutoModelForCausalLM.from_pretrained(tiny_chat_model).save_pretrained(tmp_path / "resaved", max_shard_size="300KB")
    assert len(list((tmp_path / "resaved").glob("*.safetensors"))) > 1
    assert base_fingerprint(tmp_path / "resaved") == base_fingerprint(tiny_chat_model)
    assert base_fingerprint(tmp_path / "nowhere") is None


def test_merge_refuses_another_base_of_the_same_shape(
    lora_adapter, tiny_chat_model, same_shape_model, tmp_path, capsys
):
    """Before, this merged and its parity check passed: it compares the adapter on the wrong base with itself."""
    from llmft.tools.merge import main

    adapter = adapter_recording_base(lora_adapter, tiny_chat_model, tmp_path / "adapter")
    with pytest.raises(SystemExit) as info:
        main(["--adapter", str(adapter), "--base", str(same_shape_model), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"the base {same_shape_model} is not the model the adapter {adapter} was trained on" in err
    assert "--allow_base_mismatch" in err and "llmft_run.json" in err
    assert not (tmp_path / "out").exists()

    result = merge_lora(adapter, tmp_path / "out", base=str(same_shape_model), allow_base_mismatch=True)
    assert result.base == str(same_shape_model)
    assert merge_lora(adapter, tmp_path / "right", base=str(tiny_chat_model)).max_abs_diff < 1e-4


def test_merge_refuses_a_recorded_base_replaced_since_training(
    lora_adapter, tiny_chat_model, same_shape_model, tmp_path
):
    base = shutil.copytree(tiny_chat_model, tmp_path / "base")
    adapter = copy_adapter_with_base(lora_adapter, str(base), tmp_path / "plain")
    adapter = adapter_recording_base(adapter, base, tmp_path / "adapter")
    shutil.copy(same_shape_model / "model.safetensors", base / "model.safetensors")  # overwritten in place
    with pytest.raises(LlmftError, match="not the model the adapter .* was trained on"):
        merge_lora(adapter, tmp_path / "out")


def test_base_fingerprint_covers_every_tensor(tiny_chat_model, same_shape_model, tmp_path):
    """Before, the fingerprint sampled 4 tensors: a base differing from the trained one only in one layer's q_proj and
    v_proj passed as the same base."""
    from safetensors.torch import load_file, save_file

    from llmft.saving import base_fingerprint

    ours, theirs = load_file(tiny_chat_model / "model.safetensors"), load_file(same_shape_model / "model.safetensors")
    base = shutil.copytree(tiny_chat_model, tmp_path / "base")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        ours[name] = theirs[name]
    save_file(ours, base / "model.safetensors", metadata={"format": "pt"})
    assert base_fingerprint(base) != base_fingerprint(tiny_chat_model)
    # one value, anywhere a run of the sample reads (here the tensor's last), is enough
    last = load_file(tiny_chat_model / "model.safetensors")
    last["model.norm.weight"][-1] += 1
    save_file(last, base / "model.safetensors", metadata={"format": "pt"})
    assert base_fingerprint(base) != base_fingerprint(tiny_chat_model)


def test_an_adapter_with_an_earlier_fingerprint_is_still_checked(
    lora_adapter, tiny_chat_model, same_shape_model, tmp_path
):
    from llmft.saving import RUN_FILE, base_fingerprint_v1

    adapter = adapter_recording_base(lora_adapter, tiny_chat_model, tmp_path / "adapter")
    run = json.loads((adapter / RUN_FILE).read_text())
    (adapter / RUN_FILE).write_text(json.dumps({**run, "base_fingerprint": base_fingerprint_v1(tiny_chat_model)}))
    with pytest.raises(LlmftError, match="not the model the adapter .* was trained on"):
        merge_lora(adapter, tmp_path / "out", base=str(same_shape_model))
    assert merge_lora(adapter, tmp_path / "right", base=str(tiny_chat_model)).max_abs_diff < 1e-4


# --- interrupted and shared results -----------------------------------------------------------------------------

SIGTERM_CHILD = """
import sys, time
from pathlib import Path
import llmft.tools.merge as tool
ready = Path(sys.argv[3])
real = tool.compare_logits
def slow(*args):
    ready.write_text("merging")
    time.sleep(120)
tool.compare_logits = slow
tool.main(["--adapter", sys.argv[1], "--output", sys.argv[2]])
"""


@pytest.mark.slow
def test_sigterm_during_merge_leaves_no_partial_folder(lora_adapter, tmp_path):
    """Before, a SIGTERM (what schedulers send) killed the merge without cleanup: a hidden .out.partial-* stayed."""
    import os
    import signal
    import time

    work = tmp_path / "work"
    work.mkdir()
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, str(lora_adapter), str(work / "out"), str(ready)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), child.communicate(timeout=10)
        # the merge was under way: its partial folder, and the lock on its output (llmft/run_folder.py)
        assert {p.name.split("-")[0] for p in work.iterdir()} == {".out.partial", f".out{LOCK_FILE}"}
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert list(work.iterdir()) == []
    assert os.path.exists(lora_adapter / "adapter_config.json")


def test_merged_files_follow_the_umask(lora_adapter, tmp_path):
    """safetensors writes its files 0600; every file of the result must read like the rest (0644 under 022)."""
    import os

    old = os.umask(0o022)
    try:
        merge_lora(lora_adapter, tmp_path / "out", max_shard_size="500KB")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert sum(name.endswith(".safetensors") for name in modes) > 1
    assert set(modes.values()) == {"0o644"}, modes
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o755"


# --- adapters that cannot be merged: one error naming what is wrong, and no output -------------------------------


def broken_adapter(adapter: Path, dest: Path, config: dict | None = None, weights=None) -> Path:
    """A copy of `adapter` with `config` keys replaced in its adapter_config.json and `weights` (a function of the
    tensors dict) applied to its adapter_model.safetensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, dest)
    if config:
        path = dest / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights:
        tensors = load_file(dest / "adapter_model.safetensors")
        weights(tensors)
        save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def first_lora_b_nan(tensors: dict) -> None:
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name][0, 0] = float("nan")


@pytest.mark.parametrize(
    ("config", "weights", "message"),
    [
        (None, first_lora_b_nan, r"holds NaN or infinite weights \(first in .*lora_B"),
        ({"target_modules": ["no_such_proj"]}, None, r"does not load onto its base .*no_such_proj.* not found"),
        ({"r": 8}, None, r"does not load onto its base .*size mismatch"),
        ({"r": "eight"}, None, r"is not usable: r 'eight' is not a positive whole number"),
        ({"peft_type": "BOGUS"}, None, r"is not usable: peft_type 'BOGUS' is not one PEFT knows"),
        ({"peft_type": "IA3"}, None, r"does not match its adapter_config.json: .* weights of the file fit none"),
        (None, lambda t: t.pop(sorted(t)[0]), r"does not match its adapter_config.json: 1 of the 28 weights"),
        (None, lambda t: t.clear(), r"does not match its adapter_config.json: 28 of the 28 weights"),
    ],
    ids=["nan-weight", "target-modules", "rank", "rank-type", "peft-type", "other-peft-type", "missing", "none"],
)
def test_a_broken_adapter_is_refused_by_name(lora_adapter, tmp_path, config, weights, message):
    """Before, a NaN adapter merged with exit 0 and the parity check printed a max diff of 0; the others failed with
    PEFT's traceback, or merged an adapter with weights missing (PEFT only warns)."""
    adapter = broken_adapter(lora_adapter, tmp_path / "adapter", config, weights)
    with pytest.raises(LlmftError, match=message):
        merge_lora(adapter, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_an_adapter_without_weights_is_refused(lora_adapter, tmp_path):
    adapter = broken_adapter(lora_adapter, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(LlmftError, match="holds no weights"):
        merge_lora(adapter, tmp_path / "out")


def test_parity_check_does_not_take_nan_logits_for_no_difference():
    from llmft.tools.merge import compare_logits

    logits = torch.zeros(3, 5)
    with pytest.raises(LlmftError, match="NaN or infinite logits from the merged model"):
        compare_logits([logits], [torch.full((3, 5), float("nan"))])
