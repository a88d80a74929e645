#!/usr/bin/env bash
# Usage: tests/slurm_localhost.sh start|stop|status
# A Slurm cluster of two nodes, n1 and n2, on this one machine, for the tests that submit
# finetune/slurm_finetune.sbatch: munged, slurmctld, and one slurmd per node (slurmd -N), all talking over 127.0.0.1.
#   start    write /etc/slurm/slurm.conf, start what is not running, and wait until both nodes are idle; does nothing
#            when the cluster is already up with this configuration. Prints the daemons' logs if it cannot start.
#   stop     stop the daemons that start started (by their pid files)
#   status   print the daemons and the nodes; exit 0 when both nodes take jobs, else 3
#
# Example (as root; tools/install_system_deps.sh installs the packages, `make test` runs both):
#   tests/slurm_localhost.sh start && sbatch --wrap hostname && tests/slurm_localhost.sh status
#
# It writes the machine's own /etc/slurm/slurm.conf, because sbatch, srun and sinfo read that path unless SLURM_CONF
# says otherwise. It is the source of truth for that file: start overwrites any other and restarts the daemons with it.
# Environment: WAIT_S=${WAIT_S:-60} seconds that start waits for the nodes.
set -euo pipefail

WAIT_S=${WAIT_S:-60}
NODES=(n1 n2)
NODE_LIST="n[1-${#NODES[@]}]"
SLURM_CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGED_PID=/run/munge/munged.pid
SLURMCTLD_PID=/run/slurmctld.pid
PATH=$PATH:/usr/sbin:/sbin

die() {
    echo "slurm_localhost.sh: error: $*" >&2
    exit 1
}

# The configuration for this machine, on stdout.
slurm_conf() {
    local host cpus nodes
    host=$(hostname -s)
    # The node lines must not promise more CPUs than the machine has, or slurmctld refuses the nodes; slurmd -C
    # reports the machine's sockets, cores and threads. Each node gets them all: the two share the machine.
    cpus=$(slurmd -C 2> /dev/null | grep -o 'CPUs=.* ThreadsPerCore=[0-9]*' || true)
    [[ -n $cpus ]] || cpus="CPUs=$(nproc)"
    # Memory is not scheduled (CR_Core), and a node claiming more than the machine has would be refused.
    nodes="NodeName=$NODE_LIST NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-$(( 17000 + ${#NODES[@]} )) $cpus"
    nodes+=" RealMemory=1000 State=UNKNOWN"
    cat << CONF
# Written by tests/slurm_localhost.sh; overwritten by its next start.
ClusterName=llmft-localhost
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# No cgroups: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# A node that registers after a restart takes jobs again, without 'scontrol update'.
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmctldPidFile=$SLURMCTLD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
StateSaveLocation=$STATE_DIR/slurmctld
# Several slurmd on one host: %n (the node name) keeps their files apart; each listens on its own port.
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
$nodes
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

# The pid in PIDFILE when that process is alive and is COMMAND; fails otherwise (no file, or a stale one).
running_pid() {
    local pidfile=$1 command=$2 pid
    [[ -r $pidfile ]] || return 1
    read -r pid < "$pidfile" || return 1
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2> /dev/null) == "$command" ]] || return 1
    echo "$pid"
}

munge_works() {
    munge -n 2> /dev/null | unmunge > /dev/null 2>&1
}

controller_answers() {
    scontrol ping 2> /dev/null | grep -q 'is UP'
}

# How many of the nodes are up, and how many of those idle. sinfo marks a node that does not answer with '*'.
count_nodes() {
    local up=0 idle=0 node state
    while read -r node state; do
        case $state in
            idle) (( ++up, ++idle )) ;;
            mix | alloc | comp) (( ++up )) ;;
        esac
    done < <(sinfo -h -N -n "$NODE_LIST" -o '%N %t' 2> /dev/null || true)
    echo "$up $idle"
}

start_munged() {
    if munge_works; then
        return
    fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        # The machine's own secret, made here once; never part of the repository.
        if command -v mungekey > /dev/null; then
            mungekey --create --keyfile "$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0600 "$MUNGE_KEY"
    # munged refuses to run as root.
    runuser -u munge -- munged
    local waited
    for (( waited = 0; waited < 10; waited++ )); do
        munge_works && return
        sleep 1
    done
    return 1
}

# Starts those of slurmctld and the slurmd that are not running; they fork into the background once their
# configuration is read, so a failure here is a bad slurm.conf or state.
start_slurm_daemons() {
    install -d -m 0755 "$LOG_DIR" "$STATE_DIR/slurmctld"
    if ! running_pid "$SLURMCTLD_PID" slurmctld > /dev/null; then
        slurmctld || return 1
    fi
    local node
    for node in "${NODES[@]}"; do
        install -d -m 0755 "$STATE_DIR/slurmd-$node"
        if ! running_pid "/run/slurmd-$node.pid" slurmd > /dev/null; then
            slurmd -N "$node" || return 1
        fi
    done
}

