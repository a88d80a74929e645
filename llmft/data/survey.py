"""A survey of a training file: what it holds and what the loss will cover, before any GPU time is spent (the
command line is `llmft check`, llmft/tools/check.py; settings are checked elsewhere, in llmft/checks.py).

`check_data(path, tokenizer, settings)` reads every record with the code training uses (`llmft.data.records` to
parse, `RenderSettings.render` to render and mask, the same over-long policy) but does not stop at the first bad
record: every problem is listed with its record index, line (JSONL) and id. It counts records, samples (a template
that rewrites history splits a conversation into several), assistant and trained turns, tool calls, tokens and
trained tokens, samples with no trained token, samples truncated or dropped at `max_length`, duplicate records, and
the steps one epoch takes at the given batch settings; and it gives the sample-length percentiles of the untruncated
samples. The report is written as JSON (`CheckReport.to_json`) and the lengths as a histogram PNG; `show_samples`
prints rendered samples with their trained tokens highlighted.

`check_preference_data(path, tokenizer, settings, objective, batch)` does the same for preference data
(`llmft.data.preference`, read and rendered as training reads and renders it): pairs for dpo, simpo and orpo (KTO
examples, desirable and undesirable, for kto), the token lengths of prompts and answers, pairs (examples) dropped as
longer than `max_length`, and every bad record, pairs whose chosen answer is their rejected one among them. A record
in the other kind of data (a pair in an SFT check, a conversation in a preference check) is named as such, with the
flag that checks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, TextIO

from llmft.data.dataset import RenderSettings
from llmft.data.conversation import ASSISTANT, TOOL
from llmft.data import preference
from llmft.data.reading import iter_raw_records
from llmft.data.records import parse_record
from llmft.data.render import IGNORE_INDEX, RenderedSample, fit_to_length, trained_turn_indices
from llmft.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from llmft.data.conversation import Conversation

PERCENTILES = (50, 90, 95, 99)
# Samples are encoded to at most this many times --model_max_length tokens: enough for the lengths above the limit to
# show in the histogram, while a huge string costs time and memory by the limit, not by its size.
MEASURE_FACTOR = 4


@dataclass
class Problem:
    index: int  # the record's position in the file, from 0
    line: int | None  # its line, in JSONL
    id: str | None  # its own id, when it has one
    message: str  # the error training would stop with


@dataclass
class BatchSettings:
    """What one optimizer step consumes: micro-batches of `per_device_train_batch_size` samples (or of at most
    `max_tokens_per_batch` tokens, packed as training packs them, in windows of `packing_window` samples shuffled
    by `seed`) on each of `world_size` ranks, accumulated `gradient_accumulation_steps` times."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    max_tokens_per_batch: int | None = None
    packing_window: int = 4096
    seed: int = 0


@dataclass
class ShownSample:
    index: int
    id: str
    part: int
    parts: int
    sample: RenderedSample
    side: str | None = None  # a preference sequence's answer: chosen, rejected, desirable, undesirable


