"""FSDP as the alternative to DeepSpeed: the configs in ds_configs/fsdp*.json, the launchers' --fsdp option, the
settings FSDP cannot run with, and full and LoRA fine-tuning through the launchers on 2 CPU ranks over gloo.

The slow runs check what a GPU run must give too: FSDP really shards (each rank holds half the rows of every weight
while it trains, not the whole model as under a silent fall-back to DDP), and the final save is an ordinary model or
adapter that plain transformers/PEFT load.
"""

from __future__ import annotations

import json

import pytest

from llmft.config import parse_args
from llmft.errors import ConfigError, LlmftError
from llmft.saving import check_adapter_complete, check_model_written
from tests.conftest import (
    DISTRIBUTED_LAUNCHERS,
    DS_CONFIGS,
    REPO,
    SINGLE_LAUNCHERS,
    TINY_RUN,
    argv,
    assert_adapter_trained,
    assert_full_model_trained,
    assert_reloads_and_generates,
    dry_run,
    entry_args,
    flag_value,
    launcher_env,
    run_launcher,
)

FSDP_CONFIGS = sorted(p.name for p in DS_CONFIGS.glob("fsdp*.json"))
FSDP_LAUNCHERS = ["finetune_ds.sh", "finetune_lora_ds.sh"]
# What transformers 5 reads from an FSDP2 --fsdp_config; it ignores any other key without a word.
FSDP2_KEYS = {
    "version",
    "reshard_after_forward",
    "cpu_offload",
    "activation_checkpointing",
    "cpu_ram_efficient_loading",
    "state_dict_type",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
}


# --- the configs -------------------------------------------------------------------------------------------------


def test_fsdp_configs_are_shipped():
    assert "fsdp.json" in FSDP_CONFIGS