# Waits up to WAIT_S seconds until every node is idle; fails when they are not by then.
wait_for_idle_nodes() {
    local deadline=$(( SECONDS + WAIT_S )) up idle resumed=0 stuck
    while (( SECONDS < deadline )); do
        read -r up idle < <(count_nodes)
        (( idle == ${#NODES[@]} )) && return 0
        # A node that answers but was left DOWN or DRAINED (by hand, or in an earlier run's state) stays so until
        # resumed; one that does not answer yet ('*') comes back by itself when its slurmd registers.
        if (( ! resumed )); then
            stuck=$(sinfo -h -N -n "$NODE_LIST" -o '%N %t' 2> /dev/null \
                | awk '$2 ~ /^(down|drain|drng|drained)$/ {printf "%s%s", sep, $1; sep = ","}' || true)
            if [[ -n $stuck ]]; then
                echo "slurm_localhost.sh: resuming $stuck"
                scontrol update nodename="$stuck" state=resume || true
                resumed=1
            fi
        fi
        sleep 1
    done
    return 1
}

show_logs() {
    local log node logs=("$LOG_DIR/slurmctld.log")
    for node in "${NODES[@]}"; do
        logs+=("$LOG_DIR/slurmd-$node.log")
    done
    logs+=(/var/log/munge/munged.log)
    echo "slurm_localhost.sh: the nodes:" >&2
    sinfo -N -l >&2 2>&1 || true
    for log in "${logs[@]}"; do
        [[ -r $log ]] || continue
        echo "--- tail of $log" >&2
        tail -n 25 "$log" >&2
    done
}

cluster_ready() {
    local up idle
    munge_works || return 1
    controller_answers || return 1
    read -r up idle < <(count_nodes)
    (( up == ${#NODES[@]} ))
}

start() {
    (( EUID == 0 )) || die "start needs root (Slurm runs as root here, and munged as user munge)"
    local daemon
    for daemon in munged slurmctld slurmd; do
        command -v "$daemon" > /dev/null || die "$daemon is not installed; run tools/install_system_deps.sh first"
    done
    local conf
    conf=$(slurm_conf)
    if [[ -f $SLURM_CONF && $(< "$SLURM_CONF") == "$conf" ]] && cluster_ready; then
        echo "slurm_localhost.sh: already running: nodes $NODE_LIST"
        return 0
    fi
    if [[ ! -f $SLURM_CONF || $(< "$SLURM_CONF") != "$conf" ]]; then
        # Daemons started with another configuration would keep it, and slurmctld refuses the saved state of another
        # cluster (and would bring back its nodes and jobs): a test cluster starts afresh.
        stop > /dev/null
        rm -rf "${STATE_DIR:?}/slurmctld"
        install -d -m 0755 "$(dirname "$SLURM_CONF")"
        printf '%s\n' "$conf" > "$SLURM_CONF"
    fi
    local start=$SECONDS
    if ! start_munged; then
        show_logs
        die "munged did not start"
    fi
    if ! start_slurm_daemons; then
        show_logs
        die "slurmctld or slurmd did not start"
    fi
    if ! wait_for_idle_nodes; then
        show_logs
        die "the nodes $NODE_LIST were not idle after ${WAIT_S}s"
    fi
    echo "slurm_localhost.sh: nodes $NODE_LIST idle after $(( SECONDS - start ))s"
}

# Stops one daemon by its pid file: TERM, then KILL after 10 s.
stop_daemon() {
    local pidfile=$1 command=$2 pid waited
    pid=$(running_pid "$pidfile" "$command") || return 0
    kill "$pid"
    for (( waited = 0; waited < 20; waited++ )); do
        [[ -d /proc/$pid ]] || { echo "slurm_localhost.sh: stopped $command ($pid)"; return 0; }
        sleep 0.5
    done
    kill -KILL "$pid" 2> /dev/null || true
    echo "slurm_localhost.sh: killed $command ($pid)"
}

stop() {
    local node
    for node in "${NODES[@]}"; do
        stop_daemon "/run/slurmd-$node.pid" slurmd
    done
    stop_daemon "$SLURMCTLD_PID" slurmctld
    stop_daemon "$MUNGED_PID" munged
}

# One line: NAME running (PID), or NAME not running.
print_daemon() {
    local name=$1 pid
    if pid=$(running_pid "$2" "$3"); then
        printf '%-10s running (%s)\n' "$name" "$pid"
    else
        printf '%-10s not running\n' "$name"
    fi
}

status() {
    local node
    print_daemon munged "$MUNGED_PID" munged
    print_daemon slurmctld "$SLURMCTLD_PID" slurmctld
    for node in "${NODES[@]}"; do
        print_daemon "slurmd $node" "/run/slurmd-$node.pid" slurmd
    done
    if controller_answers; then
        sinfo -N -n "$NODE_LIST"
    fi
    cluster_ready || return 3
}

case ${1:-} in
    start | stop | status) "$1" ;;
    -h | --help) sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p' ;;
    *)
        echo "slurm_localhost.sh: error: expected start, stop or status${1:+, got \"$1\"}" >&2
        echo "Try 'tests/slurm_localhost.sh --help'." >&2
        exit 2 ;;
esac
