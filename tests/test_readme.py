"""The README's launcher recipe table is the launchers' own data (`LAUNCHERS` in llmft/launch/launcher.py), rendered.

`recipe_table()` renders it; the README holds exactly that between its two marker comments. After changing a
recipe, paste what `PYTHONPATH=. python tests/test_readme.py` prints over the README's block.
"""

from __future__ import annotations

from pathlib import Path

from llmft.launch.launcher import LAUNCHERS, SHARED_RECIPE, Launcher

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = (
    "<!-- launcher recipes: generated from llmft/launch/launcher.py's LAUNCHERS, checked by tests/test_readme.py -->"
)
END = "<!-- end of launcher recipes -->"
# the flags the "trains" column states, left out of the recipe column
MODE_FLAGS = ("--use_lora", "--q_lora")


def flag_pairs(args: tuple[str, ...]) -> list[tuple[str, str]]:
    """('--a', '1', '--b', '2') -> [('--a', '1'), ('--b', '2')]; every recipe flag takes one value."""
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return list(zip(args[::2], args[1::2]))


def trains(launcher: Launcher) -> str:
    flags = dict(flag_pairs(launcher.recipe))
    if flags.get("--q_lora") == "True":
        return "Q-LoRA"
    return "LoRA" if flags.get("--use_lora") == "True" else "full"


def code_spans(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"`{flag} {value}`" for flag, value in pairs]


def recipe_table() -> str:
    """The markdown block: one row per launcher, then the recipe every launcher shares."""
    lines = [
        BEGIN,
        "| launcher | trains | processes | `--deepspeed` | `-o` | recipe |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, launcher in LAUNCHERS.items():
        processes = "torchrun on each node" if launcher.distributed else "one"
        config = f"`{launcher.ds_config}`" if launcher.ds_config else "none"
        recipe = " ".join(code_spans([pair for pair in flag_pairs(launcher.recipe) if pair[0] not in MODE_FLAGS]))
        lines.append(f"| `{name}` | {trains(launcher)} | {processes} | {config} | `{launcher.output_dir}` | {recipe} |")
    shared = wrap(["Every recipe also passes", *code_spans(flag_pairs(SHARED_RECIPE))])
    lines += ["", *shared, END]
    return "\n".join(lines)


def wrap(words: list[str], width: int = 120) -> list[str]:
    """`words` joined by spaces, never split, in lines of at most `width` characters; a full stop at the end."""
    words = [*words[:-1], words[-1] + "."]
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] += " " + word
    return lines


def test_readme_recipe_table_is_the_launchers_data():
    readme = README.read_text(encoding="utf-8")
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1, "the README needs one generated recipe block"
    block = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert block == recipe_table(), "README's recipe table differs from LAUNCHERS: paste `python tests/test_readme.py`"


def test_recipe_table_reads_every_launcher_and_flag():
    """The rendering leaves nothing out: each launcher, its default config and each recipe value appear."""
    table = recipe_table()
    for name, launcher in LAUNCHERS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert (launcher.ds_config or "none") in row and launcher.output_dir in row
        for flag, value in flag_pairs(launcher.recipe):
            assert flag in MODE_FLAGS or f"`{flag} {value}`" in row
    assert trains(LAUNCHERS["finetune_qlora_ds.sh"]) == "Q-LoRA" and trains(LAUNCHERS["finetune_ds.sh"]) == "full"


if __name__ == "__main__":
    print(recipe_table())
