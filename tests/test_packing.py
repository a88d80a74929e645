"""Packing and token-budget micro-batches (llmft/data/packing.py, llmft/trainer.py).

- The collator and the bin packer on inputs written out here, with their outputs written out by hand.
- The sampler: every sample exactly once per epoch, micro-batches within budget, the same count every epoch, a
  multiple of ranks x accumulation, shuffled differently per epoch, reproducible from the seed, waste reported.
- Exactness: per-token losses and gradients of a packed row equal those of the same samples run one at a time, for
  full weights and for LoRA, with each attention kernel the CPU runs (SDPA and eager); a row whose positions do not
  restart (no isolation) is shown to differ, so the comparison can fail.
- Through finetune.py: one optimizer step over token-budget micro-batches with gradient accumulation gives the same
  gradient as one micro-batch holding every sample, and as the padded, unpacked batch of the same samples.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmft.data.packing import (
    LongestFirstSampler,
    PackedCollator,
    TokenBudgetBatchSampler,
    best_fit_decreasing,
    heaviest_first,
)
from llmft.data.render import IGNORE_INDEX as X
from llmft.errors import ConfigError, DataError
from tests.conftest import argv, chat_record, write_records

# --- the collator and the bin packer, literally ------------------------------------------------------------------


def test_collator_lays_samples_end_to_end_with_restarting_positions():
    features = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(features)
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no attention_mask: samples are told apart
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    # each sample's first label is ignored (it would be predicted from the previous sample), and so is the padding
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]


def test_collator_pads_to_a_fixed_length_and_skips_empty_samples():
    features = [
        {"input_ids": [5, 6], "labels": [5, 6]},
        {"input_ids": [], "labels": []},
        {"input_ids": [7], "labels": [7]},
    ]
    batch = PackedCollator(pad_token_id=1, pad_to=6)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1, 1]]
    assert batch["labels"].tolist() == [[X, 6, X, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2]]
    exact = PackedCollator(pad_token_id=1, pad_to_multiple_of=3)([{"input_ids": [4, 4, 4], "labels": [X, X, 4]}])
    assert exact["input_ids"].tolist() == [[4, 4, 4]]  # already a multiple: no padding


def test_best_fit_decreasing_fills_the_fullest_bin_that_fits():
    lengths = [5, 4, 3, 3, 2, 2, 1]
    # 5 opens bin 0 (room 3); 4 opens bin 1 (room 4); 3 fills bin 0; 3 goes to bin 1 (room 1); 2 opens bin 2;
    # 2 joins bin 2; 1 takes bin 1's last slot, the least room that fits
    assert best_fit_decreasing(lengths, range(7), 8) == [[0, 2], [1, 3, 6], [4, 5]]
    assert best_fit_decreasing([3, 3, 3], [2, 0, 1], 3) == [[2], [0], [1]]  # equal lengths keep the given order


# --- the sampler -------------------------------------------------------------------------------------------------


def lognormal_lengths(count: int, seed: int = 0, median: int = 400, cap: int = 2048) -> list[int]:
    rng = random.Random(seed)
    return [min(cap, max(8, int(rng.lognormvariate(math.log(median), 0.8)))) for _ in range(count)]


def test_sampler_uses_every_sample_once_per_epoch_within_the_budget():
    lengths = lognormal_lengths(3000)
    sampler = TokenBudgetBatchSampler(lengths, 8192, window=1024, seed=3, num_epochs=3, batches_multiple_of=4)
    assert len(sampler) % 4 == 0
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in batch) for batch in batches) <= 8192
        epochs.append(batches)
    assert epochs[0] != epochs[1] != epochs[2]  # each epoch shuffled and packed anew
    # best-fit decreasing in windows of 1024 samples leaves well under 5% of the budget unused
    assert 0 <= sampler.unused_share() < 0.05
    again = TokenBudgetBatchSampler(lengths, 8192, window=1024, seed=3, num_epochs=3, batches_multiple_of=4)
    assert again.batches(1) == epochs[1]  # the seed fixes the order: a resumed run sees the same micro-batches
    assert TokenBudgetBatchSampler(lengths, 8192, window=1024, seed=4, num_epochs=3).batches(1) != epochs[1]


def test_sampler_splits_micro_batches_to_fill_every_rank_and_step():
    lengths = [10] * 9  # fits one micro-batch of 100 tokens; 4 ranks x 2 accumulation steps want 8
    sampler = TokenBudgetBatchSampler(lengths, 100, seed=0, num_epochs=2, batches_multiple_of=8)
    assert len(sampler) == 8
    for epoch in range(2):
        batches = sampler.batches(epoch)
        assert len(batches) == 8 and all(batches)
        assert sorted(i for batch in batches for i in batch) == list(range(9))


def test_sampler_plans_enough_epochs_for_max_steps():
    lengths = lognormal_lengths(200, seed=1)
    sampler = TokenBudgetBatchSampler(lengths, 4096, seed=0, max_batches=200)  # about 8 epochs of 25
    for epoch in range(math.ceil(200 / len(sampler)) + 2):  # and epochs past the plan still fit
        assert len(sampler.batches(epoch)) == len(sampler)


def test_sampler_refuses_a_sample_longer_than_the_budget_and_too_few_samples():
    with pytest.raises(ConfigError, match="sample 1 of the training data has 300 tokens"):
        TokenBudgetBatchSampler([100, 300], 256, num_epochs=1)
    with pytest.raises(DataError, match="3 training samples cannot fill the 4 micro-batches"):
        TokenBudgetBatchSampler([10, 10, 10], 256, num_epochs=1, batches_multiple_of=4)


def test_ranks_share_the_micro_batches_without_overlap():
    """accelerate deals the sampler's micro-batches out to the ranks (rank r takes every r-th)."""
    from accelerate.data_loader import BatchSamplerShard

    lengths = lognormal_lengths(500, seed=2)
    sampler = TokenBudgetBatchSampler(lengths, 4096, seed=0, num_epochs=1, batches_multiple_of=2)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(sampler) // 2
    assert sorted(shards[0] + shards[1]) == sorted(sampler.batches(0))


