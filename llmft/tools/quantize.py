"""GPTQ-quantize a model (typically a merged fine-tune) on its own fine-tuning conversations, and report the cost.

    llmft quantize --model_name_or_path output/merged --data_path data.json --output_dir output/merged-gptq --bits 4
    llmft quantize --model_name_or_path output/merged --data_path data.json --output_dir output/merged-int8 \
        --bits 8 --group_size 128 --max_len 1024 --num_samples 256 --desc_act --eval_samples 32 --overwrite_output_dir
    llmft quantize ... --eval_data_path held_out.json     # evaluate on a separate file instead
    llmft quantize ... --trust_remote_code True          # a model that ships its own modelling code
    python tools/run_gptq.py ...                         # the same as llmft quantize

Calibration: the conversations of `--data_path` rendered with the model's own chat template, exactly as training
renders them (`render_conversation`), cut to `--max_len` tokens. The last `--eval_samples` records are held out from
calibration for the quality report, unless `--eval_data_path` gives the evaluation conversations.

Quantization runs through GPTQModel (`GPTQModel.load` + `quantize` + `save`), on the GPU when there is one and on
CPU otherwise. GPTQMODEL_CPU_WORKERS sets its CPU worker count (set here to 2 on machines of 2 cores or fewer, where
GPTQModel's own default cannot quantize). The output loads with plain
`AutoModelForCausalLM.from_pretrained(output_dir)` (transformers' GPTQ integration, backed by GPTQModel's kernels)
and carries the tokenizer, its chat template and a generation config that stops at the end-of-turn token. It is
written into a hidden sibling folder that takes the output's name only when complete.

A model folder whose config maps classes to its own Python files (`auto_map`) is refused unless
`--trust_remote_code True`: GPTQModel's loader imports those files whatever trust_remote_code it is given.

Quality report: mean loss on the assistant tokens (the tokens training puts loss on) and perplexity of the original
and of the quantized model reloaded from the output, printed and written to `output_dir/quantization_report.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING


import torch

from llmft.data.records import load_conversations
from llmft.data.render import IGNORE_INDEX, RenderedSample, render_conversation
from llmft.errors import ConfigError, LlmftError, exit_on_user_error
from llmft.model_card import derived_card_facts, write_model_card
from llmft.quiet import quiet_gptqmodel, saving_quietly
from llmft.model_folder import model_folder, require_model
from llmft.inference import (
    check_weights_finite,
    load_for_inference,
    load_tokenizer,
    set_generation_stops,
    stdout_to_stderr,
)
from llmft.tools.cli_flags import add_overwrite_output_dir_flag, add_trust_remote_code_flag
from llmft.run_folder import staged_output_dir

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmft.data.conversation import Conversation

logger = logging.getLogger("run_gptq")

BITS_CHOICES = (4, 8)
REPORT_FILE = "quantization_report.json"


@dataclass
class GptqSettings:
    bits: int = 4  # 4 or 8: the widths GPTQ kernels serve on every backend
    group_size: int = 128  # input features sharing one scale; -1 for one group per row
    desc_act: bool = False  # quantize columns in order of activation size: a bit more accurate, slower kernels
    max_len: int = 512  # calibration and evaluation conversations are cut to this many tokens
    num_samples: int = 128  # calibration conversations


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy per assistant token
    perplexity: float
    tokens: int  # assistant tokens scored


@dataclass
class QuantizationReport:
    model: str
    bits: int
    group_size: int
    desc_act: bool
    calibration_samples: int
    calibration_tokens: int
    eval_samples: int
    quantization_seconds: float
    original: Evaluation
    quantized: Evaluation

    @property
    def loss_increase(self) -> float:
        return self.quantized.loss - self.original.loss

    def to_json(self) -> dict:
        return {**asdict(self), "loss_increase": self.loss_increase}

    def table(self) -> str:
        rows = [
            ("model", "loss", "perplexity"),
            ("original", f"{self.original.loss:.4f}", f"{self.original.perplexity:.3f}"),
            (f"gptq {self.bits}-bit", f"{self.quantized.loss:.4f}", f"{self.quantized.perplexity:.3f}"),
        ]
        lines = [f"{name:<12}{loss:>10}{ppl:>14}" for name, loss, ppl in rows]
        lines.append(
            f"loss increase {self.loss_increase:+.4f} on {self.eval_samples} held-out conversations "
            f"({self.original.tokens} assistant tokens)"
        )
        return "\n".join(lines)


def validate(
    model_name_or_path: str,
    data_path: str,
    eval_data_path: str | None,
    settings: GptqSettings,
    eval_samples: int,
    trust_remote_code: bool = False,
) -> None:
    """Raise one ConfigError listing every problem with the arguments."""
    model = model_folder(model_name_or_path)
    problems = model.problems("--model_name_or_path", trust_remote_code=trust_remote_code)
    if settings.bits not in BITS_CHOICES:
        problems.append(f"--bits {settings.bits}: GPTQ here writes {' or '.join(map(str, BITS_CHOICES))} bits")
    if settings.group_size != -1 and settings.group_size < 1:
        problems.append(f"--group_size {settings.group_size}: use a positive size, or -1 for one group per row")
    if settings.max_len < 2:
        problems.append(f"--max_len {settings.max_len}: must be at least 2 tokens")
    if settings.num_samples < 1:
        problems.append(f"--num_samples {settings.num_samples}: must be at least 1")
    if eval_samples < 1:
        problems.append(f"--eval_samples {eval_samples}: must be at least 1 (the quality report needs held-out data)")
    for flag, path in (("--data_path", data_path), ("--eval_data_path", eval_data_path)):
        if path is not None and not os.path.isfile(path):
            problems.append(f"{flag} {path}: no such file")
    if model.quant_method:
        problems.append(
            f"--model_name_or_path {model_name_or_path} is quantized already ({model.quant_method}): "
            "quantize the unquantized model"
        )
    if problems:
        raise ConfigError(problems)


def render_samples(
    conversations: list[Conversation], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> list[RenderedSample]:
    """Rendered conversations cut to max_len tokens; those with nothing left to score are left out."""
    samples = [render_conversation(c, tokenizer, max_length=max_len, overlong="truncate") for c in conversations]
    return [s for s in samples if s is not None]


def split_data(
    data_path: str, eval_data_path: str | None, settings: GptqSettings, eval_samples: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(calibration conversations, evaluation conversations). Without eval_data_path the last eval_samples records
    of data_path are held out, and calibration takes the first num_samples of the rest."""
    conversations = load_conversations(data_path)
    if eval_data_path:
        return conversations[: settings.num_samples], load_conversations(eval_data_path)[:eval_samples]
    if len(conversations) <= eval_samples:
        raise LlmftError(
            f"--data_path {data_path} has {len(conversations)} conversations: the last --eval_samples {eval_samples} "
            "are held out for the quality report, which leaves none to calibrate on; lower --eval_samples or pass "
            "--eval_data_path"
        )
    return conversations[:-eval_samples][: settings.num_samples], conversations[-eval_samples:]


