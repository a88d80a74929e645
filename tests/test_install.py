"""Every documented way of installing llmft gives working entry points, run from another directory: the README's GPU
steps, the Dockerfile's install steps, `pip install .` from a clone, and a built wheel.

Each test copies the working tree as a fresh clone would have it, makes a new virtual environment that sees this
test environment's packages (no torch download: `--system-site-packages`, plus a .pth line for this environment's
own site-packages when it is itself a virtual environment; pip runs with --no-index, so nothing is fetched), replays
the install commands as they are written (the README's code block, the Dockerfile's RUN pip lines) and runs each
entry point's `--help` from an unrelated directory, with no PYTHONPATH: the `llmft` command and every subcommand,
`finetune.py`, every `tools/*.py` and every `finetune/*.sh` launcher. Docker itself cannot run here; its pip lines
are replayed against the venv standing in for /opt/venv.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmft.cli import SUBCOMMANDS
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def fresh_clone(tmp_path: Path) -> Path:
    """The repository's files as a clone has them (tracked and new, not ignored), uncommitted edits included."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    clone = tmp_path / "llmft"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


def make_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's packages; returns its python."""
    # without a pip of its own: ensurepip's bundled setuptools would shadow the newer one torch requires; this
    # environment's pip (and setuptools) install into the new one as they do into any --system-site-packages venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # a venv of a venv: --system-site-packages reaches only the base interpreter's
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (Path(site) / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def clean_env(venv: Path) -> dict:
    """A user's shell with the venv activated: its bin/ first on PATH, no PYTHONPATH, nothing downloaded."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        PIP_NO_INDEX="1",
        PIP_CONFIG_FILE=os.devnull,  # this machine's pip settings (extra wheel folders) play no part
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def replay(command: str, venv: Path, cwd: Path) -> None:
    """One documented pip command, run as written in `venv` (offline: the packages it names are there already; a
    project build uses the installed setuptools, as the Makefile's and Dockerfile's --no-build-isolation do)."""
    argv = shlex.split(command)
    pip = next(i for i, token in enumerate(argv) if os.path.basename(token) == "pip")
    argv = [str(venv / "bin" / "python"), "-m", "pip", *argv[pip + 1 :]]
    if argv[3] == "install" and ("." in argv or "-e" in argv) and "--no-build-isolation" not in argv:
        argv.insert(4, "--no-build-isolation")  # offline: no isolated build environment to download into
    result = subprocess.run(argv, cwd=cwd, env=clean_env(venv), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def entry_points(clone: Path) -> list[list[str]]:
    """Every documented entry point, with --help."""
    commands = [["llmft", "--help"]] + [["llmft", name, "--help"] for name in SUBCOMMANDS]
    commands.append(["python", str(clone / "finetune.py"), "--help"])
    tools = sorted(p for p in (clone / "tools").glob("*.py") if p.name != "__init__.py")
    commands += [["python", str(tool), "--help"] for tool in tools]
    launchers = sorted(p for p in (clone / "finetune").glob("*.sh") if p.name != "common.sh")
    return commands + [["bash", str(launcher), "--help"] for launcher in launchers]


def assert_entry_points_work(venv: Path, clone: Path, elsewhere: Path, only: tuple[list[str], ...] = ()) -> None:
    """Each entry point (or `only` these) answers --help from `elsewhere` with exit 0 and a usage text."""
    elsewhere.mkdir(exist_ok=True)
    env = clean_env(venv)

    def run(command: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
        return command, subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, list(only) or entry_points(clone)))
    failed = [
        f"{' '.join(command)}: exit {result.returncode}\n{result.stderr[-1500:]}"
        for command, result in results
        if result.returncode != 0 or "usage" not in (result.stdout + result.stderr).lower()
    ]
    assert failed == [], "\n\n".join(failed)
    # the llmft these ran is the one just installed (in the venv, or the clone for an editable install), never this
    # test environment's
    located = subprocess.run(
        ["python", "-c", "import llmft; print(llmft.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert {venv, clone} & set(Path(located.stdout.strip()).parents), located.stdout + located.stderr


def readme_gpu_steps() -> list[str]:
    """The pip commands of the README's GPU set-up block."""
    readme = (REPO / "README.md").read_text()
    section = readme[re.search(r"On a GPU\s+machine", readme).start() :]  # wherever the line breaks
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("pip ")]


def dockerfile_pip_steps() -> list[str]:
    """The pip commands of the Dockerfile's RUN lines, in order (continuation lines joined, `&&` split)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    steps = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            steps += [part.strip() for part in line[4:].split("&&") if re.match(r"\S*pip install", part.strip())]
    return steps


def test_readme_gpu_install(tmp_path):
    steps = readme_gpu_steps()
    assert steps[0] == "pip install -r requirements.txt" and any(" -e ." in s or s.endswith(" .") for s in steps)
    clone, venv = fresh_clone(tmp_path), tmp_path / "venv"
    make_venv(venv)
    for step in steps:
        replay(step, venv, cwd=clone)
    assert_entry_points_work(venv, clone, tmp_path / "elsewhere")


def test_dockerfile_install(tmp_path):
    """The image's /opt/llmft is the clone, /opt/venv the venv (its ENV PATH puts /opt/venv/bin first)."""
    steps = dockerfile_pip_steps()
    assert any(s.endswith(" -e .") or s.endswith(" .") for s in steps), steps  # llmft itself is installed
    assert "ENV PATH=/opt/venv/bin:$PATH" in (REPO / "Dockerfile").read_text()
    clone, venv = fresh_clone(tmp_path), tmp_path / "venv"
    make_venv(venv)
    for step in steps:
        replay(step, venv, cwd=clone)
    assert_entry_points_work(venv, clone, tmp_path / "elsewhere")


def test_wheel_and_pip_install_from_a_clone(tmp_path):
    """A wheel carries every module of the package and gives the `llmft` command; `pip install .` (which builds the
    same wheel) gives it too. The clone's scripts then import the installed llmft."""
    clone = fresh_clone(tmp_path)
    wheels, venv, pip_venv = tmp_path / "wheels", tmp_path / "venv", tmp_path / "pip-venv"
    python = make_venv(venv)
    replay(f"pip wheel --no-deps --no-build-isolation -w {wheels} .", venv, cwd=clone)
    (wheel,) = wheels.glob("llmft-*.whl")
    modules = {str(p.relative_to(clone)) for p in (clone / "llmft").rglob("*.py")}
    assert modules - set(zipfile.ZipFile(wheel).namelist()) == set()
    replay(f"pip install --no-deps {wheel}", venv, cwd=tmp_path)
    installed = subprocess.run(
        [str(python), "-c", "import llmft; print(llmft.__file__)"],
        cwd=tmp_path,
        env=clean_env(venv),
        capture_output=True,
        text=True,
    ).stdout
    assert installed.startswith(str(venv)), installed  # the wheel's copy, not the clone's
    assert_entry_points_work(venv, clone, tmp_path / "elsewhere")

    # `pip install .`: the same wheel, built and installed in one step; its command and the mission's tool answer
    make_venv(pip_venv)
    replay("pip install --no-deps .", pip_venv, cwd=clone)
    assert_entry_points_work(
        pip_venv,
        clone,
        tmp_path / "elsewhere",
        only=(["llmft", "--help"], ["python", str(clone / "tools" / "run_gptq.py"), "--help"]),
    )
