"""`PreferenceTrainer`: LlmftTrainer with a preference objective's loss (llmft/objectives/) in place of SFT's.

Each micro-batch is one packed row of whole pairs (KTO: examples) from llmft.data.preference's collators; its loss
is `micro_batch_loss` (the mean over its pairs), weighted so that an optimizer step's loss is the mean over every
pair of all its micro-batches and ranks, as transformers' `num_items_in_batch` does for SFT's tokens: the step's
pairs are counted over its micro-batches and summed over the ranks (`_get_num_items_in_batch`), and a micro-batch of
n pairs contributes its mean x n / that count x ranks (the ranks' gradients are averaged). Evaluation scores
--eval_data_path's pairs with the same loss; `eval_loss` is the mean over its pairs.

The objective's metrics (rewards chosen / rejected, margins, accuracy, log-probabilities, and ORPO's and KTO's own;
llmft.objectives.preference names them) are averaged over the pairs of every rank since the last log, and logged
with the loss (evaluation's with the `eval_` prefix), so they reach the log history and the run report.

A full fine-tune's reference log-probabilities (`reference_plan`) are added to the datasets' rows as training starts,
before the first step, through the model as training wraps it (`ReferenceBeforeFirstStep`): computed once and kept in
the run folder, read back from there on a resume (llmft.objectives.reference).

Dropout is switched off in the model: the policy's log-probabilities are compared with the reference's, which dropout
would blur with noise (the checks refuse --lora_dropout > 0 for the same reason).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from llmft.objectives.forward import micro_batch_loss
from llmft.objectives.reference import keep_reference_log_probs
from llmft.report import PREFERENCE_METRICS
from llmft.trainer import LlmftTrainer

if TYPE_CHECKING:
    from llmft.args import PreferenceArguments
    from llmft.plan import RunPlan

# every metric the objectives log and the loss, in one fixed order, so that ranks sum them in one collective whatever
# subset their micro-batches produced (a KTO micro-batch without an undesirable example has no rewards/rejected)
METRICS = (*PREFERENCE_METRICS, "loss")


def items_in(batch: dict) -> int:
    """The pairs (KTO: examples) of a collated micro-batch."""
    return len(batch["desirable"]) if "desirable" in batch else len(batch["chosen_index"])


class PreferenceTrainer(LlmftTrainer):
    """See the module docstring. `preference`: the run's PreferenceArguments (a preference objective)."""

    # compute_loss weights the loss for accumulation and ranks itself (see the module docstring)
    loss_is_scaled_for_ga = True

    def __init__(
        self, *args: Any, preference: PreferenceArguments, reference_plan: RunPlan | None = None, **kwargs: Any
    ) -> None:
        self.preference = preference
        self._metric_sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        if reference_plan is not None:
            kwargs["callbacks"] = [ReferenceBeforeFirstStep(self, reference_plan), *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)
        for module in self.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    def _sample_lengths(self, dataset: torch.utils.data.Dataset) -> list[int]:
        return dataset.lengths  # a pair (KTO: an example and its KL sequence) is the sampler's unit

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        return data_collator  # the rows' keys are the collator's, not the model's arguments

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The pairs of an optimizer step's micro-batches, over all ranks."""
        if not batch_samples:
            return None
        count = torch.tensor(sum(items_in(batch) for batch in batch_samples), dtype=torch.float32, device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss, metrics = micro_batch_loss(model, inputs, self.preference)
        if model.training and torch.is_grad_enabled():  # the model never saw the labels: the report counts them here
            self.training_report.count_trained(inputs["labels"])
        pairs = items_in(inputs)
        self._add_metrics("train" if model.training else "eval", {**metrics, "loss": loss.detach()}, pairs)
        if num_items_in_batch is not None:
            loss = loss * (pairs * self.accelerator.num_processes / num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict, prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _add_metrics(self, kind: str, metrics: dict[str, torch.Tensor], pairs: int) -> None:
        """Add a micro-batch's metrics, weighted by its pairs, to the sums since the last log (on the device, no
        synchronisation): one row of sums and one of weights."""
        device = metrics["loss"].device
        row = torch.zeros(2, len(METRICS), device=device)
        for i, name in enumerate(METRICS):
            if name in metrics:
                row[0, i], row[1, i] = metrics[name].float() * pairs, pairs
        sums = self._metric_sums[kind]
        self._metric_sums[kind] = row if sums is None else sums + row

    def _take_metrics(self, kind: str) -> dict[str, float]:
        """The metrics' means since the last log over every rank's pairs, and the sums start again. Every rank calls
        it (a collective), as every rank calls `log`."""
        sums, self._metric_sums[kind] = self._metric_sums[kind], None
        if sums is None:
            sums = torch.zeros(2, len(METRICS), device=self.args.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum")
        prefix = "eval_" if kind == "eval" else ""
        return {
            prefix + name: round(total / weight, 6)
            for name, total, weight in zip(METRICS, sums[0].tolist(), sums[1].tolist())
            if weight > 0 and (name != "loss" or kind == "eval")
        }

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "eval_loss" in logs:
            logs = {**logs, **self._take_metrics("eval")}  # eval_loss: the mean over the eval pairs
        elif "loss" in logs:
            logs = {**logs, **self._take_metrics("train")}
        super().log(logs, *args, **kwargs)


class ReferenceBeforeFirstStep(TrainerCallback):
    """At the start of training, on every rank: the precomputed reference's values added to the trainer's datasets
    (llmft.objectives.reference.keep_reference_log_probs), computed with the model as training wraps it."""

    def __init__(self, trainer: PreferenceTrainer, plan: RunPlan) -> None:
        self.trainer, self.plan = trainer, plan

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None, **_: Any
    ) -> None:
        trainer = self.trainer
        datasets = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
        resumed = state.global_step > 0
        keep_reference_log_probs(model, datasets, self.plan, args, self.plan.micro_batch_tokens, resumed=resumed)
