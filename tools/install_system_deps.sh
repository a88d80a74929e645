#!/usr/bin/env bash
# Usage: tools/install_system_deps.sh [-h]
# Installs from the system's apt what the MPI and Slurm launcher tests need: Open MPI (mpirun, and the headers a later
# 'pip install mpi4py' builds against) and the daemons and commands of a one-machine Slurm cluster (with munge, its
# authentication). tests/slurm_localhost.sh then starts that cluster; `make test` runs both.
#
# Example:
#   sudo tools/install_system_deps.sh && sudo tests/slurm_localhost.sh start
#
# Safe to re-run: when every package is installed it returns at once, without asking apt anything. Without root or
# without apt-get it installs nothing, says that the MPI and Slurm tests will be skipped, and exits 0, so that
# `make test` still runs everywhere else.
set -euo pipefail

if (( $# )); then
    if [[ $1 == -h || $1 == --help ]]; then
        sed -n '/^# Usage:/,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -n 's/^# \{0,1\}//p'
        exit 0
    fi
    echo "install_system_deps.sh: error: unexpected argument '$1'" >&2
    echo "Try 'tools/install_system_deps.sh --help'." >&2
    exit 2
fi

# slurm-wlm is the metapackage of slurmctld + slurmd + slurm-client; they are named too so that a half-removed set is
# completed. munge comes with slurmd, and is named because tests/slurm_localhost.sh starts munged itself.
PACKAGES=(openmpi-bin libopenmpi-dev slurm-wlm slurmctld slurmd slurm-client munge)

missing=()
for package in "${PACKAGES[@]}"; do
    if [[ $(dpkg-query -W -f '${db:Status-Status}' "$package" 2> /dev/null) != installed ]]; then
        missing+=("$package")
    fi
done
if (( ${#missing[@]} == 0 )); then
    echo "install_system_deps.sh: Open MPI and Slurm are installed"
    exit 0
fi

skip_because() {
    echo "install_system_deps.sh: $1; not installing ${missing[*]}." >&2
    echo "install_system_deps.sh: tests that need mpirun or a Slurm cluster skip themselves without them." >&2
    exit 0
}
(( EUID == 0 )) || skip_because "not root (run 'sudo $0' to install)"
command -v apt-get > /dev/null || skip_because "no apt-get on this system"

export DEBIAN_FRONTEND=noninteractive
echo "install_system_deps.sh: installing ${missing[*]} from apt"
start=$SECONDS
# Fresh images ship without package lists. A source that cannot be reached only warns; install then says if it matters.
apt-get update -q -o Acquire::Retries=3 || echo "install_system_deps.sh: apt-get update failed; trying the install anyway" >&2
# Recommends would add some 36 packages the tests do not use (Fortran coarrays, every Slurm plugin, their headers).
apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}"
echo "install_system_deps.sh: installed in $(( SECONDS - start )) s"
