# Shared code of the finetune/*.sh launchers; sourced, never run.
#
# A launcher sets, then calls `launcher_main "$@"`:
#   USAGE         its usage line, what it trains, and an example (the rest of --help is generated here)
#   DISTRIBUTED   1: torchrun over GPUS_PER_NODE ranks on each of NNODES nodes; 0: one process
#   DS_CONFIG     default --deepspeed value (a name in ds_configs/ or a path); empty: no DeepSpeed
#   NO_FSDP       optional, on a distributed launcher: why its recipe cannot run under --fsdp (the option is refused)
#   OUTPUT_DIR    default --output
#   RECIPE        array of finetune.py arguments that make its recipe, on top of SHARED_RECIPE
# --help prints these values themselves, so the help cannot drift from what the launcher runs.

# Schedule, regularisation, checkpointing and logging shared by every recipe. The last occurrence of an argument
# wins (argparse), so RECIPE overrides these and the user's arguments after '--' override both.
SHARED_RECIPE=(
    --num_train_epochs 3
    --lr_scheduler_type cosine
    --warmup_steps 0.01
    --weight_decay 0.1
    --adam_beta2 0.95
    --gradient_checkpointing True
    --save_strategy steps
    --save_steps 500
    --logging_steps 10
    --report_to none
)

# The adapter recipe of the LoRA and Q-LoRA launchers (one GPU or many; Q-LoRA adds --q_lora True to it).
# Micro-batches of up to 16,384 packed tokens (about 40 chat samples of a few hundred tokens) keep the GPU busy where
# a count of 2 samples left it idle; --max_tokens_per_batch 0 goes back to --per_device_train_batch_size samples.
ADAPTER_RECIPE=(
    --use_lora True
    --model_max_length 2048
    --max_tokens_per_batch 16384
    --gradient_accumulation_steps 1
    --learning_rate 3e-4
    --save_total_limit 3
)

