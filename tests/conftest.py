"""Shared fixtures and helpers: tiny models built once per test session, data files, an in-process finetune.py runner,
the checks of a saved run, and running the launchers in finetune/ on CPU ranks."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

from transformers import TrainerCallback  # noqa: E402  (after the settings above, which it reads on import)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "conversations.json"


# Skip reasons of the tests that need Open MPI or a Slurm cluster (tests/test_launchers.py, test_distributed.py)
SYSTEM_SKIP_WORDS = ("mpirun", "Slurm")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under LLMFT_REQUIRE_SYSTEM_TESTS=1 (.ci/run, after `make system-deps`), a test skipped for want of mpirun or
    Slurm fails instead: CI asked for them, so their absence is a broken set-up, not a reason to stay green."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("LLMFT_REQUIRE_SYSTEM_TESTS") == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(word in reason for word in SYSTEM_SKIP_WORDS):
            report.outcome = "failed"
            report.longrepr = f"LLMFT_REQUIRE_SYSTEM_TESTS=1 but this test was skipped: {reason}"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # keywords would also match a folder named gpu
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
    from llmft.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A tiny base model: no chat template, no ChatML tokens."""
    from llmft.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-base", chat=False)


@pytest.fixture(scope="session")
def tiny_gptq_model(tiny_chat_model, tmp_path_factory) -> Path:
    """The tiny chat model quantized to 4-bit GPTQ (group size 128) by tools/run_gptq.py."""
    from llmft.tools.quantize import run_gptq

    out = tmp_path_factory.mktemp("models") / "tiny-gptq"
    run_gptq(str(tiny_chat_model), str(EXAMPLES), out, bits=4, num_samples=16, eval_samples=4)
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """A HF tokenizer over Qwen's real vocabulary, with the ChatML template."""
    from llmft.tools.tiny_model import make_tokenizer

    return make_tokenizer("qwen", chat=True)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from llmft.tools.tiny_model import make_tokenizer

    return make_tokenizer("bpe", chat=True)


def argv(*parts: str, **values) -> list[str]:
    """Command-line arguments written as one types them: the parts joined by spaces and split as a POSIX shell splits
    them (shlex), then each `{name}` in an argument replaced by str(values[name]). Splitting comes first, so a path
    with spaces stays one argument; every `{name}` must have a value and every value a `{name}` (a typo fails here);
    other braces (JSON) are left as they are."""
    placeholder = re.compile(r"\{(\w+)\}")
    args = shlex.split(" ".join(parts))
    named = {name for arg in args for name in placeholder.findall(arg)}
    assert named == set(values), f"argv: placeholders {sorted(named)}, values {sorted(values)}"
    return [placeholder.sub(lambda m: str(values[m[1]]), arg) for arg in args]


def write_records(path: Path, records, jsonl: bool = False) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        else:
            json.dump(records, f, ensure_ascii=False)
    return path


