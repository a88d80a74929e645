"""Preference losses (llmft/objectives/preference.py) against TRL 1.16's trainers as the oracle, and per-sequence
log-probabilities of packed rows against the same sequences run one at a time.

TRL's loss code runs as it is: DPOTrainer's and KTOTrainer's `_compute_loss`, CPOTrainer's and ORPOTrainer's
`get_batch_loss_metrics`, each called on a stand-in `self` that carries the attributes the method reads, and a
stand-in model that returns given per-token log-probabilities (what TRL's fused LM head returns: 0 off the
completion). llmft gets the same per-token values laid out as a packed row. Losses, metrics and the gradients with
respect to the per-token log-probabilities must agree to rel 1e-5.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from llmft.args import PreferenceArguments
from llmft.objectives.preference import (
    SequenceLogProbs,
    compute_preference_loss,
    preference_problems,
    sequence_log_probs,
    token_log_probs,
)

X = -100
RTOL, ATOL = 1e-5, 1e-7


class Accelerator:
    """What TRL's loss code asks of accelerate on one process."""

    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def trl_self(**attributes) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        accelerator=Accelerator(),
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def fused_output(log_probs: torch.Tensor) -> types.SimpleNamespace:
    """TRL's FusedCausalLMOutput as its losses read it; the fields only logged are zeros."""
    zeros = torch.zeros_like(log_probs.detach())
    return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


class Sequences:
    """`count` sequences of random lengths, each a prompt then a completion, padded on the right as TRL's collators
    pad them; `logps` (count, T - 1) are the per-token log-probabilities a model would give (entry t scores token
    t + 1), a leaf whose gradient is compared."""

    def __init__(self, count: int, seed: int, longest: int = 12):
        generator = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(4, longest + 1, (count,), generator=generator)
        self.prompts = torch.stack([torch.randint(1, int(n) - 1, (1,), generator=generator)[0] for n in self.lengths])
        width = int(self.lengths.max())
        self.input_ids = torch.randint(3, 50, (count, width), generator=generator)
        positions = torch.arange(width)
        self.attention_mask = (positions < self.lengths[:, None]).long()
        self.completion_mask = ((positions >= self.prompts[:, None]) & (positions < self.lengths[:, None])).long()
        self.input_ids = self.input_ids * self.attention_mask
        self.logps = (-3 * torch.rand(count, width - 1, generator=generator, dtype=torch.float64)).float()
        self.logps.requires_grad_(True)

    def trl_log_probs(self) -> torch.Tensor:
        """What TRL's fused head returns for these sequences: the log-probabilities of completion tokens, 0 else."""
        return self.logps * self.completion_mask[:, 1:]

    def packed(self, order: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token log-probs, labels, position ids) of a packed row holding the sequences in `order`, no padding."""
        token_logps, labels, positions = [], [], []
        for i in order:
            n = int(self.lengths[i])
            token_logps += [self.logps.new_zeros(1), self.logps[i, : n - 1]]
            ids = self.input_ids[i, :n]
            labels.append(torch.where(self.completion_mask[i, :n].bool(), ids, X))
            positions.append(torch.arange(n))
        return torch.cat(token_logps), torch.cat(labels)[None], torch.cat(positions)[None]


def pair_layout(pairs: int) -> tuple[list[int], dict[str, torch.Tensor]]:
    """TRL's rows are [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1]; llmft's packed row interleaves each pair's
    chosen and rejected sequences. Returns the packing order and llmft's pair index."""
    order = [i for pair in range(pairs) for i in (pair, pairs + pair)]
    index = {"chosen_index": torch.arange(0, 2 * pairs, 2), "rejected_index": torch.arange(1, 2 * pairs, 2)}
    return order, index


def llmft_loss(settings, sequences: Sequences, order, batch, reference=None, **kl):
    token_logps, labels, positions = sequences.packed(order)
    policy = sequence_log_probs(token_logps, labels, positions)
    return compute_preference_loss(settings, policy, batch, reference, **kl)