# Why ds_configs/fsdp.json says what it says (JSON has no comments); --help prints this on the launchers with --fsdp.
FSDP_NOTES="\
FSDP (--fsdp CONFIG): PyTorch FSDP through accelerate, in place of the launcher's DeepSpeed config; the CONFIG goes to
finetune.py as --fsdp True --fsdp_config CONFIG. ds_configs/fsdp.json asks for FSDP2 (fully_shard, each parameter
sharded on its own, so frozen base and trainable LoRA weights mix without FSDP1's use_orig_params; transformers 5
deprecates FSDP1), one shard unit per transformer layer (TRANSFORMER_BASED_WRAP: the model's _no_split_modules), and
a FULL_STATE_DICT gathered onto rank 0 for the final save, so the output is an ordinary checkpoint or adapter (with a
sharded state dict transformers would save no weights). Activation checkpointing stays --gradient_checkpointing True:
FSDP's own (activation_checkpointing in the JSON) puts each layer in a checkpoint wrapper, inside which PEFT no longer
finds the LoRA layers, and the saved adapter would be empty. On CPU ranks llmft turns FSDP on itself (accelerate only
does on GPUs and other accelerators): see llmft/trainer.py."

LLMFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# One launcher runs per node. Under mpirun, srun or by hand, the node's place in the job comes from the environment:
# explicit NNODES/NODE_RANK first, then Open MPI's, then PMI's (MPICH, Intel MPI, srun --mpi=pmi2).
NNODES=${NNODES:-${OMPI_COMM_WORLD_SIZE:-${PMI_SIZE:-1}}}
NODE_RANK=${NODE_RANK:-${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}
PYTHON=${PYTHON:-python}
LLMFT_ENTRY=${LLMFT_ENTRY:-$LLMFT_ROOT/finetune.py}
# Ranks start through llmft.launch: torchrun, but a user error on the ranks ends in their message and exit status 2,
# not in torchrun's traceback.
export PYTHONPATH="$LLMFT_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die_usage() {
    echo "$(basename "$0"): error: $*" >&2
    echo "Try '$(basename "$0") --help'." >&2
    exit 2
}

# Number of GPUs this process may use: CUDA_VISIBLE_DEVICES when set (empty means none), else nvidia-smi's count.
visible_gpu_count() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        local ids=${CUDA_VISIBLE_DEVICES//[[:space:]]/}
        if [[ -z $ids || $ids == -1 ]]; then
            echo 0
        else
            local -a list
            IFS=, read -r -a list <<< "$ids"
            echo "${#list[@]}"
        fi
    elif command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi --list-gpus 2> /dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# bf16 needs compute capability 8.0 (Ampere) or newer; older GPUs train in fp16.
gpu_supports_bf16() {
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n1)
    [[ $cap =~ ^[0-9]+ ]] && (( ${cap%%.*} >= 8 ))
}

# Sets USE_CPU (0/1), GPUS_PER_NODE and PRECISION_ARGS for this machine.
detect_devices() {
    local gpus
    gpus=$(visible_gpu_count)
    USE_CPU=${USE_CPU:-$(( gpus == 0 ? 1 : 0 ))}
    if (( USE_CPU )); then
        # transformers + accelerate count the ranks of a DeepSpeed run wrongly unless told it is a CPU run
        # (--use_cpu); DeepSpeed then runs on its CPU accelerator, with gloo collectives.
        GPUS_PER_NODE=${GPUS_PER_NODE:-${NPROC_PER_NODE:-1}}
        export CUDA_VISIBLE_DEVICES=""
        export DS_ACCELERATOR=cpu
        PRECISION_ARGS=(--use_cpu True --bf16 False --fp16 False)
    else
        GPUS_PER_NODE=${GPUS_PER_NODE:-${NPROC_PER_NODE:-$gpus}}
        if gpu_supports_bf16; then
            PRECISION_ARGS=(--bf16 True)
        else
            PRECISION_ARGS=(--fp16 True)
        fi
    fi
    [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] \
        || die_usage "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE' (USE_CPU=1 trains on CPU)"
}

# ds_configs/ holds both kinds of config, told apart by name: DeepSpeed's zero*.json, FSDP's fsdp*.json.
DS_CONFIG_PREFIX=zero
FSDP_CONFIG_PREFIX=fsdp

# Names (without .json) of the shipped configs whose name starts with $1.
shipped_configs() {
    local file names=()
    for file in "$LLMFT_ROOT"/ds_configs/"$1"*.json; do
        [[ -f $file ]] && names+=("$(basename "$file" .json)")
    done
    echo "${names[*]}"
}

# $1: prefix of the kind's shipped names, $2: its name in messages, $3: a short name or a path -> an existing file.
resolve_config() {
    local prefix=$1 kind=$2 value=$3
    if [[ -f $value ]]; then
        echo "$value"
    elif [[ $value != */* && $value == "$prefix"* && -f $LLMFT_ROOT/ds_configs/${value%.json}.json ]]; then
        echo "$LLMFT_ROOT/ds_configs/${value%.json}.json"
    else
        die_usage "$kind config '$value' not found (a path, or one of: $(shipped_configs "$prefix"))"
    fi
}

# A short name (zero2, zero3_offload, ...) or a path -> the path of an existing DeepSpeed JSON.
resolve_ds_config() {
    resolve_config "$DS_CONFIG_PREFIX" DeepSpeed "$1"
}

# A short name (fsdp) or a path -> the path of an existing --fsdp_config JSON.
resolve_fsdp_config() {
    resolve_config "$FSDP_CONFIG_PREFIX" FSDP "$1"
}

# Prints '--flag value' pairs, indented, several to a line.
wrap_flag_pairs() {
    local line="" pair
    while (( $# >= 2 )); do
        pair="$1 $2"
        shift 2
        if (( ${#line} + ${#pair} > 108 )); then
            echo "  $line"
            line=""
        fi
        line+="${line:+ }$pair"
    done
    [[ -z $line ]] || echo "  $line"
}

# The --fsdp line(s) of --help: on distributed launchers only (FSDP shards over ranks).
fsdp_usage() {
    (( DISTRIBUTED )) || return 0
    if [[ -n ${NO_FSDP:-} ]]; then
        echo "      --fsdp CONFIG        not with this launcher:"
        echo "                           $NO_FSDP"
    else
        echo "      --fsdp CONFIG        FSDP instead of DeepSpeed (see FSDP below): a JSON for --fsdp_config,"
        echo "                           a path or a name in ds_configs/ ($(shipped_configs "$FSDP_CONFIG_PREFIX"))"
    fi
}

print_usage() {
    printf '%s\n' "$USAGE"
    cat << USAGE_END
Options:
  -m, --model MODEL        base model: a local folder or a Hugging Face hub id (env MODEL)
  -d, --data PATH          training data, JSON or JSONL conversations (env DATA)
  -o, --output DIR         where checkpoints and the final model go (default: $OUTPUT_DIR)
      --deepspeed CONFIG   DeepSpeed JSON: a path, or a name in ds_configs/ (default: ${DS_CONFIG:-none})
$(fsdp_usage)
  -n, --dry-run            print the command that would run, and exit
  -h, --help               show this text
Everything after '--' goes to finetune.py unchanged and overrides the recipe below, e.g.
  -- --num_train_epochs 1 --model_max_length 512 --eval_data_path dev.json

Recipe (finetune.py arguments this launcher passes):
$(wrap_flag_pairs "${SHARED_RECIPE[@]}" "${RECIPE[@]}")
  --bf16 True on GPUs of compute capability 8.0 or newer, else --fp16 True; on CPU --use_cpu True in fp32

Environment (current value after '='):
USAGE_END
    if (( DISTRIBUTED )); then
        cat << USAGE_END
  GPUS_PER_NODE=${GPUS_PER_NODE:-}  ranks per node; default: the visible GPUs, or on CPU NPROC_PER_NODE (else 1)
  NNODES=$NNODES NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT
      run this launcher once per node; NNODES and NODE_RANK default to mpirun's OMPI_COMM_WORLD_SIZE/RANK or
      PMI_SIZE/RANK when present (mpirun -npernode 1 ...); for Slurm see finetune/slurm_finetune.sbatch
  HOSTFILE=${HOSTFILE:-}  set: start all nodes from this one with 'deepspeed --hostfile HOSTFILE' (pdsh over
      passwordless ssh; lines like 'node1 slots=8'); MASTER_ADDR should then name the first host
USAGE_END
    fi
    cat << USAGE_END
  USE_CPU=${USE_CPU:-}  1: train on CPU ranks over gloo in fp32 (DeepSpeed's CPU accelerator, or FSDP2); the default
      when no GPU is visible (nvidia-smi finds none, or CUDA_VISIBLE_DEVICES is empty)
  PYTHON=$PYTHON  the interpreter with llmft's requirements
  RESUME=${RESUME:-}  set: --resume_from_checkpoint RESUME; auto resumes the run in the output folder when it is
      this same run (its recorded settings match), starts fresh in an empty one, refuses another run; the Slurm
      script sets it, so a requeued job continues. SIGTERM or SIGUSR1 stops the run after its next optimizer step
      with a checkpoint, exit status 75
USAGE_END
    if (( DISTRIBUTED )) && [[ -z ${NO_FSDP:-} ]]; then
        printf '\n%s\n' "$FSDP_NOTES"
    fi
}

# Parses the launcher's own options into MODEL, DATA, OUTPUT_DIR, DS_CONFIG, FSDP_CONFIG, DRY_RUN and
# PASSTHROUGH_ARGS. With --fsdp, DS_CONFIG is emptied: FSDP replaces the launcher's DeepSpeed config.
parse_launcher_args() {
    MODEL=${MODEL:-}
    DATA=${DATA:-}
    DRY_RUN=0
    PASSTHROUGH_ARGS=()
    FSDP_CONFIG=""
    local deepspeed_given=0
    while (( $# )); do
        case $1 in
            -h | --help)
                print_usage
                exit 0 ;;
            -m | --model | -d | --data | -o | --output | --deepspeed | --fsdp)
                (( $# >= 2 )) || die_usage "option '$1' needs a value"
                case $1 in
                    -m | --model) MODEL=$2 ;;
                    -d | --data) DATA=$2 ;;
                    -o | --output) OUTPUT_DIR=$2 ;;
                    --deepspeed) DS_CONFIG=$2 deepspeed_given=1 ;;
                    --fsdp) FSDP_CONFIG=$2 ;;
                esac
                shift 2 ;;
            --model=* | --data=* | --output=* | --deepspeed=* | --fsdp=*)
                set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
            -n | --dry-run)
                DRY_RUN=1
                shift ;;
            --)
                shift
                PASSTHROUGH_ARGS=("$@")
                break ;;
            -*) die_usage "unknown option '$1' (finetune.py arguments go after '--')" ;;
            *) die_usage "unexpected argument '$1' (finetune.py arguments go after '--')" ;;
        esac
    done
    [[ -n $MODEL ]] || die_usage "no model given: pass -m MODEL (a local folder or a hub id)"
    [[ -n $DATA ]] || die_usage "no training data given: pass -d DATA"
    [[ -e $DATA ]] || die_usage "training data '$DATA' does not exist"
    # A hub id also contains '/', so only a model written as a path ('/x', './x', '../x') must exist here.
    if [[ $MODEL == /* || $MODEL == ./* || $MODEL == ../* ]] && [[ ! -e $MODEL ]]; then
        die_usage "model folder '$MODEL' does not exist"
    fi
    if [[ -n $FSDP_CONFIG ]]; then
        (( ! deepspeed_given )) \
            || die_usage "--deepspeed and --fsdp both given: each shards the model its own way; choose one"
        (( DISTRIBUTED )) || die_usage "--fsdp shards the model over several ranks, and this launcher runs one" \
            "process: use finetune/finetune_ds.sh or finetune/finetune_lora_ds.sh"
        [[ -z ${NO_FSDP:-} ]] || die_usage "--fsdp is not available with this launcher: $NO_FSDP"
        FSDP_CONFIG=$(resolve_fsdp_config "$FSDP_CONFIG")
        DS_CONFIG=""
    elif [[ -n $DS_CONFIG ]]; then
        DS_CONFIG=$(resolve_ds_config "$DS_CONFIG")
    fi
}

# Fills LAUNCH_CMD with the command this node runs.
build_command() {
    local -a finetune_args=(
        --model_name_or_path "$MODEL"
        --data_path "$DATA"
        --output_dir "$OUTPUT_DIR"
        "${SHARED_RECIPE[@]}"
        "${RECIPE[@]}"
        "${PRECISION_ARGS[@]}"
    )
    if [[ -n $FSDP_CONFIG ]]; then
        finetune_args+=(--fsdp True --fsdp_config "$FSDP_CONFIG")
    elif [[ -n $DS_CONFIG ]]; then
        finetune_args+=(--deepspeed "$DS_CONFIG")
    fi
    if [[ -n ${RESUME:-} ]]; then  # before the user's arguments, which may override it
        finetune_args+=(--resume_from_checkpoint "$RESUME")
    fi
    finetune_args+=("${PASSTHROUGH_ARGS[@]}")

    if (( ! DISTRIBUTED )) && [[ -z $DS_CONFIG ]]; then
        LAUNCH_CMD=("$PYTHON" "$LLMFT_ENTRY" "${finetune_args[@]}")
    elif (( ! DISTRIBUTED )); then
        # DeepSpeed wants a process group, even of one rank.
        LAUNCH_CMD=("$PYTHON" -m llmft.launch --standalone --nproc_per_node 1
            "$LLMFT_ENTRY" "${finetune_args[@]}")
    elif [[ -n ${HOSTFILE:-} ]]; then
        [[ -f $HOSTFILE ]] || die_usage "HOSTFILE '$HOSTFILE' does not exist"
        # pdsh: its ranks start with RANK/LOCAL_RANK/WORLD_SIZE set (so no --local_rank argument is needed).
        # DeepSpeed's MPI and Slurm launchers set only MPI's variables, which transformers does not read: under MPI
        # or Slurm, run one launcher per node instead (mpirun -npernode 1 ..., slurm_finetune.sbatch).
        LAUNCH_CMD=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher pdsh --no_local_rank
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$LLMFT_ENTRY" "${finetune_args[@]}")
    else
        LAUNCH_CMD=("$PYTHON" -m llmft.launch
            --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
            "$LLMFT_ENTRY" "${finetune_args[@]}")
    fi
}

launcher_main() {
    parse_launcher_args "$@"
    detect_devices
    if (( ! DISTRIBUTED )); then
        GPUS_PER_NODE=1
        if (( ! USE_CPU )); then
            # Trainer wraps the model in nn.DataParallel when one process sees several GPUs: show it only the first.
            local first=${CUDA_VISIBLE_DEVICES:-0}
            export CUDA_VISIBLE_DEVICES=${first%%,*}
        fi
    fi
    build_command
    # The node's MPI rank is not a training rank: keep it from the ranks torchrun starts, which get their own.
    unset OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK OMPI_COMM_WORLD_LOCAL_SIZE PMI_RANK PMI_SIZE
    local where="node $NODE_RANK of $NNODES, $GPUS_PER_NODE rank(s) per node"
    if (( DISTRIBUTED )) && [[ -n ${HOSTFILE:-} ]]; then
        where="nodes and ranks from $HOSTFILE"
    fi
    if (( USE_CPU )); then
        where+=", on CPU in fp32 (gloo between ranks)"
    fi
    echo "[llmft] $where" >&2
    printf '+' >&2
    printf ' %q' "${LAUNCH_CMD[@]}" >&2
    echo >&2
    if (( DRY_RUN )); then
        exit 0
    fi
    exec "${LAUNCH_CMD[@]}"
}
