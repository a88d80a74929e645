"""The model card (README.md) of every result, on real runs of the tiny model: a LoRA adapter (in place of PEFT's
empty template), a full fine-tune, the merged model and its GPTQ quantization, and the card a GGUF export gets.

Checked against what is true of the run: the Hub header (base model and relation, library, tags, the data files,
the license of the base model's own card), the data table against `llmft check`'s counts of the same file at the
same settings, steps and losses against the run report, the plot beside the card, and the card's own loading code,
executed on the folder it describes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from llmft.model_card import CardFacts, model_card
from tests.conftest import EXAMPLES, argv, finetune

STEPS = 6
LICENSE = {"license": "other", "license_name": "tiny-research", "license_link": "https://example.org/LICENSE"}


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def table_row(body: str, first_cell: str) -> list[str]:
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{body}")


def run_card_code(folder: Path) -> None:
    """Execute the card's Python block on `folder`: the loading and chat code a reader copies."""
    _, body = card_of(folder)
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1).replace('"PATH"', repr(str(folder)))
    code = code.replace("max_new_tokens=256", "max_new_tokens=4")
    exec(compile(code, f"{folder}/README.md", "exec"), {})


@pytest.fixture(scope="module")
def licensed_base(tiny_chat_model, tmp_path_factory) -> Path:
    """The tiny chat model with a card of its own that names its license."""
    base = tmp_path_factory.mktemp("base") / "tiny-licensed"
    shutil.copytree(tiny_chat_model, base)
    (base / "README.md").write_text("---\n" + yaml.safe_dump(LICENSE) + "---\n\n# Tiny\n")
    return base


def train(base: Path, out: Path, *extra) -> Path:
    finetune(
        *argv(
            "--model_name_or_path {base} --data_path {examples} --eval_data_path {examples} --eval_strategy steps",
            "--eval_steps {steps} --output_dir {out} --use_cpu True --model_max_length 128",
            "--max_tokens_per_batch 0 --per_device_train_batch_size 4 --max_steps {steps} --logging_steps 1",
            "--save_strategy no --report_to none --seed 0",
            base=base,
            examples=EXAMPLES,
            steps=STEPS,
            out=out,
        ),
        *extra,
    )
    return out


@pytest.fixture(scope="module")
def adapter(licensed_base, tmp_path_factory, datasets_cache) -> Path:
    out = tmp_path_factory.mktemp("runs") / "adapter"
    return train(licensed_base, out, "--use_lora", "True", "--lora_r", "8", "--lora_alpha", "16")


@pytest.fixture(scope="module")
def check_counts(licensed_base, tmp_path_factory) -> dict:
    """`llmft check`'s counts of the data file at the run's settings: the oracle for the card's data table."""
    from llmft.tools.check import main as check

    out = tmp_path_factory.mktemp("check")
    flags = "{examples} --model_name_or_path {model} --model_max_length 128 --output_dir {out}"
    assert check(argv(flags, examples=EXAMPLES, model=licensed_base, out=out)) == 0
    return json.loads((out / f"{EXAMPLES.name}.check.json").read_text())


def assert_training_sections(body: str, folder: Path, check_counts: dict) -> None:
    report = json.loads((folder / "training_report.json").read_text())
    records = len(json.loads(EXAMPLES.read_text()))
    for split in ("train", "eval"):
        row = table_row(body, split)
        assert row[1] == f"`{EXAMPLES}`"
        assert row[2:] == [
            f"{records:,}",
            f"{check_counts['samples']:,}",
            f"{check_counts['tokens']:,}",
            f"{check_counts['trained_tokens']:,}",
        ]
    assert table_row(body, "epochs, steps")[1].endswith(f"epochs, {STEPS} optimizer steps")
    assert table_row(body, "final train loss")[1] == f"{report['loss']['final']:.4g}"
    assert table_row(body, "final eval loss")[1] == f"{report['eval_loss']['final']:.4g}"
    assert table_row(body, "trained tokens (with loss)")[1] == f"{report['trained_tokens']:,}"
    assert "](training_report.png)" in body and (folder / "training_report.png").is_file()
    assert "## Library versions" in body and f"transformers {report['versions']['transformers']}" in body


