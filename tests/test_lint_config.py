"""The pre-commit hook (.pre-commit-config.yaml) runs the ruff `make lint` runs: the version requirements-dev.txt
pins, checking the layout and the rules (not fixing them), with the repository's ruff.toml."""

from __future__ import annotations

import yaml

from tests.conftest import REPO


def pinned(requirements: str, package: str) -> str:
    lines = (REPO / requirements).read_text().splitlines()
    return next(line.split("==", 1)[1].strip() for line in lines if line.startswith(f"{package}=="))


def test_pre_commit_runs_the_pinned_ruff_check():
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    (repo,) = [r for r in config["repos"] if "ruff" in r["repo"]]
    assert repo["repo"] == "https://github.com/astral-sh/ruff-pre-commit"
    assert repo["rev"] == f"v{pinned('requirements-dev.txt', 'ruff')}"
    hooks = {hook["id"]: hook.get("args", []) for hook in repo["hooks"]}
    assert hooks == {"ruff-format": ["--check"], "ruff-check": []}  # ruff.toml decides the rest, as for `make lint`
