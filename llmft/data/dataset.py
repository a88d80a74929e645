"""Training and evaluation datasets: conversations rendered to `input_ids`/`labels`, eagerly or lazily.

Eager (default): records are read once into an Arrow dataset and rendered with `datasets.map`; both steps are cached
under the Hugging Face datasets cache, keyed by the file's size and modification time, the tokenizer and the render
settings, so a second run with the same inputs tokenizes nothing. Samples dropped as over-long leave the dataset.

Lazy (`--lazy_preprocess True`): one streaming pass validates every record and spools it as a line of JSONL whose
byte offset is kept; a sample is read back and rendered only when the trainer asks for it, so memory stays flat
however large the file (a JSON list is parsed once for that pass; JSONL is streamed line by line).

Either way a record is parsed and validated once, when the file is read (llmft.data.records); what is stored between
reading and rendering is the validated `Conversation` itself (`conversation_fields`), rebuilt without parsing the
record again (`conversation_from_fields`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import torch

from llmft.data.conversation import Conversation, Message, ToolCall
from llmft.data.reading import check_data_file
from llmft.data.records import iter_conversations
from llmft.data.render import IGNORE_INDEX, render_samples, sample_texts
from llmft.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainingArguments

    from llmft.args import DataArguments
    from llmft.data.render import RenderedSample

logger = logging.getLogger(__name__)

RENDER_VERSION = "2"  # bump when rendering changes, so cached tokenizations are not reused
SPOOL_FORMAT = "conversation-1"  # the lazy spool's line format (`conversation_fields`), part of the spool's name


def conversation_fields(conversation: Conversation) -> dict:
    """A validated conversation as its own fields (JSON-ready), kept between reading a file and rendering it (the
    Arrow rows, the lazy spool); `conversation_from_fields` gives back an equal Conversation."""
    return dataclasses.asdict(conversation)


def conversation_from_fields(fields: dict) -> Conversation:
    """The Conversation `conversation_fields` took apart, rebuilt as it was: no record is parsed or validated again."""
    messages = tuple(
        Message(**{**m, "tool_calls": tuple(ToolCall(**call) for call in m["tool_calls"])}) for m in fields["messages"]
    )
    return Conversation(id=fields["id"], messages=messages, text=fields["text"], tools=tuple(fields["tools"]))


@dataclass(frozen=True)
class RenderSettings:
    default_system: str | None
    max_length: int
    overlong: str
    train_turns: str = "all"

    @classmethod
    def from_args(cls, data_args: DataArguments) -> "RenderSettings":
        return cls(
            data_args.system_prompt, data_args.model_max_length, data_args.overlong_samples, data_args.train_turns
        )

    def render(
        self,
        conversation: Conversation,
        tokenizer: PreTrainedTokenizerBase,
        *,
        cut: bool = True,
        encode_limit: int | None = None,
    ) -> list[RenderedSample | None]:
        """The conversation's samples under these settings (`cut=False`: at full length, or up to `encode_limit`
        tokens, see `render_samples`)."""
        return render_samples(
            conversation,
            tokenizer,
            default_system=self.default_system,
            train_turns=self.train_turns,
            max_length=self.max_length if cut else None,
            overlong=self.overlong,
            encode_limit=encode_limit,
        )


@dataclass
class DataStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    split_conversations: int = 0  # conversations that became several samples (the template rewrites history)
    split_samples: int = 0  # the samples those conversations became
    tokens_known: bool = True  # False for lazy datasets: samples are tokenized only when the trainer uses them

    def summary(self, name: str) -> str:
        if not self.tokens_known:
            return (
                f"{name}: {self.samples} samples; their token counts (and which are truncated) are known only as "
                "the samples are used (--lazy_preprocess)"
            )
        share = self.trained_tokens / self.tokens if self.tokens else 0.0
        split = ""
        if self.split_conversations:
            split = (
                f" ({self.split_conversations} conversations became {self.split_samples} samples, one per "
                "trained turn, because the chat template renders earlier turns differently later)"
            )
        return (
            f"{name}: {self.samples} samples{split}, {self.tokens} tokens ({share:.1%} trained), "
            f"{self.truncated} truncated, {self.dropped} dropped as over-long"
        )


def build_datasets(
    data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, training_args: TrainingArguments
) -> tuple[datasets.Dataset | LazyConversationDataset, datasets.Dataset | LazyConversationDataset | None]:
    """(train, eval or None). Rank 0 prepares and caches; the other ranks then read its cache."""
    settings = RenderSettings.from_args(data_args)
    build = lazy_dataset if data_args.lazy_preprocess else eager_dataset
    result = []
    for path, name in ((data_args.data_path, "train"), (data_args.eval_data_path, "eval")):
        if path is None:
            result.append(None)
            continue
        with training_args.main_process_first(desc=f"preparing {name} data"):
            dataset, stats = build(path, tokenizer, settings, num_proc=data_args.preprocessing_num_workers)
        logger.warning(stats.summary(f"{name} data {path}"))
        if len(dataset) == 0:
            raise DataError(f"{path}: no sample left to train on ({stats.dropped} dropped as over-long)")
        result.append(dataset)
    return tuple(result)


def data_fingerprint(path: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings) -> str:
    """Identifies a rendering of one file: its size and mtime, the tokenizer's vocabulary and template, settings."""
    stat = os.stat(path)
    h = hashlib.sha256()
    for part in (
        os.path.abspath(path),
        stat.st_size,
        stat.st_mtime_ns,
        RENDER_VERSION,
        repr(settings),
        tokenizer.chat_template,
        tokenizer.eos_token,
        len(tokenizer),
        json.dumps(tokenizer.get_vocab(), sort_keys=True),
    ):
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _records(path: str, stamp: str) -> Iterator[dict[str, str]]:
    """Arrow rows of a file's conversations, validated as they are read (`stamp` is only there to key the cache to
    the file's contents)."""
    for conversation in iter_conversations(path):
        yield {"conversation": json.dumps(conversation_fields(conversation), ensure_ascii=False)}


