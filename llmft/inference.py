"""Loading any result of a run for inference, and generating one reply with it.

What a path can hold, and how it loads (`load_for_inference` asks `llmft.model_folder`, which tells them apart by their
files):
- a PEFT adapter (LoRA / Q-LoRA output: `adapter_config.json`): its base, found from `base_model_name_or_path` or
  given, loaded as stored (a Q-LoRA base is the original unquantized model), its embeddings grown to the rows the
  adapter trained, then the adapter on top;
- a GPTQ checkpoint (`quantization_config.quant_method == "gptq"` in config.json), through transformers' GPTQModel
  integration;
- any other model folder (a base model, a full fine-tune, a merged adapter).

The tokenizer comes from the result's own folder when it has one (an adapter folder carries the tokenizer the run
trained with, ChatML tokens and template included), else from the base. A tokenizer without a chat template gets
ChatML, as training gives it (`llmft.chat_template`).

Generation stops where training's saved generation config does (`llmft.chat_template.generation_stops`: the
end-of-turn token first, then EOS, the end-of-document token and the model's configured eos ids), passed explicitly
to `generate`, so a model whose saved generation config stops only at EOS still ends after one answer.

Code shipped with a model (`auto_map` in its config.json or tokenizer_config.json, pointing at the folder's own .py
files) is never run unless the user passes `--trust_remote_code True`: every loader here refuses such a folder first,
since GPTQModel imports those files whatever trust_remote_code says. Weight files are checked cheaply (the safetensors
header against the file's size, `llmft.model_folder`) before loading, so a truncated or garbage file is named instead of
failing deep inside a load.

The tools write their results through `llmft.run_folder.staged_output_dir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmft.chat_template import GenerationStops, choose_chat_template, generation_stops
from llmft.model_folder import ADAPTER_CONFIG, model_folder, require_adapter, require_model
from llmft.data.render import render_prompt
from llmft.errors import ConfigError, LlmftError
from llmft.quiet import without_unused_gptqmodel

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cpu", "cuda")


# ---------------------------------------------------------------- loading


def resolve_device(device: str = "auto") -> str:
    if device not in DEVICE_CHOICES:
        raise ConfigError([f"--device {device!r}: choose one of {DEVICE_CHOICES}"])
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["--device cuda: no CUDA GPU is visible"])
    return device


def inference_dtype(dtype: str, device: str) -> torch.dtype | str:
    """The dtype to load in: a named one, or for `auto` float32 on CPU (16-bit matmuls are slow or missing there)
    and the checkpoint's own dtype on a GPU."""
    if dtype not in DTYPE_CHOICES:
        raise ConfigError([f"--dtype {dtype!r}: choose one of {DTYPE_CHOICES}"])
    if dtype != "auto":
        return DTYPES[dtype]
    return torch.float32 if device == "cpu" else "auto"