def test_every_epoch_starts_with_its_heaviest_micro_batches_and_keeps_the_rest_in_order():
    """One per rank, so that every rank meets its largest micro-batch (tokens, then the longest sample) in step one."""
    lengths = lognormal_lengths(2000, seed=5)
    plain = TokenBudgetBatchSampler(
        lengths, 8192, window=512, seed=1, num_epochs=2, batches_multiple_of=4, heaviest_first=0
    )
    sampler = TokenBudgetBatchSampler(
        lengths, 8192, window=512, seed=1, num_epochs=2, batches_multiple_of=4, heaviest_first=4
    )
    assert len(sampler) == len(plain)

    def weight(batch):
        return sum(lengths[i] for i in batch), max(lengths[i] for i in batch)

    for epoch in range(2):
        order, moved = plain.batches(epoch), sampler.batches(epoch)
        heaviest = sorted(order, key=weight, reverse=True)[:4]
        assert moved[:4] == heaviest  # heaviest first
        assert weight(moved[0]) == max(weight(b) for b in order)
        assert moved[4:] == [b for b in order if b not in heaviest]  # the seeded order otherwise
    # ties on tokens (10 each) go to the micro-batch with the longest sample (10, then 8, then 5); then the earlier one
    assert heaviest_first([[0, 1], [2], [3, 4]], [5, 5, 10, 2, 8], 2) == [[2], [3, 4], [0, 1]]
    assert heaviest_first([[0], [1], [2]], [3, 7, 7], 1) == [[1], [0], [2]]
    # dealt out by accelerate over 2 ranks (rank r takes every r-th): each rank's first micro-batch is one of the two
    # heaviest
    from accelerate.data_loader import BatchSamplerShard

    two = TokenBudgetBatchSampler(
        lengths, 8192, window=512, seed=1, num_epochs=2, batches_multiple_of=2, heaviest_first=2
    )
    top = sorted(two.batches(0), key=weight, reverse=True)[:2]
    assert [next(iter(BatchSamplerShard(two, num_processes=2, process_index=rank))) for rank in range(2)] == top
    # the default is one: a single rank
    assert TokenBudgetBatchSampler(lengths, 8192, window=512, seed=1, num_epochs=2).batches(0)[0] == max(
        plain.batches(0), key=weight
    )


