"""Every ZeRO / FSDP / rank concern of a run, and each library workaround that comes with one, in one place.

One function per concern; each docstring says which library (and version: those of requirements.txt unless it says
otherwise) it answers to, and why. The rest of llmft asks these functions instead of reading DeepSpeed's,
accelerate's or the environment's state itself:

- `uses_zero3`, `shards_parameters`: whether this run partitions its parameters over the ranks;
- `sharding_of`: how the run spreads over its ranks (none / ddp / zero1-3 / fsdp) and what it offloads to the CPU;
- `deepspeed_optimizer`: the optimizer a DeepSpeed config builds itself instead of --optim's;
- `init_deepspeed_on_cpu_ranks`: DeepSpeed's communication layer for ZeRO-3 loading on gloo ranks;
- `quantized_weights_device_map`, `bnb_4bit_storage_dtype`: where and in what dtype a quantized base is loaded;
- `dataloader_order_options`: the Trainer's `dataloader_in_order`, on the transformers versions that have it;
- `enable_fsdp_on_cpu_ranks`: FSDP on CPU ranks, which accelerate never turns on (a patch of its private state,
  guarded by the accelerate versions it was checked on);
- `runs_on_several_ranks`, `whole_parameter_name_and_shape`: collectives only where there are ranks to talk to, and a
  sharded parameter's own name and whole shape;
- `shut_down_ranks`, `ranks_shut_down_when_done`: the end of a run on every rank, DeepSpeed and the process group
  torn down before the interpreter exits.

Launching the ranks (torchrun, MPI, Slurm, DeepSpeed's pdsh runner) is the llmft/launch/ package's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from llmft.errors import ConfigError, LlmftError
from llmft.preemption import Preempted

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)


def uses_zero3(training_args: TrainingArguments) -> bool:
    """Whether this run trains under DeepSpeed ZeRO-3. transformers' own answer (`is_deepspeed_zero3_enabled`) comes
    from a process-wide weak reference to the last DeepSpeed config any TrainingArguments made, so it is asked only
    when this run's arguments name a DeepSpeed config."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(training_args.deepspeed) and is_deepspeed_zero3_enabled()


def shards_parameters(sharding: str) -> bool:
    """Whether a run of this sharding (`sharding_of`) holds on each rank only a shard of every parameter (ZeRO-3 or
    FSDP), so nothing may need a whole weight outside the module call that gathers it (Liger's fused output head,
    PiSSA's decomposition, a GPTQ base's packed buffers, which neither shards)."""
    return sharding in ("zero3", "fsdp")


def deepspeed_optimizer(training_args: TrainingArguments) -> str | None:
    """The optimizer the DeepSpeed config --deepspeed names builds itself (its "optimizer" section's type, lower
    case; the offload configs' AdamW), which then replaces --optim; None without DeepSpeed or such a section."""
    config = getattr(training_args, "hf_deepspeed_config", None) if training_args.deepspeed else None
    if config is None or "optimizer" not in config.config:
        return None
    return str(config.config["optimizer"].get("type", "adamw")).lower()


def sharding_of(training_args: TrainingArguments) -> tuple[str, tuple[str, ...]]:
    """(sharding, offloaded): `none` (one process), `ddp` (several, each with the whole model), `zero0`..`zero3`
    (DeepSpeed's ZeRO stage, from the config --deepspeed names) or `fsdp`; and what the CPU holds instead of the
    accelerator: `optimizer` and/or `parameters` (DeepSpeed's offload_optimizer / offload_param; FSDP's cpu_offload,
    which moves both), empty for none."""
    if training_args.deepspeed:
        config = getattr(training_args, "hf_deepspeed_config", None)
        stage = 3 if uses_zero3(training_args) else (config.get_value("zero_optimization.stage", 0) if config else 0)
        offloaded = tuple(
            what
            for what, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
            if config is not None and str(config.get_value(f"zero_optimization.{key}.device", "none")).lower() != "none"
        )
        return f"zero{stage}", offloaded
    if training_args.fsdp:
        from transformers.training_args import FSDPOption

        # transformers turns the `offload` option into fsdp_config's cpu_offload, which may also be set there itself
        options = training_args.fsdp if isinstance(training_args.fsdp, (list, tuple)) else ()  # True: the bare switch
        offload = (
            FSDPOption.OFFLOAD in options
            or str((training_args.fsdp_config or {}).get("cpu_offload", False)).lower() == "true"
        )
        return "fsdp", ("optimizer", "parameters") if offload else ()
    return ("ddp" if training_args.world_size > 1 else "none"), ()