def _render_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, settings: RenderSettings
) -> dict[str, list]:
    """One row per sample; `parts` is the number of samples a conversation became, on its first row (0 after)."""
    out = {"input_ids": [], "labels": [], "truncated": [], "dropped": [], "parts": []}
    for encoded in batch["conversation"]:
        samples = settings.render(conversation_from_fields(json.loads(encoded)), tokenizer)
        for part, sample in enumerate(samples):
            out["input_ids"].append(sample.input_ids if sample else [])
            out["labels"].append(sample.labels if sample else [])
            out["truncated"].append(bool(sample and sample.truncated))
            out["dropped"].append(sample is None)
            out["parts"].append(0 if part else len(samples))
    return out


def eager_dataset(
    path: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings, num_proc: int | None = None
) -> tuple[datasets.Dataset, DataStats]:
    check_data_file(path)
    fingerprint = data_fingerprint(path, tokenizer, settings)
    stat = os.stat(path)
    try:
        records = datasets.Dataset.from_generator(
            _records, gen_kwargs={"path": os.path.abspath(path), "stamp": f"{stat.st_size}-{stat.st_mtime_ns}"}
        )
    except datasets.exceptions.DatasetGenerationError as e:
        raise _data_error_inside(e) from None
    try:
        rendered = records.map(
            _render_batch,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer, "settings": settings},
            remove_columns=["conversation"],
            new_fingerprint=fingerprint,
            num_proc=num_proc,
            desc="rendering",
        )
    except DataError:
        raise
    except Exception as e:
        raise _data_error_inside(e) from None
    split = [parts for parts in rendered["parts"] if parts > 1]
    stats = DataStats(
        samples=len(rendered),
        truncated=sum(rendered["truncated"]),
        dropped=sum(rendered["dropped"]),
        split_conversations=len(split),
        split_samples=sum(split),
    )
    if stats.dropped:
        rendered = rendered.filter(
            lambda dropped: not dropped, input_columns="dropped", new_fingerprint=fingerprint + "-kept"
        )
    stats.samples = len(rendered)
    rendered = rendered.remove_columns(["truncated", "dropped", "parts"])
    for labels in rendered.with_format("numpy")["labels"]:
        stats.tokens += len(labels)
        stats.trained_tokens += int((labels != IGNORE_INDEX).sum())
    return rendered, stats


