"""The model card (README.md) of every result llmft writes: a trained adapter or full model, a merged model, a GPTQ
model, and a GGUF export.

A card says what the weights are and how they came to be: the base model, the training mode and its key settings,
the data files with their record and token counts, epochs and steps, the final train and eval losses with the run
report's plot, the quantization and its measured cost where there is one; how to load the result (transformers,
PEFT), merge, quantize and chat with it; the library versions; and a Hub metadata header (base_model and its
relation, library_name, tags, datasets, and the license of the base model's own card when it states one).

Everything comes from `CardFacts`, which each writer fills with what it knows: finetune.py's final save from its
run record and report (`training_card_facts`), merge and quantize from the folder they read, which carries the
training report on (`derived_card_facts`), and any later tool the same way. `write_model_card` replaces whatever
README.md was there (PEFT writes an empty template of its own).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"
REPORT_JSON = "training_report.json"  # llmft.report's names, repeated here so the card needs no torch import
REPORT_PNG = "training_report.png"
RUN_FILE = "llmft_run.json"  # llmft.saving.RUN_FILE
KINDS = ("adapter", "full", "merged", "gptq", "gguf")
# base_model_relation on the Hub: how these weights relate to base_model
RELATIONS = {"adapter": "adapter", "full": "finetune", "merged": "finetune", "gptq": "quantized", "gguf": "quantized"}
LIBRARIES = {
    "adapter": "peft",
    "full": "transformers",
    "merged": "transformers",
    "gptq": "transformers",
    "gguf": "gguf",
}
MODES = {"lora": "LoRA", "qlora": "Q-LoRA", "full": "full fine-tuning"}


@dataclass
class CardFacts:
    """What a card says; every field but `kind` may be unknown (None / empty) and is then left out."""

    kind: str  # one of KINDS
    base_model: str | None  # the Hub `base_model`: what was fine-tuned (adapter, full, merged) or quantized
    source: str | None = None  # the folder this result was made from (merged: the adapter; gptq, gguf: the model)
    trained_from: str | None = None  # the base the training started from, when that is not base_model
    mode: str | None = None  # lora | qlora | full (llmft_run.json's)
    base_quantization: Mapping[str, Any] | None = None  # how training loaded the base (bitsandbytes 4-bit, GPTQ)
    report: Mapping[str, Any] | None = None  # training_report.json: settings, steps, losses, data, versions
    has_plot: bool = False  # training_report.png is in the folder
    merge: Mapping[str, Any] | None = None  # the merge's parity figures
    quantization: Mapping[str, Any] | None = None  # quantization_report.json, or {"type": ...} for GGUF
    files: list[str] = field(default_factory=list)  # the weight files to name (GGUF)
    license: Mapping[str, str] = field(default_factory=dict)  # license, license_name, license_link of the base


# --- reading what a folder knows -------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def card_metadata(path: str | os.PathLike) -> dict:
    """The YAML header of a model card (README.md), {} when there is none or it does not parse."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        header = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def base_model_license(model: str | None) -> dict[str, str]:
    """license (and license_name / license_link for `other`) from the model card of `model`, a local folder or a Hub
    id in the local cache; {} when it has no card or the card names no license."""
    if not model:
        return {}
    from llmft.model_folder import model_folder

    folder = model_folder(model).folder
    if folder is None:
        return {}
    header = card_metadata(folder / CARD_FILE)
    return {k: str(header[k]) for k in ("license", "license_name", "license_link") if header.get(k)}


def training_card_facts(folder: str | os.PathLike, output_dir: str | os.PathLike) -> CardFacts:
    """The facts of a training run's final save: `folder` holds the saved weights and llmft_run.json, `output_dir`
    the run report (training_report.json and .png)."""
    folder, output_dir = Path(folder), Path(output_dir)
    run = read_json(folder / RUN_FILE) or {}
    base = run.get("base_model")
    return CardFacts(
        kind="adapter" if (folder / "adapter_config.json").is_file() else "full",
        base_model=base,
        mode=run.get("mode"),
        base_quantization=run.get("base_quantization"),
        report=read_json(output_dir / REPORT_JSON),
        has_plot=(output_dir / REPORT_PNG).is_file(),
        license=base_model_license(base),
    )


