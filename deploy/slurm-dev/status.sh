#!/usr/bin/env bash
# Is the dev Slurm cluster of a release up? Prints one line per daemon;
# exit 0 when every daemon is healthy and the node can run jobs, 1 otherwise.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

load_release "${1:-22.05}"
[[ $(id -u) -eq 0 ]] || die "must run as root"

if [[ $MODE == chroot ]] && ! is_mounted "$ROOT/proc"; then
    echo "$RELEASE: down (chroot $ROOT not mounted)"
    exit 1
fi

ok=0
for name in "${DAEMONS[@]}"; do
    if "healthy_$name"; then
        printf '  %-11s ok   (pid %s)\n' "$name" "$(pids_of "$name" | tr '\n' ' ')"
    elif is_running "$name"; then
        printf '  %-11s UNHEALTHY (pid %s; log %s)\n' "$name" "$(pids_of "$name" | tr '\n' ' ')" "$(log_path "$name")"
        ok=1
    else
        printf '  %-11s DOWN (log %s)\n' "$name" "$(log_path "$name")"
        ok=1
    fi
done
if ((ok == 0)); then
    echo "$RELEASE: up (cluster $CLUSTER, node $NODE $(node_state))"
else
    echo "$RELEASE: not (fully) up — deploy/slurm-dev/up.sh $RELEASE"
fi
exit "$ok"
