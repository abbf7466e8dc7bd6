#!/usr/bin/env bash
# Stop or start one daemon of a running dev cluster, e.g. for tests that need
# "slurmctld stopped during tracking":
#
#   deploy/slurm-dev/ctl.sh 22.05 stop-slurmctld
#   deploy/slurm-dev/ctl.sh 22.05 start-slurmctld    # returns once it answers
#
# Daemons: munged slurmdbd slurmctld slurmd slurmrestd sshd;
# actions: stop-X, start-X, restart-X.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

load_release "${1:-}"
action=${2:-}
verb=${action%%-*}
name=${action#*-}
usage() { echo "usage: $(basename "$0") RELEASE stop-|start-|restart-{${DAEMONS[*]}}" >&2; exit 2; }
case " ${DAEMONS[*]} " in *" $name "*) ;; *) usage ;; esac
case $verb in stop|start|restart) ;; *) usage ;; esac
[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ -d $STATE ]] || die "the $RELEASE cluster was never brought up (run up.sh $RELEASE)"
if [[ $MODE == chroot ]] && ! is_mounted "$ROOT/proc"; then
    die "the $RELEASE cluster is not up (run up.sh $RELEASE)"
fi
# Not while up.sh/down.sh of this release runs (launch closes this fd for daemons).
exec 9>"$STATE/.lock"
flock -w 120 9 || die "another up/down of $RELEASE holds $STATE/.lock"

do_start() {
    if "healthy_$name"; then log "$name already running"; return 0; fi
    stop_daemon "$name"          # a hung or half-dead one
    "start_$name"
    # Job tracking needs the node back, not only the process.
    case $name in slurmd|slurmctld) wait_node_idle ;; esac
}

case $verb in
    stop)    stop_daemon "$name" ;;
    start)   do_start ;;
    restart) stop_daemon "$name"; do_start ;;
esac