def derived_card_facts(
    kind: str,
    source: str | os.PathLike,
    folder: str | os.PathLike,
    base_model: str | None = None,
    **known: Any,
) -> CardFacts:
    """The facts of a result made from the folder `source` (merged from an adapter, quantized or exported from a
    model): the training report and plot that `source` carries are copied into `folder`, so every result made from
    a run keeps that run's record. `base_model` is the Hub base_model (default: `source`; a merge gives the base it
    merged into); `known` fills the other CardFacts fields (merge, quantization, files)."""
    source, folder = Path(source), Path(folder)
    for name in (REPORT_JSON, REPORT_PNG):
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)
    report = read_json(folder / REPORT_JSON)
    run = read_json(source / RUN_FILE) or {}
    settings = (report or {}).get("settings") or {}
    trained_from = run.get("base_model") or settings.get("model_name_or_path")
    base_model = str(base_model or source)
    return CardFacts(
        kind=kind,
        base_model=base_model,
        source=str(source),
        trained_from=str(trained_from) if trained_from else None,
        mode=run.get("mode") or (_mode_from_settings(settings) if settings else None),
        base_quantization=run.get("base_quantization"),
        report=report,
        has_plot=(folder / REPORT_PNG).is_file(),
        license=base_model_license(base_model) or base_model_license(trained_from),
        **known,
    )


def _mode_from_settings(settings: Mapping[str, Any]) -> str:
    if not settings.get("use_lora"):
        return "full"
    return "qlora" if settings.get("q_lora") else "lora"


# --- writing ---------------------------------------------------------------------------------------------------------


def write_model_card(folder: str | os.PathLike, facts: CardFacts) -> str:
    """Write the card for `facts` as folder/README.md (replacing any), whole or not at all; returns its path."""
    path = os.path.join(folder, CARD_FILE)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(model_card(facts))
    os.replace(partial, path)
    return path


def model_card(facts: CardFacts) -> str:
    """The card's text: the YAML metadata header, then the sections (see the module docstring)."""
    if facts.kind not in KINDS:
        raise ValueError(f"unknown result kind {facts.kind!r}: one of {', '.join(KINDS)}")
    sections = [
        _title(facts),
        _training(facts),
        _data(facts),
        _results(facts),
        _quantization(facts),
        _usage(facts),
        _versions(facts),
    ]
    header = yaml.safe_dump(hub_metadata(facts), sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def hub_metadata(facts: CardFacts) -> dict:
    """The card's YAML header, in the Hub's model-card fields."""
    settings = (facts.report or {}).get("settings") or {}
    meta: dict[str, Any] = {}
    if facts.base_model:
        meta["base_model"] = facts.base_model
        meta["base_model_relation"] = RELATIONS[facts.kind]
    meta["library_name"] = LIBRARIES[facts.kind]
    meta.update(facts.license)
    meta["pipeline_tag"] = "text-generation"
    tags = ["llmft", "text-generation", "conversational"]
    if facts.mode in ("lora", "qlora"):
        tags += ["lora"] + (["qlora"] if facts.mode == "qlora" else [])
        tags += ["peft"] if facts.kind == "adapter" else []
    elif facts.mode == "full":
        tags.append("full-fine-tuning")
    if facts.kind in ("gptq", "gguf"):
        tags.append(facts.kind)
    meta["tags"] = tags
    datasets = [
        os.path.basename(entry["path"])
        for key in ("data_path", "eval_data_path")
        if isinstance(entry := settings.get(key), dict) and entry.get("path")
    ]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))  # an eval file may be the train file
    return meta


def _title(facts: CardFacts) -> str:
    mode = MODES.get(facts.mode or "", "fine-tuning")
    base, source = f"`{facts.base_model or '?'}`", f"`{facts.source or '?'}`"
    what = {
        "adapter": f"A {mode} adapter for {base}",
        "full": f"{base} after full fine-tuning",
        "merged": f"The {mode} adapter {source} merged into its base model, {base}",
        "gptq": f"A {_gptq_name(facts)} quantization of {source}",
        "gguf": f"A GGUF export of {source}",
    }[facts.kind]
    if facts.kind in ("gptq", "gguf") and facts.trained_from and facts.trained_from != facts.source:
        what += f", fine-tuned ({mode}) from `{facts.trained_from}`"
    return (
        f"# Model card\n\n{what}; made with llmft on chat conversations. The chat template is saved with the "
        "tokenizer, so prompts at inference are rendered exactly as training rendered them."
    )


def _gptq_name(facts: CardFacts) -> str:
    bits = (facts.quantization or {}).get("bits")
    return f"GPTQ {bits}-bit" if bits else "GPTQ"


