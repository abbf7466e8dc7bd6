#!/usr/bin/env bash
# Stop the dev Slurm cluster of a release: only what up.sh started. Packages
# stay installed, state (keys, database, chroot cache) stays for the next up.
# A MariaDB that was already running is never touched; one that up.sh started
# is stopped only when no dev cluster of any release is still up.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

load_release "${1:-22.05}"
[[ $(id -u) -eq 0 ]] || die "must run as root"
T0=$SECONDS

if [[ -d $STATE ]]; then
    exec 9>"$STATE/.lock"
    flock -w 120 9 || die "another up/down of $RELEASE holds $STATE/.lock"
fi

# Daemons in reverse start order.
for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    name=${DAEMONS[i]}
    if is_ours "$name"; then
        stop_daemon "$name"
        rm -f "$STATE/started/$name"
    elif is_running "$name"; then
        log "leaving $name alone (it was running before up.sh)"
    fi
done

if [[ $MODE == host ]]; then
    # Job step daemons of our slurmd (only our cluster runs slurmd on the host).
    mapfile -t steps < <(pids_of slurmstepd)
    ((${#steps[@]})) && kill_and_wait 5 "${steps[@]}"
else
    # Empty the chroot: anything still running in it (sshd sessions, job
    # processes) keeps its mounts busy.
    mapfile -t rest < <(all_pids_in_root)
    if ((${#rest[@]})); then
        names=$(for p in "${rest[@]}"; do cat "/proc/$p/comm" 2>/dev/null; done | sort | uniq -c | xargs)
        log "stopping ${#rest[@]} remaining process(es) in $ROOT: $names"
        kill_and_wait 5 "${rest[@]}"
    fi
    # Unmount in reverse order. Never delete anything here: $ROOT/dev is the
    # host's /dev while mounted.
    read -r -a mounts <<<"$(chroot_mounts)"
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        m=${mounts[i]}
        is_mounted "$m" || continue
        umount "$m" 2>/dev/null || { log "umount $m busy; detaching lazily"; umount -l "$m"; }
    done
    if anything_mounted_under "$ROOT"; then
        awk -v d="$ROOT" 'index($5, d) == 1 {print "  still mounted: " $5}' /proc/self/mountinfo >&2
        die "mounts left under $ROOT"
    fi
fi

[[ -f $GEN_DIR/info.json ]] && write_info false

# MariaDB: only if we started it, and only when no dev cluster still needs it.
if [[ -f $AIFA_DEV_BASE/mariadb.started-by-us ]]; then
    others_up=0
    for rel in 22.05 24.11 26.05; do
        [[ $rel == "$RELEASE" ]] && continue
        ( load_release "$rel"; is_running slurmdbd ) && others_up=1
    done
    if ((others_up == 0)); then
        mapfile -t db < <(ROOT=/ pids_of mariadbd)
        if ((${#db[@]})); then
            log "stopping MariaDB (started by up.sh)"
            kill_and_wait 30 "${db[@]}"
        fi
        rm -f "$AIFA_DEV_BASE/mariadb.started-by-us"
    else
        log "leaving MariaDB running (another dev cluster uses it)"
    fi
fi

log "down in $((SECONDS - T0))s"