@dataclass
class CheckReport:
    path: str
    max_length: int
    overlong: str
    records: int = 0
    chat_records: int = 0
    text_records: int = 0
    bad_records: int = 0
    samples: int = 0  # kept for training (after dropping over-long ones)
    split_conversations: int = 0
    split_samples: int = 0
    assistant_turns: int = 0
    trained_turns: int = 0
    tool_calls: int = 0
    tool_results: int = 0
    reasoning_turns: int = 0
    reasoning_not_rendered: int = 0
    tokens: int = 0  # in the kept samples, as trained (truncated)
    trained_tokens: int = 0
    zero_trained_samples: int = 0
    truncated: int = 0
    dropped: int = 0
    measured_to: int = 0  # tokens a sample is encoded to at most (the sequence limit x MEASURE_FACTOR)
    longer_than_measured: int = 0  # samples longer than that, counted at measured_to in the lengths
    duplicate_records: int = 0
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (index, index of its first copy), the first 100
    length_percentiles: dict[str, int] = field(default_factory=dict)  # untruncated sample lengths
    longest: int = 0
    mean_length: float = 0.0
    batch: dict = field(default_factory=dict)
    micro_batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    problems: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list, repr=False)  # untruncated, for the histogram; not in the JSON
    shown: list[ShownSample] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        report = asdict(self)
        del report["lengths"], report["shown"]
        report["duplicates"] = [list(pair) for pair in self.duplicates]
        return report

    def histogram_labels(self) -> tuple[str, str, str]:
        """(x label, y label, title) of the length histogram."""
        title = f"{len(self.lengths)} samples; {self.truncated} truncated, {self.dropped} dropped"
        return "tokens per sample (untruncated)", "samples", title

    def summary(self) -> str:
        """The report as lines a person reads."""
        share = self.trained_tokens / self.tokens if self.tokens else 0.0
        lines = [
            f"{self.path}: {self.records} records ({self.chat_records} chat, {self.text_records} plain text, "
            f"{self.bad_records} with problems)",
            f"samples: {self.samples}"
            + (
                f" ({self.split_conversations} conversations became {self.split_samples} "
                "samples, one per trained turn, because the chat template renders "
                "earlier turns differently later)"
                if self.split_conversations
                else ""
            ),
            f"assistant turns: {self.assistant_turns}, trained: {self.trained_turns}; tool calls: {self.tool_calls}, "
            f"tool results: {self.tool_results}; turns with reasoning: {self.reasoning_turns}"
            + (
                f" ({self.reasoning_not_rendered} not rendered by the chat template, so not trained)"
                if self.reasoning_not_rendered
                else ""
            ),
            f"tokens: {self.tokens}, trained: {self.trained_tokens} ({share:.1%}); samples with no trained token: "
            f"{self.zero_trained_samples}",
            f"at --model_max_length {self.max_length} (--overlong_samples {self.overlong}): "
            f"{self.truncated} truncated, {self.dropped} dropped",
            "sample length (tokens, untruncated): "
            + ", ".join(f"p{k[1:]} {v}" for k, v in self.length_percentiles.items())
            + f", max {self.longest}, mean {self.mean_length:.1f}"
            + (
                f" ({self.longer_than_measured} samples longer than {self.measured_to} tokens, "
                f"{MEASURE_FACTOR} x --model_max_length, counted at {self.measured_to})"
                if self.longer_than_measured
                else ""
            ),
            f"duplicate records: {self.duplicate_records}"
            + (
                ""
                if not self.duplicates
                else " (e.g. " + ", ".join(f"#{a} = #{b}" for a, b in self.duplicates[:5]) + ")"
            ),
            f"one epoch: {self.micro_batches_per_epoch} micro-batches, {self.steps_per_epoch} optimizer steps at "
            + ", ".join(f"{k} {v}" for k, v in self.batch.items() if v is not None),
        ]
        return "\n".join(lines + problem_lines(self.problems))


def problem_lines(problems: list) -> list[str]:
    """The report's closing lines: every problem found, each on a line of its own, or that there were none."""
    if not problems:
        return ["problems: none"]
    return [f"problems ({len(problems)}):", *(f"  - {p.message}" for p in problems)]