def test_longest_first_sampler_is_accelerates_order_with_the_longest_samples_first():
    from accelerate.data_loader import SeedableRandomSampler

    lengths = lognormal_lengths(300, seed=7)
    sampler = LongestFirstSampler(lengths, 6, seed=11)
    longest = sorted(range(300), key=lambda i: (-lengths[i], i))[:6]
    assert len(sampler) == 300
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        reference = SeedableRandomSampler(range(300), data_seed=11)  # what the Trainer's RandomSampler becomes
        reference.set_epoch(epoch)
        assert order[:6] == longest
        assert order[6:] == [i for i in reference if i not in longest]
        epochs.append(order)
    assert epochs[0][6:] != epochs[1][6:]
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]  # reproducible: a resumed run skips the same samples


def test_first_micro_batch_of_a_run_holds_the_longest_samples(tiny_chat_model, tmp_path, datasets_cache):
    """Through finetune.py: the Trainer's per-sample batches, and token-budget micro-batches."""
    from transformers import TrainerCallback

    import finetune
    from llmft.data.packing import sample_lengths

    class FirstBatch(TrainerCallback):
        tokens = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            def record(module, positional, named):
                if self.tokens is None:
                    mask = named.get("attention_mask")
                    ids = named["input_ids"]
                    self.tokens = sorted(mask.sum(-1).tolist()) if mask is not None else ids.shape[-1]

            model.register_forward_pre_hook(record, with_kwargs=True)

    data = uneven_data(tmp_path, count=24)
    common = argv(
        "--model_name_or_path {model} --data_path {data} --max_steps 1 --use_cpu True --save_strategy no",
        "--report_to none --model_max_length 128 --seed 3",
        model=tiny_chat_model,
        data=data,
    )
    first = FirstBatch()
    trainer = finetune.main(
        [
            str(f)
            for f in [
                *common,
                *argv(
                    "--packing False --per_device_train_batch_size 2 --output_dir {padded}", padded=tmp_path / "padded"
                ),
            ]
        ],
        callbacks=[first],
    )
    lengths = sample_lengths(trainer.train_dataset)
    assert first.tokens == sorted(lengths)[-2:]  # the two longest of 24 samples, not a random two

    first = FirstBatch()
    trainer = finetune.main(
        [str(f) for f in [*common, "--max_tokens_per_batch", "160", "--output_dir", tmp_path / "budget"]],
        callbacks=[first],
    )
    loader = trainer.get_train_dataloader()
    sampler = (
        loader.batch_sampler.batch_sampler if hasattr(loader.batch_sampler, "batch_sampler") else (loader.batch_sampler)
    )
    batches = sampler.batches(0)
    most = max(sum(lengths[i] for i in b) for b in batches)
    assert sum(lengths[i] for i in batches[0]) == most
    assert first.tokens == math.ceil(most / 64) * 64  # the packed row of that micro-batch, padded to 64


# --- exactness on the model --------------------------------------------------------------------------------------


def random_samples(vocab: int, lengths, seed: int = 0) -> list[dict]:
    """Samples whose first tokens are an untrained prompt and the rest trained."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        prompt = n // 3
        samples.append({"input_ids": ids, "labels": [X] * prompt + ids[prompt:]})
    return samples


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-target cross-entropy of one row (logits at t predict labels at t + 1); ignored targets dropped."""
    targets = labels[0, 1:]
    losses = torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets.clamp(min=0), reduction="none")
    return losses[targets != X]