@torch.inference_mode()
def evaluate(model: PreTrainedModel | PeftModel, samples: list[RenderedSample]) -> Evaluation:
    """Mean next-token cross-entropy over the trained (assistant) tokens of all samples, weighted by token."""
    total, tokens = 0.0, 0
    for sample in samples:
        input_ids = torch.tensor([sample.input_ids], device=model.device)
        labels = torch.tensor(sample.labels[1:], device=model.device)  # position t predicts token t + 1
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        scored = labels != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[scored], labels[scored], reduction="sum").item()
        tokens += int(scored.sum())
    if tokens == 0:
        raise LlmftError("the evaluation conversations have no assistant tokens to score")
    loss = total / tokens
    if math.isnan(loss):  # an infinite loss is a real (if awful) score; NaN is none
        raise LlmftError(
            "the model's loss on the evaluation conversations is NaN: its weights or logits are not finite"
        )
    return Evaluation(loss, math.exp(min(loss, 700.0)), tokens)  # exp overflows a float past ~709


def quantize_with_gptqmodel(
    model_path: str,
    calibration: list[RenderedSample],
    settings: GptqSettings,
    out_dir: str | Path,
    trust_remote_code: bool = False,
    verbose: bool = False,
) -> None:
    """Quantize with GPTQModel and save into out_dir. GPTQModel prints its progress on stdout: sent to stderr; what
    it prints while saving is shown only with `verbose` (llmft.quiet.saving_quietly).
    GPTQModel imports a model's own code (`auto_map`) even with trust_remote_code=False: callers check first
    (`require_model`)."""
    # GPTQModel gives its CPU pool (cores + 1) // 2 workers, but its model loader asks that pool for 2: with 2 cores
    # or fewer, quantizing fails ("requests 2 workers but parent 'cpu' only has 1") unless this is at least 2.
    # Read when the pool is first built, which is at quantization, not import.
    if (os.cpu_count() or 1) < 3:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    with stdout_to_stderr():
        from gptqmodel import GPTQModel, QuantizeConfig

        config = QuantizeConfig(bits=settings.bits, group_size=settings.group_size, desc_act=settings.desc_act)
        model = GPTQModel.load(model_path, config, trust_remote_code=trust_remote_code)
        model.quantize(
            [{"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids)} for s in calibration],
            batch_size=1,
        )
        with saving_quietly(verbose):
            model.save(str(out_dir))
    del model
    gc.collect()


def run_gptq(
    model_name_or_path: str,
    data_path: str,
    output_dir: str | Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    max_len: int = 512,
    num_samples: int = 128,
    desc_act: bool = False,
    eval_samples: int = 16,
    eval_data_path: str | None = None,
    overwrite_output_dir: bool = False,
    trust_remote_code: bool = False,
    verbose: bool = False,
) -> QuantizationReport:
    """Quantize `model_name_or_path` to `output_dir` and return the quality report (see the module docstring).
    GPTQModel's informational output shows only with `verbose` (llmft.quiet.quiet_gptqmodel)."""
    settings = GptqSettings(bits, group_size, desc_act, max_len, num_samples)
    validate(model_name_or_path, data_path, eval_data_path, settings, eval_samples, trust_remote_code)
    trust = {"trust_remote_code": trust_remote_code}

    inputs = {"--model_name_or_path": model_name_or_path, "--data_path": data_path, "--eval_data_path": eval_data_path}
    with (
        quiet_gptqmodel(verbose),
        staged_output_dir(output_dir, force=overwrite_output_dir, inputs=inputs) as staging,
    ):
        tokenizer = load_tokenizer(model_name_or_path, **trust)
        calibration_data, eval_data = split_data(data_path, eval_data_path, settings, eval_samples)
        calibration = render_samples(calibration_data, tokenizer, max_len)
        held_out = render_samples(eval_data, tokenizer, max_len)
        if not calibration:
            raise LlmftError(f"--data_path {data_path}: no conversation leaves any tokens within --max_len {max_len}")

        model, _ = load_for_inference(model_name_or_path, what="--model_name_or_path", **trust)
        check_weights_finite(model, f"--model_name_or_path {model_name_or_path}")
        original = evaluate(model, held_out)
        del model
        gc.collect()

        logger.info("quantizing to %d bits (group size %d) on %d conversations", bits, group_size, len(calibration))
        started = time.perf_counter()
        # A hub id's config.json is in the local cache only now that it has loaded: check it again right before
        # GPTQModel, which imports a model's own code whatever trust_remote_code says.
        require_model(model_name_or_path, "--model_name_or_path", **trust)
        quantize_with_gptqmodel(model_name_or_path, calibration, settings, staging, **trust, verbose=verbose)
        seconds = time.perf_counter() - started

        # Reloading the way users will (plain transformers) both checks the output and scores what they get.
        quantized_model, _ = load_for_inference(staging, what="the quantized model", **trust)
        quantized = evaluate(quantized_model, held_out)
        set_generation_stops(quantized_model, tokenizer)
        quantized_model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del quantized_model

        report = QuantizationReport(
            model=str(model_name_or_path),
            bits=bits,
            group_size=group_size,
            desc_act=desc_act,
            calibration_samples=len(calibration),
            calibration_tokens=sum(len(s.input_ids) for s in calibration),
            eval_samples=len(held_out),
            quantization_seconds=round(seconds, 2),
            original=original,
            quantized=quantized,
        )
        with open(os.path.join(staging, REPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=2)
        write_model_card(
            staging, derived_card_facts("gptq", model_name_or_path, staging, quantization=report.to_json())
        )

    print(f"quantized {model_name_or_path} -> {output_dir} in {seconds:.1f}s")
    print(report.table())
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = GptqSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="unquantized model folder (e.g. a merged adapter)")
    parser.add_argument("--data_path", required=True, help="fine-tuning conversations used for calibration")
    parser.add_argument(
        "--output_dir",
        "--out_path",
        dest="output_dir",
        required=True,
        metavar="DIR",
        help="folder for the quantized model",
    )
    parser.add_argument("--bits", type=int, default=defaults.bits, help=f"one of {BITS_CHOICES}")
    parser.add_argument("--group_size", type=int, default=defaults.group_size, help="-1: one group per row")
    parser.add_argument("--max_len", type=int, default=defaults.max_len, help="tokens per conversation, at most")
    parser.add_argument("--num_samples", type=int, default=defaults.num_samples, help="calibration conversations")
    parser.add_argument("--desc_act", action="store_true", help="quantize columns by decreasing activation size")
    parser.add_argument("--eval_samples", type=int, default=16, help="held-out conversations for the quality report")
    parser.add_argument("--eval_data_path", help="conversations for the quality report (default: --data_path's last)")
    add_overwrite_output_dir_flag(parser, "the quantization succeeds")
    add_trust_remote_code_flag(parser)
    parser.add_argument(
        "--verbose", action="store_true", help="also show GPTQModel's own informational output (timings, configs)"
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # this tool's own progress lines at INFO; the libraries' (GPTQModel's tokenizer helper, ...) only with --verbose
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    run_gptq(**vars(args))


if __name__ == "__main__":
    main()
