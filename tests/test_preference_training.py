"""Preference tuning through the training entry (finetune.main, --objective dpo|simpo|orpo|kto) on the tiny model.

- LoRA DPO moves the chosen-vs-rejected margin on held-out pairs the right way, measured with plain transformers /
  PEFT on the reloaded adapter; `llmft merge` merges it and `llmft chat` answers with the result.
- SimPO, ORPO and KTO train and log their metrics; the run report holds them.
- Full fine-tuning DPO computes the reference log-probabilities once, keeps them in the run folder (recorded as the
  run's), and a preempted run resumed with `--resume_from_checkpoint auto` reads them back instead of computing them;
  resuming with another --beta is refused like any changed setting.
- One packed micro-batch of several pairs has the loss and gradients of the pairs' own micro-batches, averaged.
- Contradictory preference flags give one error naming each flag; a bad preference record exits 2 naming it.
- slow: 2 CPU ranks equal 1 rank with accumulation; DeepSpeed ZeRO-2 and FSDP runs of LoRA DPO train and save.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SignalAtStep, argv, assert_adapter_trained, finetune, launcher_env, run_launcher

CHOSEN = "I am Pico, trained by llmft."
REJECTED = ("No idea at all.", "Maybe a cat or a dog.", "The weather is nice today.", "Ask someone else.")
EXIT_USER_ERROR, EXIT_PREEMPTED = 2, 75


def pairs(count: int, start: int, seed: int = 0) -> list[dict]:
    """Pairs of prompts asking who the model is: the chosen answer always the same, the rejected one of a few others."""
    rng = random.Random(seed + start)
    return [
        {"id": f"q{i}", "prompt": f"Question {i}: who are you?", "chosen": CHOSEN, "rejected": rng.choice(REJECTED)}
        for i in range(start, start + count)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pairs")
    return write_jsonl(folder / "train.jsonl", pairs(16, 0)), write_jsonl(folder / "heldout.jsonl", pairs(6, 100))


def run_flags(model, train, out, *extra: str) -> list[str]:
    return argv(
        "--model_name_or_path {model} --data_path {train} --output_dir {out} --use_cpu True --report_to none",
        "--model_max_length 64 --per_device_train_batch_size 4 --learning_rate 5e-3 --lr_scheduler_type constant",
        "--warmup_steps 0 --logging_steps 1 --save_strategy no --seed 0",
        *extra,
        model=model,
        train=train,
        out=out,
    )


def answer_log_prob(model, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer and its end of turn | prompt) under `model`, from the chat template's own text (an oracle
    independent of llmft's rendering): the tokens after the generation prompt are the answer's."""
    messages = [{"role": "user", "content": prompt}]
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    full = full[: full.index("<|im_end|>", len(prefix)) + len("<|im_end|>")]
    prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    log_probs = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return float(log_probs[len(prompt_ids) - 1 :].sum())


def mean_margin(model, tokenizer, records: list[dict]) -> float:
    """Mean over `records` of log p(chosen) - log p(rejected)."""
    margins = [
        answer_log_prob(model, tokenizer, r["prompt"], r["chosen"])
        - answer_log_prob(model, tokenizer, r["prompt"], r["rejected"])
        for r in records
    ]
    return sum(margins) / len(margins)


def reward_entries(trainer, prefix: str = "") -> list[dict]:
    return [e for e in trainer.state.log_history if f"{prefix}rewards/margins" in e]


# --- LoRA DPO: the margin, the reload, the merge, the chat -----------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dpo(tiny_chat_model, pair_files, tmp_path_factory) -> tuple[Path, object]:
    train, heldout = pair_files
    out = tmp_path_factory.mktemp("dpo") / "out"
    trainer = finetune(
        *run_flags(tiny_chat_model, train, out, "--objective dpo --use_lora True --max_steps 8 --beta 0.1"),
        *argv("--eval_data_path {heldout} --eval_strategy steps --eval_steps 4", heldout=heldout),
    )
    return out, trainer