def test_adapter_card_replaces_peft_template(adapter, licensed_base, check_counts):
    header, body = card_of(adapter)
    assert "More Information Needed" not in body  # PEFT's template is gone
    assert header["base_model"] == str(licensed_base)
    assert header["base_model_relation"] == "adapter"
    assert header["library_name"] == "peft"
    assert {k: header[k] for k in LICENSE} == LICENSE  # from the base model's card
    assert header["datasets"] == [EXAMPLES.name]
    assert {"llmft", "lora", "peft", "text-generation"} <= set(header["tags"])
    assert table_row(body, "LoRA")[1].startswith("r 8, alpha 16")
    assert_training_sections(body, adapter, check_counts)
    assert "llmft merge --adapter PATH" in body and "llmft chat --model_name_or_path PATH" in body
    assert "llmft quantize" in body
    run_card_code(adapter)


@pytest.mark.slow
def test_full_model_card(licensed_base, tmp_path, datasets_cache, check_counts):
    out = train(licensed_base, tmp_path / "full")
    header, body = card_of(out)
    assert (header["base_model"], header["base_model_relation"], header["library_name"]) == (
        str(licensed_base),
        "finetune",
        "transformers",
    )
    assert "full-fine-tuning" in header["tags"] and header["license"] == "other"
    assert table_row(body, "mode")[1] == "full fine-tuning"
    assert_training_sections(body, out, check_counts)
    run_card_code(out)


@pytest.mark.slow
def test_merged_and_gptq_cards_carry_the_run(adapter, licensed_base, tmp_path, check_counts):
    from llmft.tools.merge import merge_lora
    from llmft.tools.quantize import run_gptq

    merged, quantized = tmp_path / "merged", tmp_path / "gptq"
    merge_lora(str(adapter), merged)
    header, body = card_of(merged)
    assert (header["base_model"], header["base_model_relation"], header["library_name"]) == (
        str(licensed_base),
        "finetune",
        "transformers",
    )
    assert header["license_name"] == "tiny-research"
    assert f"adapter `{adapter}` merged into its base model" in body
    assert re.search(r"argmax agreement \d+\.\d\d% on \d+ tokens", body)
    assert_training_sections(body, merged, check_counts)
    run_card_code(merged)

    report = run_gptq(str(merged), str(EXAMPLES), quantized, bits=4, num_samples=8, eval_samples=4)
    header, body = card_of(quantized)
    assert (header["base_model"], header["base_model_relation"]) == (str(merged), "quantized")
    assert "gptq" in header["tags"] and header["license"] == "other"  # the merged card names the base's license
    assert f"fine-tuned (LoRA) from `{licensed_base}`" in body
    assert table_row(body, "method")[1] == "GPTQ (GPTQModel), 4 bits, group size 128"
    expected = f"{report.original.loss:.4g} -> {report.quantized.loss:.4g}"
    assert table_row(body, "loss on held-out assistant tokens")[1] == expected
    assert_training_sections(body, quantized, check_counts)
    assert "Quantized with" in body and "gptqmodel" in body
    run_card_code(quantized)


def test_gguf_card_from_what_an_export_knows():
    """The card writer as an export tool calls it: only the facts it has."""
    facts = CardFacts(
        kind="gguf",
        base_model="org/merged-model",
        source="org/merged-model",
        quantization={"type": "Q4_K_M"},
        files=["model-Q4_K_M.gguf"],
        license={"license": "apache-2.0"},
    )
    text = model_card(facts)
    header = yaml.safe_load(text.split("\n---\n", 1)[0][4:])
    assert header["library_name"] == "gguf" and header["base_model_relation"] == "quantized"
    assert header["license"] == "apache-2.0" and "gguf" in header["tags"]
    assert "llama-cli -m PATH/model-Q4_K_M.gguf" in text and "| type | Q4_K_M |" in text
