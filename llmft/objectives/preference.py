"""Preference losses over packed rows: DPO (sigmoid, hinge, IPO, robust and conservative), SimPO, ORPO and KTO.

Contract. A packed row holds whole sequences end to end (`llmft.data.preference`'s collators): `input_ids`, `labels`
and `position_ids` of shape (1, T), positions restarting at 0 where a sequence starts, labels IGNORE_INDEX (-100)
except on the answer's tokens and its end-of-turn token, as in SFT. A token is a *target* when its label is not -100
and it does not open its sequence; its log-probability comes from the logits one position earlier, which lie in the
same sequence, so no sequence scores another's tokens (`token_log_probs`). `sequence_log_probs` sums them per
sequence and counts them: a sequence's log-probability is the sum over its targets, its mean that sum over their
number (SimPO and ORPO score means, DPO and KTO sums, as TRL does).

The losses take per-sequence log-probabilities and return `(loss, metrics)`: the loss a scalar tensor averaged over
the micro-batch's pairs (KTO: examples), the metrics detached scalars named as TRL logs them (`rewards/chosen`,
`rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, and each objective's
own: ORPO's `nll_loss`, `log_odds_ratio`, `log_odds_chosen`; KTO's `kl`). Each equals TRL 1.16's trainer on the same
log-probabilities (DPOTrainer, CPOTrainer with loss_type="simpo" and cpo_alpha=0, ORPOTrainer, KTOTrainer), losses
and gradients, which tests/test_preference_losses.py checks. One deliberate difference: ORPO's NLL term scores the
chosen answer's tokens only (the paper's L_SFT, and SFT's masks), where TRL's ORPOTrainer also scores the prompt.

`compute_preference_loss(settings, policy, batch, reference, ...)` turns a micro-batch's log-probabilities into its
loss, with `settings` a `PreferenceArguments` (llmft/args.py); `llmft.objectives.forward.micro_batch_loss` runs the
forward passes that produce them. `preference_problems(settings)` lists what is wrong with the settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llmft.data.render import IGNORE_INDEX

if TYPE_CHECKING:
    from llmft.args import PreferenceArguments

OBJECTIVES = ("sft", "dpo", "simpo", "orpo", "kto")
PAIR_OBJECTIVES = ("dpo", "simpo", "orpo")  # trained on (prompt, chosen, rejected) pairs
REFERENCE_OBJECTIVES = ("dpo", "kto")  # need the reference model's log-probabilities
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "conservative")
SMOOTHED_DPO_LOSS_TYPES = ("robust", "conservative")  # the DPO losses that read --label_smoothing

Metrics = dict[str, torch.Tensor]


# --- log-probabilities of the sequences of a packed row ----------------------------------------------------------


@dataclass
class SequenceLogProbs:
    """Per-sequence sums of the targets' log-probabilities, shape (N,), and the number of targets, shape (N,)."""

    sums: torch.Tensor
    counts: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)

    def select(self, index: torch.Tensor) -> "SequenceLogProbs":
        return SequenceLogProbs(self.sums[index], self.counts[index])


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """The sequence each token of a packed row belongs to, shape (T,): 0 for the first, counting up at every position
    that restarts at 0."""
    positions = position_ids.reshape(-1)
    return (positions == 0).long().cumsum(0) - 1


