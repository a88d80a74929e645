"""Compiled kernels kept with the run (llmft/compile_cache.py): the launchers and finetune.py point inductor's and
Triton's caches at the output folder (or LLMFT_COMPILE_CACHE) unless the user set them, and the log says what is
compiled and where it is kept."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from llmft.compile_cache import (
    COMPILE_CACHE_ENV,
    compile_cache_env,
    describe_compile_plan,
    log_compile_plan,
    use_compile_cache,
)
from tests.conftest import REPO, TINY_LORA, argv, launcher_env, run_launcher

CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")

# stands in for finetune.py: writes the cache variables each rank starts with
STUB = """
import json, os
path = os.path.join(os.environ["STUB_OUT"], "rank%s.json" % os.environ.get("RANK", "0"))
with open(path, "w") as f:
    json.dump({k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "LLMFT_COMPILE_CACHE")}, f)
"""


@pytest.fixture
def clean_environ(monkeypatch):
    """This process without cache variables of the developer's; what a test sets is undone after it."""
    for name in (*CACHE_VARIABLES, COMPILE_CACHE_ENV):
        monkeypatch.delenv(name, raising=False)


def launch(name, data_file, *args, **env):
    """The launcher's --dry-run: its stderr and the cache variables it prints."""
    result = run_launcher(name, "--dry-run", "-m", "org/model", "-d", data_file, *args, env=launcher_env(**env))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("[llmft] compiled kernels kept in "))
    return dict(word.split("=", 1) for word in line.split(" in ", 1)[1].split())


@pytest.mark.parametrize("name", ["finetune_qlora_ds.sh", "finetune_lora_single_gpu.sh"])
def test_launcher_keeps_compiled_kernels_in_the_output_folder(name, data_file, tmp_path):
    out = tmp_path / "run"
    assert launch(name, data_file, "-o", out) == {
        "TORCHINDUCTOR_CACHE_DIR": str(out / "_compile_cache" / "inductor"),
        "TRITON_CACHE_DIR": str(out / "_compile_cache" / "triton"),
    }
    # an --output_dir after '--' is the one finetune.py writes to: the cache follows it
    later = tmp_path / "later"
    assert launch(name, data_file, "-o", out, "--", f"--output_dir={later}")["TRITON_CACHE_DIR"] == str(
        later / "_compile_cache" / "triton"
    )


def test_launcher_keeps_what_the_user_set(data_file, tmp_path):
    shared = tmp_path / "shared"
    assert launch("finetune_lora_ds.sh", data_file, **{COMPILE_CACHE_ENV: shared}) == {
        "TORCHINDUCTOR_CACHE_DIR": str(shared / "inductor"),
        "TRITON_CACHE_DIR": str(shared / "triton"),
    }
    mine = tmp_path / "mine"
    seen = launch("finetune_lora_ds.sh", data_file, "-o", tmp_path / "out", TORCHINDUCTOR_CACHE_DIR=mine)
    assert seen == {
        "TORCHINDUCTOR_CACHE_DIR": str(mine),
        "TRITON_CACHE_DIR": str(tmp_path / "out" / "_compile_cache" / "triton"),
    }


@pytest.mark.slow
def test_ranks_point_their_caches_there_themselves(data_file, tmp_path):
    """The launcher passes no cache variables of its own: each rank sets them once its settings have passed
    (finetune.py, test_finetune_sets_the_cache_before_training), so a run refused by its settings leaves no folder
    (libraries make the cache folder as they import)."""
    stub = tmp_path / "stub_entry.py"
    stub.write_text(STUB)
    (tmp_path / "ranks").mkdir()
    env = launcher_env(LLMFT_ENTRY=stub, STUB_OUT=tmp_path / "ranks", GPUS_PER_NODE=2)
    for name in (*CACHE_VARIABLES, COMPILE_CACHE_ENV):
        env.pop(name, None)
    out = tmp_path / "out"
    result = run_launcher("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, "-o", out, env=env)
    assert result.returncode == 0, result.stderr
    seen = [json.loads(p.read_text()) for p in sorted((tmp_path / "ranks").glob("rank*.json"))]
    unset = {"TORCHINDUCTOR_CACHE_DIR": None, "TRITON_CACHE_DIR": None, COMPILE_CACHE_ENV: None}
    assert seen == [unset] * 2
    assert not out.exists()
    shared = tmp_path / "shared"  # the user's folder reaches every rank as it is, for the rank to point its caches at
    env[COMPILE_CACHE_ENV] = str(shared)
    assert run_launcher("finetune_lora_ds.sh", "-m", "org/model", "-d", data_file, "-o", out, env=env).returncode == 0
    seen = [json.loads(p.read_text()) for p in sorted((tmp_path / "ranks").glob("rank*.json"))]
    assert seen == [{**unset, COMPILE_CACHE_ENV: str(shared)}] * 2
    assert not out.exists()


def test_use_compile_cache_sets_only_what_is_unset(clean_environ, tmp_path):
    environ = {"TRITON_CACHE_DIR": "/mine/triton"}
    assert use_compile_cache(str(tmp_path / "out"), environ) == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "out" / "_compile_cache" / "inductor"),
        "TRITON_CACHE_DIR": "/mine/triton",
    }
    assert environ["TRITON_CACHE_DIR"] == "/mine/triton"
    # a relative output folder becomes absolute (ranks may start elsewhere); an empty variable counts as unset
    relative = compile_cache_env("out", {"TORCHINDUCTOR_CACHE_DIR": ""})
    assert relative["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(os.getcwd(), "out", "_compile_cache", "inductor")


def test_a_second_run_in_the_same_process_gets_its_own_cache(clean_environ, tmp_path):
    use_compile_cache(str(tmp_path / "first"))
    use_compile_cache(str(tmp_path / "second"))  # what the first set was llmft's, not the user's
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "second" / "_compile_cache" / "triton")
    os.environ["TRITON_CACHE_DIR"] = "/the/user/s"
    use_compile_cache(str(tmp_path / "third"))
    assert os.environ["TRITON_CACHE_DIR"] == "/the/user/s"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "third" / "_compile_cache" / "inductor")


