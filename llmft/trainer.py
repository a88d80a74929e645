"""The Trainer finetune.py trains with: transformers' own, plus FSDP on CPU ranks.

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

import transformers

logger = logging.getLogger(__name__)


class Trainer(transformers.Trainer):
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