def target_mask(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Which tokens of a packed row are scored, shape (T,): labelled ones, except the first of each sequence (nothing
    of its own sequence precedes it)."""
    return (labels.reshape(-1) != IGNORE_INDEX) & (position_ids.reshape(-1) != 0)


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | the tokens before it in its sequence) at every target t, 0 elsewhere: shape (T,), float32.

    `logits`: (1, T, V) or (T, V) for a packed row. Only the rows that predict a target are normalised (in float32),
    so prompts cost no softmax."""
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    targets = target_mask(labels, position_ids)
    predicting = targets[1:]  # logits t-1 predict token t
    rows = logits[:-1][predicting].float()
    picked = rows.gather(-1, labels[1:][predicting].unsqueeze(-1)).squeeze(-1) - rows.logsumexp(-1)
    shifted = torch.zeros(labels.numel() - 1, dtype=picked.dtype, device=picked.device).masked_scatter(
        predicting, picked
    )
    return torch.cat([shifted.new_zeros(1), shifted])


def sequence_log_probs(
    token_logps: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, num_sequences: int | None = None
) -> SequenceLogProbs:
    """Per-sequence sums and counts of `token_logps` (shape (T,) or (1, T), aligned with the tokens they score, as
    `token_log_probs` gives them, or as a fused kernel's per-token output shifted by one) over the targets."""
    ids = sequence_ids(position_ids)
    targets = target_mask(labels, position_ids)
    count = int(ids[-1]) + 1 if num_sequences is None else num_sequences
    token_logps = token_logps.reshape(-1)
    scored = torch.where(targets, token_logps, torch.zeros_like(token_logps))
    sums = scored.new_zeros(count).index_add(0, ids, scored)
    counts = torch.zeros(count, dtype=torch.long, device=ids.device).index_add(0, ids, targets.long())
    return SequenceLogProbs(sums, counts)


# --- the losses ------------------------------------------------------------------------------------------------------


def _pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DPO over pairs, from summed log-probabilities of shape (B,) under the policy and the reference.

    sigmoid: -log σ(β Δ), Δ the chosen answer's log-ratio to the reference minus the rejected one's; hinge:
    max(0, 1 - β Δ); robust (Chowdhury et al.): the sigmoid loss debiased for labels flipped with probability
    `label_smoothing` ε in [0, 0.5); conservative (cDPO, Mitchell): the sigmoid loss of a label flipped with
    probability ε, -(1 - ε) log σ(β Δ) - ε log σ(-β Δ), whose optimum keeps the margin finite; ipo: (Δ' - 1/(2β))²,
    Δ' with each log-ratio divided by its answer's token count (`chosen_tokens`, `rejected_tokens`), as TRL
    normalises it."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "robust":
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "conservative":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the answers' token counts")
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps)
    return losses.mean(), metrics


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO over pairs, from mean log-probabilities per answer token, shape (B,): -log σ(β (m_c - m_r) - γ), with
    `label_smoothing` ε mixing in (ε) the loss of the flipped label, as TRL's CPOTrainer does. No reference model."""
    logits = chosen_mean_logps - rejected_mean_logps - gamma / beta
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    metrics = _pair_metrics(
        beta * chosen_mean_logps, beta * rejected_mean_logps, chosen_mean_logps, rejected_mean_logps
    )
    return losses.mean(), metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Mächler's split)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO: `chosen_nll` (the mean negative log-likelihood of the chosen answers' tokens) minus λ (`beta`, as TRL
    names it) times the mean log σ of the log odds ratio between chosen and rejected, from mean log-probabilities
    per answer token (B,), in float32."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll - beta * ratio.mean()
    metrics = _pair_metrics(beta * chosen, beta * rejected, chosen, rejected)
    metrics.update(
        nll_loss=chosen_nll.detach(), log_odds_ratio=ratio.detach().mean(), log_odds_chosen=log_odds.detach().mean()
    )
    return loss, metrics


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO over single answers labelled desirable or not, from summed log-probabilities (B,) under policy and
    reference.

    The reference point z is the KL estimate TRL's KTOTrainer uses: the mean, over the micro-batch, of the policy's
    minus the reference's log-probability of mismatched (prompt, answer) pairs (`kl_logps`, `ref_kl_logps`: each
    prompt with another example's answer, see `llmft.data.preference.kl_partners`), clamped at 0 and carrying no
    gradient. A desirable answer's loss is w_d (1 - σ(β (r - z))), an undesirable one's w_u (1 - σ(β (z - r))), r its
    log-ratio to the reference; the loss is their mean over the examples."""
    kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    logratios = logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    rewards = beta * logratios.detach()
    metrics: Metrics = {"kl": kl}
    for name, chosen in (("chosen", desirable), ("rejected", ~desirable)):
        if chosen.any():
            metrics[f"rewards/{name}"] = rewards[chosen].mean()
            metrics[f"logps/{name}"] = logps.detach()[chosen].mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


# --- what a trainer calls -------------------------------------------------------------------------------------------


def compute_preference_loss(
    settings: PreferenceArguments,
    policy: SequenceLogProbs,
    batch: dict[str, torch.Tensor],
    reference: torch.Tensor | None = None,
    kl_logps: torch.Tensor | None = None,
    reference_kl_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The micro-batch's loss and metrics under `settings.objective`.

    `policy`: `sequence_log_probs` of the packed row `batch` (a pair collator's: `chosen_index`, `rejected_index`;
    a KTO collator's: `desirable`). `reference`: the reference model's summed log-probabilities of the same sequences,
    shape (N,), for DPO and KTO (the batch's `reference_logps` when they were computed before training). KTO also takes
    the summed log-probabilities of the batch's KL row (`kl_input_ids` ...) under the policy, without gradient, and
    under the reference."""
    objective = settings.objective
    if objective in REFERENCE_OBJECTIVES and reference is None:
        raise ValueError(f"the {objective} objective needs the reference model's log-probabilities")
    if objective == "kto":
        if kl_logps is None or reference_kl_logps is None:
            raise ValueError("the kto objective needs the log-probabilities of the KL row")
        return kto_loss(
            policy.sums,
            reference,
            batch["desirable"],
            kl_logps,
            reference_kl_logps,
            beta=settings.beta,
            desirable_weight=settings.desirable_weight,
            undesirable_weight=settings.undesirable_weight,
        )
    chosen, rejected = policy.select(batch["chosen_index"]), policy.select(batch["rejected_index"])
    if objective == "dpo":
        return dpo_loss(
            chosen.sums,
            rejected.sums,
            reference[batch["chosen_index"]],
            reference[batch["rejected_index"]],
            beta=settings.beta,
            loss_type=settings.loss_type,
            label_smoothing=settings.label_smoothing,
            chosen_tokens=chosen.counts,
            rejected_tokens=rejected.counts,
        )
    if objective == "simpo":
        return simpo_loss(
            chosen.means,
            rejected.means,
            beta=settings.beta,
            gamma=settings.simpo_gamma,
            label_smoothing=settings.label_smoothing,
        )
    if objective == "orpo":
        nll = -chosen.sums.sum() / chosen.counts.sum().clamp(min=1)
        return orpo_loss(chosen.means, rejected.means, nll, beta=settings.beta)
    raise ValueError(f"{objective!r} is not a preference objective; choose one of {OBJECTIVES[1:]}")


