"""Reading the settings (llmft/config.py): one boolean parser for every flag, --fsdp's included."""

from argparse import ArgumentTypeError

import pytest

from llmft.config import fsdp_flag_as_switch, parse_bool


@pytest.mark.parametrize("word, value", [("True", True), ("yes", True), ("1", True), ("false", False), ("No", False)])
def test_parse_bool_reads_the_words_finetune_flags_take(word, value):
    assert parse_bool(word) is value


def test_parse_bool_refuses_anything_else():
    with pytest.raises(ArgumentTypeError):
        parse_bool("maybe")


def test_fsdp_switch_reads_booleans_as_every_flag_does_and_leaves_its_options():
    assert fsdp_flag_as_switch(["--fsdp", "yes", "--bf16", "True"]) == ["--fsdp", "--bf16", "True"]
    assert fsdp_flag_as_switch(["--fsdp=0", "--bf16", "True"]) == ["--bf16", "True"]
    assert fsdp_flag_as_switch(["--fsdp", "full_shard auto_wrap"]) == ["--fsdp", "full_shard auto_wrap"]