def expected_from_pieces(encode, pieces) -> tuple[list[int], list[int]]:
    """ids and labels written out from (text, trained) pieces, each encoded on its own as inference encodes prompt and
    answer: the reference the renderer's output is compared with, token for token."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = encode(text)
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


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
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def assert_full_model_trained(base_dir: Path, out: Path) -> None:
    """A full fine-tune's save: every weight of the base, whole (not one rank's shard) and changed; an output head
    written beside tied embeddings (ZeRO-2's and FSDP's gathered saves do) is still the same matrix."""
    import torch
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    extra = set(trained) - set(base)
    assert extra <= {"lm_head.weight"}, extra
    if extra:
        assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])
    assert set(base) <= set(trained)
    assert all(trained[k].shape == v.shape for k, v in base.items())
    unchanged = [k for k in base if torch.equal(base[k].float(), trained[k].float())]
    assert not unchanged, unchanged


def assert_adapter_trained(base_dir: Path, out: Path) -> None:
    """A LoRA save over the (unquantized) base in base_dir: lora_A and lora_B for each of the 7 projections of every
    layer, whole — (r, in) and (out, r), not empty (ZeRO-3) nor one rank's shard (FSDP) — and trained (lora_B starts
    at zero)."""
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    r = json.loads((out / "adapter_config.json").read_text())["r"]
    targets = [k.removesuffix(".weight") for k in base if k.startswith("model.layers.") and k.endswith("_proj.weight")]
    assert len(targets) == 7 * sum(1 for k in base if k.endswith("self_attn.q_proj.weight"))
    assert len(adapter) == 2 * len(targets)
    for target in targets:
        out_features, in_features = base[target + ".weight"].shape
        lora_a = adapter[f"base_model.model.{target}.lora_A.weight"]
        lora_b = adapter[f"base_model.model.{target}.lora_B.weight"]
        assert lora_a.shape == (r, in_features) and lora_b.shape == (out_features, r), target
        assert lora_b.abs().sum() > 0, target


def assistant_token_loss(model_dir: Path, pairs: list[tuple[str, str]], **load) -> tuple[float, int]:
    """(mean cross-entropy, tokens scored) of a saved model over the assistant's tokens (its answer and its
    <|im_end|>) of single-turn (question, answer) conversations, worked out here from the chat template with plain
    transformers: an independent reference for the losses tools/run_gptq.py reports."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map={"": "cpu"}, **load)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    total, scored = 0.0, 0
    for question, answer in pairs:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True
        )["input_ids"]
        assert full[: len(prompt)] == prompt
        end = full.index(im_end, len(prompt))
        targets = torch.tensor(full[len(prompt) : end + 1])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits[len(prompt) - 1 : end], targets, reduction="sum").item()
        scored += len(targets)
    return total / scored, scored


# --- the launchers in finetune/, run as a user runs them -------------------------------------------------------