def check_data(
    path: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings, batch: BatchSettings, show: int = 0
) -> CheckReport:
    """The report on one file (see the module docstring); `show` keeps that many rendered samples for display."""
    measured_to = MEASURE_FACTOR * settings.max_length
    report = CheckReport(path=path, max_length=settings.max_length, overlong=settings.overlong, measured_to=measured_to)
    first_copy: dict[str, int] = {}
    kept_lengths = []

    def bad_line(error: DataError, index: int, line: int) -> None:
        report.records += 1
        report.problems.append(Problem(index, line, None, str(error)))

    for index, line, where, raw in iter_raw_records(path, on_bad_line=bad_line):
        record_id = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else None
        try:
            conversation = parse_record(raw, where, default_id=str(index))
            samples = settings.render(conversation, tokenizer, cut=False, encode_limit=measured_to)
        except DataError as e:
            message = str(e) if str(e).startswith(path) else f"{where}: {e}"
            if (form := preference_form(raw)) is not None:
                message = f"{where}: {form[1]}, not an SFT conversation: check it with {_objective_hint(form[0])}"
            report.problems.append(Problem(index, line, record_id, message))
            continue
        finally:
            report.records += 1
        _count_turns(report, conversation, settings)
        key = hashlib.sha1(json.dumps({**conversation.to_record(), "id": None}, sort_keys=True).encode()).hexdigest()
        if key in first_copy:
            report.duplicate_records += 1
            if len(report.duplicates) < 100:
                report.duplicates.append((index, first_copy[key]))
        else:
            first_copy[key] = index
        if len(samples) > 1:
            report.split_conversations += 1
            report.split_samples += len(samples)
        for part, full in enumerate(samples):
            report.lengths.append(len(full.input_ids))
            report.longer_than_measured += full.cut_at_limit
            report.reasoning_not_rendered += full.reasoning_not_rendered
            sample = fit_to_length(full, settings.max_length, settings.overlong, plain_text=conversation.is_plain_text)
            if sample is None:
                report.dropped += 1
                continue
            report.samples += 1
            report.truncated += sample.truncated
            trained = sum(label != IGNORE_INDEX for label in sample.labels)
            report.tokens += len(sample.input_ids)
            report.trained_tokens += trained
            report.zero_trained_samples += trained == 0
            kept_lengths.append(len(sample.input_ids))
            if len(report.shown) < show:
                report.shown.append(ShownSample(index, conversation.id, part, len(samples), sample))
    report.bad_records = len({p.index for p in report.problems})
    _length_figures(report)
    _epoch_figures(report, kept_lengths, batch)
    return report


def _count_turns(report: CheckReport, conversation: Conversation, settings: RenderSettings) -> None:
    if conversation.is_plain_text:
        report.text_records += 1
        return
    report.chat_records += 1
    messages = conversation.messages
    report.assistant_turns += sum(m.role == ASSISTANT for m in messages)
    report.trained_turns += len(trained_turn_indices(conversation, settings.train_turns))
    report.tool_calls += sum(len(m.tool_calls) for m in messages)
    report.tool_results += sum(m.role == TOOL for m in messages)
    report.reasoning_turns += sum(bool(m.reasoning) for m in messages)