def _training(facts: CardFacts) -> str | None:
    report = facts.report or {}
    settings = report.get("settings") or {}
    if not settings:
        return None
    rows = [("mode", MODES.get(facts.mode or "", facts.mode or "?"))]
    if facts.mode in ("lora", "qlora"):
        lora = f"r {settings.get('lora_r')}, alpha {settings.get('lora_alpha')}, dropout {settings.get('lora_dropout')}"
        targets = settings.get("lora_target_modules")
        lora += f", targets {', '.join(targets) if isinstance(targets, list) else targets}"
        variants = [name for name in ("use_dora", "use_rslora") if settings.get(name)]
        if settings.get("lora_init") not in (None, "default"):
            variants.append(f"init {settings['lora_init']}")
        if settings.get("loraplus_lr_ratio"):
            variants.append(f"LoRA+ ratio {settings['loraplus_lr_ratio']}")
        rows.append(("LoRA", lora + (f" ({', '.join(variants)})" if variants else "")))
    if facts.base_quantization:
        q = facts.base_quantization
        bits = f"{q['bits']}-bit" if q.get("bits") else None
        rows.append(("base weights", " ".join(str(part) for part in (q.get("method"), bits, q.get("type")) if part)))
    precision = "bf16" if settings.get("bf16") else "fp16" if settings.get("fp16") else "fp32"
    rows.append(("precision", precision))
    schedule = f"{settings.get('learning_rate')}, {settings.get('lr_scheduler_type')} schedule"
    if settings.get("warmup_steps"):
        schedule += f", warm-up {settings['warmup_steps']}"
    rows.append(("learning rate", schedule))
    rows.append(("optimizer", f"{settings.get('optim')}, weight decay {settings.get('weight_decay')}"))
    micro_batch = (
        f"up to {settings['max_tokens_per_batch']} tokens"
        if settings.get("max_tokens_per_batch")
        else f"{settings.get('per_device_train_batch_size')} samples"
    )
    ranks = _plural(settings.get("world_size", report.get("world_size")), "rank")
    batch = f"{micro_batch} per micro-batch x {settings.get('gradient_accumulation_steps')} accumulation x {ranks}"
    rows.append(("batch", batch))
    rows.append(
        (
            "sequence",
            f"up to {settings.get('model_max_length')} tokens ({settings.get('overlong_samples')} longer ones)"
            + (", packed" if settings.get("packing") else ""),
        )
    )
    if settings.get("deepspeed") or settings.get("fsdp"):
        deepspeed = settings.get("deepspeed")
        rows.append(("sharding", f"DeepSpeed {deepspeed}" if deepspeed else f"FSDP {settings.get('fsdp')}"))
    epochs = report.get("epoch")
    rows.append(("epochs, steps", f"{_number(epochs)} epochs, {report.get('global_step')} optimizer steps"))
    rows.append(("seed", str(settings.get("seed"))))
    return "## Training\n\n" + _table(("setting", "value"), rows)


def _data(facts: CardFacts) -> str | None:
    data = (facts.report or {}).get("data") or {}
    if not data:
        return None
    rows = [
        (
            name,
            f"`{entry.get('path')}`",
            _count(entry.get("records")),
            _count(entry.get("samples")),
            _count(entry.get("tokens")),
            _count(entry.get("trained_tokens")),
        )
        for name, entry in data.items()
    ]
    return "## Data\n\n" + _table(("split", "file", "records", "samples", "tokens", "trained tokens"), rows)


def _results(facts: CardFacts) -> str | None:
    report = facts.report or {}
    if not report:
        return None
    loss, eval_loss = report.get("loss") or {}, report.get("eval_loss") or {}
    losses = [
        ("final train loss", loss.get("final")),
        ("best train loss", loss.get("best")),
        ("mean train loss over the run", loss.get("mean")),
        ("final eval loss", eval_loss.get("final")),
        ("best eval loss", eval_loss.get("best")),
    ]
    rows = [(name, _number(value)) for name, value in losses if value is not None]  # a run may log none of some
    rows += [
        ("tokens seen (padding left out)", _count(report.get("tokens_seen"))),
        ("trained tokens (with loss)", _count(report.get("trained_tokens"))),
        ("training time", f"{_number(report.get('wall_time_s'))} s on {_plural(report.get('world_size'), 'rank')}"),
    ]
    text = "## Results\n\n" + _table(("", "value"), rows)
    if facts.merge:
        text += (
            f"\n\nMerge parity (the adapter on its base against this merged model, reloaded): max |logit diff| "
            f"{_number(facts.merge.get('max_diff'))}, argmax agreement {_share(facts.merge.get('agreement'))} "
            f"on {_count(facts.merge.get('tokens'))} tokens."
        )
    if facts.has_plot:
        text += (
            f"\n\n![train and eval loss, learning rate and gradient norm against tokens seen]({REPORT_PNG})\n\n"
            f"The whole record, with every setting: `{REPORT_JSON}`."
        )
    return text


