"""Distributed runs through the launchers, on CPU ranks over gloo: what a user gets on several GPUs or nodes.

- Equivalence: 2 ranks with per-device batch 1 follow the same loss and gradient-norm trajectory as 1 rank with
  batch 2 on the same data and seed, and end with the same weights (ZeRO-2 LoRA and ZeRO-3 full). So do two nodes
  simulated on this machine (two launcher processes, NNODES=2, NODE_RANK=0/1) and two nodes started by mpirun.
- The combinations of the "Distributed training" table in the README that test_launchers.py does not run: Q-LoRA
  with ZeRO-3 (4-bit weights stored in the compute dtype), full fine-tuning with ZeRO-2 + CPU offload, a base model
  whose ChatML tokens are added and trained (modules_to_save) under ZeRO-3, LoRA on a GPTQ base with ZeRO-2, and
  with ZeRO-3, which is refused with a clear message before anything is loaded.
Each saved result reloads with plain transformers/PEFT and generates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    EQUIVALENCE_DATA,
    EQUIVALENCE_RUN,
    EQUIVALENCE_STEPS,
    FINETUNE,
    REPO,
    assert_adapter_trained,
    assert_full_model_trained,
    assert_reloads_and_generates,
    argv,
    launcher_env,
)
from tests.conftest import train_with_launcher as train

pytestmark = pytest.mark.slow

DATA = EQUIVALENCE_DATA
STEPS = EQUIVALENCE_STEPS
GLOBAL_BATCH = 2
# EQUIVALENCE_RUN with micro-batches of: the global batch (one rank), half of it (each of two ranks), one sample
WHOLE_BATCH = argv(EQUIVALENCE_RUN, batch=GLOBAL_BATCH, accumulation=1, max_tokens=0)
HALF_BATCH = argv(EQUIVALENCE_RUN, batch=GLOBAL_BATCH // 2, accumulation=1, max_tokens=0)
ONE_SAMPLE = argv(EQUIVALENCE_RUN, batch=1, accumulation=1, max_tokens=0)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]


def trajectory(out: Path) -> list[float]:
    """Loss and gradient norm of every step, in order, from the trainer state saved with the last checkpoint."""
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == STEPS
    return [value for entry in steps for value in (entry["loss"], entry["grad_norm"])]


def trained_tensors(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (out / "adapter_config.json").exists() else "model.safetensors"
    return load_file(str(out / name))


def assert_same_run(reference: Path, other: Path) -> None:
    expected, actual = trajectory(reference), trajectory(other)
    assert actual == pytest.approx(expected, rel=1e-4), (expected, actual)
    ref_tensors, tensors = trained_tensors(reference), trained_tensors(other)
    assert sorted(tensors) == sorted(ref_tensors)
    for key, tensor in ref_tensors.items():
        assert torch.allclose(tensors[key], tensor, atol=1e-5), key


# --- equivalence: the same training, however it is spread ------------------------------------------------------


@pytest.fixture(scope="module")
def lora_zero2_reference(tiny_chat_model, tmp_path_factory) -> Path:
    """1 rank, per-device batch 2: the run every LoRA + ZeRO-2 layout below must reproduce."""
    out = tmp_path_factory.mktemp("lora-zero2") / "one-rank"
    assert_ok(train("finetune_lora_ds.sh", tiny_chat_model, out, "zero2", 1, *WHOLE_BATCH))
    return out


def test_two_ranks_match_one_rank_with_twice_the_batch(lora_zero2_reference, tiny_chat_model, tmp_path):
    out = tmp_path / "two-ranks"
    assert_ok(train("finetune_lora_ds.sh", tiny_chat_model, out, "zero2", 2, *HALF_BATCH))
    assert_same_run(lora_zero2_reference, out)
    assert_reloads_and_generates(out)


def test_two_ranks_packed_by_token_budget_match_one_rank(tiny_chat_model, tmp_path):
    """Token-budget micro-batches (packed rows): one rank accumulating two of them per step trains the same steps as
    two ranks taking one each: the same samples per optimizer step, the loss averaged over all their targets."""
    one, two = tmp_path / "one-rank", tmp_path / "two-ranks"
    assert_ok(
        train(
            "finetune_lora_ds.sh",
            tiny_chat_model,
            one,
            "zero2",
            1,
            *argv(EQUIVALENCE_RUN, batch=1, accumulation=2, max_tokens=256),
        )
    )
    assert_ok(
        train(
            "finetune_lora_ds.sh",
            tiny_chat_model,
            two,
            "zero2",
            2,
            *argv(EQUIVALENCE_RUN, batch=1, accumulation=1, max_tokens=256),
        )
    )
    assert_same_run(one, two)
    assert_reloads_and_generates(two)


def test_full_zero3_two_ranks_match_one_rank(tiny_chat_model, tmp_path):
    one, two = tmp_path / "one-rank", tmp_path / "two-ranks"
    assert_ok(train("finetune_ds.sh", tiny_chat_model, one, "zero3", 1, *WHOLE_BATCH))
    assert_ok(train("finetune_ds.sh", tiny_chat_model, two, "zero3", 2, *HALF_BATCH))
    assert_same_run(one, two)
    assert_reloads_and_generates(two)


def test_two_nodes_simulated_on_one_machine(lora_zero2_reference, tiny_chat_model, tmp_path):
    """Two launcher processes, as two nodes would run them: NNODES=2, NODE_RANK=0/1, the master on 127.0.0.1."""
    out = tmp_path / "two-nodes"
    result = train("finetune_lora_ds.sh", tiny_chat_model, out, "zero2", 1, *HALF_BATCH, nodes=2)
    assert "[llmft] node 0 of 2, 1 rank(s) per node" in result.stderr
    assert_same_run(lora_zero2_reference, out)
    assert_reloads_and_generates(out)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun (tools/install_system_deps.sh)")
def test_two_nodes_started_by_mpirun(lora_zero2_reference, tiny_chat_model, tmp_path):
    """mpirun starts one launcher per 'node'; each takes its node rank from Open MPI's environment."""
    out = tmp_path / "mpirun"
    env = launcher_env(GPUS_PER_NODE=1, MASTER_ADDR="127.0.0.1", HF_DATASETS_CACHE=tmp_path / "datasets")
    exports = [
        arg
        for name in (
            "GPUS_PER_NODE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "PYTHON",
            "CUDA_VISIBLE_DEVICES",
            "HF_DATASETS_CACHE",
        )
        for arg in ("-x", name)
    ]
    command = [
        *argv("mpirun --allow-run-as-root --oversubscribe -np 2"),
        *exports,
        *argv(
            "{launcher} -m {model} -d {data} -o {out} --",
            launcher=FINETUNE / "finetune_lora_ds.sh",
            model=tiny_chat_model,
            data=DATA,
            out=out,
        ),
        *HALF_BATCH,
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert_ok(result)
    assert "[llmft] node 1 of 2" in result.stdout + result.stderr
    assert_same_run(lora_zero2_reference, out)


# --- combinations of the README's table not run by test_launchers.py ---------------------------------------------


def test_qlora_with_zero3_saves_a_complete_adapter(tiny_chat_model, tmp_path):
    out = tmp_path / "qlora-zero3"
    assert_ok(train("finetune_qlora_ds.sh", tiny_chat_model, out, "zero3", 2, *ONE_SAMPLE))
    assert_adapter_trained(tiny_chat_model, out)
    run = json.loads((out / "llmft_run.json").read_text())
    assert run["mode"] == "qlora" and run["base_quantization"]["method"] == "bitsandbytes"
    assert_reloads_and_generates(out)


def test_full_with_zero2_cpu_offload(tiny_chat_model, tmp_path):
    out = tmp_path / "full-zero2-offload"
    assert_ok(train("finetune_ds.sh", tiny_chat_model, out, "zero2_offload", 2, *ONE_SAMPLE))
    assert_full_model_trained(tiny_chat_model, out)
    assert_reloads_and_generates(out)


def test_base_model_with_added_chatml_tokens_under_zero3(tiny_base_model, tmp_path):
    """The ChatML tokens are added, and the embeddings and output head train in full (modules_to_save) while
    ZeRO-3 partitions them: the adapter must hold them whole, with the new tokens' rows trained."""
    from transformers import AutoTokenizer

    out = tmp_path / "base-zero3"
    result = train("finetune_lora_ds.sh", tiny_base_model, out, "zero3", 2, *ONE_SAMPLE)
    assert_ok(result)
    assert "added them; embeddings and lm_head will be resized and trained" in result.stderr
    base = load_file(str(tiny_base_model / "model.safetensors"))["model.embed_tokens.weight"]
    adapter = trained_tensors(out)
    embed = adapter["base_model.model.model.embed_tokens.weight"]
    assert embed.shape == base.shape and adapter["base_model.model.lm_head.weight"].shape == base.shape
    tokenizer = AutoTokenizer.from_pretrained(out)
    for token in ("<|im_start|>", "<|im_end|>"):
        row = tokenizer.convert_tokens_to_ids(token)
        assert not torch.equal(embed[row], base[row]), token  # in every sample: trained
    # the tiny model ties its output head to the embeddings; the trained copies stay one matrix
    assert torch.equal(adapter["base_model.model.lm_head.weight"], embed)
    assert_reloads_and_generates(out)


def test_lora_on_gptq_base_with_zero2(tiny_gptq_model, tmp_path):
    """The way the ZeRO-3 refusal below points to: ZeRO-2 leaves the packed weights whole on every rank."""
    out = tmp_path / "lora-on-gptq"
    assert_ok(train("finetune_lora_ds.sh", tiny_gptq_model, out, "zero2", 2, *ONE_SAMPLE))
    adapter = trained_tensors(out)
    assert adapter and all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    assert json.loads((out / "llmft_run.json").read_text())["base_quantization"] == {"method": "gptq"}
    assert_reloads_and_generates(out)


def test_lora_on_gptq_base_with_zero3_is_refused(tiny_chat_model, tmp_path):
    """Refused by the settings check on every rank, before the model loads: one message, exit status 2, no
    torchrun traceback, no output folder."""
    model = tmp_path / "gptq-model"
    shutil.copytree(tiny_chat_model, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"

    result = train("finetune_lora_ds.sh", model, out, "zero3", 2, "--max_steps", "1")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "LoRA on a GPTQ base cannot be sharded with ZeRO-3 or FSDP" in result.stderr
    assert "Traceback" not in result.stderr
    assert "llmft: stopped, rank" in result.stderr
    assert not out.exists()
