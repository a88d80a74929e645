"""The GPU benchmark's own set-up, run on the CPU: the random model and the log-normal data it measures on.

The measurements themselves need a GPU (tools/run_benchmarks.sh); what is checked here is that the benchmark builds
what it says it builds, so a GPU call is never spent on an import error."""

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transformers import AutoModelForCausalLM, AutoTokenizer

import torch

from llmft.tools.bench import SHAPES, fresh_compile_cache, lognormal_lengths, parse_lengths, prepare
from tests.conftest import argv

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prepare_builds_the_shape_and_the_data(tmp_path):
    model_dir, data = prepare(tmp_path, "tiny", samples=200, median=120, sigma=0.8, cap=512)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shape = SHAPES["tiny"]
    assert model.config.hidden_size == shape["hidden_size"]
    assert model.config.num_hidden_layers == shape["num_layers"]
    assert model.config.num_key_value_heads == shape["num_kv_heads"]
    assert len(tokenizer) > 150_000  # Qwen's real vocabulary, not the tiny BPE
    assert "<|im_end|>" in tokenizer.get_vocab()
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(records) == 200
    assert [turn["from"] for turn in records[0]["conversations"]] == ["user", "assistant"]
    # prepare() reuses what is there: the second call builds nothing new
    written = {path: path.stat().st_mtime_ns for path in [data, *model_dir.iterdir()]}
    assert prepare(tmp_path, "tiny", samples=200, median=120, sigma=0.8, cap=512) == (model_dir, data)
    assert {path: path.stat().st_mtime_ns for path in [data, *model_dir.iterdir()]} == written


def test_lengths_are_log_normal_and_capped():
    lengths = lognormal_lengths(5000, median=400, sigma=0.8, cap=2048)
    assert max(lengths) == 2048 and min(lengths) >= 32
    assert 370 <= statistics.median(lengths) <= 430
    assert sum(length == 2048 for length in lengths) > 0  # a long tail reaching the cap


@pytest.mark.slow
def test_fixed_lengths_give_long_samples_of_that_length(tmp_path):
    """--lengths fixed:N: every conversation renders to about N tokens (of at most N), for how long one sample can be."""
    model_dir, data = prepare(tmp_path, "tiny", samples=3, median=400, sigma=0.8, cap=2048, fixed=3000)
    assert data.name == "chat-3-fixed-3000.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for line in data.read_text().splitlines():
        turns = json.loads(line)["conversations"]
        messages = [{"role": t["from"], "content": t["value"]} for t in turns]
        length = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        assert 2950 <= length <= 3000, length
    assert parse_lengths("lognormal") is None and parse_lengths("fixed:32768") == 32768
    for bad in ("fixed", "fixed:x", "fixed:10", "uniform:100"):
        with pytest.raises(Exception, match="lognormal, or fixed:N"):
            parse_lengths(bad)


