# Shared by the finetune/*.sh launchers; sourced, never run. What a launcher does (its recipe, options, --help, the
# checks of its environment variables, this node's devices, the command it starts) is LAUNCHERS[its name] in
# llmft/launch/launcher.py; this runs that under the launcher's own file name, with its arguments.
# Any python3 (3.10 or newer) runs it, standard library only, so a bad option or variable fails before torch loads;
# PYTHON, the interpreter with llmft's requirements, counts the GPUs and trains.
LLMFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# llmft.launch.launcher and llmft.launch.torchrun (the ranks start through it) import from this checkout.
export PYTHONPATH="$LLMFT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m llmft.launch.launcher "$(basename "$0")" "$@"
