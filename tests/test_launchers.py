"""The shell launchers in finetune/ and the DeepSpeed configs in ds_configs/.

Fast tests check flags, errors and the command each launcher builds (`--dry-run`), the configs' keys, and that the
launch itself hands ranks the right environment (a stub stands in for finetune.py). Slow tests train a tiny model
through each launcher with 2 CPU ranks over gloo, as a GPU run would, and check what it saved.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.conftest import (
    DS_CONFIGS,
    FINETUNE,
    LAUNCHERS,
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

CONFIGS = sorted(p.name for p in DS_CONFIGS.glob("zero*.json"))  # DeepSpeed's; FSDP's fsdp*.json: tests/test_fsdp.py

# Settings that transformers' DeepSpeed integration fills from TrainingArguments; a number here instead of "auto"
# would have to be kept equal to the flags by hand.
AUTO_KEYS = [
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
]
OPTIMIZER_AUTO_KEYS = ["lr", "betas", "eps", "weight_decay"]

# Where the stub entry point writes what each rank saw.
STUB = """
import json, os, sys
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES",
        "OMPI_COMM_WORLD_RANK"]
path = os.path.join(os.environ["STUB_OUT"], "rank%s.json" % os.environ.get("RANK", "none"))
with open(path, "w") as f:
    json.dump({"env": {k: os.environ.get(k) for k in keys}, "argv": sys.argv[1:]}, f)