def test_cold_arm_starts_with_empty_compile_caches(tmp_path):
    stale = tmp_path / "cold-compile-cache-llmft-run" / "inductor" / "kernel.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("compiled earlier")
    env = fresh_compile_cache(tmp_path, "llmft-run")
    folder = tmp_path / "cold-compile-cache-llmft-run"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
    assert env["TRITON_CACHE_DIR"] == str(folder / "triton")
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.slow
def test_benchmark_runs_both_arms_end_to_end_on_cpu(tmp_path):
    """tools/benchmark.py as the GPU suite runs it, on the tiny shape: both arms train and report."""
    results = tmp_path / "results.jsonl"
    command = argv(
        "{python} {benchmark} --shape tiny --workdir {tmp_path} --steps 3 --warmup 1 --samples 200",
        "--median 100 --max_length 256 --compare --results {results} -- --use_cpu True --use_lora True",
        "--max_tokens_per_batch 1024 --model_max_length 256 --learning_rate 1e-4",
        python=sys.executable,
        benchmark=REPO / "tools" / "benchmark.py",
        tmp_path=tmp_path,
        results=results,
    )
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    arms = {r["arm"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(arms) == {"llmft", "plain"}
    assert arms["llmft"]["steps"] == arms["plain"]["steps"] == 2  # steps after the warm-up
    assert 900 <= arms["llmft"]["tokens_per_step"] <= 1024  # packed micro-batches fill the token budget
    assert arms["plain"]["padding_share"] > 0.1 > arms["llmft"]["padding_share"]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_a_stopped_benchmark_stops_its_arm(tmp_path):
    """SIGTERM to the benchmark (what `timeout` or a scheduler sends) ends the arm it is running too: an arm left
    training would keep the GPU, and the pipe a caller reads the results from, busy."""
    workdir = tmp_path / "bench-stopped"
    command = argv(
        "{python} {benchmark} --shape tiny --workdir {workdir} --steps 400 --warmup 1 --samples 200",
        "--median 100 --max_length 256 -- --use_cpu True --max_tokens_per_batch 1024 --model_max_length 256",
        python=sys.executable,
        benchmark=REPO / "tools" / "benchmark.py",
        workdir=workdir,
    )
    bench = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not [p for p in _processes_mentioning(str(workdir)) if p != bench.pid]:
        time.sleep(0.5)
    arms = [p for p in _processes_mentioning(str(workdir)) if p != bench.pid]
    assert arms, "the arm never started"
    time.sleep(3)
    bench.terminate()
    assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while time.time() < deadline and _processes_mentioning(str(workdir)):
        time.sleep(0.5)
    assert _processes_mentioning(str(workdir)) == []


@pytest.mark.slow
def test_cold_start_and_a_launcher_end_to_end_on_cpu(tmp_path):
    """--cold --end_to_end: the finetune.py arm and a launcher's whole command, each from empty compile caches, report
    their first optimizer step beside the whole run, from the run report they wrote."""
    results = tmp_path / "results.jsonl"
    command = [
        sys.executable,
        str(REPO / "tools" / "benchmark.py"),
        *("--shape", "tiny", "--workdir", str(tmp_path), "--steps", "3", "--warmup", "1", "--samples", "200"),
        *("--median", "100", "--max_length", "256", "--cold", "--end_to_end", "finetune_lora_single_gpu.sh"),
        *("--results", str(results), "--"),
        *("--use_cpu", "True", "--use_lora", "True", "--max_tokens_per_batch", "1024", "--learning_rate", "1e-4"),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    arms = {r["arm"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(arms) == {"llmft", "end-to-end"}
    measured, whole = arms["llmft"], arms["end-to-end"]
    assert measured["cold_cache"] and whole["cold_cache"]
    assert measured["first_step_s"] > 0 and measured["run_tokens_per_s_after_first_step"] > 0
    assert whole["launcher"] == "finetune_lora_single_gpu.sh" and whole["steps"] == 3
    assert 0 < whole["first_step_s"] < whole["command_s"]
    assert whole["run_tokens_per_s"] > 0 and whole["run_tokens_per_s_after_first_step"] > 0
    for name in ("llmft-run", "end-to-end-run"):  # each arm's caches: emptied before it started
        assert (tmp_path / f"cold-compile-cache-{name}").is_dir()
    assert "end-to-end finetune_lora_single_gpu.sh:" in done.stdout


def test_a_launcher_that_is_not_there_is_refused_before_anything_runs(tmp_path, capsys):
    """The launcher arm needs a checkout's finetune/ launchers; an installed wheel has none."""
    from llmft.tools.bench import main

    with pytest.raises(SystemExit) as info:
        main(["--workdir", str(tmp_path), "--launcher", "no_such_launcher.sh"])
    assert info.value.code == 2
    assert "--launcher no_such_launcher.sh: no such launcher in" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no model or data prepared


def test_the_clock_stops_at_the_last_step_not_after_the_end_of_training_callbacks():
    """What runs once training ends (the run report, its plot) is not counted as time of the timed steps."""
    from types import SimpleNamespace

    import torch
    from transformers import TrainerControl, TrainerState

    from llmft.tools.bench import Meter

    class Counter:  # TrainingTokenCounter's interface, fed by hand: [seen, processed, trained] since the last take
        def __init__(self) -> None:
            self.counts = torch.zeros(3, dtype=torch.long)

        def take(self, device: str) -> torch.Tensor:
            counts, self.counts = self.counts, torch.zeros(3, dtype=torch.long)
            return counts

        def remove(self) -> None:
            pass

    meter, args = Meter(warmup=1), SimpleNamespace(device="cpu")
    meter.tokens = Counter()
    meter.tokens.counts += torch.tensor([7, 9, 5])  # the warm-up step's tokens, not timed
    state, control = TrainerState(global_step=1, max_steps=3), TrainerControl()
    meter.on_step_begin(args, state, control)
    for step in (2, 3):
        meter.tokens.counts += torch.tensor([100, 128, 60])
        state.global_step = step
        meter.on_step_end(args, state, control)
    time.sleep(0.5)  # the end of training's own work
    meter.on_train_end(args, state, control)
    assert meter.seconds < 0.5 and meter.steps == 2
    assert (meter.real_tokens, meter.computed_tokens) == (200, 256)


# --- preference data (--objective) ---------------------------------------------------------------------------------


def test_pair_data_has_log_normal_sides_and_its_sft_twin_holds_the_same_sequences(tmp_path):
    """--objective: pairs whose sides render to the drawn log-normal lengths, read by llmft's pair parser; the sft
    arm's file holds each side as a conversation that renders to the very same tokens."""
    from llmft.data.preference import parse_preference_record, render_pair
    from llmft.data.records import parse_record
    from llmft.data.render import render_samples
    from llmft.tools.bench import sides_path

    model_dir, data = prepare(tmp_path, "tiny", samples=12, median=120, sigma=0.8, cap=512, pairs=True)
    assert data.name == "pairs-12-lognormal-120-0.8-512.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = [parse_preference_record(json.loads(line)) for line in data.read_text().splitlines()]
    sides = [parse_record(json.loads(line)) for line in sides_path(data).read_text().splitlines()]
    assert len(pairs) == 12 and len(sides) == 24
    drawn = lognormal_lengths(24, median=120, sigma=0.8, cap=512 - 16)
    for i, pair in enumerate(pairs):
        rendered = render_pair(pair, tokenizer)
        for k, side in enumerate((rendered.chosen, rendered.rejected)):
            assert abs(len(side.input_ids) - drawn[2 * i + k]) <= 2, (i, k)
            (twin,) = render_samples(sides[2 * i + k], tokenizer)
            assert (twin.input_ids, twin.labels) == (side.input_ids, side.labels)
    assert {len(p.prompt[0].content.split()) for p in pairs} != {2}  # prompts grow with the sides


def test_the_sft_arm_gets_the_flags_without_the_preference_settings():
    from llmft.tools.bench import without_preference_flags

    flags = ["--use_lora", "True", "--beta", "0.2", "--loss_type=ipo", "--max_tokens_per_batch", "1024"]
    assert without_preference_flags(flags) == ["--use_lora", "True", "--max_tokens_per_batch", "1024"]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_what_the_counter_counts_of_a_preference_micro_batch(tiny_chat_model, objective):
    """The benchmark's and the run report's TrainingTokenCounter on preference training: the sequences the policy's
    forward with gradients sees (both sides of each pair; KTO's examples), not the reference's nor KTO's KL row."""
    from transformers import AutoModelForCausalLM

    from llmft.args import PreferenceArguments
    from llmft.data.preference import (
        KtoPackedCollator,
        PairPackedCollator,
        parse_kto_record,
        parse_preference_record,
        render_kto_example,
        render_pair,
        with_kl_sequences,
    )
    from llmft.objectives.forward import micro_batch_loss
    from llmft.report import TrainingTokenCounter

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    records = [
        {"prompt": "Who are you?", "chosen": "I am Pico.", "rejected": "No idea at all, sorry."},
        {"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "Go away."},
    ]
    if objective == "dpo":
        rows = [render_pair(parse_preference_record(r), tokenizer).features() for r in records]
        for row in rows:  # a full fine-tune's reference, computed before training
            row["ref_chosen_logps"], row["ref_rejected_logps"] = -30.0, -40.0
        batch = PairPackedCollator()(rows)
        tokens = sum(len(row[f"{side}_input_ids"]) for row in rows for side in ("chosen", "rejected"))
    else:
        examples = [e for r in records for e in parse_kto_record(r)]
        rows = with_kl_sequences([render_kto_example(e, tokenizer) for e in examples], block=4)
        for row in rows:
            row["ref_logps"], row["ref_kl_logps"] = -30.0, -35.0
        batch = KtoPackedCollator()(rows)
        tokens = sum(len(row["input_ids"]) for row in rows)
        assert batch["kl_input_ids"].numel() > 0
    counter = TrainingTokenCounter(model, tokenizer.pad_token_id)
    model.train()
    loss, _ = micro_batch_loss(model, batch, PreferenceArguments(objective=objective))
    seen, processed, _ = counter.take(torch.device("cpu")).tolist()
    assert seen == processed == tokens == batch["input_ids"].numel()
    assert torch.isfinite(loss)


BENCH_PAIRS = (
    *("--shape", "tiny", "--steps", "2", "--warmup", "1", "--samples", "100", "--median", "100"),
    *("--max_length", "256", "--objective", "dpo"),
)
BENCH_PAIR_FLAGS = ("--use_cpu", "True", "--use_lora", "True", "--max_tokens_per_batch", "1024", "--beta", "0.2")


@pytest.mark.slow
def test_preference_benchmark_runs_the_sft_baseline_and_trl_on_cpu(tmp_path):
    """--objective dpo --compare: llmft's SFT on the pairs' sequences and TRL's DPOTrainer on the pairs, both
    counting chosen and rejected tokens; TRL's padded batches show their padding."""
    results = tmp_path / "results.jsonl"
    command = [sys.executable, str(REPO / "tools" / "benchmark.py"), *BENCH_PAIRS, "--workdir", str(tmp_path)]
    command += ["--compare", "--no_llmft", "--results", str(results), "--", *BENCH_PAIR_FLAGS]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    arms = {r["arm"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(arms) == {"sft", "trl"}
    assert arms["sft"]["objective"] == "sft" and arms["trl"]["objective"] == "dpo"
    assert arms["sft"]["steps"] == arms["trl"]["steps"] == 1
    assert 900 <= arms["sft"]["tokens_per_step"] <= 1024
    assert arms["trl"]["padding_share"] > 0.1 > arms["sft"]["padding_share"]
    assert "vs sft" in done.stdout


def finetune_has_objective() -> bool:
    import inspect

    import llmft.config

    return "PreferenceArguments" in inspect.getsource(llmft.config)


@pytest.mark.slow
@pytest.mark.skipif(not finetune_has_objective(), reason="finetune.py does not parse --objective on this branch")
def test_preference_benchmark_runs_llmft_dpo_on_cpu(tmp_path):
    """The llmft arm trains DPO through finetune.py, counting both sides of each pair, packed without padding."""
    results = tmp_path / "results.jsonl"
    command = [sys.executable, str(REPO / "tools" / "benchmark.py"), *BENCH_PAIRS, "--workdir", str(tmp_path)]
    command += ["--results", str(results), "--", *BENCH_PAIR_FLAGS]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    arms = {r["arm"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(arms) == {"llmft", "sft"}
    assert arms["llmft"]["objective"] == "dpo"
    assert 700 <= arms["llmft"]["tokens_per_step"] <= 1024 and arms["llmft"]["padding_share"] < 0.1


def test_preference_benchmark_flags_that_do_not_fit_are_refused(tmp_path, capsys):
    from llmft.tools.bench import main

    for flags, message in (
        ("--objective kto --compare", "the TRL arm runs DPOTrainer"),
        ("--objective dpo -- --objective dpo", "give --objective before --"),
        ("--objective dpo --launcher finetune_lora_single_gpu.sh", "measure SFT recipes"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv("--workdir {workdir}", flags, workdir=tmp_path))
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
