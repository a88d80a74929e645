"""The final save of a run, in the shape inference tools load without help.

- LoRA / Q-LoRA: the PEFT adapter (safetensors, modules_to_save included) + tokenizer with its chat template +
  generation config; `AutoPeftModelForCausalLM.from_pretrained(output_dir)` loads it.
- Full: a standalone model directory; `AutoModelForCausalLM.from_pretrained(output_dir)` loads it.

`Trainer.save_model` does the sharding-aware part: ZeRO-3 gathers the 16-bit weights on every rank, FSDP gathers a
FULL_STATE_DICT onto rank 0. It writes into a staging folder inside output_dir, which rank 0 checks, completes and
then moves into place file by file, so an interrupted or incomplete save never leaves an output directory that looks
finished.

Every file a save writes follows the umask (0644 under the usual 022), so a team on shared storage can read each
other's results: safetensors (0.8) writes through a temporary file that it creates 0600 and renames into place,
which would leave the weights, and only the weights, private (`llmft.run_folder.follow_umask`).

`llmft_run.json` records a fingerprint of the base the run trained on (`base_fingerprint`), which tools/merge_lora.py
compares with the base it is asked to merge into.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from llmft.model_folder import _safetensors_header, model_folder, safetensors_header_problem
from llmft.distributed import whole_parameter_name_and_shape
from llmft.errors import LlmftError
from llmft.run_folder import RUN_STAGING, follow_umask, place_staged, record_written
from llmft.model_card import training_card_facts, write_model_card

if TYPE_CHECKING:
    import torch
    import transformers
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase, Trainer, TrainerControl, TrainerState

    from llmft.plan import RunPlan

logger = logging.getLogger(__name__)

RUN_FILE = "llmft_run.json"


def describe_run(plan: RunPlan) -> dict:
    """What tools after training need to know and cannot read from the adapter: how the base was loaded. `mode` is
    the plan's `coarse_mode` (full, lora or qlora; a base stored quantized is told by `base_quantization`)."""
    quantization = None
    if (on_load := plan.quantize_on_load) is not None:
        quantization = {
            "method": "bitsandbytes",
            "bits": on_load.bits,
            "type": on_load.quant_type if on_load.bits == 4 else "int8",
        }
    elif plan.base_quantization is not None:
        quantization = {"method": plan.base_quantization}
    return {
        "mode": plan.coarse_mode,
        "base_model": plan.base_model,
        "base_quantization": quantization,
        "base_fingerprint": base_fingerprint(plan.base_model),
        "added_tokens": list(plan.added_tokens),
    }


# config.json keys that differ between copies of the same weights (where it was loaded from, which transformers
# wrote it, the dtype it was stored in), left out of the fingerprint.
FINGERPRINT_IGNORED_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
FINGERPRINT_SCHEME = "sha256-all:"  # every tensor sampled (`base_fingerprint`)
FINGERPRINT_RUNS = 16  # runs of values read from each tensor, spread evenly from its first value to its last
FINGERPRINT_RUN = 16  # values in each run
# safetensors float dtypes, read as float32 so that the same weights stored in a wider float dtype hash the same
FINGERPRINT_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def base_fingerprint(model: str | os.PathLike) -> str | None:
    """A short hash that tells a model's weights apart from another model of the same shape, cheaply: its
    config.json (less FINGERPRINT_IGNORED_KEYS), and for every tensor of its safetensors files its name, shape and
    FINGERPRINT_RUNS runs of FINGERPRINT_RUN values spread from the first value to the last (read straight from the
    file, a few KB a tensor whatever the model's size), so that a base differing in any one tensor's values at those
    places, or in any tensor's name or shape, differs. Float values are hashed as float32: the same weights stored in
    another float dtype that holds them exactly give the same fingerprint. None when the model is neither a local
    folder nor in the local hub cache, or has no whole safetensors weights."""
    import torch

    inspected = model_folder(model)
    if inspected.folder is None or inspected.config is None:
        return None
    digest = _config_digest(inspected.config)
    tensors = []  # (name, file, header entry, where the data starts)
    for file in sorted(inspected.folder.glob("*.safetensors")):
        header = _safetensors_header(file)
        if isinstance(header, str):
            return None
        with open(file, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")  # the data follow the header and its length
        tensors += [(name, file, entry, start) for name, entry in header.items() if name != "__metadata__"]
    if not tensors:
        return None
    handles = {}
    try:
        for name, file, entry, start in sorted(tensors, key=lambda t: t[0]):
            shape, dtype = entry.get("shape") or [], entry.get("dtype")
            begin, end = entry["data_offsets"]
            count = math.prod(shape)
            width = (end - begin) // count if count else 0
            digest.update(f"{name}{shape}".encode())
            if not width:
                continue
            f = handles.get(file) or handles.setdefault(file, open(file, "rb"))
            run = min(FINGERPRINT_RUN, count)
            for first in sorted(
                {round(i * (count - run) / max(FINGERPRINT_RUNS - 1, 1)) for i in range(FINGERPRINT_RUNS)}
            ):
                f.seek(start + begin + first * width)
                raw = f.read(run * width)
                if dtype in FINGERPRINT_FLOATS:
                    values = torch.frombuffer(bytearray(raw), dtype=getattr(torch, FINGERPRINT_FLOATS[dtype]))
                    raw = values.float().numpy().tobytes()
                digest.update(raw)
    finally:
        for f in handles.values():
            f.close()
    return FINGERPRINT_SCHEME + digest.hexdigest()[:32]


def _config_digest(config: dict) -> hashlib._Hash:
    config = dict(config)
    for key in FINGERPRINT_IGNORED_KEYS:
        config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode())


