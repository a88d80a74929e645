"""The finetune/*.sh launchers: `python -m llmft.launch.launcher LAUNCHER [options] [-- finetune.py arguments...]`.

Each shell launcher is a few lines that run this module with its own name; everything it does is here: its recipe
(`LAUNCHERS`, data), its options (argparse), the checks of every environment variable it reads (one error that lists
each bad one), the devices of this node (torch.cuda, which honours CUDA_VISIBLE_DEVICES) and the command it starts.
Ranks start through `llmft.launch.torchrun` (torchrun that turns a rank's user error into exit status 2 and a
preemption into 75, and passes SIGTERM/SIGUSR1 on to the ranks); this process becomes it, so a signal sent to the
launcher reaches it.
With HOSTFILE, DeepSpeed's pdsh launcher starts every node from this one instead (see `build_command`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from llmft.model_folder import looks_like_path
from llmft.compile_cache import CACHE_VARIABLES, COMPILE_CACHE_ENV, compile_cache_env
from llmft.errors import EXIT_USER_ERROR

ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = ROOT / "ds_configs"
# ds_configs/ holds both kinds of config, told apart by name: DeepSpeed's zero*.json, FSDP's fsdp*.json.
DS_CONFIG_PREFIX, FSDP_CONFIG_PREFIX = "zero", "fsdp"

# Schedule, regularisation, checkpointing and logging shared by every recipe. The last occurrence of an argument
# wins (argparse), so a launcher's recipe overrides these and the user's arguments after '--' override both.
SHARED_RECIPE = (
    "--num_train_epochs",
    "3",
    "--lr_scheduler_type",
    "cosine",
    "--warmup_steps",
    "0.01",
    "--weight_decay",
    "0.1",
    "--adam_beta2",
    "0.95",
    "--gradient_checkpointing",
    "True",
    "--save_strategy",
    "steps",
    "--save_steps",
    "500",
    "--logging_steps",
    "10",
    "--report_to",
    "none",
)

# The adapter recipe of the LoRA and Q-LoRA launchers (one GPU or many; Q-LoRA adds --q_lora True to it).
# Micro-batches of up to 16,384 packed tokens (about 40 chat samples of a few hundred tokens) keep the GPU busy where
# a count of 2 samples left it idle; --max_tokens_per_batch 0 goes back to --per_device_train_batch_size samples.
ADAPTER_RECIPE = (
    "--use_lora",
    "True",
    "--model_max_length",
    "2048",
    "--max_tokens_per_batch",
    "16384",
    "--gradient_accumulation_steps",
    "1",
    "--learning_rate",
    "3e-4",
    "--save_total_limit",
    "3",
)

# Why ds_configs/fsdp.json says what it says (JSON has no comments); --help prints this on the launchers with --fsdp.
FSDP_NOTES = """\
FSDP (--fsdp CONFIG): PyTorch FSDP through accelerate, in place of the launcher's DeepSpeed config; the CONFIG goes to
finetune.py as --fsdp True --fsdp_config CONFIG. ds_configs/fsdp.json asks for FSDP2 (fully_shard, each parameter
sharded on its own, so frozen base and trainable LoRA weights mix without FSDP1's use_orig_params; transformers 5
deprecates FSDP1), one shard unit per transformer layer (TRANSFORMER_BASED_WRAP: the model's _no_split_modules), and
a FULL_STATE_DICT gathered onto rank 0 for the final save, so the output is an ordinary checkpoint or adapter (with a
sharded state dict transformers would save no weights). Activation checkpointing stays --gradient_checkpointing True:
FSDP's own (activation_checkpointing in the JSON) puts each layer in a checkpoint wrapper, inside which PEFT no longer
finds the LoRA layers, and the saved adapter would be empty. On CPU ranks llmft turns FSDP on itself (accelerate only
does on GPUs and other accelerators): see llmft/distributed.py."""


@dataclass(frozen=True)
class Launcher:
    """One finetune/NAME.sh: what --help says of it, how it starts ranks and the finetune.py arguments it passes."""

    usage: str  # the usage line, what it trains and an example; the rest of --help is generated
    distributed: bool  # True: torchrun over GPUS_PER_NODE ranks on each of NNODES nodes; False: one process
    ds_config: str  # default --deepspeed (a name in ds_configs/ or a path); "": no DeepSpeed
    output_dir: str  # default --output
    recipe: tuple[str, ...]  # on top of SHARED_RECIPE
    no_fsdp: str = ""  # on a distributed launcher: why its recipe cannot run under --fsdp (the option is refused)


LAUNCHERS = {
    "finetune_ds.sh": Launcher(
        usage="""\
Usage: finetune/finetune_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
Full-parameter fine-tuning on one or more nodes with DeepSpeed ZeRO, or PyTorch FSDP (--fsdp fsdp): weights,
gradients and optimizer state are sharded over all ranks, and the saved model is gathered back into one safetensors
checkpoint.

Example:
  finetune/finetune_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -o output_full
  finetune/finetune_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json --fsdp fsdp
  NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 finetune/finetune_ds.sh -m ... -d ...   # on node1; NODE_RANK=1 on node2
""",
        distributed=True,
        ds_config="zero3",
        output_dir="output_full",
        recipe=(
            "--model_max_length",
            "2048",
            "--max_tokens_per_batch",
            "8192",
            "--gradient_accumulation_steps",
            "2",
            "--learning_rate",
            "1e-5",
            "--save_total_limit",
            "2",
        ),
    ),
    "finetune_lora_ds.sh": Launcher(
        usage="""\
Usage: finetune/finetune_lora_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
LoRA fine-tuning on one or more nodes with DeepSpeed ZeRO, or PyTorch FSDP (--fsdp fsdp): the base model stays
frozen and only the adapter trains, with its gradients and optimizer state sharded over all ranks.

Example:
  finetune/finetune_lora_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -- --lora_r 16
  finetune/finetune_lora_ds.sh -m Qwen/Qwen2.5-72B-Instruct -d examples/conversations.json --deepspeed zero3
  finetune/finetune_lora_ds.sh -m Qwen/Qwen2.5-72B-Instruct -d examples/conversations.json --fsdp fsdp
""",
        distributed=True,
        ds_config="zero2",
        output_dir="output_lora",
        recipe=ADAPTER_RECIPE,
    ),
    "finetune_qlora_ds.sh": Launcher(
        usage="""\
Usage: finetune/finetune_qlora_ds.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
Q-LoRA fine-tuning on one or more nodes with DeepSpeed ZeRO: a LoRA adapter trains on a frozen base loaded in
4-bit NF4; the adapter's gradients and optimizer state are sharded over all ranks.

Example:
  finetune/finetune_qlora_ds.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -o output_qlora
""",
        distributed=True,
        ds_config="zero2",
        output_dir="output_qlora",
        recipe=(*ADAPTER_RECIPE, "--q_lora", "True"),
        no_fsdp="the 4-bit base is placed whole on each rank, which FSDP cannot shard (--deepspeed zero3 shards it)",
    ),
    "finetune_lora_single_gpu.sh": Launcher(
        usage="""\
Usage: finetune/finetune_lora_single_gpu.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
LoRA fine-tuning in one process on one GPU (the first in CUDA_VISIBLE_DEVICES): the base model stays frozen and
only the adapter trains. No DeepSpeed unless --deepspeed is given (zero2_offload moves optimizer state to CPU RAM).

Example:
  finetune/finetune_lora_single_gpu.sh -m Qwen/Qwen2.5-1.5B-Instruct -d examples/conversations.json \\
      -- --num_train_epochs 1
""",
        distributed=False,
        ds_config="",
        output_dir="output_lora",
        recipe=ADAPTER_RECIPE,
    ),
    "finetune_qlora_single_gpu.sh": Launcher(
        usage="""\
Usage: finetune/finetune_qlora_single_gpu.sh -m MODEL -d DATA [options] [-- finetune.py arguments...]
Q-LoRA fine-tuning in one process on one GPU (the first in CUDA_VISIBLE_DEVICES): a LoRA adapter trains on a frozen
base loaded in 4-bit NF4. No DeepSpeed unless --deepspeed is given.

Example:
  finetune/finetune_qlora_single_gpu.sh -m Qwen/Qwen2.5-7B-Instruct -d examples/conversations.json -o output_qlora
""",
        distributed=False,
        ds_config="",
        output_dir="output_qlora",
        recipe=(*ADAPTER_RECIPE, "--q_lora", "True"),
    ),
}

# The node's MPI rank is not a training rank: kept from the ranks torchrun starts, which get their own.
MPI_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
)
BOOLEANS = {"1": True, "true": True, "0": False, "false": False}
RESUME_WORDS = ("auto", "true", "false")


class UsageError(Exception):
    """A launcher option or environment variable the user must fix; printed with a pointer to --help, exit 2."""


# --- the environment ----------------------------------------------------------------------------------------------


def env_value(environ: dict, *names: str, default: str | None = None) -> str | None:
    """The first of `names` set to a non-empty value (as bash's ${A:-${B:-default}} reads them)."""
    return next((environ[n] for n in names if environ.get(n)), default)


@dataclass(frozen=True)
class NodeEnvironment:
    """The environment variables a launcher reads, checked. gpus_per_node is None: not given, decided by devices."""

    use_cpu: bool | None
    gpus_per_node: int | None
    nnodes: int
    node_rank: int
    master_addr: str | None
    master_port: int
    resume: str | None
    hostfile: str | None
    python: str
    entry: str


def integer(problems: list[str], name: str, value: str | None, minimum: int, maximum: int | None = None) -> int | None:
    if value is None:
        return None
    if re.fullmatch(r"[0-9]+", value) and int(value) >= minimum and (maximum is None or int(value) <= maximum):
        return int(value)
    kind = "a positive integer" if minimum == 1 else "a non-negative integer"
    bound = f" up to {maximum}" if maximum is not None else ""
    problems.append(f"{name} must be {kind}{bound}, got {value!r}")
    return None


HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def is_host(value: str) -> bool:
    """Whether `value` is a host name (letters, digits, '-' and '_' in dot-separated labels, none starting with '-')
    or an IPv4 / IPv6 address (bracketed or not): what torchrun and DeepSpeed can connect to, and nothing that
    another program could take for an option."""
    import ipaddress

    try:
        ipaddress.ip_address(value.removeprefix("[").removesuffix("]"))
        return True
    except ValueError:
        return len(value) <= 253 and HOST_NAME.fullmatch(value) is not None


def read_environment(environ: dict) -> NodeEnvironment:
    """Every environment variable a launcher reads, each checked; raises one UsageError listing all bad ones.
    One launcher runs per node: its place in the job is NNODES/NODE_RANK, else Open MPI's, else PMI's (MPICH,
    Intel MPI, srun --mpi=pmi2)."""
    problems: list[str] = []
    use_cpu = env_value(environ, "USE_CPU")
    if use_cpu is not None and use_cpu.lower() not in BOOLEANS:
        problems.append(f"USE_CPU must be 1, 0, true or false, got {use_cpu!r}")
    gpus = integer(
        problems,
        "GPUS_PER_NODE" if environ.get("GPUS_PER_NODE") else "NPROC_PER_NODE",
        env_value(environ, "GPUS_PER_NODE", "NPROC_PER_NODE"),
        1,
    )
    nnodes_name = next((n for n in ("NNODES", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE") if environ.get(n)), "NNODES")
    nnodes = integer(problems, nnodes_name, environ.get(nnodes_name, "1") or "1", 1)
    rank_name = next((n for n in ("NODE_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if environ.get(n)), "NODE_RANK")
    node_rank = integer(problems, rank_name, environ.get(rank_name, "0") or "0", 0)
    if nnodes is not None and node_rank is not None and node_rank >= nnodes:
        problems.append(f"{rank_name}={node_rank} is not below {nnodes_name}={nnodes} (node ranks count from 0)")
    port = integer(problems, "MASTER_PORT", env_value(environ, "MASTER_PORT", default="6001"), 1, 65535)
    master_addr = env_value(environ, "MASTER_ADDR")
    if master_addr is not None and not is_host(master_addr):
        problems.append(f"MASTER_ADDR must be a host name or an IP address, got {master_addr!r}")
    resume = env_value(environ, "RESUME")
    if resume is not None and resume.lower() not in RESUME_WORDS and not os.path.isdir(resume):
        problems.append(f"RESUME must be auto, True, False or a checkpoint folder, got {resume!r} (no such folder)")
    hostfile = env_value(environ, "HOSTFILE")
    if hostfile is not None and not os.path.isfile(hostfile):
        problems.append(f"HOSTFILE '{hostfile}' does not exist")
    if problems:
        raise UsageError("; ".join(problems))
    return NodeEnvironment(
        use_cpu=None if use_cpu is None else BOOLEANS[use_cpu.lower()],
        gpus_per_node=gpus,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=port,
        resume=resume,
        hostfile=hostfile,
        python=env_value(environ, "PYTHON", default="python"),
        entry=env_value(environ, "LLMFT_ENTRY", default=str(ROOT / "finetune.py")),
    )


# --- the devices ----------------------------------------------------------------------------------------------------

# Run by PYTHON, the interpreter with torch: this module needs only the standard library, so a bad option or
# variable is refused before anything heavy starts.
GPU_QUERY = (
    "import json, torch; print(json.dumps([torch.cuda.get_device_capability(i) "
    "for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []))"
)


def visible_gpu_capabilities(python: str, environ: dict) -> list[tuple[int, int]]:
    """Compute capability of each GPU this process may use, in CUDA_VISIBLE_DEVICES order (torch.cuda honours it,
    UUIDs and MIG instances included); empty when it hides them all or there is none. Asks `python`'s torch, in a
    process of its own, only when CUDA_VISIBLE_DEVICES does not already hide every GPU."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    try:
        result = subprocess.run([python, "-c", GPU_QUERY], env=environ, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise UsageError(f"PYTHON={python} could not count the GPUs with torch: {detail.strip().splitlines()[-1]}")
    return [tuple(cap) for cap in json.loads(result.stdout.strip().splitlines()[-1])]


def precision_args(capabilities: list[tuple[int, int]]) -> list[str]:
    """finetune.py's precision flags for ranks on these GPUs (none: CPU, fp32). bf16 needs compute capability 8.0
    (Ampere) or newer on every one of them; older GPUs train in fp16."""
    if not capabilities:
        # transformers + accelerate count the ranks of a DeepSpeed run wrongly unless told it is a CPU run
        return ["--use_cpu", "True", "--bf16", "False", "--fp16", "False"]
    if all(major >= 8 for major, _ in capabilities):
        return ["--bf16", "True"]
    return ["--fp16", "True"]


# --- the options ----------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


VALUE_OPTIONS = ("-m", "--model", "-d", "--data", "-o", "--output", "--deepspeed", "--fsdp")


def option_parser(launcher: Launcher) -> Parser:
    parser = Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("-m", "--model")
    parser.add_argument("-d", "--data")
    parser.add_argument("-o", "--output", default=launcher.output_dir)
    parser.add_argument("--deepspeed")
    parser.add_argument("--fsdp")
    parser.add_argument("-n", "--dry-run", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def shipped_configs(prefix: str) -> str:
    return " ".join(sorted(p.stem for p in DS_CONFIGS.glob(f"{prefix}*.json")))


def resolve_config(prefix: str, kind: str, value: str) -> str:
    """A path, or a short name in ds_configs/ (zero2, zero3_offload, fsdp, ...) -> the path of an existing file."""
    if os.path.isfile(value):
        return value
    shipped = DS_CONFIGS / f"{value[:-5] if value.endswith('.json') else value}.json"
    if "/" not in value and value.startswith(prefix) and shipped.is_file():
        return str(shipped)
    raise UsageError(f"{kind} config '{value}' not found (a path, or one of: {shipped_configs(prefix)})")


def parse_options(launcher: Launcher, argv: list[str], environ: dict) -> argparse.Namespace:
    """The launcher's own options (everything before '--'); `passthrough` is what follows '--'. With --fsdp, the
    DeepSpeed config is dropped: FSDP replaces it."""
    split = argv.index("--") if "--" in argv else len(argv)
    own, passthrough = argv[:split], argv[split + 1 :]
    for i, arg in enumerate(own):
        if arg in VALUE_OPTIONS and i + 1 == len(own):
            raise UsageError(f"option '{arg}' needs a value")
    options, rest = option_parser(launcher).parse_known_args(own)
    if options.help:
        return options
    for arg in rest:
        what = "unknown option" if arg.startswith("-") else "unexpected argument"
        raise UsageError(f"{what} '{arg}' (finetune.py arguments go after '--')")
    options.passthrough = passthrough
    options.model = options.model or env_value(environ, "MODEL")
    options.data = options.data or env_value(environ, "DATA")
    if not options.model:
        raise UsageError("no model given: pass -m MODEL (a local folder or a hub id)")
    if not options.data:
        raise UsageError("no training data given: pass -d DATA")
    if not os.path.exists(options.data):
        raise UsageError(f"training data '{options.data}' does not exist")
    # A Hub id also contains '/', so only a model written as a path must exist here; finetune.py checks the rest
    # (llmft.model_folder: the one rule for what names a folder and what a Hub id)
    if looks_like_path(options.model) and not os.path.exists(options.model):
        raise UsageError(f"model folder '{options.model}' does not exist")
    if options.fsdp:
        if options.deepspeed:
            raise UsageError("--deepspeed and --fsdp both given: each shards the model its own way; choose one")
        if not launcher.distributed:
            raise UsageError(
                "--fsdp shards the model over several ranks, and this launcher runs one process: use "
                "finetune/finetune_ds.sh or finetune/finetune_lora_ds.sh"
            )
        if launcher.no_fsdp:
            raise UsageError(f"--fsdp is not available with this launcher: {launcher.no_fsdp}")
        options.fsdp = resolve_config(FSDP_CONFIG_PREFIX, "FSDP", options.fsdp)
    else:
        deepspeed = options.deepspeed or launcher.ds_config
        options.deepspeed = resolve_config(DS_CONFIG_PREFIX, "DeepSpeed", deepspeed) if deepspeed else None
    return options


def wrap_flag_pairs(args: tuple[str, ...] | list[str], width: int = 108) -> str:
    """'--flag value' pairs, indented, several to a line."""
    lines, line = [], ""
    for pair in (f"{args[i]} {args[i + 1]}" for i in range(0, len(args) - 1, 2)):
        if len(line) + len(pair) > width:
            lines.append(f"  {line}")
            line = ""
        line += (" " if line else "") + pair
    if line:
        lines.append(f"  {line}")
    return "\n".join(lines)


def help_text(launcher: Launcher, environ: dict) -> str:
    """--help: the launcher's usage, then options, recipe and environment printed from the values it runs with."""

    def env(name: str, default: str = "") -> str:
        return environ.get(name) or default

    fsdp = ""
    if launcher.distributed and launcher.no_fsdp:
        fsdp = f"      --fsdp CONFIG        not with this launcher:\n                           {launcher.no_fsdp}\n"
    elif launcher.distributed:
        fsdp = (
            "      --fsdp CONFIG        FSDP instead of DeepSpeed (see FSDP below): a JSON for --fsdp_config,\n"
            f"                           a path or a name in ds_configs/ ({shipped_configs(FSDP_CONFIG_PREFIX)})\n"
        )
    text = f"""{launcher.usage}
Options:
  -m, --model MODEL        base model: a local folder or a Hugging Face hub id (env MODEL)
  -d, --data PATH          training data, JSON or JSONL conversations (env DATA)
  -o, --output DIR         where checkpoints and the final model go (default: {launcher.output_dir})
      --deepspeed CONFIG   DeepSpeed JSON: a path, or a name in ds_configs/ (default: {launcher.ds_config or "none"})
{fsdp}  -n, --dry-run            print the command that would run, and exit
  -h, --help               show this text
Everything after '--' goes to finetune.py unchanged and overrides the recipe below, e.g.
  -- --num_train_epochs 1 --model_max_length 512 --eval_data_path dev.json

Recipe (finetune.py arguments this launcher passes):
{wrap_flag_pairs(SHARED_RECIPE + launcher.recipe)}
  --bf16 True on GPUs of compute capability 8.0 or newer, else --fp16 True; on CPU --use_cpu True in fp32

Environment (current value after '='):
"""
    if launcher.distributed:
        nnodes = env_value(environ, "NNODES", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default="1")
        node_rank = env_value(environ, "NODE_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", default="0")
        text += f"""\
  GPUS_PER_NODE={env("GPUS_PER_NODE")}  ranks per node; default: the visible GPUs, or on CPU NPROC_PER_NODE (else 1)
  NNODES={nnodes} NODE_RANK={node_rank} MASTER_ADDR={env("MASTER_ADDR", "localhost")} \
MASTER_PORT={env("MASTER_PORT", "6001")}
      run this launcher once per node; NNODES and NODE_RANK default to mpirun's OMPI_COMM_WORLD_SIZE/RANK or
      PMI_SIZE/RANK when present (mpirun -npernode 1 ...); for Slurm see finetune/slurm_finetune.sbatch
  HOSTFILE={env("HOSTFILE")}  set: start all nodes from this one with 'deepspeed --hostfile HOSTFILE' (pdsh over
      passwordless ssh; lines like 'node1 slots=8'); MASTER_ADDR defaults to its first host. The nodes then run
      DeepSpeed's launcher, not llmft.launch.torchrun: a rank's failure is reported as DeepSpeed and pdsh report it
      (with tracebacks; exit statuses 2 and 75 are not guaranteed), and SIGTERM/SIGUSR1 are not passed on to the
      ranks
"""
    text += f"""\
  USE_CPU={env("USE_CPU")}  1 (or true): train on CPU ranks over gloo in fp32 (DeepSpeed's CPU accelerator, or FSDP2);
      the default when no GPU is visible (PYTHON's torch finds none, or CUDA_VISIBLE_DEVICES is empty); 0 (or
      false): GPUs only
  PYTHON={env("PYTHON", "python")}  the interpreter with llmft's requirements
  {COMPILE_CACHE_ENV}={env(COMPILE_CACHE_ENV)}  where compiled kernels (flex attention, Triton) are kept; default
      OUTPUT/_compile_cache, so the nodes and a resumed or requeued run compile once; a folder every node mounts
      shares them between runs. Sets TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, unless those are set already
  RESUME={env("RESUME")}  set: --resume_from_checkpoint RESUME; auto resumes the run in the output folder when it is
      this same run (its recorded settings match), starts fresh in an empty one, refuses another run; the Slurm
      script sets it, so a requeued job continues. SIGTERM or SIGUSR1 stops the run after its next optimizer step
      with a checkpoint, exit status 75
"""
    if launcher.distributed and not launcher.no_fsdp:
        text += f"\n{FSDP_NOTES}\n"
    return text


# --- the command ----------------------------------------------------------------------------------------------------


def first_host(hostfile: str) -> str | None:
    """The first host of a DeepSpeed hostfile ('node1 slots=8' lines, '#' comments)."""
    for line in Path(hostfile).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            return words[0]
    return None


@dataclass(frozen=True)
class Launch:
    command: list[str]
    environ: dict  # the environment it runs in
    where: str  # the one line saying what runs on this node
    dry_run: bool  # print it only
    compile_caches: dict  # where the ranks will keep compiled kernels (they point their caches there themselves)


def last_value(args: list[str], flag: str) -> str | None:
    """The value argparse keeps for `flag` in finetune.py arguments: its last occurrence, `--flag value` or
    `--flag=value`."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def build_launch(name: str, argv: list[str], environ: dict) -> Launch | str:
    """The command launcher `name` runs on this node for `argv`, or the --help text. Raises UsageError."""
    launcher = LAUNCHERS[name]
    options = parse_options(launcher, argv, environ)
    if options.help:
        return help_text(launcher, environ)
    node = read_environment(environ)
    environ = {k: v for k, v in environ.items() if k not in MPI_RANK_VARIABLES}

    capabilities = [] if node.use_cpu else visible_gpu_capabilities(node.python, environ)
    use_cpu = node.use_cpu if node.use_cpu is not None else not capabilities
    if use_cpu:
        # DeepSpeed then runs on its CPU accelerator, with gloo collectives
        environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        capabilities, gpus = [], node.gpus_per_node or 1
    elif not capabilities:
        raise UsageError(
            "USE_CPU is false but no GPU is visible (CUDA_VISIBLE_DEVICES, torch.cuda); USE_CPU=1 trains on CPU"
        )
    else:
        gpus = node.gpus_per_node or len(capabilities)
    if not launcher.distributed:
        gpus = 1
        if not use_cpu:
            # Trainer wraps the model in nn.DataParallel when one process sees several GPUs: show it only the first.
            environ["CUDA_VISIBLE_DEVICES"] = (environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
            capabilities = capabilities[:1]

    args = [
        "--model_name_or_path",
        options.model,
        "--data_path",
        options.data,
        "--output_dir",
        options.output,
        *SHARED_RECIPE,
        *launcher.recipe,
        *precision_args(capabilities),
    ]
    if options.fsdp:
        args += ["--fsdp", "True", "--fsdp_config", options.fsdp]
    elif options.deepspeed:
        args += ["--deepspeed", options.deepspeed]
    if node.resume:  # before the user's arguments, which may override it
        args += ["--resume_from_checkpoint", node.resume]
    args += options.passthrough
    # compiled kernels kept with the run (the output folder the ranks will use), not in each node's /tmp: each rank
    # points its caches there itself once its settings have passed (llmft.compile_cache.use_compile_cache), so a
    # refused run leaves no folder behind; LLMFT_COMPILE_CACHE and any cache variable the user set pass through
    cache = compile_cache_env(last_value(args, "--output_dir"), environ)

    where = f"node {node.node_rank} of {node.nnodes}, {gpus} rank(s) per node"
    master_addr = node.master_addr or "localhost"
    if not launcher.distributed and not options.deepspeed:
        command = [node.python, node.entry, *args]
    elif not launcher.distributed:  # DeepSpeed wants a process group, even of one rank
        command = [
            node.python,
            "-m",
            "llmft.launch.torchrun",
            "--standalone",
            "--nproc_per_node",
            "1",
            node.entry,
            *args,
        ]
    elif node.hostfile:
        # pdsh: its ranks start with RANK/LOCAL_RANK/WORLD_SIZE set (so no --local_rank argument is needed).
        # DeepSpeed's MPI and Slurm launchers set only MPI's variables, which transformers does not read: under MPI
        # or Slurm, run one launcher per node instead (mpirun -npernode 1 ..., slurm_finetune.sbatch).
        master_addr = node.master_addr or first_host(node.hostfile) or "localhost"
        if not is_host(master_addr):
            raise UsageError(f"the first host of HOSTFILE {node.hostfile}, {master_addr!r}, is not a host name")
        command = [
            node.python,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            node.hostfile,
            "--launcher",
            "pdsh",
            "--no_local_rank",
            "--master_addr",
            master_addr,
            "--master_port",
            str(node.master_port),
            node.entry,
            *args,
        ]
        where = f"nodes and ranks from {node.hostfile}"
    else:
        command = [
            node.python,
            "-m",
            "llmft.launch.torchrun",
            "--nproc_per_node",
            str(gpus),
            "--nnodes",
            str(node.nnodes),
            "--node_rank",
            str(node.node_rank),
            "--master_addr",
            master_addr,
            "--master_port",
            str(node.master_port),
            node.entry,
            *args,
        ]
    if use_cpu:
        where += ", on CPU in fp32 (gloo between ranks)"
    caches = {name: environ.get(name) or cache[name] for name, _ in CACHE_VARIABLES}
    return Launch(command, environ, where, options.dry_run, caches)


def main(argv: list[str] | None = None) -> None:
    """`python -m llmft.launch.launcher LAUNCHER [options]`: print what runs, then become it (or exit, on --dry-run)."""
    argv = sys.argv[1:] if argv is None else argv
    name, args = argv[0], argv[1:]
    try:
        launch = build_launch(name, args, dict(os.environ))
    except UsageError as e:
        print(f"{name}: error: {e}\nTry '{name} --help'.", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if isinstance(launch, str):
        print(launch, end="")
        sys.exit(0)
    print(f"[llmft] {launch.where}", file=sys.stderr)
    caches = " ".join(f"{name}={path}" for name, path in launch.compile_caches.items())
    print(f"[llmft] compiled kernels kept in {caches}", file=sys.stderr)
    print("+ " + shlex.join(launch.command), file=sys.stderr, flush=True)
    if launch.dry_run:
        sys.exit(0)
    os.execvpe(launch.command[0], launch.command, launch.environ)


if __name__ == "__main__":
    main()