"""


# --- flags and errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage_with_example_and_exits_0(name, flag):
    result = run_launcher(name, flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: finetune/{name} ")
    assert "Example:" in result.stdout and f"finetune/{name} -m " in result.stdout
    for option in ("--model", "--data", "--output", "--deepspeed", "--dry-run", "USE_CPU"):
        assert option in result.stdout, option


def test_help_shows_the_recipe_it_runs(data_file):
    """The recipe in --help is printed from the same arrays the command is built from."""
    usage = run_launcher("finetune_lora_ds.sh", "--help").stdout
    argv = entry_args(dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file))
    for flag in ("--learning_rate", "--lr_scheduler_type", "--model_max_length", "--use_lora"):
        assert f"{flag} {flag_value(argv, flag)}" in usage


@pytest.mark.parametrize("name", LAUNCHERS)
def test_unknown_option_fails_with_message(name, data_file):
    result = run_launcher(name, "-m", "org/model", "-d", data_file, "--learning-rate", "1e-4")
    assert result.returncode == 2
    assert "unknown option '--learning-rate'" in result.stderr
    assert "after '--'" in result.stderr


def test_stray_argument_fails(data_file):
    result = run_launcher("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, "extra")
    assert result.returncode == 2
    assert "unexpected argument 'extra'" in result.stderr


def test_option_without_value_fails(data_file):
    result = run_launcher("finetune_lora_ds.sh", "-d", data_file, "-m")
    assert result.returncode == 2
    assert "option '-m' needs a value" in result.stderr


@pytest.mark.parametrize("name", LAUNCHERS)
def test_missing_data_fails_before_launching(name, tmp_path):
    """Neither an absent -d nor a path that does not exist gets as far as starting Python."""
    marker = tmp_path / "launched"
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake_python.chmod(0o755)
    env = launcher_env(PYTHON=fake_python)

    result = run_launcher(name, "-m", "org/model", env=env)
    assert result.returncode == 2
    assert "no training data given: pass -d DATA" in result.stderr

    result = run_launcher(name, "-m", "org/model", "-d", tmp_path / "nope.json", env=env)
    assert result.returncode == 2
    assert f"training data '{tmp_path / 'nope.json'}' does not exist" in result.stderr
    assert not marker.exists()


def test_missing_model_fails(data_file, tmp_path):
    result = run_launcher("finetune_ds.sh", "-d", data_file)
    assert result.returncode == 2 and "no model given" in result.stderr
    result = run_launcher("finetune_ds.sh", "-d", data_file, "-m", tmp_path / "no-such-model")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_unknown_deepspeed_config_lists_the_shipped_ones(data_file):
    result = run_launcher("finetune_ds.sh", "-m", "org/model", "-d", data_file, "--deepspeed", "zero9")
    assert result.returncode == 2
    assert "DeepSpeed config 'zero9' not found" in result.stderr
    for config in CONFIGS:
        assert config.removesuffix(".json") in result.stderr


def test_model_and_data_from_environment(data_file):
    argv = entry_args(dry_run("finetune_lora_single_gpu.sh", MODEL="org/model", DATA=data_file))
    assert flag_value(argv, "--model_name_or_path") == "org/model"
    assert flag_value(argv, "--data_path") == str(data_file)


# --- the command built ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, stage", [("finetune_ds.sh", 3), ("finetune_lora_ds.sh", 2), ("finetune_qlora_ds.sh", 2)]
)
def test_distributed_launchers_default_to_their_zero_stage(name, stage, data_file):
    argv = dry_run(name, "-m", "org/model", "-d", data_file)
    config = json.loads(Path(flag_value(argv, "--deepspeed")).read_text())
    assert config["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("name", SINGLE_LAUNCHERS)
def test_single_gpu_launchers_run_one_plain_process(name, data_file):
    argv = dry_run(name, "-m", "org/model", "-d", data_file)
    assert argv[0] == sys.executable and argv[1].endswith("finetune.py")
    assert "--deepspeed" not in argv
    # asked for DeepSpeed, one rank still needs a process group
    argv = dry_run(name, "-m", "org/model", "-d", data_file, "--deepspeed", "zero2_offload")
    assert argv[1:3] == ["-m", "llmft.launch.torchrun"] and flag_value(argv, "--nproc_per_node") == "1"
    assert flag_value(argv, "--deepspeed") == str(DS_CONFIGS / "zero2_offload.json")


@pytest.mark.parametrize(
    "name, lr, lora, q_lora",
    [
        ("finetune_ds.sh", "1e-5", False, False),
        ("finetune_lora_ds.sh", "3e-4", True, False),
        ("finetune_lora_single_gpu.sh", "3e-4", True, False),
        ("finetune_qlora_ds.sh", "3e-4", True, True),
        ("finetune_qlora_single_gpu.sh", "3e-4", True, True),
    ],
)
def test_recipe_per_mode(name, lr, lora, q_lora, data_file):
    argv = entry_args(dry_run(name, "-m", "org/model", "-d", data_file))
    assert flag_value(argv, "--learning_rate") == lr
    assert ("--use_lora" in argv) == lora and ("--q_lora" in argv) == q_lora
    assert flag_value(argv, "--lr_scheduler_type") == "cosine"
    assert flag_value(argv, "--warmup_steps") == "0.01"
    assert flag_value(argv, "--weight_decay") == "0.1"
    assert flag_value(argv, "--adam_beta2") == "0.95"
    assert flag_value(argv, "--gradient_checkpointing") == "True"
    assert flag_value(argv, "--save_strategy") == "steps"


def test_arguments_after_double_dash_pass_through_last_and_verbatim(data_file, tmp_path):
    entry = entry_args(
        dry_run(
            "finetune_lora_ds.sh",
            *argv(
                "-m org/model -d {data_file} -o {out} --deepspeed zero3 -- --learning_rate 1e-4 --run_name 'a b'",
                "--unknown_to_the_launcher x",
                data_file=data_file,
                out=tmp_path / "out",
            ),
        )
    )
    assert entry[-6:] == ["--learning_rate", "1e-4", "--run_name", "a b", "--unknown_to_the_launcher", "x"]
    assert flag_value(entry, "--learning_rate") == "1e-4"  # the recipe's 3e-4 comes earlier: argparse keeps the last
    assert flag_value(entry, "--output_dir") == str(tmp_path / "out")
    assert flag_value(entry, "--deepspeed") == str(DS_CONFIGS / "zero3.json")


def test_deepspeed_config_by_path_and_equals_form(data_file):
    path = DS_CONFIGS / "zero3_offload.json"
    argv = dry_run("finetune_ds.sh", "--model=org/model", f"--data={data_file}", f"--deepspeed={path}")
    assert flag_value(argv, "--deepspeed") == str(path)


def test_cpu_mode_without_gpu(data_file):
    argv = dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, GPUS_PER_NODE=2)
    assert argv[:3] == [sys.executable, "-m", "llmft.launch.torchrun"]
    assert flag_value(argv, "--nproc_per_node") == "2"
    assert flag_value(argv, "--use_cpu") == "True"
    assert flag_value(argv, "--bf16") == "False" and flag_value(argv, "--fp16") == "False"
    # one CPU rank unless asked; NPROC_PER_NODE is the other name for the count
    assert flag_value(dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file), "--nproc_per_node") == "1"
    argv = dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, NPROC_PER_NODE=3)
    assert flag_value(argv, "--nproc_per_node") == "3"


def test_multi_node_settings_from_environment(data_file):
    command = dry_run(
        "finetune_ds.sh",
        *argv("-m org/model -d {data_file}", data_file=data_file),
        GPUS_PER_NODE=4,
        NNODES=3,
        NODE_RANK=2,
        MASTER_ADDR="node7",
        MASTER_PORT=6123,
    )
    assert [
        flag_value(command, f)
        for f in ("--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port")
    ] == ["4", "3", "2", "node7", "6123"]


@pytest.mark.parametrize(
    "size_var, rank_var", [("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK")]
)
def test_node_rank_from_mpi_environment(size_var, rank_var, data_file):
    argv = dry_run("finetune_ds.sh", "-m", "org/model", "-d", data_file, **{size_var: 4, rank_var: 3})
    assert flag_value(argv, "--nnodes") == "4" and flag_value(argv, "--node_rank") == "3"


def test_hostfile_uses_deepspeed_launcher(data_file, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    argv = dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, HOSTFILE=hostfile, MASTER_ADDR="node1")
    assert argv[1:3] == ["-m", "deepspeed.launcher.runner"]
    # pdsh: its ranks get RANK/LOCAL_RANK/WORLD_SIZE, which transformers needs (DeepSpeed's MPI launchers don't set them)
    assert flag_value(argv, "--hostfile") == str(hostfile) and flag_value(argv, "--launcher") == "pdsh"
    assert flag_value(argv, "--master_addr") == "node1"
    assert "--no_local_rank" in argv


def test_bad_gpus_per_node_fails(data_file):
    result = run_launcher(
        "finetune_ds.sh", "-m", "org/model", "-d", data_file, "-n", env=launcher_env(GPUS_PER_NODE="two")
    )
    assert result.returncode == 2 and "GPUS_PER_NODE must be a positive integer" in result.stderr


# --- the environment variables, checked before anything starts ---------------------------------------------------


@pytest.mark.parametrize("value", ["true", "1", "True"])
def test_use_cpu_accepts_true_and_1(value, data_file):
    argv = dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, USE_CPU=value, GPUS_PER_NODE=2)
    assert flag_value(argv, "--use_cpu") == "True" and flag_value(argv, "--nproc_per_node") == "2"


def test_use_cpu_is_not_evaluated_as_shell_code(data_file, tmp_path):
    """The bash launchers did arithmetic on USE_CPU, which runs a command substitution inside an array index."""
    marker = tmp_path / "ran"
    result = run_launcher(
        "finetune_lora_ds.sh",
        *argv("-n -m org/model -d {data_file}", data_file=data_file),
        env=launcher_env(USE_CPU=f"PATH[$(touch {marker})]"),
    )
    assert result.returncode == 2
    assert "USE_CPU must be 1, 0, true or false" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "abc"}, "NNODES must be a positive integer, got 'abc'"),
        ({"NNODES": "0"}, "NNODES must be a positive integer, got '0'"),
        ({"OMPI_COMM_WORLD_SIZE": "x"}, "OMPI_COMM_WORLD_SIZE must be a positive integer, got 'x'"),
        ({"NODE_RANK": "-1"}, "NODE_RANK must be a non-negative integer, got '-1'"),
        ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 is not below NNODES=2"),
        ({"NPROC_PER_NODE": "2.5"}, "NPROC_PER_NODE must be a positive integer, got '2.5'"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a positive integer up to 65535, got '70000'"),
        ({"RESUME": "yes"}, "RESUME must be auto, True, False or a checkpoint folder, got 'yes'"),
        ({"HOSTFILE": "/no/such/hostfile"}, "HOSTFILE '/no/such/hostfile' does not exist"),
        ({"MASTER_ADDR": "node1 --x"}, "MASTER_ADDR must be a host name or an IP address, got 'node1 --x'"),
        ({"MASTER_ADDR": "--help"}, "MASTER_ADDR must be a host name or an IP address, got '--help'"),
        ({"MASTER_ADDR": "a;touch b"}, "MASTER_ADDR must be a host name or an IP address, got 'a;touch b'"),
    ],
)
def test_bad_environment_variable_fails_with_its_name(env, message, data_file):
    result = run_launcher("finetune_ds.sh", "-n", "-m", "org/model", "-d", data_file, env=launcher_env(**env))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "+ " not in result.stderr  # no command built


def test_every_bad_environment_variable_is_reported_at_once(data_file):
    result = run_launcher(
        "finetune_ds.sh",
        *argv("-n -m org/model -d {data_file}", data_file=data_file),
        env=launcher_env(NNODES="abc", MASTER_PORT="http", USE_CPU="maybe"),
    )
    assert result.returncode == 2
    assert all(name in result.stderr for name in ("NNODES must", "MASTER_PORT must", "USE_CPU must"))


@pytest.mark.parametrize("value", ["auto", "False", str(REPO / "ds_configs")])
def test_resume_passes_its_value_on(value, data_file):
    argv = dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, RESUME=value)
    assert flag_value(argv, "--resume_from_checkpoint") == value


def test_hostfile_master_addr_defaults_to_its_first_host(data_file, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the nodes\n\nnode3 slots=8\nnode4 slots=8\n")
    argv = dry_run("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, HOSTFILE=hostfile)
    assert flag_value(argv, "--master_addr") == "node3"


def test_precision_needs_bf16_on_every_visible_gpu():
    from llmft.launch.launcher import precision_args

    assert precision_args([(9, 0), (8, 0)]) == ["--bf16", "True"]
    assert precision_args([(9, 0), (7, 0)]) == ["--fp16", "True"]
    assert precision_args([]) == ["--use_cpu", "True", "--bf16", "False", "--fp16", "False"]


# A stand-in for PYTHON's torch on a host whose GPU 0 is a V100 (no bf16) and GPU 1 an H100: it shows only the GPUs
# CUDA_VISIBLE_DEVICES names, as torch.cuda does.
FAKE_TORCH_PYTHON = """#!{python}
import json, os
host = [[7, 0], [9, 0]]
visible = os.environ.get("CUDA_VISIBLE_DEVICES")
print(json.dumps(host if visible is None else [host[int(i)] for i in visible.split(",")]))
"""


@pytest.mark.parametrize(
    "name, visible, precision, ranks",
    [
        ("finetune_lora_ds.sh", "1", "--bf16", "1"),  # the host's first GPU would have said fp16
        ("finetune_lora_ds.sh", "0,1", "--fp16", "2"),
        ("finetune_lora_ds.sh", None, "--fp16", "2"),
        ("finetune_lora_single_gpu.sh", "1,0", "--bf16", None),  # one process sees only the first: the H100
    ],
)
def test_bf16_decision_reads_the_gpus_cuda_visible_devices_shows(name, visible, precision, ranks, data_file, tmp_path):
    from llmft.launch.launcher import visible_gpu_capabilities

    python = tmp_path / "python"
    python.write_text(FAKE_TORCH_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    env = launcher_env(PYTHON=python)
    if visible is None:
        del env["CUDA_VISIBLE_DEVICES"]
    else:
        env["CUDA_VISIBLE_DEVICES"] = visible
    assert visible_gpu_capabilities(str(python), env) == (
        [(9, 0)] if visible == "1" else [(9, 0), (7, 0)] if visible == "1,0" else [(7, 0), (9, 0)]
    )
    result = run_launcher(name, "-n", "-m", "org/model", "-d", data_file, env=env)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(next(line for line in result.stderr.splitlines() if line.startswith("+ "))[2:])
    assert flag_value(argv, precision) == "True" and "--use_cpu" not in argv
    if ranks:
        assert flag_value(argv, "--nproc_per_node") == ranks
    # a hidden GPU set never starts PYTHON to ask
    assert visible_gpu_capabilities("/no/such/python", {"CUDA_VISIBLE_DEVICES": ""}) == []


# --- the launch: ranks and their environment (a stub stands in for finetune.py) ----------------------------------


@pytest.fixture
def stub_entry(tmp_path) -> Path:
    path = tmp_path / "stub_entry.py"
    path.write_text(STUB)
    (tmp_path / "ranks").mkdir()
    return path


def read_ranks(folder: Path) -> dict[int, dict]:
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in folder.glob("rank*.json")}


@pytest.mark.slow
def test_two_cpu_ranks_get_a_gloo_ready_environment(stub_entry, data_file):
    env = launcher_env(LLMFT_ENTRY=stub_entry, STUB_OUT=stub_entry.parent / "ranks", GPUS_PER_NODE=2)
    result = run_launcher("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, "--", "--seed", "7", env=env)
    assert result.returncode == 0, result.stderr
    ranks = read_ranks(stub_entry.parent / "ranks")
    assert sorted(ranks) == [0, 1]
    for rank, seen in ranks.items():
        assert seen["env"]["WORLD_SIZE"] == "2" and seen["env"]["LOCAL_RANK"] == str(rank)
        assert seen["env"]["DS_ACCELERATOR"] == "cpu" and seen["env"]["CUDA_VISIBLE_DEVICES"] == ""
        assert seen["argv"][-2:] == ["--seed", "7"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure, status, traceback",
    [
        ("raise SystemExit(2)", 2, False),  # finetune.py's exit on a user error: its message is all the user needs
        ("raise RuntimeError('a bug')", 1, True),  # anything else keeps torchrun's report and the rank's traceback
    ],
)
def test_rank_failures_user_error_is_quiet_bug_is_reported(failure, status, traceback, tmp_path, data_file):
    entry = tmp_path / "failing_entry.py"
    entry.write_text(f"import sys\nprint('error: the message', file=sys.stderr)\n{failure}\n")
    env = launcher_env(LLMFT_ENTRY=entry, GPUS_PER_NODE=2)
    result = run_launcher("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, env=env)
    assert result.returncode == status, result.stderr
    assert result.stderr.count("error: the message") == 2
    assert ("Traceback" in result.stderr) == traceback
    assert ("llmft: stopped, rank" in result.stderr) != traceback


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")
def test_mpirun_starts_one_launcher_per_node(stub_entry, data_file):
    """Two 'nodes' on this machine under mpirun: each launcher takes its node rank from Open MPI."""
    env = launcher_env(LLMFT_ENTRY=stub_entry, STUB_OUT=stub_entry.parent / "ranks", GPUS_PER_NODE=1)
    exports = [
        arg
        for name in ("LLMFT_ENTRY", "STUB_OUT", "GPUS_PER_NODE", "MASTER_PORT", "PYTHON", "CUDA_VISIBLE_DEVICES")
        for arg in ("-x", name)
    ]
    command = [
        *argv("mpirun --allow-run-as-root --oversubscribe -np 2"),
        *exports,
        *argv(
            "{launcher} -m org/model -d {data_file}",
            launcher=FINETUNE / "finetune_lora_ds.sh",
            data_file=data_file,
        ),
    ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = read_ranks(stub_entry.parent / "ranks")
    assert sorted(ranks) == [0, 1]
    assert all(seen["env"]["WORLD_SIZE"] == "2" and seen["env"]["LOCAL_RANK"] == "0" for seen in ranks.values())
    assert all(seen["env"]["OMPI_COMM_WORLD_RANK"] is None for seen in ranks.values())


def slurm_nodes() -> int:
    """Idle nodes of a reachable Slurm cluster; 0 without one."""
    if shutil.which("sbatch") is None:
        return 0
    result = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], capture_output=True, text=True)
    return sum(int(n) for n in result.stdout.split()) if result.returncode == 0 else 0


@pytest.mark.slow
@pytest.mark.skipif(slurm_nodes() == 0, reason="needs a Slurm cluster with an idle node")
def test_slurm_batch_script_starts_one_launcher_per_node(stub_entry, data_file, tmp_path):
    nodes = min(2, slurm_nodes())
    # MASTER_ADDR is given because test clusters may run several slurmd on one host under names DNS doesn't know
    env = launcher_env(
        LLMFT_ENTRY=stub_entry, STUB_OUT=stub_entry.parent / "ranks", GPUS_PER_NODE=1, MASTER_ADDR="127.0.0.1"
    )
    command = argv(
        "sbatch --wait --nodes {nodes} --gpus-per-node=0 --cpus-per-task=1 --output {log}",
        "{batch_script} {launcher} -m org/model -d {data_file}",
        nodes=nodes,
        log=tmp_path / "slurm-%j.out",
        batch_script=FINETUNE / "slurm_finetune.sbatch",
        launcher=FINETUNE / "finetune_lora_ds.sh",
        data_file=data_file,
    )
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert result.returncode == 0, result.stderr + log
    ranks = read_ranks(stub_entry.parent / "ranks")
    assert sorted(ranks) == list(range(nodes))
    assert all(seen["env"]["WORLD_SIZE"] == str(nodes) for seen in ranks.values())
    assert sorted(f"node {r} of {nodes}" in log for r in range(nodes)) == [True] * nodes


# --- DeepSpeed configs ------------------------------------------------------------------------------------------


def get_key(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_leaves_trainer_settings_to_training_arguments(name):
    config = json.loads((DS_CONFIGS / name).read_text())
    for key in AUTO_KEYS:
        assert get_key(config, key) == "auto", key
    if "optimizer" in config:
        assert all(config["optimizer"]["params"][k] == "auto" for k in OPTIMIZER_AUTO_KEYS)
    # a "scheduler" block would silently replace --lr_scheduler_type and the warmup flags
    assert "scheduler" not in config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_stage_and_offload(name):
    zero = json.loads((DS_CONFIGS / name).read_text())["zero_optimization"]
    stage = int(name[len("zero")])
    assert zero["stage"] == stage
    if stage == 3:
        # otherwise save_model writes empty, still-partitioned tensors
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offloaded = {key: zero[key] for key in ("offload_optimizer", "offload_param") if key in zero}
    if "offload" not in name:
        assert offloaded == {}
    else:
        expected = ["offload_optimizer", "offload_param"] if stage == 3 else ["offload_optimizer"]
        assert sorted(offloaded) == expected
        assert all(o == {"device": "cpu", "pin_memory": True} for o in offloaded.values())
        # ZeRO-Offload needs DeepSpeed's own CPU Adam: a Trainer-made optimizer is refused with offload
        assert json.loads((DS_CONFIGS / name).read_text())["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_complete_once_trainer_fills_it(name):
    """transformers fills every "auto" from TrainingArguments and the model, and DeepSpeed accepts the result."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf_config = HfTrainerDeepSpeedConfig(str(DS_CONFIGS / name))
    args = types.SimpleNamespace(
        world_size=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=1.0,
        learning_rate=3e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.1,
        save_on_each_node=False,
        fp16=False,
        fp16_full_eval=False,
        bf16=True,
        bf16_full_eval=False,
        get_warmup_steps=lambda total: 1,
    )
    hf_config.trainer_config_process(args)
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=64))
    hf_config.trainer_config_finalize(args, model, num_training_steps=10)
    config = hf_config.config
    assert '"auto"' not in json.dumps(config)
    assert config["train_batch_size"] == 2 * 2 * 4 and config["bf16"]["enabled"] is True
    DeepSpeedZeroConfig(**config["zero_optimization"])  # rejects misspelled or unknown keys