FINGERPRINT_V1_TENSORS = 4  # tensors sampled, spread over the sorted tensor names
FINGERPRINT_V1_VALUES = 4096  # leading values read from each sampled tensor


def base_fingerprint_v1(model: str | os.PathLike) -> str | None:
    """The fingerprint earlier llmft versions recorded ("sha256:..."), kept to check their adapters' bases: the
    config and the first FINGERPRINT_V1_VALUES values of FINGERPRINT_V1_TENSORS tensors, spread over the sorted
    names."""
    inspected = model_folder(model)
    if inspected.folder is None or inspected.config is None:
        return None
    from safetensors import safe_open

    digest = _config_digest(inspected.config)
    names = []
    for file in sorted(inspected.folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names += [(name, file) for name in f.keys()]
    if not names:
        return None
    names.sort()
    count = min(FINGERPRINT_V1_TENSORS, len(names))
    picked = sorted({round(i * (len(names) - 1) / max(count - 1, 1)) for i in range(count)})
    for index in picked:
        name, file = names[index]
        with safe_open(str(file), framework="pt") as f:
            tensor_slice = f.get_slice(name)
            shape = list(tensor_slice.get_shape())
            row = math.prod(shape[1:]) if len(shape) > 1 else 1
            sample = tensor_slice[: max(1, FINGERPRINT_V1_VALUES // max(row, 1))] if shape else f.get_tensor(name)
        values = sample.reshape(-1)[:FINGERPRINT_V1_VALUES].float().contiguous()
        digest.update(f"{name}{shape}".encode())
        digest.update(values.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


class FollowUmaskCallback(TrainerCallback):
    """Make each checkpoint's files follow the umask as soon as it is saved (see `follow_umask`); the Trainer writes
    the weights of a checkpoint through safetensors, 0600 otherwise."""

    def on_save(
        self, args: transformers.TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_local_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(checkpoint):
                follow_umask(checkpoint)


def save_for_inference(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str,
    run: dict | None = None,
    initial_adapter: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the trained model (or adapter) with its tokenizer, generation config and `llmft_run.json` (the
    `describe_run` record) into output_dir. `initial_adapter`: a PiSSA / OLoRA run's adapter as it started
    (llmft.model.lora_weights), with which the saved adapter is converted into one for the original base."""
    staging = os.path.join(output_dir, RUN_STAGING)  # the same on every rank: each writes its part there
    if trainer.is_world_process_zero():
        record_written(output_dir, RUN_STAGING)
    model = trainer.accelerator.unwrap_model(trainer.model)
    check_trained_weights_finite(model, trainer.args)
    model.config.use_cache = True  # training turned the KV cache off; inference wants it back
    trainer.save_model(staging)  # every rank takes part: ZeRO-3 and FSDP gather the sharded weights here
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        if run is not None:
            with open(os.path.join(staging, RUN_FILE), "w", encoding="utf-8") as f:
                json.dump(run, f, indent=2)
        write_model_card(staging, training_card_facts(staging, output_dir))  # replaces PEFT's empty card
        if hasattr(model, "peft_config"):
            check_adapter_complete(staging, model)
            if initial_adapter is not None:  # PiSSA / OLoRA trained on a residual base
                save_adapter_for_original_base(model, staging, initial_adapter)
        else:
            check_model_written(staging)
        follow_umask(staging)
        for checkpoint in Path(output_dir).glob("checkpoint-*"):  # in case no FollowUmaskCallback saw them saved
            follow_umask(checkpoint)
        place_staged(staging, output_dir, whole=False)  # file by file beside the checkpoints, the weights last
        logger.warning("saved %s to %s", "adapter" if hasattr(model, "peft_config") else "model", output_dir)
    trainer.accelerator.wait_for_everyone()


def save_adapter_for_original_base(model: PeftModel, folder: str, initial_adapter: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter saved in `folder` (from a PiSSA / OLoRA run: it applies only to the residual base the
    run trained on) with PEFT's conversion: trained minus initial adapter (`initial_adapter`, its lora_A / lora_B
    tensors as llmft.model.lora_weights took them before training), written as a plain LoRA adapter of twice
    the rank (`init_lora_weights` true) that applies to the original base, as `--lora_init default` adapters do.
    Needs the whole adapter in memory (no ZeRO-3 or FSDP: llmft.checks refuses those).

    PEFT 0.21's conversion writes only the lora_A / lora_B tensors; the others are put back unchanged: modules_to_save
    (whole copies, independent of the base) and DoRA's magnitudes (W_res + BA, which they scale, equals the converted
    W + B'A' exactly)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    kept = {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in get_peft_model_state_dict(model).items()
        if ".lora_A." not in name and ".lora_B." not in name
    }
    with tempfile.TemporaryDirectory(prefix="llmft-initial-adapter-") as scratch:
        initial = os.path.join(scratch, "initial")
        os.makedirs(initial)
        # PEFT loads this back as a second adapter and subtracts only its lora_A / lora_B; loading needs the other
        # tensors to be there too, and the trained ones serve
        save_file({**kept, **initial_adapter}, os.path.join(initial, "adapter_model.safetensors"))
        # PEFT writes the initial adapter's config there itself
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=initial)
    if kept:
        file = os.path.join(folder, "adapter_model.safetensors")
        converted = load_file(file)
        save_file({**converted, **kept}, file, metadata={"format": "pt"})


def check_trained_weights_finite(model: torch.nn.Module, args: transformers.TrainingArguments) -> None:
    """Refuse to save a result whose trained weights hold NaN or inf (a diverged run: every prediction NaN), on every
    rank together: each checks its own part of the trainable weights (ZeRO-3's partition, FSDP's shard), and one
    all-reduce shares the verdict, so that no rank waits for a save the others abandoned. The checkpoints stay."""
    import torch

    bad = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        local = getattr(param, "ds_tensor", None)  # ZeRO-3 keeps only this rank's partition
        if local is None:
            local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2's DTensor shard
        if local.numel() and not torch.isfinite(local).all():
            bad = name
            break
    found = bad is not None
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([1.0 if found else 0.0], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        found = bool(flag.item())
    if found:
        where = f" (first in {bad})" if bad is not None else " (on another rank)"
        raise LlmftError(
            f"the trained weights hold NaN or infinite values{where}, so the result was not saved: training "
            "diverged; lower --learning_rate, check --max_grad_norm and the data, and train again"
        )


def check_adapter_complete(path: str, model: torch.nn.Module) -> None:
    """Fail loudly when a saved adapter lacks LoRA weights or holds only one rank's shard of them. Sharded training
    can otherwise write an adapter that loads and silently does nothing: DeepSpeed ZeRO-3 one of empty (partitioned)
    tensors, FSDP one without the LoRA layers it could not find (inside activation-checkpoint wrappers)."""
    from safetensors import safe_open

    expected = _lora_shapes(model)
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise LlmftError(f"the adapter was not written: {file} is missing")
    with safe_open(file, framework="pt") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    empty = [key for key, shape in saved.items() if not shape or 0 in shape]
    missing = sorted(set(expected) - set(saved))
    partial = sorted(
        key for key in set(expected) & set(saved) if expected[key] is not None and saved[key] != expected[key]
    )
    if empty or missing or partial:
        example = (missing or partial or empty)[0]
        raise LlmftError(
            f"the saved adapter {file} is incomplete: of {len(expected)} LoRA tensors {len(missing)} missing, "
            f"{len(partial)} of the wrong shape, {len(empty)} empty (e.g. {example}); under ZeRO-3 set "
            "stage3_gather_16bit_weights_on_model_save, under FSDP use state_dict_type FULL_STATE_DICT and no "
            "activation_checkpointing in --fsdp_config"
        )


def _lora_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...] | None]:
    """The adapter file's key for each trainable lora_A and lora_B weight, with the whole weight's shape (None where
    the model cannot tell it: FSDP1's flattened shards; llmft.distributed.whole_parameter_name_and_shape)."""
    adapter = getattr(model, "active_adapter", "default")
    shapes = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or not (".lora_A." in name or ".lora_B." in name):
            continue
        name, shape = whole_parameter_name_and_shape(name, param)
        shapes[name.replace(f".{adapter}.", ".")] = shape
    return shapes


def check_model_written(path: str) -> None:
    """Fail loudly when a full fine-tune saved no usable weights: transformers writes none under FSDP with a sharded
    state dict, nor under ZeRO-3 without stage3_gather_16bit_weights_on_model_save (only a DeepSpeed checkpoint then),
    and a rank that died mid-save leaves an empty or truncated file. Reads each weight file's safetensors header (not
    the weights): every file must be whole (`safetensors_header_problem`) and the files together hold a tensor."""
    names = sorted(os.listdir(path))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set((json.load(f).get("weight_map") or {}).values()))
    else:
        files = [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    if not files:
        raise LlmftError(
            f"the model weights were not written to {path} (files: {', '.join(names)}); under ZeRO-3 set "
            "stage3_gather_16bit_weights_on_model_save, under FSDP use state_dict_type FULL_STATE_DICT"
        )
    from safetensors import safe_open

    problems, tensors = [], 0
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing (the index names it)")
        elif problem := safetensors_header_problem(file):
            problems.append(problem)
        else:
            with safe_open(file, framework="pt") as f:
                tensors += len(list(f.keys()))
    if not problems and not tensors:
        problems.append(f"{', '.join(files)} hold{'s' if len(files) == 1 else ''} no tensor")
    if problems:
        raise LlmftError(f"the model weights written to {path} are not usable: {'; '.join(problems)}")