def _quantization(facts: CardFacts) -> str | None:
    q = facts.quantization or {}
    if not q:
        return None
    if facts.kind == "gguf":
        rows = [(k, str(v)) for k, v in q.items()]
        return "## Quantization\n\n" + _table(("", "value"), rows)
    original, quantized = q.get("original") or {}, q.get("quantized") or {}
    rows = [
        ("method", f"GPTQ (GPTQModel), {q.get('bits')} bits, group size {q.get('group_size')}"),
        (
            "calibration",
            f"{_count(q.get('calibration_samples'))} conversations, {_count(q.get('calibration_tokens'))} tokens",
        ),
        ("loss on held-out assistant tokens", f"{_number(original.get('loss'))} -> {_number(quantized.get('loss'))}"),
        ("perplexity", f"{_number(original.get('perplexity'))} -> {_number(quantized.get('perplexity'))}"),
        ("held-out conversations", f"{_count(q.get('eval_samples'))} ({_count(original.get('tokens'))} tokens)"),
    ]
    return "## Quantization\n\n" + _table(("", "value"), rows) + "\n\nThe whole record: `quantization_report.json`."


def _usage(facts: CardFacts) -> str:
    path = "PATH"  # this folder, wherever it is copied or uploaded to
    if facts.kind == "gguf":
        file = facts.files[0] if facts.files else "MODEL.gguf"
        return (
            "## Use\n\n```bash\n"
            f"llama-cli -m {path}/{file} -cnv        # llama.cpp: chat with the chat template stored in the file\n"
            f"ollama create my-model -f Modelfile    # Ollama: a Modelfile with `FROM {path}/{file}`\n"
            "```"
        )
    if facts.kind == "adapter":
        load = (
            "from peft import AutoPeftModelForCausalLM\n"
            "from transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{path}")  # with the base adapter_config.json names\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")'
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{path}"'
            + (")  # GPTQ kernels come from gptqmodel\n" if facts.kind == "gptq" else ")\n")
            + f'tokenizer = AutoTokenizer.from_pretrained("{path}")'
        )
    generate = (
        'messages = [{"role": "user", "content": "Who are you?"}]\n'
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
        "return_dict=True)\n"
        "reply = model.generate(**inputs.to(model.device), max_new_tokens=256)  # stops at the end-of-turn token\n"
        'print(tokenizer.decode(reply[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    )
    commands = [f"llmft chat --model_name_or_path {path}                 # talk to it"]
    if facts.kind == "adapter":
        commands.append(f"llmft merge --adapter {path} --output_dir merged   # one standalone model")
        quantize_from = "merged"
    else:
        quantize_from = path
    if facts.kind != "gptq":
        commands.append(
            f"llmft quantize --model_name_or_path {quantize_from} --data_path DATA --output_dir {quantize_from}-gptq"
            " --bits 4"
        )
    return (
        f"## Use\n\n`{path}` is this folder.\n\n```python\n{load}\n\n{generate}\n```\n\n"
        "With llmft (`pip install` from its repository):\n\n```bash\n" + "\n".join(commands) + "\n```"
    )


def _versions(facts: CardFacts) -> str:
    from llmft.report import library_versions

    trained = dict((facts.report or {}).get("versions") or {})
    now = library_versions()
    if facts.kind == "gptq":
        from importlib import metadata

        try:
            now["gptqmodel"] = metadata.version("gptqmodel")
        except metadata.PackageNotFoundError:
            pass
    lines = []
    if trained:
        lines.append("Trained with " + ", ".join(f"{name} {version}" for name, version in trained.items()) + ".")
    if facts.kind not in ("adapter", "full") or not trained:
        what = {"merged": "Merged", "gptq": "Quantized", "gguf": "Exported"}.get(facts.kind, "Written")
        lines.append(f"{what} with " + ", ".join(f"{name} {version}" for name, version in now.items()) + ".")
    return "## Library versions\n\n" + "\n\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _share(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "-"


def _plural(count: Any, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
