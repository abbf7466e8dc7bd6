# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this file
# Shared helpers for the dev Slurm clusters (sourced by up.sh, down.sh, status.sh,
# ctl.sh, run-in, can-run.sh). Not meant to be executed on its own.
#
# Model: every release has a "root" (the host's / for 22.05, a debootstrapped
# chroot for 24.11 / 26.05) and a state directory on the host
# (/var/lib/aifa-slurm-dev/<release>). For chroot releases the state directory is
# bind-mounted into the chroot at the same path, so every path written into a
# config file means the same thing inside and outside the chroot (logs, keys,
# spool).

AIFA_DEV_BASE=${AIFA_DEV_BASE:-/var/lib/aifa-slurm-dev}
SLURM_DEV_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Daemons we manage, in start order. munged first, sshd last.
DAEMONS=(munged slurmdbd slurmctld slurmd slurmrestd sshd)

log()  { printf '[slurm-dev %s] %s\n' "${RELEASE:-?}" "$*" >&2; }
die()  { log "ERROR: $*"; exit 1; }

# load_release RELEASE: sets the per-release variables everything else uses.
load_release() {
    RELEASE=${1:-}
    case "$RELEASE" in
        22.05)
            MODE=host;   SUITE=bookworm; CLUSTER=dev2205
            CTLD_PORT=6817; SLURMD_PORT=6818; DBD_PORT=6819
            REST_PORT=6820; SSH_PORT=2222 ;;
        24.11)
            MODE=chroot; SUITE=trixie;   CLUSTER=dev2411
            CTLD_PORT=6827; SLURMD_PORT=6828; DBD_PORT=6829
            REST_PORT=6821; SSH_PORT=2224 ;;
        26.05)
            MODE=chroot; SUITE=sid;      CLUSTER=dev2605
            CTLD_PORT=6837; SLURMD_PORT=6838; DBD_PORT=6839
            REST_PORT=6822; SSH_PORT=2226 ;;
        *) echo "usage: $(basename "$0") 22.05|24.11|26.05 ..." >&2; exit 2 ;;
    esac
    STATE=$AIFA_DEV_BASE/$RELEASE
    NODE=${CLUSTER}n1
    DB_NAME=slurm_acct_${CLUSTER}
    DB_USER=slurm_${CLUSTER}
    GEN_DIR=$SLURM_DEV_DIR/generated/$RELEASE
    if [[ $MODE == host ]]; then
        ROOT=/; RP=""           # RP: prefix that turns an in-root path into a host path
    else
        ROOT=$AIFA_DEV_BASE/chroots/$SUITE; RP=$ROOT
    fi
    if [[ $MODE == host ]]; then
        RT_PREFIX=(env -u SLURM_CONF)
    else
        RT_PREFIX=(chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin
                   HOME=/root LANG=C.UTF-8 TERM=dumb)
    fi
}

# rt CMD...: run a command inside the release's root, as root, with a clean
# environment (a stray SLURM_CONF from the caller must not leak in).
# RT_PREFIX is the same as an argv prefix, for setsid/exec.
rt() { "${RT_PREFIX[@]}" "$@"; }

# pids_of NAME: live processes (not zombies) whose command name is NAME and whose
# root directory is this release's root. Pidfiles go stale on 24.11+ (reconfigure
# re-executes daemons under new PIDs), so /proc is the source of truth.
pids_of() {
    local name=$1 want_root p comm root stat rest
    want_root=$(readlink -f "$ROOT")
    for p in /proc/[0-9]*; do
        # Builtins only until the name matches: this runs over every process.
        read -r comm 2>/dev/null <"$p/comm" || continue
        [[ $comm == "$name" ]] || continue
        root=$(readlink "$p/root" 2>/dev/null) || continue
        [[ $root == "$want_root" ]] || continue
        # Field 3 of stat is the state; orphans linger as Z for a moment.
        read -r _ _ stat rest 2>/dev/null <"$p/stat" || continue
        [[ $stat == Z ]] && continue
        # sshd: only the listener started with our config (not per-connection
        # children, not another sshd on the host).
        if [[ $name == sshd ]]; then
            tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q -- "-f $STATE/ssh/sshd_config" || continue
        fi
        echo "${p#/proc/}"
    done
}

is_running() { [[ -n $(pids_of "$1") ]]; }

