# Shared by the finetune/*.sh launchers; sourced, never run. What a launcher does (its recipe, options, --help, the
# checks of its environment variables, this node's devices, the command it starts) is LAUNCHERS[its name] in
# llmft/launcher.py; this runs that under the launcher's own file name, with its arguments.
# Any python3 (3.8 or newer) runs it, standard library only, so a bad option or variable fails before torch loads;
# PYTHON, the interpreter with llmft's requirements, counts the GPUs and trains.
LLMFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# llmft.launcher and llmft.launch (the ranks start through it) import from this checkout.
export PYTHONPATH="$LLMFT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m llmft.launcher "$(basename "$0")" "$@"