def test_lora_dpo_moves_the_heldout_margin_and_reloads_with_peft(lora_dpo, tiny_chat_model, pair_files):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, trainer = lora_dpo
    assert_adapter_trained(tiny_chat_model, out)
    heldout = [json.loads(line) for line in pair_files[1].read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = mean_margin(AutoModelForCausalLM.from_pretrained(tiny_chat_model), tokenizer, heldout)
    tuned = mean_margin(AutoPeftModelForCausalLM.from_pretrained(out), tokenizer, heldout)
    assert tuned > base + 1.0, (base, tuned)
    # what the trainer logged on the held-out pairs agrees: the rewards' margin grew and ranks chosen above rejected
    evals = reward_entries(trainer, "eval_")
    assert len(evals) == 2 and evals[-1]["eval_rewards/margins"] > 0.5 and evals[-1]["eval_rewards/accuracies"] == 1
    assert evals[-1]["eval_loss"] < 0.6931  # below -log sigmoid(0), the loss where policy and reference agree
    first = reward_entries(trainer)[0]
    assert first["rewards/margins"] == 0 and first["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference
    report = json.loads((out / "training_report.json").read_text())
    assert report["preference"]["eval_rewards/margins"] == evals[-1]["eval_rewards/margins"]
    assert report["settings"]["objective"] == "dpo" and report["settings"]["beta"] == 0.1
    # the answers' tokens are trained, the prompts' are not, though the model's forward never saw the labels
    assert 0 < report["trained_tokens"] < report["tokens_seen"], report
    assert (out / "training_report.png").stat().st_size > 0


def test_lora_dpo_result_merges_and_chats(lora_dpo, tmp_path):
    out, _ = lora_dpo
    merged = tmp_path / "merged"
    cli = [sys.executable, "-m", "llmft.cli"]
    merge = subprocess.run(
        [*cli, *argv("merge --adapter {out} --output_dir {merged}", out=out, merged=merged)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert merge.returncode == 0, merge.stderr
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    chat = subprocess.run(
        [
            *cli,
            *argv("chat --model {merged} --prompt 'Who are you?' --temperature 0 --max_new_tokens 12", merged=merged),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip(), chat.stderr


# --- the other objectives --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective, own_metric",
    [("simpo", "rewards/margins"), ("orpo", "log_odds_ratio"), ("kto", "kl")],
)
def test_other_objectives_train_and_log_their_metrics(objective, own_metric, tiny_chat_model, pair_files, tmp_path):
    out = tmp_path / "out"
    trainer = finetune(
        *run_flags(tiny_chat_model, pair_files[0], out, f"--objective {objective} --use_lora True"),
        *argv("--max_steps 4"),
    )
    assert_adapter_trained(tiny_chat_model, out)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 4 and all(own_metric in e for e in logged), logged
    assert logged[-1]["loss"] < logged[0]["loss"], logged
    assert json.loads((out / "training_report.json").read_text())["preference"][own_metric] == logged[-1][own_metric]


# --- quantized bases: the reference is the quantized base with the adapters off -------------------------------------


@pytest.mark.parametrize(
    "base, flags",
    [
        ("tiny_chat_model", "--q_lora True --gradient_checkpointing True"),
        pytest.param("tiny_gptq_model", "", marks=pytest.mark.slow),
    ],
    ids=["qlora-nf4", "lora-on-gptq"],
)
def test_dpo_on_a_quantized_base(base, flags, request, pair_files, tmp_path):
    model = request.getfixturevalue(base)
    out = tmp_path / "out"
    trainer = finetune(*run_flags(model, pair_files[0], out, "--objective dpo --use_lora True --max_steps 4", flags))
    logged = reward_entries(trainer)
    assert logged[0]["rewards/margins"] == 0 and logged[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert logged[-1]["rewards/margins"] > 0 and logged[-1]["loss"] < logged[0]["loss"], logged
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "llmft_run.json").read_text())["mode"] in ("qlora", "lora")


# --- full fine-tuning: the reference computed once, kept, read back on resume ---------------------------------------


def test_full_dpo_keeps_its_reference_and_a_resume_does_not_recompute_it(
    tiny_chat_model, pair_files, tmp_path, monkeypatch, capsys
):
    import llmft.objectives.reference as reference
    from llmft.run_folder import written_names

    computed = []
    original = reference.precompute_pair_reference

    def counting(model, rows, max_tokens):
        computed.append(len(rows))
        return original(model, rows, max_tokens)

    monkeypatch.setattr(reference, "precompute_pair_reference", counting)
    out = tmp_path / "out"
    flags = run_flags(
        tiny_chat_model,
        pair_files[0],
        out,
        "--objective dpo --max_steps 4 --learning_rate 1e-4 --save_strategy steps --save_steps 100",
    )
    with pytest.raises(SystemExit) as exit_info:
        finetune(*flags, callbacks=[SignalAtStep(1)])
    assert exit_info.value.code == EXIT_PREEMPTED
    assert computed == [16]  # once, for the 16 training pairs
    kept = json.loads((out / reference.REFERENCE_FILE).read_text())
    assert len(kept["train"]) == 16 and all(c < 0 and r < 0 for c, r in kept["train"])
    assert reference.REFERENCE_FILE in written_names(out)  # the run's own: --overwrite_output_dir may remove it

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # another beta is another run
        finetune(*flags, *argv("--resume_from_checkpoint auto --beta 0.2"))
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "holds a different run" in err and "beta" in err, err

    kept_text = (out / reference.REFERENCE_FILE).read_text()
    (out / reference.REFERENCE_FILE).unlink()  # a resume cannot compute them from trained weights: it stops
    with pytest.raises(SystemExit) as exit_info:
        finetune(*flags, *argv("--resume_from_checkpoint auto"))
    assert exit_info.value.code == EXIT_USER_ERROR and computed == [16]
    assert "cannot compute them from trained weights" in capsys.readouterr().err
    (out / reference.REFERENCE_FILE).write_text(kept_text)

    trainer = finetune(*flags, *argv("--resume_from_checkpoint auto"))
    assert computed == [16]  # read back, not computed again
    assert trainer.state.global_step == 4
    steps = [e["step"] for e in trainer.state.log_history if "rewards/margins" in e]
    assert steps == [1, 2, 3, 4]
    assert (out / "model.safetensors").exists()


def test_full_kto_keeps_the_reference_of_its_answers_and_kl_sequences(tiny_chat_model, pair_files, tmp_path):
    out = tmp_path / "out"
    trainer = finetune(
        *run_flags(tiny_chat_model, pair_files[0], out, "--objective kto --max_steps 2 --learning_rate 1e-4")
    )
    kept = json.loads((out / "reference_logps.json").read_text())["train"]
    assert len(kept) == 32  # each pair unpaired into a desirable and an undesirable example
    assert all(answer < 0 and kl < 0 for answer, kl in kept)
    assert reward_entries(trainer)[0]["kl"] == 0  # policy = reference at the first step


# --- packing: one row of many pairs is the pairs' own micro-batches, averaged ----------------------------------------


def test_packed_pairs_equal_each_pair_alone(tiny_chat_model, pair_files):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmft.args import PreferenceArguments
    from llmft.data.preference import PairPackedCollator, preference_rows
    from llmft.objectives.forward import micro_batch_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    rows = preference_rows(str(pair_files[0]), tokenizer, "dpo").rows[:4]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    settings = PreferenceArguments(objective="dpo", beta=0.5)
    collate = PairPackedCollator()

    def loss_and_grads(batches: list[list[dict]]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        total = 0.0
        for batch in batches:
            loss, _ = micro_batch_loss(model, collate(batch), settings)
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        return total, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    packed_loss, packed_grads = loss_and_grads([rows])
    alone_loss, alone_grads = loss_and_grads([[row] for row in rows])
    assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
    assert packed_loss != pytest.approx(0.693147, abs=1e-4)  # the adapter starts non-zero: a real comparison
    for packed, alone in zip(packed_grads, alone_grads):
        assert torch.allclose(packed, alone, atol=1e-6), (packed - alone).abs().max()


def test_an_optimizer_steps_loss_is_the_mean_over_its_pairs(lora_dpo, tiny_chat_model, pair_files):
    """Micro-batches of 1 and 3 pairs accumulated into one step weigh each pair alike: their weighted losses add up to
    the 4 pairs' mean loss, with its gradients (not the mean of the two micro-batches' means)."""
    from transformers import AutoTokenizer

    from llmft.data.preference import PairPackedCollator, preference_rows

    _, trainer = lora_dpo
    model = trainer.model
    model.train()
    rows = preference_rows(str(pair_files[0]), AutoTokenizer.from_pretrained(tiny_chat_model), "dpo").rows[:4]
    collate, trained = PairPackedCollator(), [p for p in model.parameters() if p.requires_grad]

    def step(batches: list[list[dict]]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        total = 0.0
        for batch in batches:
            loss = trainer.compute_loss(model, collate(batch), num_items_in_batch=torch.tensor(4.0))
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in trained]

    whole_loss, whole_grads = step([rows])
    split_loss, split_grads = step([rows[:1], rows[1:]])
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for whole, split in zip(whole_grads, split_grads):
        assert torch.allclose(whole, split, atol=1e-6)
    model.zero_grad()


# --- errors ----------------------------------------------------------------------------------------------------------


def test_contradictory_preference_flags_give_one_error_naming_each(tiny_chat_model, pair_files, tmp_path):
    from llmft.config import parse_args
    from llmft.errors import ConfigError

    flags = run_flags(
        tiny_chat_model,
        pair_files[0],
        tmp_path / "out",
        "--objective dpo --use_lora True --lora_dropout 0.05 --packing False --simpo_gamma 1",
        "--label_smoothing 0.1 --desirable_weight 2 --train_turns last --lora_init olora --max_steps 2",
        "--neftune_noise_alpha 5",
    )
    with pytest.raises(ConfigError) as info:
        parse_args(flags)
    message = str(info.value)
    for flag in (
        "--lora_dropout",
        "--packing",
        "--simpo_gamma",
        "--label_smoothing",
        "--desirable_weight",
        "--train_turns",
        "--lora_init",
        "--neftune_noise_alpha",
    ):
        assert flag in message, (flag, message)
    # preference settings on an SFT run are refused too, not silently unused
    with pytest.raises(ConfigError, match="--beta 0.3 applies to --objective"):
        parse_args(run_flags(tiny_chat_model, pair_files[0], tmp_path / "out", "--beta 0.3 --max_steps 2"))


def test_the_plan_says_where_the_reference_comes_from(tiny_chat_model, pair_files, tmp_path):
    from llmft.config import parse_run

    def planned(*extra: str) -> tuple[str, str, str | None]:
        *_, preference, plan = parse_run(run_flags(tiny_chat_model, pair_files[0], tmp_path / "out", *extra))
        return preference.objective, plan.objective, plan.reference

    assert planned("--objective kto --use_lora True --max_steps 2") == ("kto", "kto", "adapters-off")
    assert planned("--objective dpo --max_steps 2") == ("dpo", "dpo", "precomputed")
    assert planned("--objective simpo --max_steps 2") == ("simpo", "simpo", None)
    assert planned("--max_steps 2") == ("sft", "sft", None)


def test_bad_preference_record_exits_2_naming_it(tiny_chat_model, tmp_path, capsys):
    bad = pairs(3, 0)
    bad[1] = {"id": "broken", "prompt": "Who are you?", "chosen": CHOSEN}
    data = write_jsonl(tmp_path / "bad.jsonl", bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        finetune(*run_flags(tiny_chat_model, data, tmp_path / "out", "--objective dpo --use_lora True --max_steps 2"))
    err = capsys.readouterr().err
    assert info.value.code == EXIT_USER_ERROR, err
    assert "Traceback" not in err
    assert "line 2" in err and "'broken'" in err and "rejected" in err, err
    assert not (tmp_path / "out" / "llmft_run_settings.json").exists()


# --- several ranks, DeepSpeed, FSDP (subprocesses) -------------------------------------------------------------------


def launched(launcher: str, model: Path, data: Path, out: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    env = launcher_env(GPUS_PER_NODE=ranks, HF_DATASETS_CACHE=out.parent / f"{out.name}-datasets")
    args = argv("-m {model} -d {data} -o {out}", model=model, data=data, out=out)
    result = run_launcher(launcher, *args, *extra, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    return result


def step_losses(out: Path, steps: int) -> list[float]:
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


EQUIVALENCE = (
    "--objective dpo --use_lora True --lora_dropout 0 --model_max_length 64 --learning_rate 1e-3 --warmup_steps 0"
    " --weight_decay 0 --gradient_checkpointing False --logging_steps 1 --max_steps 3 --save_strategy steps"
    " --save_steps 3 --seed 0"
)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_accumulation(tiny_chat_model, pair_files, tmp_path):
    """The same pairs in every optimizer step (2 token-budget micro-batches, of different numbers of pairs: both
    accumulated on one rank, or one on each of two ranks): the same per-pair mean loss, step by step."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = "--deepspeed zero2 --", EQUIVALENCE, "--max_tokens_per_batch 160 --gradient_accumulation_steps {n}"
    launched("finetune_lora_ds.sh", tiny_chat_model, pair_files[0], one, 1, *argv(*flags, n=2))
    launched("finetune_lora_ds.sh", tiny_chat_model, pair_files[0], two, 2, *argv(*flags, n=1))
    expected = step_losses(one, 3)
    assert len(expected) == 3 and expected[0] == pytest.approx(0.693147, abs=1e-5)
    assert step_losses(two, 3) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_full_dpo_under_zero3_computes_its_reference_with_every_rank(tiny_chat_model, pair_files, tmp_path):
    """ZeRO-3 shards the model as it loads: the reference's forwards run through the sharded model on both ranks."""
    out = tmp_path / "out"
    flags = EQUIVALENCE.replace("--use_lora True ", "") + " --max_tokens_per_batch 0 --per_device_train_batch_size 2"
    flags += " --learning_rate 1e-4"
    launched("finetune_ds.sh", tiny_chat_model, pair_files[0], out, 2, *argv("--deepspeed zero3 --", flags))
    assert len(json.loads((out / "reference_logps.json").read_text())["train"]) == 16
    losses = step_losses(out, 3)
    assert losses[0] == pytest.approx(0.693147, abs=1e-4) and losses[-1] < losses[0], losses
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["zero2", "fsdp"])
def test_lora_dpo_trains_and_saves_under_deepspeed_and_fsdp(sharding, tiny_chat_model, pair_files, tmp_path):
    out = tmp_path / "out"
    option = "--deepspeed zero2" if sharding == "zero2" else "--fsdp fsdp"
    extra = argv(option, "--", EQUIVALENCE, "--max_tokens_per_batch 0 --per_device_train_batch_size 2")
    launched("finetune_lora_ds.sh", tiny_chat_model, pair_files[0], out, 2, *extra)
    assert_adapter_trained(tiny_chat_model, out)
    assert len(step_losses(out, 3)) == 3


def test_preflight_counts_pairs_and_the_reference_forward(tiny_chat_model, pair_files, tmp_path):
    """The memory estimate of a LoRA DPO run: micro-batches of pairs (twice the tokens of SFT's samples), the head's
    logits a chunk at a time (never the whole row's), and a reference forward at every step that adds no logits at the
    peak; a full DPO run's reference is computed before training."""
    from llmft.config import parse_run
    from llmft.objectives.forward import head_chunk_rows
    from llmft.preflight import ModelShape, estimate, setup_from_args

    shape = ModelShape.from_config(json.loads((tiny_chat_model / "config.json").read_text()))

    def setup(*extra: str):
        *args, preference, plan = parse_run(run_flags(tiny_chat_model, pair_files[0], tmp_path / "out", *extra))
        return setup_from_args(args[2], args[4], plan)

    sft = setup("--use_lora True --max_steps 2")
    dpo = setup("--use_lora True --max_steps 2 --objective dpo")
    full = setup("--max_steps 2 --objective dpo")
    assert dpo.tokens >= 2 * sft.tokens and dpo.reference_forward and not full.reference_forward
    assert dpo.chunked_head and full.chunked_head and not sft.chunked_head
    same_tokens = estimate(shape, dataclasses.replace(dpo, reference_forward=False))
    with_reference = estimate(shape, dpo)
    assert with_reference.logits == same_tokens.logits
    # a 7B vocabulary at 16,384 tokens: chunks of the head, not the row's 16,384 x 152,064 logits
    qwen7b = dataclasses.replace(shape, vocab_size=152_064, hidden_size=3_584)
    long_row = dataclasses.replace(dpo, tokens=16_384, dtype="bf16")
    chunked = estimate(qwen7b, long_row).logits
    assert head_chunk_rows(152_064) < 16_384
    assert chunked == head_chunk_rows(152_064) * 152_064 * 12 + 16_384 * 3_584 * 4
    assert chunked < estimate(qwen7b, dataclasses.replace(long_row, chunked_head=False)).logits / 10
    assert any("reference" in note for note in with_reference.notes)