def require_launcher(training_args: TrainingArguments) -> None:
    """Refuse --deepspeed in a process no launcher started (ConfigError), before anything loads: DeepSpeed then looks
    for MPI itself and fails with mpi4py's ImportError once the model has loaded. Launched means RANK / LOCAL_RANK
    (torchrun, the DeepSpeed launcher) or --local_rank are set, or mpirun's variables with mpi4py to read them."""
    import importlib.util

    if not training_args.deepspeed or training_args.fsdp:  # --fsdp with --deepspeed is refused by llmft.checks
        return
    if training_args.local_rank != -1 or os.environ.get("LOCAL_RANK") or os.environ.get("RANK"):
        return
    if os.environ.get("OMPI_COMM_WORLD_SIZE") and importlib.util.find_spec("mpi4py") is not None:
        return
    raise ConfigError(
        [
            f"--deepspeed {training_args.deepspeed} runs in a process group that a launcher starts: use "
            "finetune/finetune_ds.sh (or finetune_lora_single_gpu.sh --deepspeed ...), torchrun, or for one "
            "process `python -m llmft.launch.torchrun --standalone --nproc_per_node 1 finetune.py ...`"
        ]
    )


def init_deepspeed_on_cpu_ranks(training_args: TrainingArguments) -> None:
    """DeepSpeed's communication layer on CPU ranks, before the model loads. accelerate 1.15 has started the gloo
    process group by then, but ZeRO-3's partitioned loading inside `from_pretrained` (DeepSpeed 0.19's `zero.Init`)
    talks through DeepSpeed's own `deepspeed.comm`, which on GPUs the DeepSpeed engine sets up and on CPU ranks nothing
    does. A no-op without --deepspeed or off the CPU."""
    if training_args.deepspeed and training_args.use_cpu:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def quantized_weights_device_map(sharding: str) -> dict | None:
    """`device_map` for loading a quantized base (bitsandbytes or GPTQ) under the plan's `sharding` (`sharding_of`):
    such weights are placed at load time, one whole copy per process on that process's device (LOCAL_RANK's GPU, or
    the CPU). Under ZeRO-3 none: transformers refuses a device_map there, and DeepSpeed places the partitions
    itself."""
    if sharding == "zero3":
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def bnb_4bit_storage_dtype(sharding: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit weights into under the plan's `sharding` (`sharding_of`): uint8 as
    bitsandbytes does by default, or under ZeRO-3 the compute dtype, since DeepSpeed partitions only floating-point
    parameters and would otherwise leave the whole quantized base on every rank (`bnb_4bit_quant_storage`, added for
    this in bitsandbytes 0.43 with huggingface/peft#1550)."""
    return compute_dtype if sharding == "zero3" else torch.uint8


def dataloader_order_options(training_args: TrainingArguments) -> dict:
    """The DataLoader option transformers' own train loader gets from `--dataloader_in_order` (transformers 5.18
    added the flag), for a loader llmft builds itself; nothing on a transformers without it."""
    if hasattr(training_args, "dataloader_in_order"):
        return {"in_order": training_args.dataloader_in_order}
    return {}


def runs_on_several_ranks(training_args: TrainingArguments) -> bool:
    """Whether collectives have other ranks to reach: more than one process, with the process group started."""
    return training_args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def shut_down_ranks(trainer: Trainer | None = None) -> None:
    """End this process's part in a distributed run, on every rank once all of them are done with their collectives:
    the trainer's DeepSpeed engine destroyed (DeepSpeed 0.19's `DeepSpeedEngine.destroy`: ZeRO-3's parameter hooks
    and the optimizer's state released while the process group still works), a barrier, then the process group
    destroyed, through `deepspeed.comm` when DeepSpeed set it up (which also drops DeepSpeed's own references to it).

    Why: a rank whose gloo process group is still alive when the interpreter finalizes can abort at exit (PyTorch
    2.x: gloo's worker threads still own work whose tensors hold Python references; `terminate called without an
    active exception`, SIGABRT), so the launcher reports a failure for a run that finished and saved; NCCL ranks warn
    `destroy_process_group() was not called`. PyTorch asks for `destroy_process_group()` at the end of every trainer
    process. Only where every rank gets to it: after one rank failed, the barrier would wait for ranks that never
    come. Nothing to do in a single process."""
    engine = getattr(trainer, "deepspeed", None) if trainer is not None else None
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()  # no rank leaves while another still waits on it in a collective
    if "deepspeed" in sys.modules:
        from deepspeed import comm as deepspeed_comm

        if deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def ranks_shut_down_when_done(trainer: Trainer | None = None) -> Iterator[None]:
    """Run the block, then `shut_down_ranks(trainer)` when it ends where every rank ends: normally, or with
    `llmft.preemption.Preempted` (raised on all ranks together once the checkpoint is on disk). Any other exception
    leaves the process group as it is: other ranks may never reach the barrier."""
    try:
        yield
    except Preempted:
        shut_down_ranks(trainer)
        raise
    shut_down_ranks(trainer)


# Wrappers whose names PyTorch puts into a wrapped module's parameter names (FSDP1, activation checkpointing).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def whole_parameter_name_and_shape(name: str, param: torch.nn.Parameter) -> tuple[str, tuple[int, ...] | None]:
    """A parameter's name without the wrappers' prefixes, and the shape of the whole tensor on this rank or all
    ranks: ZeRO-3 keeps a partitioned weight's shape in `ds_shape`, an FSDP2 weight is a DTensor whose shape is
    the whole one; None for FSDP1's flattened shards, whose shape no rank can tell."""
    shape = None if _WRAPPER_PREFIXES[0] in name else tuple(getattr(param, "ds_shape", param.shape))
    for wrapper in _WRAPPER_PREFIXES:
        name = name.replace(wrapper, "")
    return name, shape


# The accelerate releases whose AcceleratorState / PartialState (accelerate/state.py) were read for the patch in
# enable_fsdp_on_cpu_ranks: 1.15.0, the pinned one. A patch release of the same minor is trusted; any other release
# is refused rather than patched blind.
FSDP_ON_CPU_CHECKED_ACCELERATE = "==1.15.*"


def enable_fsdp_on_cpu_ranks(accelerator: Accelerator, training_args: TrainingArguments) -> bool:
    """Give CPU ranks the FSDP plugin accelerate builds only for accelerator devices; True when it did, False where
    nothing was needed (no --fsdp, or accelerate already runs FSDP).

    The upstream limitation (accelerate 1.15.0, `AcceleratorState.__init__`): the distributed type becomes
    `DistributedType.FSDP` only from a multi-accelerator type (MULTI_GPU, MULTI_NPU, MULTI_XPU, MULTI_HPU, ...), never
    from MULTI_CPU, so `--fsdp` on gloo ranks (`--use_cpu True`) trains as plain DDP without a word, though PyTorch's
    FSDP2 itself runs on CPU over gloo. No upstream issue was found for it.

    The patch writes accelerate's private shared state: both `AcceleratorState` and `PartialState._shared_state`,
    because `AcceleratorState.__init__` copies PartialState's distributed type back into itself whenever it is
    constructed again, as happens during training, which would quietly undo the change (the final save then gathered
    nothing and hung). That layout is private, so the patch runs only on the accelerate versions it was checked on
    (FSDP_ON_CPU_CHECKED_ACCELERATE); on any other it fails loudly (LlmftError), as it does when the state does not
    hold FSDP after the patch, instead of letting the run fall back to DDP."""
    import accelerate
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from packaging.specifiers import SpecifierSet

    state = accelerator.state
    if not (training_args.fsdp_plugin_args and state.distributed_type == DistributedType.MULTI_CPU):
        return False
    version = accelerate.__version__
    if version not in SpecifierSet(FSDP_ON_CPU_CHECKED_ACCELERATE):
        raise LlmftError(
            f"--fsdp on CPU ranks: accelerate {version} is installed, and llmft turns FSDP on for CPU processes (which "
            f"accelerate itself never does) by patching accelerate's private state, checked only on accelerate "
            f"{FSDP_ON_CPU_CHECKED_ACCELERATE.removeprefix('==')}; install accelerate==1.15.0 (requirements.txt), "
            "run FSDP on GPUs, or use --deepspeed on CPU ranks"
        )
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    if state.mixed_precision != "no":  # as accelerate does for the plugins it enables itself
        state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if AcceleratorState().distributed_type != DistributedType.FSDP:  # what training constructs again
        raise LlmftError(
            f"--fsdp on CPU ranks: accelerate {version} did not keep FSDP turned on after llmft's patch "
            "of its state, and the run would train as plain DDP; run FSDP on GPUs, or use --deepspeed "
            "on CPU ranks"
        )
    if training_args.should_log:
        logger.warning("FSDP%d on %d CPU ranks over gloo", state.fsdp_plugin.fsdp_version, state.num_processes)
    return True