def length_summary(lengths: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles (p50 ...), the max and the mean of `lengths`; empty for none."""
    lengths = sorted(lengths)
    if not lengths:
        return {}
    summary: dict[str, float] = {f"p{p}": lengths[max(0, math.ceil(p / 100 * len(lengths)) - 1)] for p in PERCENTILES}
    summary["max"] = lengths[-1]
    summary["mean"] = round(sum(lengths) / len(lengths), 1)
    return summary


def _length_figures(report: CheckReport) -> None:
    summary = length_summary(report.lengths)
    if not summary:
        return
    report.longest, report.mean_length = summary.pop("max"), summary.pop("mean")
    report.length_percentiles = summary


def _epoch_figures(report: CheckReport, lengths: list[int], batch: BatchSettings) -> None:
    ranks_times_accumulation = batch.world_size * batch.gradient_accumulation_steps
    if batch.max_tokens_per_batch:
        report.batch = {
            "max_tokens_per_batch": batch.max_tokens_per_batch,
            "packing_window": batch.packing_window,
            "gradient_accumulation_steps": batch.gradient_accumulation_steps,
            "world_size": batch.world_size,
        }
    else:
        report.batch = {
            "per_device_train_batch_size": batch.per_device_train_batch_size,
            "gradient_accumulation_steps": batch.gradient_accumulation_steps,
            "world_size": batch.world_size,
        }
    if not lengths:
        return
    if batch.max_tokens_per_batch:
        from llmft.data.packing import TokenBudgetBatchSampler

        try:
            sampler = TokenBudgetBatchSampler(
                lengths,
                batch.max_tokens_per_batch,
                window=batch.packing_window,
                seed=batch.seed,
                num_epochs=1,
                batches_multiple_of=ranks_times_accumulation,
            )
        except Exception as e:  # the sampler's own ConfigError / DataError says why
            report.problems.append(Problem(-1, None, None, f"--max_tokens_per_batch: {e}"))
            return
        per_rank = sampler.num_batches // batch.world_size
    else:
        per_rank = math.ceil(len(lengths) / (batch.per_device_train_batch_size * batch.world_size))
    report.micro_batches_per_epoch = per_rank * batch.world_size
    # as transformers' Trainer counts them: a last partial accumulation still makes a step
    report.steps_per_epoch = max(math.ceil(per_rank / batch.gradient_accumulation_steps), 1)


# --- preference data -----------------------------------------------------------------------------------------------

PAIR_KEYS = {key for keys in preference.PAIR_KEYS for key in keys}
SFT_KEYS = ("conversations", "messages", "text", "instruction")


def preference_form(raw: object) -> tuple[tuple[str, ...], str] | None:
    """(the objectives that read it, what it is) for a record in a preference form; None for any other record."""
    if not isinstance(raw, dict):
        return None
    if PAIR_KEYS & raw.keys():
        return ("dpo", "simpo", "orpo", "kto"), "a preference pair (chosen / rejected)"
    if "kto_tag" in raw or "completion" in raw or "label" in raw:
        return ("kto",), "a KTO example (completion and label, or kto_tag)"
    return None


def _objective_hint(objectives: tuple[str, ...]) -> str:
    return "--objective " + (f"{', '.join(objectives[:-1])} or " if len(objectives) > 1 else "") + objectives[-1]


@dataclass
class PreferenceCheckReport:
    """`check_preference_data`'s report. Pair objectives count `pairs`, kto `kto_examples` (a pair record gives two,
    its chosen answer desirable, its rejected one not); `to_json` leaves out the figures of the other kind."""

    path: str
    objective: str
    max_length: int
    records: int = 0
    bad_records: int = 0
    pairs: int = 0  # read without a problem, kept or dropped
    kto_examples: int = 0
    desirable: int = 0
    undesirable: int = 0
    kept: int = 0  # pairs (examples) training sees
    dropped: int = 0  # longer than max_length (a pair: on either side), dropped whole as training drops them
    identical_pairs: int = 0  # records whose chosen answer is their rejected one; each is also a problem
    tokens: int = 0  # in the kept sequences (both sides of a pair; kto: without the KL sequences)
    trained_tokens: int = 0
    token_lengths: dict[str, dict] = field(default_factory=dict)  # prompt, each answer, whole sequence: length_summary
    duplicate_records: int = 0
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (index, index of its first copy), the first 100
    batch: dict = field(default_factory=dict)
    micro_batches_per_epoch: int = 0
    steps_per_epoch: int = 0
    problems: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list, repr=False)  # each sequence, for the histogram; not in the JSON
    shown: list[ShownSample] = field(default_factory=list, repr=False)

    @property
    def is_kto(self) -> bool:
        return self.objective == "kto"

    def to_json(self) -> dict:
        report = asdict(self)
        del report["lengths"], report["shown"]
        for name in ("kto_examples", "desirable", "undesirable") if not self.is_kto else ("pairs", "identical_pairs"):
            del report[name]
        report["duplicates"] = [list(pair) for pair in self.duplicates]
        return report

    def summary(self) -> str:
        """The report as lines a person reads."""
        share = self.trained_tokens / self.tokens if self.tokens else 0.0
        unit = "examples" if self.is_kto else "pairs"
        counted = (
            f"KTO examples: {self.kto_examples} ({self.desirable} desirable, {self.undesirable} undesirable)"
            if self.is_kto
            else f"pairs: {self.pairs}; chosen the same as rejected: {self.identical_pairs} records"
        )
        lines = [
            f"{self.path}: {self.records} records ({self.bad_records} with problems), read for --objective "
            f"{self.objective}",
            counted,
            f"at --model_max_length {self.max_length}: {self.kept} {unit} kept, {self.dropped} dropped as longer"
            + ("" if self.is_kto else " on either side"),
            f"tokens (kept, {'without the KL sequences' if self.is_kto else 'both sides'}): {self.tokens}, "
            f"trained: {self.trained_tokens} ({share:.1%})",
        ]
        for name, summary in self.token_lengths.items():
            figures = ", ".join(f"{k} {v}" for k, v in summary.items())
            what = "whole sequence (prompt + answer)" if name == "sequence" else name
            lines.append(f"{what} length (tokens): {figures}")
        lines += [
            f"duplicate records: {self.duplicate_records}"
            + (
                ""
                if not self.duplicates
                else " (e.g. " + ", ".join(f"#{a} = #{b}" for a, b in self.duplicates[:5]) + ")"
            ),
            f"one epoch: {self.micro_batches_per_epoch} micro-batches, {self.steps_per_epoch} optimizer steps at "
            + ", ".join(f"{k} {v}" for k, v in self.batch.items() if v is not None)
            + f" ({unit})",
        ]
        return "\n".join(lines + problem_lines(self.problems))

    def histogram_labels(self) -> tuple[str, str, str]:
        unit = "examples" if self.is_kto else "pairs"
        title = f"{len(self.lengths)} sequences; {self.kept} {unit} kept, {self.dropped} dropped"
        return "tokens per sequence (prompt + answer)", "sequences", title


def check_preference_data(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    settings: RenderSettings,
    objective: str,
    batch: BatchSettings,
    show: int = 0,
) -> PreferenceCheckReport:
    """The report on one preference file for `objective` (dpo, simpo, orpo: pairs; kto: examples); `show` keeps the
    sequences of that many kept pairs (examples) for display. Pairs are parsed by `parse_preference_record`, KTO
    records by `parse_kto_record`, and rendered by `render_pair` / `render_kto_example` with the system prompt and
    length limit training uses (`--system_prompt`, `--model_max_length`)."""
    is_kto = objective == "kto"
    report = PreferenceCheckReport(path=path, objective=objective, max_length=settings.max_length)
    first_copy: dict[str, int] = {}
    lengths: dict[str, list[int]] = {"prompt": [], **{side: [] for side in ("completion",) if is_kto}}
    if not is_kto:
        lengths.update(chosen=[], rejected=[])
    lengths["sequence"] = []
    kept_rows: list[dict] = []
    shown_items = 0

    def bad_line(error: DataError, index: int, line: int) -> None:
        report.records += 1
        report.problems.append(Problem(index, line, None, str(error)))

    def measure(name: str, sample: RenderedSample) -> int:
        prompt = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
        lengths[name].append(len(sample.input_ids) - prompt)
        lengths["sequence"].append(len(sample.input_ids))
        report.lengths.append(len(sample.input_ids))
        return prompt

    def keep(index: int, record_id: str, sides: list[tuple[str, RenderedSample]], row: dict) -> None:
        nonlocal shown_items
        report.kept += 1
        kept_rows.append(row)
        for side, sample in sides:
            report.tokens += len(sample.input_ids)
            report.trained_tokens += sum(label != IGNORE_INDEX for label in sample.labels)
        if shown_items < show:
            shown_items += 1
            for part, (side, sample) in enumerate(sides):
                report.shown.append(ShownSample(index, record_id, part, len(sides), sample, side=side))

    for index, line, where, raw in iter_raw_records(path, on_bad_line=bad_line):
        report.records += 1
        record_id = str(raw["id"]) if isinstance(raw, dict) and raw.get("id") is not None else None
        try:
            if is_kto:
                examples = preference.parse_kto_record(raw, where, default_id=str(index))
                rendered = [
                    (
                        example,
                        preference.render_answer(
                            example.conversation(), tokenizer, default_system=settings.default_system
                        ),
                    )
                    for example in examples
                ]
                key_items = [dataclasses.replace(example, id="") for example in examples]
            else:
                pair = preference.parse_preference_record(raw, where, default_id=str(index))
                both = preference.render_pair(pair, tokenizer, default_system=settings.default_system)
                key_items = [dataclasses.replace(pair, id="")]
        except DataError as e:
            message = str(e)
            report.identical_pairs += isinstance(e, preference.IdenticalAnswers)
            form = preference_form(raw)
            if form is None and isinstance(raw, dict) and any(key in raw for key in SFT_KEYS):
                message = f"{where}: an SFT conversation, not preference data: check it without --objective"
            elif form is not None and objective not in form[0]:
                hint = _objective_hint(form[0])
                message = f"{where}: {form[1]}, not read by --objective {objective}: check it with {hint}"
            report.problems.append(Problem(index, line, record_id, message))
            continue
        key = hashlib.sha1(repr(key_items).encode()).hexdigest()
        if key in first_copy:
            report.duplicate_records += 1
            if len(report.duplicates) < 100:
                report.duplicates.append((index, first_copy[key]))
        else:
            first_copy[key] = index
        if is_kto:
            for example, sample in rendered:
                report.kto_examples += 1
                report.desirable += example.desirable
                report.undesirable += not example.desirable
                prompt = measure("completion", sample)
                lengths["prompt"].append(prompt)
                # the length rule of render_kto_example
                if len(sample.input_ids) > settings.max_length:
                    report.dropped += 1
                    continue
                row = {"input_ids": sample.input_ids, "labels": sample.labels, "answer_start": prompt}
                side = "desirable" if example.desirable else "undesirable"
                keep(index, example.id, [(side, sample)], row)
        else:
            report.pairs += 1
            lengths["prompt"].append(measure("chosen", both.chosen))
            measure("rejected", both.rejected)
            # the length rule of render_pair
            if max(len(both.chosen.input_ids), len(both.rejected.input_ids)) > settings.max_length:
                report.dropped += 1
                continue
            keep(index, pair.id, [("chosen", both.chosen), ("rejected", both.rejected)], both.features())
    report.bad_records = len({p.index for p in report.problems})
    report.token_lengths = {name: length_summary(values) for name, values in lengths.items() if values}
    if is_kto:
        batch_lengths = preference.kto_lengths(preference.with_kl_sequences(kept_rows, preference.KL_BLOCK))
    else:
        batch_lengths = preference.pair_lengths(kept_rows)
    _epoch_figures(report, batch_lengths, batch)
    return report


def write_histogram(report: CheckReport | PreferenceCheckReport, path: str, bins: int = 50) -> None:
    """A PNG histogram of the report's `lengths` (SFT: untruncated samples; preference: each answer's whole
    sequence), with --model_max_length marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    if report.lengths:
        axes.hist(report.lengths, bins=bins, color="#4878a8")
    axes.axvline(report.max_length, color="#c03030", linestyle="--", label=f"--model_max_length {report.max_length}")
    xlabel, ylabel, title = report.histogram_labels()
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