FINETUNE = REPO / "finetune"
DS_CONFIGS = REPO / "ds_configs"
LAUNCHERS = sorted(p.name for p in FINETUNE.glob("*.sh") if p.name != "common.sh")
DISTRIBUTED_LAUNCHERS = [name for name in LAUNCHERS if name.endswith("_ds.sh")]
SINGLE_LAUNCHERS = [name for name in LAUNCHERS if name.endswith("_single_gpu.sh")]
# A short run of the tiny model: 4 optimizer steps of 2 samples a rank, logged every step, nothing checkpointed.
TINY_RUN = (
    "--max_steps 4 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --model_max_length 128"
    " --learning_rate 1e-3 --warmup_steps 0 --logging_steps 1 --save_strategy no --seed 0"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**overrides) -> dict:
    """The environment of a CPU run: no GPU visible, this interpreter, no multi-node variables leaking in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "NNODES",
            "NODE_RANK",
            "GPUS_PER_NODE",
            "NPROC_PER_NODE",
            "HOSTFILE",
            "MODEL",
            "DATA",
            "USE_CPU",
            "MASTER_ADDR",
            "LLMFT_ENTRY",
            "LLMFT_COMPILE_CACHE",
            "TORCHINDUCTOR_CACHE_DIR",
            "TRITON_CACHE_DIR",
        )
        and not k.startswith(("OMPI_", "PMI_", "SLURM_"))
    }
    env.update(
        CUDA_VISIBLE_DEVICES="",
        PYTHON=sys.executable,
        MASTER_PORT=str(free_port()),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_launcher(name, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FINETUNE / name), *map(str, args)],
        env=env or launcher_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry_run(name, *args, **env) -> list[str]:
    """The command the launcher would run, as an argv list."""
    result = run_launcher(name, "--dry-run", *args, env=launcher_env(**env))
    assert result.returncode == 0, result.stderr
    command = [line for line in result.stderr.splitlines() if line.startswith("+ ")]
    assert len(command) == 1, result.stderr
    return shlex.split(command[0][2:])


def flag_value(argv: list[str], flag: str) -> str:
    """The value argparse would keep for `flag`: its last occurrence."""
    positions = [i for i, a in enumerate(argv) if a == flag]
    assert positions, f"{flag} not in {argv}"
    return argv[positions[-1] + 1]


def entry_args(argv: list[str]) -> list[str]:
    """The arguments after the entry script (finetune.py or a stand-in)."""
    entry = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    return argv[entry + 1 :]


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_records(
        tmp_path / "train.json", [chat_record("Who are you?", "I am Pico.", id=f"r{i}") for i in range(16)]
    )


# --- helpers shared by several test modules -------------------------------------------------------------------------

ANSWER = "I am Pico, trained by llmft."


# A short LoRA run of a tiny model on the bundled examples: on the CPU, samples batched per sample (no token budget),
# seed 0, nothing reported. argv() fills {model} and {out}; flags after it override.
TINY_LORA = (
    f"--model_name_or_path {{model}} --data_path {shlex.quote(str(EXAMPLES))} --output_dir {{out}} --use_cpu True"
    " --use_lora True --model_max_length 128 --max_tokens_per_batch 0 --report_to none --seed 0"
)

# A short run at a constant learning rate, logged every step, nothing saved on the way, nothing reported; argv()
# fills {model}, {data} and {out}; the caller says how many steps at which learning rate.
TRAIN = (
    "--model_name_or_path {model} --data_path {data} --output_dir {out} --per_device_train_batch_size 4"
    " --lr_scheduler_type constant --logging_steps 1 --save_strategy no --seed 0 --report_to none"
)


def run_script(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    """finetune.py in a subprocess, as a user runs it, with a datasets cache under tmp_path."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets-cache"),
    )
    return subprocess.run(
        [sys.executable, "finetune.py", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_loss_falls(trainer, factor=0.85):
    losses = logged_losses(trainer)
    assert len(losses) >= 5
    assert sum(losses[-3:]) / 3 < factor * sum(losses[:3]) / 3, losses


def sample_inputs(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who are you?"}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


class SignalAtStep(TrainerCallback):
    """Sends this process `sig` at the end of optimizer step `step`, as a scheduler would from outside."""

    def __init__(self, step: int, sig=signal.SIGTERM):
        self.step, self.sig = step, sig

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def finetune(*args, callbacks=()):
    """finetune.py's main() in this process with these flags (any types), and extra Trainer callbacks."""
    import finetune as entry

    return entry.main([str(a) for a in args], callbacks=list(callbacks))


EQUIVALENCE_DATA = REPO / "examples" / "conversations.json"  # conversations of different lengths: token averaging
EQUIVALENCE_STEPS = 4


# A short, deterministic run that saves its trainer state at the last step: micro-batches of {batch} samples, or with
# a {max_tokens} budget of up to that many packed tokens (the launchers' recipe), {accumulation} of them a step.
EQUIVALENCE_RUN = (
    f"--max_steps {EQUIVALENCE_STEPS} --per_device_train_batch_size {{batch}} --max_tokens_per_batch {{max_tokens}}"
    " --gradient_accumulation_steps {accumulation} --model_max_length 128 --learning_rate 1e-3 --warmup_steps 0"
    " --weight_decay 0 --lora_dropout 0 --gradient_checkpointing False --logging_steps 1 --save_strategy steps"
    f" --save_steps {EQUIVALENCE_STEPS} --seed 0"
)


def train_with_launcher(
    launcher: str,
    model: Path,
    out: Path,
    config: str | None,
    ranks_per_node: int,
    *extra: str,
    nodes: int = 1,
    data: Path = EQUIVALENCE_DATA,
) -> subprocess.CompletedProcess:
    """Run `launcher` on this machine as `nodes` nodes of `ranks_per_node` CPU ranks (one launcher process per
    node, as on a cluster); returns node 0's process, after every node has finished."""
    args = ["-m", model, "-d", data, "-o", out, *(["--deepspeed", config] if config else []), "--", *extra]
    env = launcher_env(GPUS_PER_NODE=ranks_per_node, HF_DATASETS_CACHE=out.parent / f"{out.name}-datasets")
    if nodes == 1:
        return run_launcher(launcher, *args, env=env, timeout=1200)
    env.update(NNODES=str(nodes), MASTER_ADDR="127.0.0.1")
    processes = [
        subprocess.Popen(
            [str(FINETUNE / launcher), *map(str, args)],
            cwd=REPO,
            text=True,
            env={**env, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(nodes)
    ]
    results = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=1200)) for p in processes]
    for process, result in zip(processes, results):
        result.returncode = process.returncode
    assert all(r.returncode == 0 for r in results), "\n".join(r.stderr[-4000:] for r in results)
    return results[0]