@pytest.mark.parametrize("name", FSDP_CONFIGS)
def test_fsdp_config_makes_a_full_shard_fsdp2_plugin_that_saves_whole(name, tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    config = json.loads((DS_CONFIGS / name).read_text())
    assert set(config) <= FSDP2_KEYS, set(config) - FSDP2_KEYS
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=str(DS_CONFIGS / name), use_cpu=True)
    plugin_args = args.fsdp_plugin_args
    assert plugin_args["fsdp_version"] == 2
    assert plugin_args["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin_args["reshard_after_forward"] is True  # full shard
    assert plugin_args["state_dict_type"] == "FULL_STATE_DICT"  # the final save is an ordinary checkpoint
    assert plugin_args.get("activation_checkpointing", False) is False  # would hide LoRA layers from PEFT's save
    FullyShardedDataParallelPlugin(**plugin_args)  # accelerate takes every key


# --- the launchers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FSDP_LAUNCHERS)
def test_fsdp_replaces_the_launchers_deepspeed_config(name, data_file):
    argv = entry_args(dry_run(name, "-m", "org/model", "-d", data_file, "--fsdp", "fsdp", GPUS_PER_NODE=2))
    assert "--deepspeed" not in argv
    assert flag_value(argv, "--fsdp") == "True"
    assert flag_value(argv, "--fsdp_config") == str(DS_CONFIGS / "fsdp.json")
    assert flag_value(argv, "--gradient_checkpointing") == "True"  # transformers' checkpointing, not FSDP's


def test_fsdp_config_by_path_and_equals_form(data_file, tmp_path):
    config = tmp_path / "my_fsdp.json"
    config.write_text((DS_CONFIGS / "fsdp.json").read_text())
    argv = dry_run("finetune_ds.sh", "-m", "org/model", "-d", data_file, f"--fsdp={config}")
    assert flag_value(argv, "--fsdp_config") == str(config) and "--deepspeed" not in argv


@pytest.mark.parametrize(
    "order", [["--deepspeed", "zero3", "--fsdp", "fsdp"], ["--fsdp", "fsdp", "--deepspeed", "zero3"]]
)
def test_deepspeed_and_fsdp_together_is_a_usage_error(order, data_file):
    result = run_launcher("finetune_ds.sh", "-m", "org/model", "-d", data_file, "-n", *order)
    assert result.returncode == 2
    assert "--deepspeed and --fsdp both given" in result.stderr


def test_fsdp_is_refused_by_the_q_lora_launcher(data_file):
    result = run_launcher("finetune_qlora_ds.sh", "-m", "org/model", "-d", data_file, "-n", "--fsdp", "fsdp")
    assert result.returncode == 2
    assert "--fsdp is not available with this launcher" in result.stderr and "--deepspeed zero3" in result.stderr
    assert "not with this launcher" in run_launcher("finetune_qlora_ds.sh", "--help").stdout


@pytest.mark.parametrize("name", SINGLE_LAUNCHERS)
def test_fsdp_is_refused_by_one_process_launchers(name, data_file):
    result = run_launcher(name, "-m", "org/model", "-d", data_file, "-n", "--fsdp", "fsdp")
    assert result.returncode == 2
    assert "this launcher runs one process" in result.stderr and "finetune_lora_ds.sh" in result.stderr


def test_fsdp_and_deepspeed_configs_are_offered_each_for_its_own_option(data_file):
    result = run_launcher("finetune_ds.sh", "-m", "org/model", "-d", data_file, "--fsdp", "zero3")
    assert result.returncode == 2
    assert "FSDP config 'zero3' not found (a path, or one of: fsdp)" in result.stderr
    result = run_launcher("finetune_ds.sh", "-m", "org/model", "-d", data_file, "--deepspeed", "fsdp")
    assert result.returncode == 2
    assert "DeepSpeed config 'fsdp' not found" in result.stderr
    offered = result.stderr.split("one of:", 1)[1]
    assert "zero3" in offered and not any(c.removesuffix(".json") in offered for c in FSDP_CONFIGS)


@pytest.mark.parametrize("name", DISTRIBUTED_LAUNCHERS)
def test_help_shows_fsdp_on_distributed_launchers(name):
    usage = run_launcher(name, "--help").stdout
    assert "--fsdp CONFIG" in usage
    if name in FSDP_LAUNCHERS:
        assert "FULL_STATE_DICT" in usage and "FSDP2" in usage  # the notes on why fsdp.json says what it says


# --- the settings check -------------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path):
    """finetune.py flags up to the settings check: a model folder (config.json only), a data file, an output dir."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    data = tmp_path / "train.json"
    data.write_text("[]")
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", tmp_path / "out", "--use_cpu", "True"]


def problems_of(*argv) -> list[str]:
    try:
        parse_args([str(a) for a in argv])
    except ConfigError as e:
        return e.problems
    return []


NOT_LAUNCHED = "--fsdp shards the model over several processes: start them with torchrun"
FSDP = ["--fsdp", "True", "--fsdp_config", DS_CONFIGS / "fsdp.json"]


def test_fsdp_without_a_distributed_launch_is_refused(settings):
    assert problems_of(*settings, *FSDP) == [
        NOT_LAUNCHED + ", or with finetune/finetune_ds.sh or finetune_lora_ds.sh --fsdp fsdp"
    ]


@pytest.mark.parametrize("switch", [["--fsdp", "True"], ["--fsdp"], ["--fsdp=true"]])
def test_fsdp_true_is_transformers_switch(switch, settings):
    """transformers 5 would read `--fsdp True` as a legacy sharding option and reject it."""
    problems = problems_of(*settings, *switch)
    assert len(problems) == 1 and problems[0].startswith(NOT_LAUNCHED)
    assert problems_of(*settings, "--fsdp", "False") == []


def test_fsdp_from_a_config_file(settings, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"fsdp: true\nfsdp_config: {DS_CONFIGS / 'fsdp.json'}\n")
    problems = problems_of(config, *settings)
    assert len(problems) == 1 and problems[0].startswith(NOT_LAUNCHED)


def test_fsdp_with_deepspeed_is_refused(settings):
    problems = problems_of(*settings, *FSDP, "--deepspeed", DS_CONFIGS / "zero2.json")
    assert problems == ["--fsdp and --deepspeed are both set: each shards the model its own way; choose one"]


def test_lora_on_a_gptq_base_with_fsdp_is_refused_with_the_reason(settings):
    model = settings[1]
    (model / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "quantization_config": {"quant_method": "gptq", "bits": 4}})
    )
    problems = problems_of(*settings, *FSDP, "--use_lora", "True")
    gptq = [p for p in problems if "GPTQ" in p]
    assert len(gptq) == 1
    assert gptq[0].startswith(
        "LoRA on a GPTQ base cannot be sharded with ZeRO-3 or FSDP: the base's packed int4 "
        "weights are buffers, not parameters"
    )
    assert "ds_configs/zero2.json" in gptq[0]


def test_q_lora_with_fsdp_is_refused_with_the_reason(settings):
    problems = problems_of(*settings, *FSDP, "--use_lora", "True", "--q_lora", "True")
    q_lora = [p for p in problems if "--q_lora" in p]
    assert len(q_lora) == 1
    assert q_lora[0].startswith("--q_lora cannot be combined with --fsdp: llmft quantizes the base with bitsandbytes")
    assert "finetune/finetune_qlora_ds.sh" in q_lora[0]


def test_fsdp_settings_that_would_save_nothing_or_an_empty_adapter(settings, tmp_path):
    sharded = tmp_path / "sharded.json"
    sharded.write_text(json.dumps({"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}))
    problems = problems_of(*settings, "--fsdp", "True", "--fsdp_config", sharded)
    assert any(
        p.startswith("--fsdp_config state_dict_type SHARDED_STATE_DICT: the final save would write no weights")
        for p in problems
    )

    checkpointed = tmp_path / "checkpointed.json"
    checkpointed.write_text(json.dumps({"version": 2, "activation_checkpointing": True}))
    problems = problems_of(
        *settings,
        *argv(
            "--fsdp True --fsdp_config {checkpointed} --use_lora True --gradient_checkpointing True",
            checkpointed=checkpointed,
        ),
    )
    assert any(
        p.startswith("--gradient_checkpointing True and the --fsdp_config's activation_checkpointing both")
        for p in problems
    )
    assert any(
        p.startswith("--use_lora True with the --fsdp_config's activation_checkpointing would save an empty adapter")
        for p in problems
    )


def test_fsdp_config_without_fsdp_is_refused(settings):
    assert problems_of(*settings, "--fsdp_config", DS_CONFIGS / "fsdp.json") == [
        "--fsdp_config is read only with --fsdp True"
    ]


# --- FSDP on CPU ranks: the patch of accelerate's private state ---------------------------------------------------


def cpu_ranks_accelerator():
    """What enable_fsdp_on_cpu_ranks reads of a Trainer's accelerator on 2 gloo ranks: accelerate's MULTI_CPU."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(
        distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None, mixed_precision="no", num_processes=2
    )
    return SimpleNamespace(state=state)


