#!/usr/bin/env bash
# Installs what tests/e2e/test_slurm.py needs to run a real one-node SLURM cluster on this machine:
# Debian's slurm-wlm (slurmctld, slurmd, sbatch/srun/squeue/scontrol/sacct) and munge (Debian 12: Slurm 22.05).
#
#     sudo launch/ci/install_slurm.sh          # called from .ci/run; idempotent, quiet, ~2 min the first time
#
# Only installs: no daemon is started and nothing under /etc is configured here. The test fixture
# (tests/e2e/slurm_cluster.py) writes its own munge key, slurm.conf and state directories under a temp dir,
# starts munged/slurmctld/slurmd itself and stops them by PID. Where this script cannot install (no root,
# no apt, no network) it says so and exits 0: the SLURM tests then skip with the reason.
set -uo pipefail

# sbatch --version needs a reachable config; ask dpkg instead.
_version() { dpkg-query -W -f='slurm ${Version}' slurmctld 2>/dev/null || echo "slurm version unknown"; }

need=(sbatch srun squeue scontrol sacct slurmctld slurmd munged)
missing=()
for bin in "${need[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || missing+=("$bin")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_slurm: slurm and munge already installed ($(_version))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm: missing ${missing[*]} and not root; the SLURM e2e tests will skip" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: missing ${missing[*]} and no apt-get; the SLURM e2e tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
start=$SECONDS
log=$(mktemp /tmp/install_slurm.XXXXXX.log)
# Do not let the packages' maintainer scripts start the daemons with the stock config: the test starts its own.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
ok=1
# apt-get update only when the package lists do not know slurm-wlm yet (fresh containers have no lists).
if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
    apt-get update -qq >>"$log" 2>&1 || ok=0
fi
if [[ $ok == 1 ]]; then
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >>"$log" 2>&1 || ok=0
fi
if [[ $ok == 0 ]]; then
    echo "install_slurm: apt-get failed (log: $log); the SLURM e2e tests will skip:" >&2
    tail -n 20 "$log" >&2
    exit 0
fi
echo "install_slurm: installed slurm-wlm + munge in $((SECONDS - start)) s ($(_version))"
rm -f "$log"