# all_pids_in_root: every live process whose root is the chroot (chroot releases
# only) — used to empty the chroot before unmounting.
all_pids_in_root() {
    local want_root p root stat rest
    want_root=$(readlink -f "$ROOT")
    [[ $want_root == / ]] && return 0
    for p in /proc/[0-9]*; do
        root=$(readlink "$p/root" 2>/dev/null) || continue
        [[ $root == "$want_root" ]] || continue
        read -r _ _ stat rest 2>/dev/null <"$p/stat" || continue
        [[ $stat == Z ]] && continue
        echo "${p#/proc/}"
    done
}

# kill_and_wait SECONDS PID...: TERM, wait, then KILL what is left.
kill_and_wait() {
    local timeout=$1; shift
    local pids=("$@") p alive i
    [[ ${#pids[@]} -eq 0 ]] && return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        alive=()
        for p in "${pids[@]}"; do
            if [[ -d /proc/$p ]] && [[ $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) != Z ]]; then
                alive+=("$p")
            fi
        done
        [[ ${#alive[@]} -eq 0 ]] && return 0
        sleep 0.1
    done
    log "still alive after ${timeout}s, killing: $(for p in "${alive[@]}"; do printf '%s(%s) ' "$(cat "/proc/$p/comm" 2>/dev/null)" "$p"; done)"
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

stop_daemon() {
    local name=$1 pids
    mapfile -t pids < <(pids_of "$name")
    [[ ${#pids[@]} -eq 0 ]] && return 0
    log "stopping $name (pid ${pids[*]})"
    kill_and_wait 15 "${pids[@]}"
}

# wait_for SECONDS DESCRIPTION CMD...: poll CMD until it succeeds.
wait_for() {
    local timeout=$1 what=$2; shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${timeout}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Health probes, one per daemon.
healthy_munged()     { is_running munged && rt sh -c 'munge -n | unmunge' >/dev/null 2>&1; }
healthy_slurmdbd()   { is_running slurmdbd && rt sacctmgr -nP show cluster format=cluster >/dev/null 2>&1; }
healthy_slurmctld()  { is_running slurmctld && rt scontrol ping 2>/dev/null | grep -q 'is UP'; }
# 23.02+ shows PLANNED while the backfill scheduler holds the node for a pending job
# (e.g. one waiting for GPUs): the node is healthy and running jobs then.
healthy_slurmd()     { is_running slurmd && [[ $(node_state) =~ ^(idle|mixed|allocated|completing|planned) ]]; }
healthy_slurmrestd() { is_running slurmrestd && port_open "$REST_PORT"; }
healthy_sshd()       { is_running sshd && port_open "$SSH_PORT"; }

node_state() { rt sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }

log_path() {
    case $1 in
        # munged insists on a log dir it owns, below root-owned dirs only.
        munged) echo "$STATE/munge/munged.log" ;;
        *) echo "$STATE/log/$1.log" ;;
    esac
}

# Print the last lines of a daemon's log in the state dir (used on failure).
show_log() {
    local f
    f=$(log_path "$1")
    if [[ -f $f ]]; then
        log "---- last lines of $f ----"
        tail -n "${2:-25}" "$f" >&2
        log "---- end of $f ----"
    else
        log "(no log at $f)"
    fi
}

# Mount points of the chroot, in mount order (unmount in reverse).
chroot_mounts() {
    echo "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" "$ROOT/dev/pts" "$ROOT/dev/shm" "$ROOT/run" "$ROOT$STATE"
}

is_mounted() { awk -v m="$1" '$5 == m {f=1} END {exit !f}' /proc/self/mountinfo; }

# Anything mounted at or below DIR?
anything_mounted_under() {
    awk -v d="$1" '$5 == d || index($5, d "/") == 1 {f=1} END {exit !f}' /proc/self/mountinfo
}

write_info() {
    local up=$1
    mkdir -p "$GEN_DIR"
    # shellcheck disable=SC2016  # a dpkg-query format, not a shell expansion
    : "${SLURM_VERSION:=$(rt dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || true)}"
    cat >"$GEN_DIR/info.json.tmp" <<EOF
{
  "release": "$RELEASE",
  "cluster_name": "$CLUSTER",
  "mode": "$MODE",
  "suite": "$SUITE",
  "slurm_version": "${SLURM_VERSION:-}",
  "root": "$ROOT",
  "state_dir": "$STATE",
  "node": "$NODE",
  "partitions": ["cpu", "gpu"],
  "default_partition": "cpu",
  "gpus_per_node": 4,
  "users": ["alice", "bob"],
  "accounts": {"proj-a": ["alice", "bob"], "proj-b": ["bob"]},
  "ports": {"slurmctld": $CTLD_PORT, "slurmd": $SLURMD_PORT, "slurmdbd": $DBD_PORT, "slurmrestd": $REST_PORT, "sshd": $SSH_PORT},
  "run_in": "$SLURM_DEV_DIR/run-in $RELEASE",
  "definitions": {"slurm_ssh": "$GEN_DIR/slurm_ssh.toml", "slurm_rest": "$GEN_DIR/slurm_rest.toml"},
  "up": $up,
  "updated_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
    mv "$GEN_DIR/info.json.tmp" "$GEN_DIR/info.json"
}

# ------------------------------------------------- starting the daemons --
start_failed() {  # start_failed NAME: show what we know, then exit
    show_log "$1" 40
    [[ -s $STATE/log/$1.start.log ]] && { log "---- $STATE/log/$1.start.log ----"; tail -n 20 "$STATE/log/$1.start.log" >&2; }
    die "$1 did not become healthy"
}

# Which daemons up.sh started itself: down.sh stops only those on the host (a
# munged that was already running, say, is left alone).
mark_ours() { mkdir -p "$STATE/started"; touch "$STATE/started/$1"; }
is_ours() { [[ $MODE == chroot || -e $STATE/started/$1 ]]; }

# wait_healthy SECONDS NAME: until healthy_NAME; give up early when the daemon
# is gone (after a grace period: it may still be forking/exec'ing).
wait_healthy() {
    local timeout=$1 name=$2 t0=$SECONDS
    until "healthy_$name" >/dev/null 2>&1; do
        if ((SECONDS - t0 >= timeout)) || { ((SECONDS - t0 >= 3)) && ! is_running "$name"; }; then
            start_failed "$name"
        fi
        sleep 0.2
    done
}

launch() {  # launch NAME CMD...: start a daemon in the root, detached from us
    local name=$1; shift
    log "starting $name"
    mark_ours "$name"
    # setsid -f: own session, no inherited terminal; fds away from our caller's
    # pipes so `make slurm-up | tee` does not hang on the daemons.
    # 9>&-: the daemon must not inherit (and so hold) our lock.
    setsid -f "${RT_PREFIX[@]}" "$@" </dev/null >"$STATE/log/$name.start.log" 2>&1 9>&-
}

start_munged() {
    launch munged runuser -u munge -- /usr/sbin/munged --log-file="$(log_path munged)"
    wait_healthy 20 munged
}
start_slurmdbd() {
    launch slurmdbd /usr/sbin/slurmdbd
    wait_healthy 60 slurmdbd
}
start_slurmctld() {
    launch slurmctld /usr/sbin/slurmctld
    wait_healthy 30 slurmctld
}
start_slurmd() {
    launch slurmd /usr/sbin/slurmd -N "$NODE"
    wait_for 30 slurmd is_running slurmd || start_failed slurmd
}
start_slurmrestd() {
    # slurmrestd stays in the foreground: its output is its log.
    log "starting slurmrestd"
    mark_ours slurmrestd
    setsid -f "${RT_PREFIX[@]}" env SLURM_JWT=daemon /usr/sbin/slurmrestd \
        -u slurmrestd -g slurmrestd -a rest_auth/jwt "127.0.0.1:$REST_PORT" \
        </dev/null >>"$STATE/log/slurmrestd.log" 2>&1 9>&-
    wait_healthy 20 slurmrestd
}
start_sshd() {
    rt /usr/sbin/sshd -t -f "$STATE/ssh/sshd_config" || die "sshd config test failed"
    launch sshd /usr/sbin/sshd -f "$STATE/ssh/sshd_config" -E "$STATE/log/sshd.log"
    wait_healthy 20 sshd
}

# ensure NAME FORCE_RESTART: leave a healthy daemon alone unless its config
# changed; otherwise (re)start it.
ensure() {
    local name=$1 force=${2:-0}
    if ((force == 0)) && "healthy_$name"; then
        return 0
    fi
    stop_daemon "$name"
    "start_$name"
    STARTED+=("$name")
}

wait_node_idle() {
    local deadline=$((SECONDS + 40)) st resumed=0
    while :; do
        st=$(node_state || true)
        case $st in
            idle|mixed|allocated|completing) return 0 ;;
            drain*|down*|fail*)
                # e.g. after one bad registration; ReturnToService does not undrain.
                if ((resumed == 0)); then
                    log "node $NODE is $st; resuming it"
                    rt scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        if ((SECONDS >= deadline)); then
            rt sinfo -N -l >&2 || true
            show_log slurmd 30; show_log slurmctld 30
            die "node $NODE not idle (state: ${st:-?})"
        fi
        sleep 0.2
    done
}