def test_fsdp_on_cpu_ranks_is_checked_on_the_pinned_accelerate():
    """Raising accelerate's pin means reading its state.py again and extending FSDP_ON_CPU_CHECKED_ACCELERATE."""
    import accelerate
    from packaging.specifiers import SpecifierSet

    from llmft.distributed import FSDP_ON_CPU_CHECKED_ACCELERATE

    pinned = next(
        line.split("==")[1].strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.startswith("accelerate==")
    )
    assert accelerate.__version__ == pinned
    assert pinned in SpecifierSet(FSDP_ON_CPU_CHECKED_ACCELERATE)


@pytest.mark.parametrize("version", ["1.16.0", "1.14.2", "2.0.0"])
def test_fsdp_on_cpu_ranks_fails_loudly_on_an_unchecked_accelerate(version, monkeypatch):
    """Rather than patch a private state it was not checked on (or train DDP without a word): a clear error, and
    accelerate's state left as it was."""
    from types import SimpleNamespace

    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from llmft.distributed import enable_fsdp_on_cpu_ranks

    monkeypatch.setattr(accelerate, "__version__", version)
    accelerator, shared = cpu_ranks_accelerator(), dict(PartialState._shared_state)
    args = SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2}, should_log=False)
    with pytest.raises(LlmftError) as error:
        enable_fsdp_on_cpu_ranks(accelerator, args)
    assert str(error.value).startswith(f"--fsdp on CPU ranks: accelerate {version} is installed")
    assert "install accelerate==1.15.0" in str(error.value)
    assert accelerator.state.distributed_type == DistributedType.MULTI_CPU and accelerator.state.fsdp_plugin is None
    assert dict(PartialState._shared_state) == shared


