"""Refuse to resume from a checkpoint whose pickles could run code.

DeepSpeed reads its part of a checkpoint (`global_step*/*_model_states.pt`, `*_optim_states.pt`) with
`torch.load(weights_only=False)`: a plain unpickle, so a crafted file runs whatever its pickle imports and calls. The
Trainer's own files (rng_state*.pth, scheduler.pt, optimizer.pt, scaler.pt) are read with weights_only=True in
transformers 5 and are safe, but a crafted one would stop the run with an UnpicklingError traceback.

So before the Trainer resumes, every pickle of the checkpoint it will read is disassembled, not loaded
(`torch.serialization.get_unsafe_globals_in_checkpoint`, torch >= 2.5): a pickle can only run code through the
globals it imports, and the disassembler lists every GLOBAL of the protocol-2 pickles torch.save writes and fails on
any opcode it does not know (STACK_GLOBAL, INST, OBJ: other ways to import), which counts as a refusal too. A
checkpoint is accepted when each pickle is in torch.save's zip format and imports only what torch's weights_only
loader allows plus ALLOWED_GLOBALS: what DeepSpeed ZeRO-2/ZeRO-3 and the Trainer write there. Anything else is
refused with the file and the globals named, unless `--trust_checkpoint_pickles True`.
"""

from __future__ import annotations

import logging
import os

from llmft.errors import LlmftError

logger = logging.getLogger(__name__)

# Globals outside torch's weights_only allowlist that real checkpoints hold, found by listing the pickles of
# checkpoints of the tiny model on 2 CPU ranks under every shipped DeepSpeed config (zero2, zero3 with LoRA and full;
# zero2_offload, zero3_offload; the Q-LoRA launcher's ZeRO-2) and FSDP (whose .bin files need none): classes built
# from plain data, none of which runs anything when unpickled.
ALLOWED_GLOBALS = frozenset(
    {
        # ZeRO optimizer state (stage_1_and_2.py / stage3.py state_dict): the loss scaler object, the stage as an enum,
        # and ZeRO-2's per-parameter fragment addresses (a dataclass of two ints)
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        # what CreateLossScaler makes instead under --fp16 (the launchers' choice on GPUs before compute capability
        # 8.0); not seen on CPU, which trains in fp32
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        # the Trainer's rng_state*.pth: numpy's RNG state, as transformers' safe_globals() allows it (numpy 1 and 2)
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
    }
)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# Written into a checkpoint but never read on resume (the Trainer's record of its arguments, which pickles classes of
# transformers, accelerate and llmft).
NOT_READ_ON_RESUME = ("training_args.bin",)
TRUST_FLAG = "--trust_checkpoint_pickles True"


def checkpoint_pickles(checkpoint: str) -> list[str]:
    """The pickle files under checkpoint folder `checkpoint` that resuming reads, sorted. Symbolic links are
    followed, as the loaders follow them (a `global_step*` folder that is a link holds what DeepSpeed unpickles);
    each folder is listed once, so a link back up the tree ends there."""
    found, seen = [], set()
    for root, dirs, names in os.walk(checkpoint, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        for name in names:
            if name.endswith(PICKLE_SUFFIXES) and not (root == checkpoint and name in NOT_READ_ON_RESUME):
                found.append(os.path.join(root, name))
    return sorted(found)


def pickle_problem(path: str) -> str | None:
    """Why the pickle file `path` could run code when unpickled (the globals it imports outside torch's allowlist and
    ALLOWED_GLOBALS, or why they cannot be listed), or None when it cannot."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        unsafe = get_unsafe_globals_in_checkpoint(path)
    except ValueError as e:  # not torch.save's zip format (a legacy or foreign file), or TorchScript
        return f"cannot be checked: {e}"
    except Exception as e:  # an opcode the disassembler does not know, a cut-short file
        return f"cannot be checked: {type(e).__name__}: {e}"
    refused = sorted(set(unsafe) - ALLOWED_GLOBALS)
    if refused:
        return f"imports {', '.join(refused)}"
    return None


def check_checkpoint_pickles(checkpoint: str, trust: bool = False) -> None:
    """Raise LlmftError naming each pickle of `checkpoint` that could run code when resumed from (see the module's
    docstring); with `trust`, check nothing."""
    if trust:
        logger.warning("%s: resuming from %s without checking what its pickles import", TRUST_FLAG, checkpoint)
        return
    problems = [
        f"{path}: {problem}" for path in checkpoint_pickles(checkpoint) if (problem := pickle_problem(path)) is not None
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise LlmftError(
            f"not resuming from {checkpoint}: {shown}. Resuming unpickles these files (DeepSpeed with "
            "weights_only=False), which would run that code; llmft and DeepSpeed never write it. Pass "
            f"{TRUST_FLAG} only if you trust where this checkpoint came from"
        )