def tiny_model(path, attention: str, lora: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    model.config.use_cache = False  # as llmft.model trains: with a cache transformers does not look for packing
    if lora:
        from peft import LoraConfig, get_peft_model

        # lora_B starts random, not zero, so that gradients reach lora_A too
        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )
    return model.train()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_row_trains_exactly_like_samples_one_at_a_time(tiny_chat_model, attention, lora):
    model = tiny_model(tiny_chat_model, attention, lora)
    samples = random_samples(model.config.vocab_size, [9, 23, 4, 17, 30])
    trained = [name for name, p in model.named_parameters() if p.requires_grad]

    separate, count = [], 0
    model.zero_grad()
    for sample in samples:
        ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
        losses = token_losses(model(input_ids=ids).logits, labels)
        losses.sum().backward()
        separate.append(losses.detach())
        count += len(losses)
    grads = {n: p.grad.clone() / count for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=16)(samples)
    packed = token_losses(
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits, batch["labels"]
    )
    (packed.sum() / count).backward()
    assert len(packed) == count
    torch.testing.assert_close(packed, torch.cat(separate), rtol=1e-5, atol=1e-5)
    for name in trained:
        param = dict(model.named_parameters())[name]
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # the same row with positions that run on (no isolation) gives other losses: the comparison above can fail
    with torch.no_grad():
        leaky = token_losses(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert not torch.allclose(leaky, torch.cat(separate), rtol=1e-3, atol=1e-3)


# --- through finetune.py: loss normalisation over micro-batches ----------------------------------------------------


class GradientRecorder:
    """Trainer callback keeping the gradients of the first optimizer step (after accumulation, before the update)."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if not recorder.grads:
                    recorder.grads = {
                        n: p.grad.detach().clone()
                        for n, p in model.named_parameters()
                        if p.requires_grad and p.grad is not None
                    }

        self.grads: dict[str, torch.Tensor] = {}
        self.callback = Callback()


def uneven_data(tmp_path, count: int = 6):
    words = "tokens of uneven length train the same however they are batched".split()
    rng = random.Random(0)
    records = [
        chat_record(
            " ".join(rng.choices(words, k=rng.randint(2, 8))),
            " ".join(rng.choices(words, k=rng.randint(3, 40))),
            id=f"s{i}",
        )
        for i in range(count)
    ]
    return write_records(tmp_path / "uneven.json", records)


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_token_budget_accumulation_gives_the_gradient_of_one_batch(tiny_chat_model, tmp_path, datasets_cache, mode):
    import finetune

    data = uneven_data(tmp_path)
    common = [
        *argv(
            "--model_name_or_path {model} --data_path {data} --max_steps 1 --use_cpu True --learning_rate 1e-3",
            "--max_grad_norm 0 --save_strategy no --report_to none --model_max_length 128 --seed 0",
            "--lora_dropout 0",
            model=tiny_chat_model,
            data=data,
        ),
        *(["--use_lora", "True"] if mode == "lora" else []),
    ]
    layouts = {
        # six samples in micro-batches of at most 256 tokens, three accumulated into the one optimizer step
        "budget+accumulation": ["--max_tokens_per_batch", "256", "--gradient_accumulation_steps", "3"],
        "one packed batch": ["--max_tokens_per_batch", "4096", "--gradient_accumulation_steps", "1"],
        "padded batch": ["--packing", "False", "--per_device_train_batch_size", "6"],
    }
    grads, micro_batches = {}, {}
    for name, flags in layouts.items():
        recorder = GradientRecorder()
        trainer = finetune.main(
            [str(f) for f in [*common, *flags, "--output_dir", tmp_path / name.replace(" ", "-")]],
            callbacks=[recorder.callback],
        )
        grads[name], micro_batches[name] = recorder.grads, len(trainer.get_train_dataloader())
    assert micro_batches == {"budget+accumulation": 3, "one packed batch": 1, "padded batch": 1}
    reference = grads["padded batch"]
    moved = [key for key, grad in reference.items() if grad.abs().sum() > 0]
    # LoRA's first step moves lora_B only (lora_A's gradient goes through lora_B, which starts at zero)
    assert moved == list(reference) if mode == "full" else moved == [k for k in reference if "lora_B" in k]
    for name in ("budget+accumulation", "one packed batch"):
        assert sorted(grads[name]) == sorted(reference)
        for key, grad in reference.items():
            torch.testing.assert_close(grads[name][key], grad, rtol=1e-4, atol=1e-7, msg=f"{name}: {key}")