def preference_problems(settings: PreferenceArguments) -> list[str]:
    """What is wrong with the preference settings, one message per problem naming its flag; empty when none."""
    from llmft.args import PreferenceArguments

    defaults = PreferenceArguments()
    objective = settings.objective
    if objective not in OBJECTIVES:
        return [f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}"]
    problems = []

    def only_for(flag: str, objectives: tuple[str, ...], extra: str = "") -> None:
        if getattr(settings, flag) != getattr(defaults, flag) and objective not in objectives:
            problems.append(
                f"--{flag} {getattr(settings, flag)} applies to --objective {' or '.join(objectives)}{extra}, "
                f"not {objective}"
            )

    only_for("beta", OBJECTIVES[1:])
    only_for("loss_type", ("dpo",))
    only_for("label_smoothing", ("dpo", "simpo"), " (with --loss_type robust or conservative for dpo)")
    only_for("simpo_gamma", ("simpo",))
    only_for("desirable_weight", ("kto",))
    only_for("undesirable_weight", ("kto",))
    if not (isinstance(settings.beta, (int, float)) and math.isfinite(settings.beta) and settings.beta > 0):
        problems.append(f"--beta {settings.beta}: must be a positive number")
    if settings.loss_type not in DPO_LOSS_TYPES:
        problems.append(f"--loss_type {settings.loss_type!r}: choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0 <= settings.label_smoothing < 0.5:
        problems.append(
            f"--label_smoothing {settings.label_smoothing}: the probability that a preference is flipped lies in "
            "[0, 0.5)"
        )
    elif settings.label_smoothing and objective == "dpo" and settings.loss_type not in SMOOTHED_DPO_LOSS_TYPES:
        problems.append(
            f"--label_smoothing {settings.label_smoothing} needs --loss_type robust or conservative (the "
            f"{settings.loss_type} loss has no label smoothing)"
        )
    if not (math.isfinite(settings.simpo_gamma) and settings.simpo_gamma >= 0):
        problems.append(f"--simpo_gamma {settings.simpo_gamma}: the target reward margin must be 0 or more")
    for flag in ("desirable_weight", "undesirable_weight"):
        value = getattr(settings, flag)
        if not (math.isfinite(value) and value > 0):
            problems.append(f"--{flag} {value}: must be a positive number")
    return problems