# --- end to end: a tiny model trained through each launcher on 2 CPU ranks ---------------------------------------

E2E_CASES = [
    # launcher, --deepspeed, what it saves
    ("finetune_ds.sh", "zero3", "full"),
    ("finetune_ds.sh", "zero2", "full"),
    ("finetune_lora_ds.sh", "zero2", "lora"),
    ("finetune_lora_ds.sh", "zero3", "lora"),
    ("finetune_lora_ds.sh", "zero3_offload", "lora"),
    ("finetune_qlora_ds.sh", "zero2", "lora"),
    ("finetune_lora_single_gpu.sh", None, "lora"),
    ("finetune_qlora_single_gpu.sh", None, "lora"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, config, saves", E2E_CASES)
def test_launcher_trains_tiny_model_on_cpu_ranks(name, config, saves, tiny_chat_model, data_file, tmp_path):
    out = tmp_path / "out"
    args = ["-m", tiny_chat_model, "-d", data_file, "-o", out]
    if config:
        args += ["--deepspeed", config]
    env = launcher_env(GPUS_PER_NODE=2, HF_DATASETS_CACHE=tmp_path / "datasets-cache")
    result = run_launcher(name, *args, "--", *argv(TINY_RUN), env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]

    if saves == "full":
        assert_full_model_trained(tiny_chat_model, out)
    else:
        assert_adapter_trained(tiny_chat_model, out)  # ZeRO-3 gathered it whole
    assert_reloads_and_generates(out)


@pytest.mark.parametrize("addr", ["node-1.cluster.local", "10.0.0.7", "fe80::1", "[fe80::1]", "gpu_node3"])
def test_master_addr_takes_host_names_and_addresses(addr):
    from llmft.launch.launcher import is_host

    assert is_host(addr)
