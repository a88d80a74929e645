"""The Trainer finetune.py trains with: transformers' own, plus packed micro-batches, checkpoints whose files follow
the umask as soon as they are written (llmft.saving.FollowUmaskCallback), and FSDP on CPU ranks.

Packing (see llmft/data/packing.py): training micro-batches go through `PackedCollator`; with a token budget their
samples are chosen by `TokenBudgetBatchSampler` instead of a sample count. Evaluation keeps the padding collator the
Trainer is given, so eval losses are averaged as transformers always has. Under several ranks the sampler's
micro-batches are dealt out by accelerate (rank r takes every r-th), and every epoch has the same number of them, a
multiple of ranks x accumulation steps. Loss normalisation needs nothing of its own: transformers counts the trained
targets of all micro-batches of an optimizer step (over all ranks) and divides each micro-batch's summed loss by that
count.

FSDP comes from `--fsdp True --fsdp_config ds_configs/fsdp.json` (see finetune/common.sh for the choices in that
file). transformers hands the config to accelerate, which wraps the model with PyTorch's FSDP2 (`fully_shard`) on GPU
ranks. On CPU ranks (`--use_cpu True`, gloo) accelerate 1.15 never turns FSDP on: `AcceleratorState` switches to
`DistributedType.FSDP` only from a multi-accelerator type (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...), not MULTI_CPU, so
the run trains as plain DDP without a word. PyTorch's FSDP2 itself runs on CPU over gloo, so `Trainer` below takes
the step accelerate leaves out, and CPU runs (the tests, a laptop) go through the same FSDP wrapping, training and
saving as GPU runs.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import transformers

from llmft.data.packing import LongestFirstSampler, Packing, TokenBudgetBatchSampler, sample_lengths
from llmft.preemption import PreemptionCallback
from llmft.report import TrainingReportCallback
from llmft.saving import FollowUmaskCallback

logger = logging.getLogger(__name__)


class Trainer(transformers.Trainer):
    def __init__(self, *args, packing: Packing | None = None, loraplus_lr_ratio: float | None = None, **kwargs):
        self.packing = packing
        self.loraplus_lr_ratio = loraplus_lr_ratio
        # before the caller's callbacks, so that anything reading a checkpoint sees its final file modes
        kwargs["callbacks"] = [FollowUmaskCallback(), TrainingReportCallback(), PreemptionCallback(),
                               *(kwargs.get("callbacks") or [])]
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self):
        if self.packing is None:
            return super().get_train_dataloader()
        if self.packing.max_tokens is None:  # the Trainer's own sampler, with the packing collator
            padding_collator, self.data_collator = self.data_collator, self.packing.collator
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = padding_collator
        return self._token_budget_dataloader()

    def _get_train_sampler(self, train_dataset=None):
        """transformers' sampler, except that its random order puts the longest samples in every rank's first batch
        (`LongestFirstSampler`: an out-of-memory shows in the first step). Lazy datasets keep transformers' sampler:
        their lengths are known only once each sample is tokenized."""
        import datasets

        sampler = super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if type(sampler) is not torch.utils.data.RandomSampler or not isinstance(dataset, datasets.Dataset):
            return sampler
        args = self.args
        return LongestFirstSampler(sample_lengths(dataset), args.train_batch_size * args.world_size,
                                   seed=args.seed if args.data_seed is None else args.data_seed)

    def _token_budget_dataloader(self):
        # every epoch a whole number of optimizer steps, each of the same micro-batches however many ranks share them
        args, world = self.args, self.args.world_size
        lengths = sample_lengths(self.train_dataset)
        batches_needed = None
        if args.max_steps > 0:
            batches_needed = args.max_steps * args.gradient_accumulation_steps * world
        sampler = TokenBudgetBatchSampler(
            lengths, self.packing.max_tokens, window=self.packing.window,
            seed=args.seed if args.data_seed is None else args.data_seed,
            num_epochs=None if batches_needed else math.ceil(args.num_train_epochs), max_batches=batches_needed,
            batches_multiple_of=world * args.gradient_accumulation_steps, heaviest_first=world,
        )
        if args.should_log:
            logger.warning("packing: %d samples, %d tokens into %d micro-batches of at most %d tokens an epoch "
                           "(%d per rank; --per_device_train_batch_size unused), %.1f%% of the token budget unused",
                           len(lengths), sum(lengths),
                           len(sampler), sampler.max_tokens, len(sampler) // world, 100 * sampler.unused_share())
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.packing.collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            **({"in_order": args.dataloader_in_order} if hasattr(args, "dataloader_in_order") else {}),  # 5.18+
            worker_init_fn=partial(transformers.trainer_utils.seed_worker, num_workers=args.dataloader_num_workers,
                                   rank=args.process_index),
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model=None):
        """transformers' optimizer, or with `loraplus_lr_ratio` PEFT's LoRA+ one: the same optimizer class and
        settings (--optim, --optim_args, --adam_*, --weight_decay), the B matrices (and other vectors, DoRA's
        magnitudes included) at --learning_rate x the ratio. Under DeepSpeed transformers calls this too, as long as
        the DeepSpeed config names no optimizer of its own (args.validate refuses one that does)."""
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
        self.optimizer = create_loraplus_optimizer(opt_model, optimizer_cls, lr=lr,
                                                   loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **optimizer_kwargs)
        if self.args.should_log:
            groups = self.optimizer.param_groups  # PEFT's order: A side, LoRA embeddings, B side, B side no decay
            logger.warning("LoRA+: %d tensors at learning rate %g, %d (B side) at %g", len(groups[0]["params"]), lr,
                           len(groups[2]["params"]) + len(groups[3]["params"]), lr * self.loraplus_lr_ratio)
        return self.optimizer

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if enable_fsdp_on_cpu_ranks(self.accelerator, self.args):
            self.is_fsdp_enabled = True  # read by Trainer.__init__ after this, and by train() and save_model()


def enable_fsdp_on_cpu_ranks(accelerator, training_args) -> bool:
    """Give CPU ranks the FSDP plugin accelerate built only for accelerator devices; True when it did.

    Both shared states are set: `AcceleratorState` copies `PartialState`'s distributed type back into itself whenever
    it is constructed again, as happens during training, which would quietly undo the change (the final save then
    gathered nothing and hung)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not (training_args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU):
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    if state.mixed_precision != "no":  # as accelerate does for the plugins it enables itself
        state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if training_args.should_log:
        logger.warning("FSDP%d on %d CPU ranks over gloo", state.fsdp_plugin.fsdp_version, state.num_processes)
    return True