TRAINED_COLOUR, RESET = "\033[1;32m", "\033[0m"  # bold green
TRAINED_MARKERS = ("[[", "]]")


def show_samples(
    report: CheckReport | PreferenceCheckReport,
    tokenizer: PreTrainedTokenizerBase,
    out: TextIO | None = None,
    colour: bool | None = None,
) -> None:
    """Print the kept samples with their trained tokens highlighted: bold green on a terminal, else between [[ ]]."""
    out = out or sys.stdout
    if colour is None:
        colour = out.isatty()
    start, end = (TRAINED_COLOUR, RESET) if colour else TRAINED_MARKERS
    legend = "trained tokens in bold green" if colour else f"trained tokens between {start} and {end}"
    print(f"--- {len(report.shown)} samples as training renders them ({legend})", file=out)
    for shown in report.shown:
        sample = shown.sample
        trained = sum(label != IGNORE_INDEX for label in sample.labels)
        if shown.side:
            part = f", {shown.side}"
        else:
            part = f", sample {shown.part + 1} of {shown.parts}" if shown.parts > 1 else ""
        print(
            f"\n=== record #{shown.index} (id {shown.id!r}{part}): {len(sample.input_ids)} tokens, {trained} trained"
            + (", truncated" if sample.truncated else ""),
            file=out,
        )
        text, run, is_trained = [], [], None
        for token, label in zip(sample.input_ids, sample.labels):
            trained_token = label != IGNORE_INDEX
            if is_trained is not None and trained_token != is_trained:
                text.append(_run_text(tokenizer, run, is_trained, start, end))
                run = []
            run.append(token)
            is_trained = trained_token
        if run:
            text.append(_run_text(tokenizer, run, is_trained, start, end))
        print("".join(text), file=out)


def _run_text(tokenizer: PreTrainedTokenizerBase, ids: list[int], trained: bool, start: str, end: str) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{start}{text}{end}" if trained else text