def _data_error_inside(error: BaseException) -> BaseException:
    """The DataError that datasets wrapped in its own exception, or the exception itself."""
    cause = error
    while cause is not None:
        if isinstance(cause, DataError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return error


class LazyConversationDataset(torch.utils.data.Dataset):
    """Samples rendered on access from a spooled JSONL copy of the validated records; see the module docstring."""

    def __init__(self, path: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings) -> None:
        self.tokenizer, self.settings = tokenizer, settings
        check_data_file(path)
        spool_dir = os.path.join(datasets.config.HF_DATASETS_CACHE, "llmft-lazy")
        os.makedirs(spool_dir, exist_ok=True)
        self.spool = os.path.join(spool_dir, f"{data_fingerprint(path, tokenizer, settings)}-{SPOOL_FORMAT}.jsonl")
        self.offsets = array("q")
        if not os.path.isfile(self.spool):
            self._write_spool(path)
        with open(self.spool, "rb") as f:
            offset = 0
            for line in f:
                self.offsets.append(offset)
                offset += len(line)
        self.stats = DataStats(samples=len(self.offsets), tokens_known=False)

    def _write_spool(self, path: str) -> None:
        """One line per sample: {"part": j, "conversation": `conversation_fields`}; a conversation the template splits
        (see llmft.data.render) has a line for each of its samples, counted by rendering its text, not tokenizing it."""
        partial = f"{self.spool}.{os.getpid()}.partial"
        settings, split = self.settings, []
        try:
            with open(partial, "w", encoding="utf-8") as out:
                for conversation in iter_conversations(path):
                    parts = 1
                    if not conversation.is_plain_text:
                        parts = max(
                            1,
                            len(
                                sample_texts(
                                    conversation,
                                    self.tokenizer,
                                    default_system=settings.default_system,
                                    train_turns=settings.train_turns,
                                )
                            ),
                        )
                    fields = conversation_fields(conversation)
                    for part in range(parts):
                        out.write(json.dumps({"part": part, "conversation": fields}, ensure_ascii=False) + "\n")
                    if parts > 1:
                        split.append(parts)
        except BaseException:
            os.remove(partial)  # a bad record stops the pass: leave no half-written spool behind
            raise
        os.replace(partial, self.spool)  # a crash mid-way leaves no spool that looks complete
        if split:
            logger.warning(
                "%s: %d conversations became %d samples, one per trained turn, because the chat template "
                "renders earlier turns differently later",
                path,
                len(split),
                sum(split),
            )

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict:
        with open(self.spool, "rb") as f:
            f.seek(self.offsets[index])
            entry = json.loads(f.readline())
        conversation = conversation_from_fields(entry["conversation"])
        settings, part = self.settings, entry["part"]
        sample = settings.render(conversation, self.tokenizer)[part]
        if sample is None:
            # The prompt alone is longer than max_length. Eager mode drops such a sample; here the trainer already
            # counts on it, so it stays, cut to length and carrying no loss.
            logger.warning(
                "sample %s: its prompt alone exceeds %d tokens; it trains nothing", conversation.id, settings.max_length
            )
            sample = settings.render(conversation, self.tokenizer, cut=False)[part]
            sample.input_ids = sample.input_ids[: settings.max_length]
            sample.labels = [IGNORE_INDEX] * len(sample.input_ids)
        return {"input_ids": sample.input_ids, "labels": sample.labels}


def lazy_dataset(
    path: str, tokenizer: PreTrainedTokenizerBase, settings: RenderSettings, num_proc: int | None = None
) -> tuple[LazyConversationDataset, DataStats]:
    """(dataset, stats); lazy samples are rendered later, so only the sample count is known now."""
    dataset = LazyConversationDataset(path, tokenizer, settings)
    return dataset, dataset.stats
