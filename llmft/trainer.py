"""The Trainer finetune.py trains with, `LlmftTrainer`: transformers' own, plus packed micro-batches, LoRA+
optimizer groups, checkpoints whose files follow the umask as soon as they are written
(llmft.saving.FollowUmaskCallback), the run report and preemption callbacks, and FSDP on CPU ranks.

Packing (see llmft/data/packing.py): training micro-batches go through `PackedCollator`; with a token budget their
samples are chosen by `TokenBudgetBatchSampler` instead of a sample count. Evaluation keeps the padding collator the
Trainer is given, so eval losses are averaged as transformers always has. Under several ranks the sampler's
micro-batches are dealt out by accelerate (rank r takes every r-th), and every epoch has the same number of them, a
multiple of ranks x accumulation steps. Loss normalisation needs nothing of its own: transformers counts the trained
targets of all micro-batches of an optimizer step (over all ranks) and divides each micro-batch's summed loss by that
count.

FSDP comes from `--fsdp True --fsdp_config ds_configs/fsdp.json` (see llmft/launch/launcher.py for the choices in that
file). transformers hands the config to accelerate, which wraps the model with PyTorch's FSDP2 (`fully_shard`) on GPU
ranks. On CPU ranks (`--use_cpu True`, gloo) accelerate never turns FSDP on, and LlmftTrainer takes that
step itself (`llmft.distributed.enable_fsdp_on_cpu_ranks`, which says why and on which accelerate versions), so CPU runs
(the tests, a laptop) go through the same FSDP wrapping, training and saving as GPU runs.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llmft.activation_offload import ActivationOffloadCallback
from llmft.data.packing import LongestFirstSampler, Packing, TokenBudgetBatchSampler, sample_lengths
from llmft.distributed import dataloader_order_options, enable_fsdp_on_cpu_ranks
from llmft.preemption import PreemptionCallback
from llmft.report import TrainingReportCallback
from llmft.run_folder import record_written
from llmft.saving import FollowUmaskCallback

if TYPE_CHECKING:
    from llmft.preflight import MemoryEstimate

logger = logging.getLogger(__name__)


class LlmftTrainer(transformers.Trainer):
    """transformers' Trainer plus what llmft adds to it:

    - packed training micro-batches (`packing`), with a token budget per micro-batch when it sets `max_tokens`;
    - the longest samples in the first optimizer step, so an out-of-memory shows at once (`_get_train_sampler`);
    - LoRA+ optimizer groups (`loraplus_lr_ratio`);
    - llmft's callbacks ahead of the caller's: checkpoint file modes, the run report, preemption, and activation
      offloading (`offload_activations`); each checkpoint recorded in the run folder before it is written;
    - no step past --max_steps when resuming from a checkpoint taken at it (`_run_epoch`);
    - FSDP on CPU ranks (`create_accelerator_and_postprocess`).
    """

    def __init__(
        self,
        *args: Any,
        packing: Packing | None = None,
        loraplus_lr_ratio: float | None = None,
        offload_activations: bool = False,
        lean_recompute: bool = False,
        memory_estimate: MemoryEstimate | None = None,
        **kwargs: Any,
    ) -> None:
        self.packing = packing
        # what the memory preflight expected, read beside the measured peak (tools/benchmark.py)
        self.memory_estimate = memory_estimate
        self.loraplus_lr_ratio = loraplus_lr_ratio
        # before the caller's callbacks, so that anything reading a checkpoint sees its final file modes
        datasets = {"train": kwargs.get("train_dataset"), "eval": kwargs.get("eval_dataset")}
        self.training_report = TrainingReportCallback(datasets)
        kwargs["callbacks"] = [
            FollowUmaskCallback(),
            self.training_report,
            PreemptionCallback(),
            *(
                [ActivationOffloadCallback(offload_activations, lean_recompute)]
                if offload_activations or lean_recompute
                else []
            ),
            *(kwargs.get("callbacks") or []),
        ]
        super().__init__(*args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> transformers.trainer_utils.TrainOutput:
        self.training_report.start_clock()  # the run report's time to the first step counts the set-up in train()
        return super().train(*args, **kwargs)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # recorded before the Trainer creates the folder: --overwrite_output_dir removes only what a run recorded
        if self.args.should_save and trial is None:
            record_written(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        super()._save_checkpoint(model, trial)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.packing is None:
            return super().get_train_dataloader()
        if self.packing.max_tokens is None:  # the Trainer's own sampler, with the packing collator
            padding_collator, self.data_collator = self.data_collator, self.packing.collator
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = padding_collator
        return self._token_budget_dataloader()

    def _get_train_sampler(
        self, train_dataset: torch.utils.data.Dataset | None = None
    ) -> torch.utils.data.Sampler | None:
        """transformers' sampler, except that its random order puts the longest samples in the first optimizer step
        (`LongestFirstSampler`: an out-of-memory shows in the first step; the whole step's worth, ranks x accumulation
        x batch size, so that the step holds the same samples however ranks and accumulation divide it). Lazy
        datasets keep transformers' sampler: their lengths are known only once each sample is tokenized."""
        import datasets

        sampler = super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if type(sampler) is not torch.utils.data.RandomSampler or not isinstance(dataset, datasets.Dataset):
            return sampler
        args = self.args
        first_step = args.train_batch_size * args.world_size * args.gradient_accumulation_steps
        seed = args.seed if args.data_seed is None else args.data_seed
        return LongestFirstSampler(sample_lengths(dataset), first_step, seed=seed)

    def _sample_lengths(self, dataset: torch.utils.data.Dataset) -> list[int]:
        """Tokens of each of `dataset`'s samples: what the token-budget sampler bins."""
        return sample_lengths(dataset)

    def _token_budget_dataloader(self) -> torch.utils.data.DataLoader:
        # every epoch a whole number of optimizer steps, each of the same micro-batches however many ranks share them
        args, world = self.args, self.args.world_size
        lengths = self._sample_lengths(self.train_dataset)
        batches_needed = None
        if args.max_steps > 0:
            batches_needed = args.max_steps * args.gradient_accumulation_steps * world
        sampler = TokenBudgetBatchSampler(
            lengths,
            self.packing.max_tokens,
            window=self.packing.window,
            seed=args.seed if args.data_seed is None else args.data_seed,
            num_epochs=None if batches_needed else math.ceil(args.num_train_epochs),
            max_batches=batches_needed,
            batches_multiple_of=world * args.gradient_accumulation_steps,
            heaviest_first=world * args.gradient_accumulation_steps,  # the first optimizer step, whoever takes it
        )
        if args.should_log:
            logger.warning(
                "packing: %d samples, %d tokens into %d micro-batches of at most %d tokens an epoch "
                "(%d per rank; --per_device_train_batch_size unused), %.1f%% of the token budget unused",
                len(lengths),
                sum(lengths),
                len(sampler),
                sampler.max_tokens,
                len(sampler) // world,
                100 * sampler.unused_share(),
            )
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.packing.collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            **dataloader_order_options(args),
            worker_init_fn=partial(
                transformers.trainer_utils.seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """transformers' optimizer, or with `loraplus_lr_ratio` PEFT's LoRA+ one: the same optimizer class and
        settings (--optim, --optim_args, --adam_*, --weight_decay), the B matrices (and other vectors, DoRA's
        magnitudes included) at --learning_rate x the ratio. Under DeepSpeed transformers calls this too, as long as
        the DeepSpeed config names no optimizer of its own (llmft.checks refuses one that does)."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            lr=lr,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **optimizer_kwargs,
        )
        if self.args.should_log:
            groups = self.optimizer.param_groups  # PEFT's order: A side, LoRA embeddings, B side, B side no decay
            logger.warning(
                "LoRA+: %d tensors at learning rate %g, %d (B side) at %g",
                len(groups[0]["params"]),
                lr,
                len(groups[2]["params"]) + len(groups[3]["params"]),
                lr * self.loraplus_lr_ratio,
            )
        return self.optimizer

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        """transformers' epoch, unless the run resumed from a checkpoint at --max_steps (a SIGTERM during the last
        step, a kill during the final save): transformers checks for the end only after a step, so it would train
        one step past --max_steps when that falls inside an epoch. Then training is over before it starts."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu_ranks(self.accelerator, self.args):
            self.is_fsdp_enabled = True  # read by Trainer.__init__ after this, and by train() and save_model()