def load_tokenizer(
    path: str | Path, base: str | Path | None = None, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`, else the one of `base`; ChatML when it has no chat template."""
    from transformers import AutoTokenizer

    source = path if (base is None or model_folder(path).has_tokenizer) else base
    problem = model_folder(source).remote_code_problem("the tokenizer in", trust_remote_code=trust_remote_code)
    if problem:
        raise LlmftError(problem)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        logger.warning("%s has no chat template: using ChatML", source)
    tokenizer.chat_template = choose_chat_template(tokenizer, "auto")
    return tokenizer


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    what: str = "model",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a model folder or hub id (a GPTQ checkpoint included), in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = require_model(path, what, trust_remote_code=trust_remote_code)
    try:
        with stdout_to_stderr():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, device_map={"": device} if device else None, trust_remote_code=trust_remote_code
            )
    except OSError as e:
        if not folder.is_hub_id:
            raise  # a local folder that fails to load is a bug or a broken file, with a traceback worth keeping
        raise LlmftError(
            f"{what} {path}: not a local folder, and it could not be fetched as a hub model ({e})"
        ) from None
    return model.eval()


def load_adapter_model(
    adapter_dir: str | Path,
    *,
    base: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
) -> PeftModel:
    """Base model + adapter, unmerged (a PeftModel in eval mode). `base` overrides the adapter's recorded base.

    The base loads as its folder stores it: a Q-LoRA base unquantized (bitsandbytes quantized it only while
    training), a GPTQ checkpoint as GPTQ. Its embeddings grow first to the rows the adapter saved for the base's
    embedding modules, or to the tokenizer's length, when training added tokens.
    """
    with stdout_to_stderr():  # importing peft imports GPTQModel, which prints a banner
        from peft import PeftModel

    from llmft.model import embedding_module_names

    adapter = require_adapter(adapter_dir, "the adapter", trust_remote_code=trust_remote_code)
    what = "--base" if base is not None else f"the base model recorded in {adapter_dir}/{ADAPTER_CONFIG}"
    base = str(base) if base is not None else adapter.adapter_base
    model = load_model(base, dtype=dtype, device=device, what=what, trust_remote_code=trust_remote_code)
    rows = model.get_input_embeddings().weight.shape[0]
    wanted = adapter.saved_embedding_rows(embedding_module_names(model))
    if wanted is None and adapter.has_tokenizer:
        wanted = len(load_tokenizer(adapter_dir, trust_remote_code=trust_remote_code))
    if wanted is not None and wanted > rows:
        logger.info("growing the base embeddings from %d to %d rows, as training did", rows, wanted)
        model.resize_token_embeddings(wanted, mean_resizing=False)  # the adapter's saved rows replace them
    check_adapter_config(adapter_dir)
    try:
        with stdout_to_stderr(), without_unused_gptqmodel():  # no GPTQModel import for a base without its layers
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:  # PEFT's words for a bad adapter
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise LlmftError(f"the adapter {adapter_dir} does not load onto its base {base}: {_first_lines(e)}") from None
    check_adapter_weights_used(model, adapter_dir)
    return model.eval()


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_config(adapter_dir: str | Path) -> None:
    """Refuse an adapter folder whose adapter_config.json PEFT would fail on with a traceback, or which holds no
    weights: an unknown peft_type, a rank or target_modules of the wrong kind, no adapter_model file."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise LlmftError(f"{path}: cannot be read: {e}") from None
    problems = []
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type not in {str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING}:
        problems.append(f"peft_type {peft_type!r} is not one PEFT knows")
    elif peft_type == "LORA":
        rank = config.get("r")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append(f"r {rank!r} is not a positive whole number")
        targets = config.get("target_modules")
        if targets is not None and not (
            isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
        ):
            problems.append(f"target_modules {targets!r} is neither a module name pattern nor a list of names")
    if not any(os.path.isfile(os.path.join(adapter_dir, name)) for name in ADAPTER_WEIGHTS):
        problems.append(f"it holds no weights (no {' or '.join(ADAPTER_WEIGHTS)})")
    if problems:
        raise LlmftError(f"the adapter {adapter_dir} is not usable: {'; '.join(problems)}")


def check_adapter_weights_used(model: PeftModel, adapter_dir: str | Path) -> None:
    """Refuse an adapter whose weight file does not match the modules its config made: PEFT only warns about
    weights the file lacks (left at their initial values, so the adapter silently does less) or holds for modules
    that do not exist (never used)."""
    from peft.utils import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    file = os.path.join(adapter_dir, ADAPTER_WEIGHTS[0])
    if os.path.isfile(file):
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            saved = set(f.keys())
    else:
        saved = set(torch.load(os.path.join(adapter_dir, ADAPTER_WEIGHTS[1]), map_location="meta", weights_only=True))
    missing, unused = sorted(expected - saved), sorted(saved - expected)
    if missing or unused:
        example = f"e.g. {missing[0]} missing" if missing else f"e.g. {unused[0]} unused"
        raise LlmftError(
            f"the adapter {adapter_dir} does not match its {ADAPTER_CONFIG}: {len(missing)} of the "
            f"{len(expected)} weights its config makes are not in its weight file, and {len(unused)} weights of the "
            f"file fit none of them ({example})"
        )


def _first_lines(error: BaseException, lines: int = 2) -> str:
    """The start of a library's error message (a state dict's size mismatches run to one line per tensor)."""
    text = str(error).strip().strip("'\"") or type(error).__name__
    kept = text.splitlines()[:lines]
    return " ".join(line.strip() for line in kept) + (" ..." if len(text.splitlines()) > lines else "")


def check_weights_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse a model (or adapter) holding a NaN or infinite weight, naming the first: it predicts NaN for every
    token, and merging, quantizing or comparing it would give numbers that look like results (max(0, nan) is 0)."""
    for name, param in model.named_parameters():
        if param.numel() and not torch.isfinite(param).all():
            raise LlmftError(
                f"{what} holds NaN or infinite weights (first in {name}): the training that wrote it diverged "
                "(a NaN or too high a learning rate, weight decay, ...); train it again"
            )


def load_for_inference(
    path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    what: str = "--model",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for any result: an adapter folder, a GPTQ checkpoint, or a plain model folder. `what`
    names the path in errors (the flag it came from)."""
    device = resolve_device(device)
    torch_dtype = inference_dtype(dtype, device)
    trust = {"trust_remote_code": trust_remote_code}
    with stdout_to_stderr():
        # checked whole before anything loads, so that nothing runs half-way
        if require_model(path, what, adapter=True, **trust).is_adapter:
            base = require_adapter(path, what, **trust).adapter_base
            require_model(base, f"the base model recorded in {path}/{ADAPTER_CONFIG}", **trust)
            model = load_adapter_model(path, dtype=torch_dtype, device=device, **trust)
            tokenizer = load_tokenizer(path, base=base, **trust)
        else:
            model = load_model(path, dtype=torch_dtype, device=device, what=what, **trust)
            tokenizer = load_tokenizer(path, **trust)
    return model, tokenizer


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send library chatter printed while loading (GPTQModel's banner and kernel choice) to stderr, keeping
    stdout for what a tool answers."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------- generating


def model_generation_stops(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | PeftModel | None = None
) -> GenerationStops:
    """`generation_stops` for this tokenizer and the eos ids the model's generation config and config name."""
    configured = []
    if model is not None:
        generation = getattr(model, "generation_config", None)
        configured = [getattr(generation, "eos_token_id", None), getattr(model.config, "eos_token_id", None)]
    return generation_stops(tokenizer, *configured)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | PeftModel | None = None) -> list[int]:
    """Token ids generation stops at (`generation_stops`): the end-of-turn token first."""
    return model_generation_stops(tokenizer, model).eos_token_ids


def set_generation_stops(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model's generation config stop where `generate_reply` does, and pad as it does."""
    stops = model_generation_stops(tokenizer, model)
    model.generation_config.eos_token_id = stops.eos_token_ids
    model.generation_config.pad_token_id = stops.pad_token_id


@dataclass
class Reply:
    text: str  # decoded without special tokens
    token_ids: list[int]  # the generated tokens, without the stop token
    finished: bool  # True when a stop token ended it, False when max_new_tokens cut it


def generate_reply(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    streamer: BaseStreamer | None = None,
    tools: list[dict] | None = None,
) -> Reply:
    """The assistant's answer to `messages` (role/content dicts), rendered with the tokenizer's chat template, with
    `tools` (OpenAI function schemas, see `load_tools`) passed to it as training passes a record's tools.

    temperature 0 decodes greedily (top_p and top_k unused); top_k 0 and top_p 1 switch those filters off. A
    `streamer` (transformers TextStreamer) receives the tokens as they come.
    """
    prompt = render_prompt(messages, tokenizer, tools)
    stops = model_generation_stops(tokenizer, model)
    input_ids = torch.tensor([prompt], device=model.device)
    if temperature == 0:
        sampling = {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
            eos_token_id=stops.eos_token_ids,
            pad_token_id=stops.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    new_ids = output[0, len(prompt) :].tolist()
    finished = bool(new_ids) and new_ids[-1] in stops.eos_token_ids
    if finished:
        new_ids = new_ids[:-1]
    return Reply(tokenizer.decode(new_ids, skip_special_tokens=True), new_ids, finished)


def load_tools(path: str | Path, flag: str = "--tools") -> list[dict]:
    """The function schemas in a JSON file, for the prompt: a list (or a JSON string of one) of OpenAI schemas,
    `{"type": "function", "function": {"name", "description", "parameters"}}`, or bare `{"name", ...}` functions,
    read exactly as training reads a record's `"tools"` (llmft.data.records), so the model sees them as it was
    trained to."""
    from llmft.data.records import parse_tools as _parse_tools

    if not os.path.isfile(path):
        raise ConfigError([f"{flag} {path}: no such file"])
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError([f"{flag} {path}: not a readable JSON file ({e})"]) from None
    tools = [dict(tool) for tool in _parse_tools(value, f"{flag} {path}")]
    if not tools:
        raise ConfigError([f"{flag} {path}: the file lists no function schemas"])
    return tools


def require_tools_shown(tokenizer: PreTrainedTokenizerBase, tools: list[dict], flag: str = "--tools") -> None:
    """Fail when the chat template leaves the tools out of the prompt (one that ignores `tools=`): the model would
    be asked to call functions it is never shown. Training refuses such data the same way."""
    from llmft.data.conversation import tool_names

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}], tools=tools, tokenize=False, add_generation_prompt=True
    )
    hidden = [name for name in tool_names(tools) if name not in text]
    if hidden:
        raise LlmftError(
            f"{flag}: the model's chat template does not show the tools ({', '.join(map(repr, hidden))})"
            " in the prompt: it ignores tools=, so this model was not trained to call them"
        )