def test_finetune_sets_the_cache_before_training(clean_environ, tiny_chat_model, tmp_path, datasets_cache):
    """A plain finetune.py run (no launcher) gets the same cache. A folder holding only what a run cut short in its
    first step leaves (its settings and compiled kernels) takes a fresh run, which keeps those kernels; on the CPU
    nothing compiles, so nothing more is written there."""
    out = tmp_path / "out"
    kernel = out / "_compile_cache" / "inductor" / "kernel.py"
    kernel.parent.mkdir(parents=True)
    kernel.write_text("compiled")
    seen = {}

    from transformers import TrainerCallback

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update({name: os.environ.get(name) for name in CACHE_VARIABLES})

    import finetune as entry

    entry.main(argv(TINY_LORA, "--max_steps 1 --save_strategy no", model=tiny_chat_model, out=out), callbacks=[Look()])
    assert seen == {
        "TORCHINDUCTOR_CACHE_DIR": str(out / "_compile_cache" / "inductor"),
        "TRITON_CACHE_DIR": str(out / "_compile_cache" / "triton"),
    }
    assert [p for p in (out / "_compile_cache").rglob("*") if p.is_file()] == [kernel]


def test_log_says_what_compiles_how_long_and_where(clean_environ, tmp_path, caplog):
    cache = tmp_path / "cache"
    line = describe_compile_plan("flex attention", str(cache), cold_seconds=240)
    assert line.startswith("compiling flex attention before the first optimizer step: about 240 s with an empty")
    assert str(cache) in line and "it is empty" in line and COMPILE_CACHE_ENV in line
    (cache / "fxgraph").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="llmft.compile_cache"):
        log_compile_plan("flex attention", str(cache))
    assert "holds earlier compiles" in caplog.text and "about" not in caplog.text
    # without a folder given: the one inductor uses now
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    assert str(tmp_path / "inductor") in describe_compile_plan("x")


def test_compile_cache_module_loads_without_torch(tmp_path):
    """The launchers import it with any python3, before torch: standard library only."""
    code = (
        "import sys; sys.modules['torch'] = None; import llmft.launch.launcher, llmft.compile_cache; "
        "print(llmft.compile_cache.compile_cache_folder('o', {}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(REPO / "o" / "_compile_cache")


FAKE_SRUN = """#!/usr/bin/env bash
# srun of one node: drops its own options (up to the task's command, bash) and runs the task as node 0
while [[ $1 != bash ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ $1 == show ]] && echo localhost
exit 0
"""


def test_slurm_script_passes_the_shared_cache_to_each_node(data_file, tmp_path):
    """slurm_finetune.sbatch (under stand-ins for srun and scontrol, one node): an exported LLMFT_COMPILE_CACHE is
    said in the job's log and reaches the node's launcher, which points both caches at it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    shared = tmp_path / "shared-cache"
    env = launcher_env(**{COMPILE_CACHE_ENV: shared})
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="7",
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="n1",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    command = ["bash", "finetune/slurm_finetune.sbatch", "finetune/finetune_lora_ds.sh", "-m", "org/model"]
    result = subprocess.run(
        [*command, "-d", str(data_file), "--dry-run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"[llmft] job 7: compiled kernels in {shared}" in result.stderr
    expected = f"TORCHINDUCTOR_CACHE_DIR={shared / 'inductor'} TRITON_CACHE_DIR={shared / 'triton'}"
    assert f"[llmft] compiled kernels kept in {expected}" in result.stderr


def test_the_trainers_hub_upload_leaves_the_cache_out(tmp_path):
    """The default folder's name is one that the Trainer's --push_to_hub skips (it uploads the output folder less
    `_*` and `checkpoint-*`, through huggingface_hub's filter): compiled kernels never go up with the model."""
    from huggingface_hub.utils import filter_repo_objects

    folder = os.path.relpath(compile_cache_env(str(tmp_path), {})["TRITON_CACHE_DIR"], tmp_path)
    files = [os.path.join(folder, "abc", "kernel.cubin"), "adapter_model.safetensors"]
    kept = list(filter_repo_objects(files, ignore_patterns=["_*", "checkpoint-*"]))
    assert kept == ["adapter_model.safetensors"]