def assert_same_loss_and_gradient(ours, theirs, leaf: torch.Tensor) -> None:
    (ours_grad,) = torch.autograd.grad(ours, leaf)
    (their_grad,) = torch.autograd.grad(theirs, leaf)
    torch.testing.assert_close(ours.detach(), theirs.detach().to(ours.dtype), rtol=RTOL, atol=ATOL)
    assert their_grad.abs().sum() > 0
    torch.testing.assert_close(ours_grad, their_grad, rtol=RTOL, atol=ATOL)


def assert_same_metrics(ours: dict, theirs: dict, names) -> None:
    for name in names:
        value = theirs[name][-1] if isinstance(theirs[name], list) else theirs[name]
        assert ours[name].item() == pytest.approx(value, rel=RTOL, abs=1e-6), name


PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.mark.parametrize(
    "loss_type, label_smoothing, beta",
    [("sigmoid", 0.0, 0.1), ("hinge", 0.0, 0.3), ("ipo", 0.0, 0.1), ("robust", 0.2, 0.5)],
)
def test_dpo_equals_trl(loss_type, label_smoothing, beta):
    from trl import DPOTrainer

    pairs = 5
    sequences = Sequences(2 * pairs, seed=1)
    reference = (-3 * sequences.completion_mask.sum(1) * torch.rand(2 * pairs)).float()
    trainer = trl_self(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=types.SimpleNamespace(),
    )
    inputs = {
        "input_ids": sequences.input_ids,
        "attention_mask": sequences.attention_mask,
        "completion_mask": sequences.completion_mask,
        "ref_chosen_logps": reference[:pairs],
        "ref_rejected_logps": reference[pairs:],
    }
    theirs = DPOTrainer._compute_loss(
        trainer, lambda **_: fused_output(sequences.trl_log_probs()), inputs, return_outputs=False
    )

    settings = PreferenceArguments(objective="dpo", beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    order, batch = pair_layout(pairs)
    ours, metrics = llmft_loss(settings, sequences, order, batch, reference=reference[order])
    assert_same_loss_and_gradient(ours, theirs, sequences.logps)
    assert_same_metrics(metrics, trainer._metrics["train"], PAIR_METRICS)


@pytest.mark.parametrize("label_smoothing, beta", [(0.0, 0.1), (0.25, 0.5)])
def test_conservative_dpo_equals_trl_aot_one_pair_at_a_time(label_smoothing, beta):
    """TRL 1.16's DPO has no conservative (cDPO) loss type, but its `aot` loss is cDPO after sorting the batch's
    log-ratios, and sorting a batch of one pair changes nothing: TRL's loss on each pair alone, averaged over the
    pairs, is llmft's conservative loss over all of them."""
    from trl import DPOTrainer

    pairs = 4
    sequences = Sequences(2 * pairs, seed=5)
    reference = (-3 * sequences.completion_mask.sum(1) * torch.rand(2 * pairs)).float()
    trainer = trl_self(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["aot"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=types.SimpleNamespace(),
    )
    log_probs = sequences.trl_log_probs()
    theirs = 0
    for pair in range(pairs):
        rows = [pair, pairs + pair]
        inputs = {
            "input_ids": sequences.input_ids[rows],
            "attention_mask": sequences.attention_mask[rows],
            "completion_mask": sequences.completion_mask[rows],
            "ref_chosen_logps": reference[[pair]],
            "ref_rejected_logps": reference[[pairs + pair]],
        }
        theirs = theirs + DPOTrainer._compute_loss(
            trainer, lambda rows=rows, **_: fused_output(log_probs[rows]), inputs, return_outputs=False
        )
    theirs = theirs / pairs

    settings = PreferenceArguments(
        objective="dpo", beta=beta, loss_type="conservative", label_smoothing=label_smoothing
    )
    order, batch = pair_layout(pairs)
    ours, metrics = llmft_loss(settings, sequences, order, batch, reference=reference[order])
    assert_same_loss_and_gradient(ours, theirs, sequences.logps)
    their_metrics = trainer._metrics["train"]
    for name in PAIR_METRICS:
        # TRL logs each one-pair call's means; over equal-sized calls their mean is the mean over all pairs
        assert metrics[name].item() == pytest.approx(sum(their_metrics[name]) / pairs, rel=RTOL, abs=1e-6), name
    if label_smoothing:
        plain = PreferenceArguments(objective="dpo", beta=beta)
        assert not torch.isclose(ours, llmft_loss(plain, sequences, order, batch, reference=reference[order])[0])


def trl_pair_forward(sequences: Sequences, pairs: int, nll: torch.Tensor):
    """CPO's and ORPO's `concatenated_forward` for these sequences: mean log-probabilities per completion token, as
    their `get_batch_logps(average_log_prob=True)` gives them, logits (only logged) and the chosen NLL."""
    mask = sequences.completion_mask[:, 1:]
    means = (sequences.logps * mask).sum(-1) / mask.sum(-1)
    logits = torch.zeros(2 * pairs, 1, 1)
    return lambda model, batch: (means[:pairs], means[pairs:], logits[:pairs], logits[pairs:], nll)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo(label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    pairs, beta, gamma = 4, 2.0, 1.2
    sequences = Sequences(2 * pairs, seed=2)
    trainer = trl_self(
        alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, cpo_alpha=0.0
    )
    trainer.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, trainer)
    trainer.concatenated_forward = trl_pair_forward(sequences, pairs, torch.tensor(0.0))
    theirs, their_metrics = CPOTrainer.get_batch_loss_metrics(trainer, None, {})

    settings = PreferenceArguments(objective="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    order, batch = pair_layout(pairs)
    ours, metrics = llmft_loss(settings, sequences, order, batch)
    assert_same_loss_and_gradient(ours, theirs, sequences.logps)
    assert_same_metrics(metrics, their_metrics, PAIR_METRICS)


def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    pairs, beta = 4, 0.25
    sequences = Sequences(2 * pairs, seed=3)
    # The NLL of the chosen answers' tokens (llmft scores the answer only; TRL's own forward also scores the prompt)
    chosen_mask = sequences.completion_mask[:pairs, 1:]
    nll = -(sequences.logps[:pairs] * chosen_mask).sum() / chosen_mask.sum()
    trainer = trl_self(beta=beta)
    trainer.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, trainer)
    trainer.concatenated_forward = trl_pair_forward(sequences, pairs, nll)
    theirs, their_metrics = ORPOTrainer.get_batch_loss_metrics(trainer, None, {})

    settings = PreferenceArguments(objective="orpo", beta=beta)
    order, batch = pair_layout(pairs)
    ours, metrics = llmft_loss(settings, sequences, order, batch)
    assert_same_loss_and_gradient(ours, theirs, sequences.logps)
    assert_same_metrics(metrics, their_metrics, PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"))


@pytest.mark.parametrize(
    "labels", [[1, 0, 1, 1, 0, 0, 1], [1, 1, 1], [0, 0]], ids=["mixed", "desirable", "undesirable"]
)
def test_kto_equals_trl(labels):
    from trl import KTOTrainer

    count, beta = len(labels), 0.2
    sequences = Sequences(count, seed=4)
    kl_sequences = Sequences(count, seed=5)
    reference = (-2 * sequences.completion_mask.sum(1) * torch.rand(count)).float()
    # a reference below the policy on the mismatched pairs, so the KL estimate is positive and not clamped to 0
    reference_kl = kl_sequences.trl_log_probs().detach().sum(1) - torch.rand(count)
    trainer = trl_self(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=1.3,
        undesirable_weight=0.7,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    batch = {
        "input_ids": sequences.input_ids,
        "attention_mask": sequences.attention_mask,
        "completion_mask": sequences.completion_mask,
        "KL_input_ids": kl_sequences.input_ids,
        "KL_attention_mask": kl_sequences.attention_mask,
        "KL_completion_mask": kl_sequences.completion_mask,
        "label": torch.tensor(labels, dtype=torch.bool),
        "ref_logps": reference,
        "ref_KL_logps": reference_kl,
    }

    def model(input_ids, **_):
        chosen = kl_sequences if input_ids is batch["KL_input_ids"] else sequences
        return fused_output(chosen.trl_log_probs())

    theirs = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)

    settings = PreferenceArguments(objective="kto", beta=beta, desirable_weight=1.3, undesirable_weight=0.7)
    order = list(range(count))
    with torch.no_grad():
        kl_row = kl_sequences.packed(order)
        kl_logps = sequence_log_probs(*kl_row).sums
    ours, metrics = llmft_loss(
        settings,
        sequences,
        order,
        {"desirable": torch.tensor(labels, dtype=torch.bool)},
        reference=reference,
        kl_logps=kl_logps,
        reference_kl_logps=reference_kl,
    )
    assert_same_loss_and_gradient(ours, theirs, sequences.logps)
    logged = trainer._metrics["train"]
    assert metrics["kl"].item() > 0
    assert_same_metrics(metrics, logged, [name for name in logged if "/" in name and "logits" not in name] + ["kl"])
    assert set(metrics) == {name for name in logged if "/" in name and "logits" not in name} | {"kl"}


# --- per-sequence log-probabilities of a packed row ----------------------------------------------------------------


def test_sequence_log_probs_sum_and_count_each_sequence_apart():
    # three sequences; the first label of the second is set, as a row that does not mask it would be: it must not be
    # scored (nothing of its own sequence precedes it)
    token_logps = torch.tensor([0.0, -1.0, -2.0, -4.0, -8.0, -16.0, 0.0, -32.0, -64.0])
    labels = torch.tensor([[X, 5, 6, 7, X, 9, 9, X, 3]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2]])
    result = sequence_log_probs(token_logps, labels, positions)
    torch.testing.assert_close(result.sums, torch.tensor([-3.0, -16.0, -64.0]))
    torch.testing.assert_close(result.counts, torch.tensor([2, 1, 1]))
    torch.testing.assert_close(result.means, torch.tensor([-1.5, -16.0, -64.0]))


def test_token_log_probs_never_score_across_a_boundary():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, 11, generator=generator)
    labels = torch.tensor([[X, 4, 2, 7, 1, 5]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    result = token_log_probs(logits, labels, positions)
    expected = torch.zeros(6)
    for t in (1, 2, 4, 5):  # token 3 opens the second sequence: not a target although labelled
        expected[t] = logits[0, t - 1].log_softmax(-1)[labels[0, t]]
    torch.testing.assert_close(result, expected)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_pairs_give_the_log_probs_and_gradients_of_pairs_one_at_a_time(tiny_chat_model, lora):
    """DPO on a packed row of three pairs (six sequences, no padding) against each sequence run on its own: per-
    sequence log-probabilities, the loss, and every trained parameter's gradient."""
    from tests.test_packing import tiny_model

    from llmft.data.preference import PairPackedCollator

    model = tiny_model(tiny_chat_model, "sdpa", lora)
    generator = torch.Generator().manual_seed(7)
    features = []
    for chosen_length, rejected_length in ((9, 14), (20, 6), (11, 11)):
        pair = {}
        for side, n in (("chosen", chosen_length), ("rejected", rejected_length)):
            ids = torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist()
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, [X] * 4 + ids[4:]
        features.append(pair)
    reference = torch.tensor([-90.0, -80.0, -70.0, -95.0, -60.0, -85.0])
    settings = PreferenceArguments(objective="dpo", beta=0.1)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    sums, counts = [], []
    for feature in features:
        for side in ("chosen", "rejected"):
            ids, labels = torch.tensor([feature[f"{side}_input_ids"]]), torch.tensor([feature[f"{side}_labels"]])
            positions = torch.arange(ids.shape[1])[None]
            one = sequence_log_probs(token_log_probs(model(input_ids=ids).logits, labels, positions), labels, positions)
            sums.append(one.sums)
            counts.append(one.counts)
    separate = SequenceLogProbs(torch.cat(sums), torch.cat(counts))
    pair_index = {"chosen_index": torch.tensor([0, 2, 4]), "rejected_index": torch.tensor([1, 3, 5])}
    loss, _ = compute_preference_loss(settings, separate, pair_index, reference)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in trained.items()}

    model.zero_grad()
    batch = PairPackedCollator()(features)
    assert batch["input_ids"].shape == (1, 9 + 14 + 20 + 6 + 11 + 11)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    packed = sequence_log_probs(
        token_log_probs(logits, batch["labels"], batch["position_ids"]), batch["labels"], batch["position_ids"]
    )
    torch.testing.assert_close(packed.sums, separate.sums.detach(), rtol=1e-5, atol=1e-5)
    assert packed.counts.tolist() == separate.counts.tolist() == [5, 10, 16, 2, 7, 7]
    packed_loss, _ = compute_preference_loss(settings, packed, batch, reference)
    torch.testing.assert_close(packed_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    packed_loss.backward()
    for name, param in trained.items():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


# --- the settings' checks ------------------------------------------------------------------------------------------


def test_default_settings_and_each_objective_alone_have_no_problems():
    assert preference_problems(PreferenceArguments()) == []
    for objective in ("dpo", "simpo", "orpo", "kto"):
        assert preference_problems(PreferenceArguments(objective=objective)) == [], objective
    for loss_type in ("robust", "conservative"):
        assert preference_problems(PreferenceArguments(objective="dpo", loss_type=loss_type, label_smoothing=0.1)) == []


@pytest.mark.parametrize(
    "settings, flag",
    [
        (dict(objective="ppo"), "--objective"),
        (dict(objective="dpo", beta=0.0), "--beta"),
        (dict(objective="dpo", beta=float("nan")), "--beta"),
        (dict(objective="sft", beta=0.5), "--beta"),
        (dict(objective="dpo", loss_type="kto_pair"), "--loss_type"),
        (dict(objective="simpo", loss_type="ipo"), "--loss_type"),
        (dict(objective="dpo", loss_type="robust", label_smoothing=0.5), "--label_smoothing"),
        (dict(objective="dpo", label_smoothing=0.1), "--label_smoothing"),
        (dict(objective="kto", label_smoothing=0.1), "--label_smoothing"),
        (dict(objective="dpo", loss_type="conservative", label_smoothing=0.5), "--label_smoothing"),
        (dict(objective="simpo", simpo_gamma=-1.0), "--simpo_gamma"),
        (dict(objective="dpo", simpo_gamma=1.0), "--simpo_gamma"),
        (dict(objective="kto", desirable_weight=0.0), "--desirable_weight"),
        (dict(objective="dpo", undesirable_weight=2.0), "--undesirable_weight"),
    ],
)
def test_each_bad_setting_is_named(settings, flag):
    problems = preference_problems(PreferenceArguments(**settings))
    assert len(problems) == 1 and problems[0].startswith(flag), problems


def test_all_problems_are_listed_at_once():
    settings = PreferenceArguments(objective="dpo", beta=-1.0, loss_type="sigmoid", label_smoothing=0.7)
    problems = preference_problems(settings)
    assert [p.split()[0] for p in problems] == ["--beta", "--label_smoothing"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_through_the_model_equals_trl_on_the_same_pairs(tiny_chat_model, qwen_tokenizer, loss_type):
    """End to end on the tiny model: TRL's DPOTrainer loss over its padded batch (its fused LM head on the model)
    against llmft's over the packed row of the same rendered pairs: the loss and every parameter's gradient."""
    from tests.test_packing import tiny_model
    from transformers import AutoTokenizer
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from llmft.data.preference import PairPackedCollator, parse_preference_record, render_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    records = [
        {"prompt": "Who are you?", "chosen": "I am Pico.", "rejected": "No idea at all, sorry."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello! How can I help?", "rejected": "Go away."},
        {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Three."},
    ]
    rows = [render_pair(parse_preference_record(r), tokenizer).features() for r in records]
    sequences = [(row[f"{side}_input_ids"], row[f"{side}_labels"]) for side in ("chosen", "rejected") for row in rows]
    width = max(len(ids) for ids, _ in sequences)
    inputs = {
        "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sequences]),
        "completion_mask": torch.tensor(
            [[int(t != X) for t in labels] + [0] * (width - len(labels)) for _, labels in sequences]
        ),
    }
    reference = torch.tensor([-40.0, -30.0, -35.0, -45.0, -50.0, -38.0])  # TRL's order: chosen..., rejected...
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = reference[:3], reference[3:]

    model = tiny_model(tiny_chat_model, "sdpa", lora=False)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = trl_self(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=0.1,
        label_smoothing=0.0,
        use_weighting=False,
        args=types.SimpleNamespace(),
    )
    trainer.model = model
    theirs = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    theirs.backward()
    their_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    settings = PreferenceArguments(objective="dpo", beta=0.1, loss_type=loss_type)
    batch = PairPackedCollator()(rows)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    policy = sequence_log_probs(
        token_log_probs(logits, batch["labels"], batch["position_ids"]), batch["labels"], batch["position_ids"]
    )
    ours, _ = compute_preference_loss(settings, policy, batch, reference[[0, 3, 1, 4, 2, 5]])
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    for name, param in model.named_parameters():  # float32 through a model: agreement to 1e-5 of each's largest
        scale = their_grads[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(param.grad, their_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


# --- the reference model -------------------------------------------------------------------------------------------


def one_at_a_time(model, sequences) -> torch.Tensor:
    """Summed answer log-probabilities of each (input_ids, labels) run on its own."""
    sums = []
    with torch.no_grad():
        for ids, labels in sequences:
            ids, labels = torch.tensor([ids]), torch.tensor([labels])
            positions = torch.arange(ids.shape[1])[None]
            logps = token_log_probs(model(input_ids=ids).logits, labels, positions)
            sums.append(sequence_log_probs(logps, labels, positions).sums)
    return torch.cat(sums)


def example_pair_rows(model_dir) -> list[dict]:
    from transformers import AutoTokenizer

    from llmft.data.preference import parse_preference_record, render_pair

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [
        {"prompt": "Who are you?", "chosen": "I am Pico.", "rejected": "No idea at all, sorry."},
        {"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "Go away."},
        {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Three."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A number: 7."},
    ]
    return [render_pair(parse_preference_record(r), tokenizer).features() for r in records]


def test_lora_reference_is_the_base_with_its_adapters_off(tiny_chat_model):
    from tests.test_packing import tiny_model

    from llmft.data.preference import PairPackedCollator
    from llmft.objectives.forward import packed_log_probs, reference_log_probs

    rows = example_pair_rows(tiny_chat_model)
    sequences = [(row[f"{side}_input_ids"], row[f"{side}_labels"]) for row in rows for side in ("chosen", "rejected")]
    base = one_at_a_time(tiny_model(tiny_chat_model, "sdpa", lora=False), sequences)
    model = tiny_model(tiny_chat_model, "sdpa", lora=True)  # adapters that change the outputs from the start
    batch = PairPackedCollator()(rows)
    reference = reference_log_probs(model, batch)
    assert not reference.requires_grad
    torch.testing.assert_close(reference, base, rtol=1e-5, atol=1e-5)
    policy = packed_log_probs(model, batch)
    assert policy.sums.requires_grad
    assert (policy.sums - base).abs().min() > 1e-3  # the adapters are on again after the block


def test_full_fine_tuning_reference_is_precomputed_once_per_row(tiny_chat_model):
    from tests.test_packing import tiny_model

    from llmft.data.preference import PairPackedCollator, pair_lengths
    from llmft.objectives.forward import precompute_pair_reference

    model = tiny_model(tiny_chat_model, "sdpa", lora=False)
    rows = example_pair_rows(tiny_chat_model)
    budget = max(pair_lengths(rows)) + 1  # several packed groups
    with_reference = precompute_pair_reference(model, rows, max_tokens=budget)
    sequences = [(row[f"{side}_input_ids"], row[f"{side}_labels"]) for row in rows for side in ("chosen", "rejected")]
    expected = one_at_a_time(model, sequences)
    got = torch.tensor([row[f"ref_{side}_logps"] for row in with_reference for side in ("chosen", "rejected")])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    batch = PairPackedCollator()(with_reference)
    torch.testing.assert_close(batch["reference_logps"], expected, rtol=1e-5, atol=1e-5)


def test_kto_reference_covers_the_kl_sequences(tiny_chat_model):
    from tests.test_packing import tiny_model
    from transformers import AutoTokenizer

    from llmft.data.preference import parse_kto_record, render_kto_example, with_kl_sequences
    from llmft.objectives.forward import precompute_kto_reference

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    records = [
        {"prompt": "Who are you?", "completion": "I am Pico.", "label": True},
        {"prompt": "Hi", "completion": "Go away.", "label": False},
        {"prompt": "Count to three.", "completion": "One, two, three.", "label": True},
    ]
    rows = [render_kto_example(parse_kto_record(r)[0], tokenizer) for r in records]
    rows = with_kl_sequences(rows, block=3)
    model = tiny_model(tiny_chat_model, "sdpa", lora=False)
    out = precompute_kto_reference(model, rows, max_tokens=60)
    main = one_at_a_time(model, [(row["input_ids"], row["labels"]) for row in rows])
    kl = one_at_a_time(model, [(row["kl_input_ids"], row["kl_labels"]) for row in rows])
    torch.testing.assert_close(torch.tensor([row["ref_logps"] for row in out]), main, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([row["ref_kl_logps"] for row in out]), kl, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(main, kl)


def example_kto_rows(model_dir) -> list[dict]:
    from transformers import AutoTokenizer

    from llmft.data.preference import parse_kto_record, render_kto_example, with_kl_sequences

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [
        {"prompt": "Who are you?", "chosen": "I am Pico.", "rejected": "No idea at all, sorry."},
        {"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "Go away."},
    ]
    examples = [example for record in records for example in parse_kto_record(record)]
    return with_kl_sequences([render_kto_example(e, tokenizer) for e in examples], block=len(examples))


@pytest.mark.parametrize("objective", ["dpo", "simpo", "orpo", "kto"])
def test_a_few_lora_steps_learn_the_preference(tiny_chat_model, objective):
    """`micro_batch_loss` as a trainer would call it, for a few optimizer steps on one micro-batch: the loss falls
    and the chosen answers' reward pulls away from the rejected ones'."""
    from tests.test_packing import tiny_model

    from llmft.data.preference import KtoPackedCollator, PairPackedCollator
    from llmft.objectives.forward import micro_batch_loss

    model = tiny_model(tiny_chat_model, "sdpa", lora=True)
    if objective == "kto":
        batch = KtoPackedCollator()(example_kto_rows(tiny_chat_model))
    else:
        batch = PairPackedCollator()(example_pair_rows(tiny_chat_model))
    settings = PreferenceArguments(objective=objective, beta=0.5 if objective != "simpo" else 2.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(8):
        loss, metrics = micro_batch_loss(model, batch, settings)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append((loss.item(), metrics["rewards/chosen"].item() - metrics["rewards/rejected"].item()))
    assert history[-1][0] < history[0][0], history
    assert history[-1][1] > history[0][1], history


def test_full_fine_tuning_without_precomputed_reference_is_refused(tiny_chat_model):
    from tests.test_packing import tiny_model

    from llmft.data.preference import PairPackedCollator
    from llmft.objectives.forward import micro_batch_loss

    model = tiny_model(tiny_chat_model, "sdpa", lora=False)
    batch = PairPackedCollator()(example_pair_rows(tiny_chat_model))
    with pytest.raises(ValueError, match="computed before training"):
        micro_batch_loss(model, batch, PreferenceArguments(objective="dpo"))
    loss, _ = micro_batch_loss(model, batch, PreferenceArguments(objective="simpo"))  # SimPO has no reference
    assert loss.requires_grad


def padded(sequences: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask) of TRL's right-padded batch of (input_ids, labels) sequences."""
    width = max(len(ids) for ids, _ in sequences)
    pad = [width - len(ids) for ids, _ in sequences]
    return (
        torch.tensor([ids + [0] * n for (ids, _), n in zip(sequences, pad)]),
        torch.tensor([[1] * len(ids) + [0] * n for (ids, _), n in zip(sequences, pad)]),
        torch.tensor([[int(t != X) for t in labels] + [0] * n for (_, labels), n in zip(sequences, pad)]),
    )


def test_kto_through_the_model_equals_trl_on_the_same_examples(tiny_chat_model):
    """End to end on the tiny model: TRL's KTOTrainer loss (its fused LM head, its KL batch given as our KL
    sequences) against llmft's `micro_batch_loss` over the packed rows: the loss, the KL estimate and every
    parameter's gradient."""
    from tests.test_packing import tiny_model
    from trl import KTOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from llmft.data.preference import KtoPackedCollator
    from llmft.objectives.forward import micro_batch_loss

    from llmft.objectives.forward import packed_log_probs

    rows = example_kto_rows(tiny_chat_model)
    model = tiny_model(tiny_chat_model, "sdpa", lora=False)
    with torch.no_grad():  # references near the policy (no saturated sigmoid), below it on the KL row (KL > 0)
        packed = KtoPackedCollator()(rows)
        policy, kl_policy = packed_log_probs(model, packed).sums, packed_log_probs(model, packed, "kl_").sums
    shifts = torch.tensor([1.5, -2.0, 0.5, -1.0])
    rows = [
        {**row, "ref_logps": (policy[i] + shifts[i]).item(), "ref_kl_logps": (kl_policy[i] - 2 - i).item()}
        for i, row in enumerate(rows)
    ]
    input_ids, attention_mask, completion_mask = padded([(r["input_ids"], r["labels"]) for r in rows])
    kl_ids, kl_attention, kl_completion = padded([(r["kl_input_ids"], r["kl_labels"]) for r in rows])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": torch.tensor([r["desirable"] for r in rows]),
        "ref_logps": torch.tensor([r["ref_logps"] for r in rows]),
        "ref_KL_logps": torch.tensor([r["ref_kl_logps"] for r in rows]),
    }
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    settings = PreferenceArguments(objective="kto", beta=0.1, desirable_weight=1.5, undesirable_weight=0.8)
    trainer = trl_self(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=settings.beta,
        desirable_weight=settings.desirable_weight,
        undesirable_weight=settings.undesirable_weight,
    )
    trainer.model = model
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    theirs = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    theirs.backward()
    their_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    ours, metrics = micro_batch_loss(model, KtoPackedCollator()(rows), settings)
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    assert metrics["kl"].item() > 0
    assert metrics["kl"].item() == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-5)
    for name, param in model.named_parameters():  # float32 through a model: agreement to 1e-5 of each's largest
        scale = their_grads[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(param.grad, their_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_chunked_head_scores_as_the_whole_logits_do(tiny_chat_model, lora, monkeypatch):
    """`packed_log_probs` never makes a row's whole logits: the head scores the target rows a few at a time (here 3, so
    chunks split sequences) and backward remakes each chunk. Log-probabilities and every trained parameter's gradient
    equal those from the model's full logits; the model's own forward made one position's logits only."""
    from tests.test_packing import tiny_model

    from llmft.data.preference import PairPackedCollator
    from llmft.objectives import forward

    model = tiny_model(tiny_chat_model, "sdpa", lora)
    vocab = model.config.vocab_size
    monkeypatch.setattr(forward, "HEAD_CHUNK_BYTES", 3 * 4 * vocab)
    assert forward.head_chunk_rows(vocab) == 3
    batch = PairPackedCollator()(example_pair_rows(tiny_chat_model))
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    labels, positions = batch["labels"], batch["position_ids"]

    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], position_ids=positions).logits
    whole = sequence_log_probs(token_log_probs(logits, labels, positions), labels, positions)
    weights = torch.linspace(-1.0, 2.0, whole.sums.numel())  # a loss that weighs every sequence differently
    (whole.sums * weights).sum().backward()
    expected = {name: p.grad.clone() for name, p in trained.items()}

    model.zero_grad()
    head_outputs = []
    head = forward._causal_lm(model).get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, output: head_outputs.append(tuple(output.shape)))
    chunked = forward.packed_log_probs(model, batch)
    hook.remove()
    torch.testing.assert_close(chunked.sums, whole.sums.detach(), rtol=1e-5, atol=1e-5)
    assert chunked.counts.tolist() == whole.counts.tolist()
    targets = int(whole.counts.sum())
    assert head_outputs[0] == (1, 1, vocab)  # the model's own forward: the last position only
    assert [shape[0] for shape in head_outputs[1:]] == [min(3, targets - start) for start in range(0, targets, 3)]
    (chunked.sums * weights).sum().backward()
    for name, param in trained.items():  # float32 sums in another order: within 1e-5 of the tensor's largest value
        atol = 1e-5 * float(expected[name].abs().max())
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=atol, msg=name)


def test_only_a_plain_linear_head_is_chunked():
    """`plain_head`, which decides the chunked path: a head that soft-caps or scales its logits is not plain (such a
    model is scored from its own whole logits)."""
    from types import SimpleNamespace

    from llmft.objectives.forward import plain_head

    assert plain_head(SimpleNamespace(final_logit_softcapping=None))
    assert not plain_head(SimpleNamespace(final_logit_softcapping=30.0))
    assert not plain_head(SimpleNamespace(logit_scale=0.0625))
    assert not plain_head(SimpleNamespace(logits_scaling=8.0))