def test_fsdp_on_cpu_ranks_leaves_runs_without_fsdp_alone_on_any_accelerate(monkeypatch):
    from types import SimpleNamespace

    import accelerate
    from accelerate.utils import DistributedType

    from llmft.distributed import enable_fsdp_on_cpu_ranks

    monkeypatch.setattr(accelerate, "__version__", "9.0.0")
    accelerator = cpu_ranks_accelerator()
    assert enable_fsdp_on_cpu_ranks(accelerator, SimpleNamespace(fsdp_plugin_args=None)) is False
    assert accelerator.state.distributed_type == DistributedType.MULTI_CPU
    accelerator.state.distributed_type = DistributedType.FSDP  # an accelerate that turns FSDP on itself
    assert enable_fsdp_on_cpu_ranks(accelerator, SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2})) is False
    assert accelerator.state.fsdp_plugin is None


# --- the checks of the final save ---------------------------------------------------------------------------------


def test_adapter_check_refuses_a_rank_shard_and_a_missing_layer(tiny_chat_model, tmp_path):
    """What a wrong FSDP save looks like: one rank's rows of a weight, or LoRA layers PEFT did not find."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model), LoraConfig(r=4, target_modules="all-linear")
    )
    model.save_pretrained(tmp_path)
    check_adapter_complete(str(tmp_path), model)
    file = tmp_path / "adapter_model.safetensors"
    whole = load_file(str(file))
    key = next(k for k in whole if "lora_B" in k)

    save_file({**whole, key: whole[key][: whole[key].shape[0] // 2].contiguous()}, str(file))
    with pytest.raises(LlmftError, match="0 missing, 1 of the wrong shape, 0 empty"):
        check_adapter_complete(str(tmp_path), model)
    save_file({k: v for k, v in whole.items() if k != key}, str(file))
    with pytest.raises(LlmftError, match="1 missing, 0 of the wrong shape, 0 empty"):
        check_adapter_complete(str(tmp_path), model)


def test_model_check_refuses_a_save_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LlmftError, match="the model weights were not written"):
        check_model_written(str(tmp_path))


def test_model_check_reads_the_weight_file(tmp_path):
    """A name is not a model: an empty file (a rank that died before writing), a cut one, or one with no tensor is
    refused; a whole file with a tensor passes."""
    import torch
    from safetensors.torch import save_file

    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(LlmftError, match=r"not usable: .*model.safetensors is not a safetensors file \(only 0 bytes"):
        check_model_written(str(tmp_path))

    save_file({"model.norm.weight": torch.ones(64)}, str(file))
    whole = file.read_bytes()
    file.write_bytes(whole[:-1])
    with pytest.raises(LlmftError, match="is truncated: tensor model.norm.weight ends at byte 256"):
        check_model_written(str(tmp_path))

    save_file({}, str(file))
    with pytest.raises(LlmftError, match="model.safetensors holds no tensor"):
        check_model_written(str(tmp_path))

    file.write_bytes(whole)
    check_model_written(str(tmp_path))


def test_model_check_reads_every_shard_the_index_names(tmp_path):
    import torch
    from safetensors.torch import save_file

    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shards[0], "lm_head.weight": shards[1]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"model.norm.weight": torch.ones(4)}, str(tmp_path / shards[0]))
    with pytest.raises(LlmftError, match="model-00002-of-00002.safetensors is missing"):
        check_model_written(str(tmp_path))
    save_file({"lm_head.weight": torch.ones(4, 4)}, str(tmp_path / shards[1]))
    check_model_written(str(tmp_path))


# --- end to end: 2 CPU ranks over gloo, through the launchers ----------------------------------------------------

# finetune.py as the launchers run it, plus a callback that writes, on each rank after the first optimizer step, how
# every parameter of the model in training lies on that rank: a DTensor's placements and local shard, or a whole tensor.
LAYOUT_ENTRY = """
import json, os
from transformers import TrainerCallback
import finetune

def placement(p):
    return "%s(%s)" % (type(p).__name__, getattr(p, "dim", ""))

class RecordLayout(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != 1:
            return
        from torch.distributed.tensor import DTensor
        layout = {}
        for name, param in model.named_parameters():
            sharded = isinstance(param, DTensor)
            layout[name] = {"placements": [placement(p) for p in param.placements] if sharded else None,
                            "shape": list(param.shape),
                            "local_shape": list((param.to_local() if sharded else param).shape)}
        with open(os.path.join(os.environ["LAYOUT_OUT"], "rank%s.json" % os.environ["RANK"]), "w") as f:
            json.dump(layout, f)

finetune.main(callbacks=[RecordLayout()])
"""


def train_with_fsdp(name, model, data, out, tmp_path) -> dict[int, dict]:
    """Train through the launcher with --fsdp fsdp on 2 CPU ranks; returns each rank's parameter layout."""
    entry, layouts = tmp_path / "finetune_recording_layout.py", tmp_path / "layouts"
    entry.write_text(LAYOUT_ENTRY)
    layouts.mkdir()
    env = launcher_env(
        GPUS_PER_NODE=2,
        HF_DATASETS_CACHE=tmp_path / "datasets-cache",
        LLMFT_ENTRY=entry,
        LAYOUT_OUT=layouts,
        PYTHONPATH=REPO,
    )
    args = argv("-m {model} -d {data} -o {out} --fsdp fsdp --", TINY_RUN, model=model, data=data, out=out)
    result = run_launcher(name, *args, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in layouts.glob("rank*.json")}


def assert_sharded_over_two_ranks(layouts: dict[int, dict], trainable: str) -> None:
    """Every parameter a DTensor split by rows between the 2 ranks (FSDP2's full shard), not the whole tensor each
    rank holds under the plain DDP accelerate falls back to on CPU ranks without llmft/distributed.py."""
    assert sorted(layouts) == [0, 1]
    assert layouts[0].keys() == layouts[1].keys() and any(trainable in name for name in layouts[0])
    for name, first in layouts[0].items():
        second = layouts[1][name]
        assert first["placements"] == second["placements"] == ["Shard(0)"], name
        assert first["shape"] == second["shape"], name
        rows = first["shape"][0]
        assert first["local_shape"] == [(rows + 1) // 2, *first["shape"][1:]], name  # rank 0 takes the larger half
        assert second["local_shape"] == [rows // 2, *first["shape"][1:]], name


@pytest.mark.slow
def test_full_fine_tuning_with_fsdp_saves_a_whole_trained_model(tiny_chat_model, data_file, tmp_path):
    out = tmp_path / "out"
    layouts = train_with_fsdp("finetune_ds.sh", tiny_chat_model, data_file, out, tmp_path)

    assert_sharded_over_two_ranks(layouts, "model.embed_tokens.weight")

    assert_full_model_trained(tiny_chat_model, out)  # gathered whole, not rank 0's shard
    assert not (out / ".llmft-saving").exists()
    assert_reloads_and_generates(out)


@pytest.mark.slow
def test_lora_with_fsdp_saves_a_whole_trained_adapter(tiny_chat_model, data_file, tmp_path):
    out = tmp_path / "out"
    layouts = train_with_fsdp("finetune_lora_ds.sh", tiny_chat_model, data_file, out, tmp_path)

    assert_sharded_over_two_ranks(layouts, ".lora_B.")

    assert_adapter_trained(tiny_chat_model, out)  # whole, not one rank's shard
    assert_reloads_and_generates(out)
