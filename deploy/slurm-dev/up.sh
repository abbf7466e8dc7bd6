#!/usr/bin/env bash
# shellcheck disable=SC2016  # dpkg-query ${...} formats are literal on purpose
# Bring up a single-node dev Slurm cluster of the given release (idempotent).
#
#   deploy/slurm-dev/up.sh 22.05   # on the host, Debian 12 packages
#   deploy/slurm-dev/up.sh 24.11   # in a Debian trixie chroot
#   deploy/slurm-dev/up.sh 26.05   # in a Debian sid chroot
#
# Needs root on Debian. Installs packages only when missing, restarts only the
# daemons that are unhealthy or whose config changed, waits until the node is
# idle and accounting answers, then writes the cluster definitions to
# deploy/slurm-dev/generated/<release>/.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

load_release "${1:-22.05}"
[[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo $0 $RELEASE)"
T0=$SECONDS

SLURM_PKGS=(slurmctld slurmd slurm-client slurmdbd slurmrestd slurm-wlm-jwt-plugin munge openssh-server)
MIRROR=${AIFA_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_SHORT=$(hostname -s)

mkdir -p "$AIFA_DEV_BASE" "$STATE" "$STATE/log"
chmod 0755 "$AIFA_DEV_BASE" "$STATE"
# One up/down at a time per release.
exec 9>"$STATE/.lock"
flock -w 300 9 || die "another up/down of $RELEASE holds $STATE/.lock"
# The daemons inherit this directory as theirs: never the caller's (a CI clone, a
# worktree), which may be deleted while they run — slurmrestd 22.05 then dies at its
# next job submission ("getcwd failed: No such file or directory"). Paths here are absolute.
cd /

# ---------------------------------------------------------------- packages --
missing_pkgs() {  # missing_pkgs PKG... (checked inside the release's root)
    local p
    for p in "$@"; do
        rt dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

apt_in_root() {  # apt_in_root PKG...: install with apt inside the root
    local policy=$RP/usr/sbin/policy-rc.d ours=0
    # Package scripts must not start services (there is no init system here and
    # in a chroot they would start with the wrong config); policy-rc.d says no.
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 0755 "$policy"; ours=1
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -y
               -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold)
    local alog=$STATE/log/apt.log
    : >"$alog"
    # Empty package lists (fresh debootstrap) need an update first.
    if ! compgen -G "$RP/var/lib/apt/lists/*_Packages*" >/dev/null; then
        rt "${apt[@]}" update >>"$alog" 2>&1 || { tail -n 20 "$alog" >&2; die "apt-get update failed (log $alog)"; }
    fi
    if ! rt "${apt[@]}" install --no-install-recommends "$@" >>"$alog" 2>&1; then
        log "apt-get install failed; refreshing package lists and retrying"
        rt "${apt[@]}" update >>"$alog" 2>&1 || true
        rt "${apt[@]}" install --no-install-recommends "$@" >>"$alog" 2>&1 \
            || { tail -n 20 "$alog" >&2; die "apt-get install $* failed (log $alog)"; }
    fi
    if ((ours)) && [[ $MODE == host ]]; then rm -f "$policy"; fi
}

ensure_packages() {
    local need=("${SLURM_PKGS[@]}") missing
    [[ $MODE == chroot ]] && need+=(ca-certificates)
    mapfile -t missing < <(missing_pkgs "${need[@]}")
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        local t=$SECONDS
        apt_in_root "${missing[@]}"
        log "apt took $((SECONDS - t))s (log $STATE/log/apt.log)"
    fi
    local v
    v=$(rt dpkg-query -W -f='${Version}' slurmctld)
    [[ $v == "$RELEASE".* ]] || die "$SUITE now carries Slurm $v, not $RELEASE (see deploy/slurm-dev/lib.sh)"
    SLURM_VERSION=$v
}

# ----------------------------------------------------------------- chroots --
ensure_chroot() {
    [[ $MODE == chroot ]] || return 0
    local marker=$ROOT/.aifa-bootstrap-complete
    if [[ ! -f $marker ]]; then
        # A leftover half-bootstrapped tree: only ever remove it when nothing is
        # mounted inside (its dev/ could be the host's /dev).
        if [[ -e $ROOT ]]; then
            anything_mounted_under "$ROOT" && die "$ROOT is incomplete but has mounts; run down.sh $RELEASE first"
            log "removing incomplete chroot $ROOT"
            rm -rf --one-file-system "$ROOT"
        fi
        if ! command -v debootstrap >/dev/null; then
            log "installing debootstrap on the host"
            DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
                install --no-install-recommends debootstrap >&2
        fi
        log "debootstrap --variant=minbase $SUITE $ROOT (cached for next time)"
        mkdir -p "$(dirname "$ROOT")"
        local t=$SECONDS
        debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$AIFA_DEV_BASE/debootstrap-$SUITE.log" 2>&1 \
            || { tail -n 30 "$AIFA_DEV_BASE/debootstrap-$SUITE.log" >&2; die "debootstrap $SUITE failed"; }
        printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
        chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
        touch "$marker"
        log "debootstrap took $((SECONDS - t))s"
    fi
    # Name resolution inside the chroot (apt, and the host name in slurm.conf).
    cp -f /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    cp -f /etc/hosts "$ROOT/etc/hosts"
    mount_chroot
}

mount_chroot() {
    mkdir -p "$ROOT$STATE"
    is_mounted "$ROOT/proc"    || mount -t proc proc "$ROOT/proc"
    is_mounted "$ROOT/sys"     || mount --bind /sys "$ROOT/sys"
    is_mounted "$ROOT/dev"     || mount --bind /dev "$ROOT/dev"
    is_mounted "$ROOT/dev/pts" || mount --bind /dev/pts "$ROOT/dev/pts"
    is_mounted "$ROOT/dev/shm" || mount --bind /dev/shm "$ROOT/dev/shm"
    # A private /run: sharing the host's makes munge sockets and pidfiles collide.
    is_mounted "$ROOT/run"     || mount -t tmpfs -o mode=0755,size=64m tmpfs "$ROOT/run"
    # The state dir at the same path inside, so config paths mean the same.
    is_mounted "$ROOT$STATE"   || mount --bind "$STATE" "$ROOT$STATE"
}

# ------------------------------------------------------------------ MariaDB --
mysql_root() {
    if mysql -u root -e 'SELECT 1' >/dev/null 2>&1; then
        mysql -u root "$@"          # unix socket (Debian's default root auth)
    else
        mysql -h 127.0.0.1 -P 3306 -u root "$@"
    fi
}

ensure_mariadb() {
    if ! command -v mysql >/dev/null; then
        log "installing mariadb-client on the host (to create the accounting database)"
        DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
            install --no-install-recommends mariadb-client >&2
    fi
    if port_open 3306; then return 0; fi
    # Not running: start our own, and remember that we did (down.sh stops only
    # a MariaDB that up.sh started, and only when no dev cluster uses it).
    if [[ ! -x /usr/sbin/mariadbd ]]; then
        log "installing mariadb-server on the host"
        DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 \
            install --no-install-recommends mariadb-server mariadb-client >&2
    fi
    log "starting MariaDB (was not running)"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    setsid -f /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --port=3306 \
        --innodb-buffer-pool-size=1024M --innodb-lock-wait-timeout=900 \
        </dev/null >>"$AIFA_DEV_BASE/mariadb.log" 2>&1 9>&-
    echo "started by deploy/slurm-dev/up.sh $RELEASE at $(date -u +%FT%TZ)" >"$AIFA_DEV_BASE/mariadb.started-by-us"
    wait_for 60 "MariaDB on 127.0.0.1:3306" port_open 3306 \
        || { tail -n 30 "$AIFA_DEV_BASE/mariadb.log" >&2; die "MariaDB did not start"; }
}

ensure_database() {
    local h sql=""
    [[ -s $STATE/db_password ]] || (umask 077; openssl rand -hex 16 >"$STATE/db_password")
    if [[ ! -e $STATE/spool/ctld/job_state && ! -e $STATE/spool/ctld/job_state.old ]] \
        && ! is_running slurmdbd; then
        # slurmctld has no saved state (new or wiped state dir): its job ids
        # restart at 1, so accounting from an earlier life would give duplicate
        # job ids. Start accounting afresh too.
        sql+="DROP DATABASE IF EXISTS \`$DB_NAME\`;"
    fi
    DB_PASS=$(cat "$STATE/db_password")
    sql+="CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;"
    for h in 127.0.0.1 localhost; do
        sql+="CREATE USER IF NOT EXISTS '$DB_USER'@'$h' IDENTIFIED BY '$DB_PASS';"
        sql+="ALTER USER '$DB_USER'@'$h' IDENTIFIED BY '$DB_PASS';"
        sql+="GRANT ALL PRIVILEGES ON \`$DB_NAME\`.* TO '$DB_USER'@'$h';"
    done
    mysql_root -e "$sql" || die "could not create database $DB_NAME / user $DB_USER in MariaDB"
}

# ------------------------------------------------------- users, keys, files --
ensure_user() {  # ensure_user NAME PREFERRED_UID
    local name=$1 uid=$2
    if ! rt getent passwd "$name" >/dev/null; then
        local uidopt=()
        rt getent passwd "$uid" >/dev/null || uidopt=(-u "$uid")
        rt useradd -m -s /bin/bash "${uidopt[@]}" "$name"
    fi
    # useradd leaves the password locked ('!'); with UsePAM no, sshd then refuses
    # even key/certificate logins. '*' = no password, but not locked.
    rt usermod -p '*' "$name"
    local home
    home=$(rt getent passwd "$name" | cut -d: -f6)
    if [[ ! -d $RP$home ]]; then
        mkdir -p "$RP$home"; rt chown "$name:" "$home"; chmod 0750 "$RP$home"
    fi
}

ensure_users() {
    ensure_user alice 2001
    ensure_user bob 2002
    # the broker's Slurm operator for budget enforcement (sacctmgr writes over SSH)
    ensure_user aifa-admin 2003
    # slurmrestd refuses to run as root or SlurmUser: a dedicated system user.
    rt getent passwd slurmrestd >/dev/null \
        || rt useradd -r -M -d /nonexistent -s /usr/sbin/nologin -U slurmrestd
}

ensure_keys() {
    mkdir -p "$STATE/ssh" "$STATE/gpu"
    # Slurm's JWT key (HS256): 32 random bytes, readable by SlurmUser only.
    [[ -s $STATE/jwt_hs256.key ]] || (umask 077; head -c 32 /dev/urandom >"$STATE/jwt_hs256.key")
    rt chown slurm:slurm "$STATE/jwt_hs256.key"; chmod 0600 "$STATE/jwt_hs256.key"
    # SSH CA the broker signs per-user certificates with; sshd trusts its .pub.
    [[ -s $STATE/ssh_ca ]] || ssh-keygen -q -t ed25519 -N '' -C "aifa-slurm-dev $RELEASE user CA" -f "$STATE/ssh_ca"
    chmod 0600 "$STATE/ssh_ca"; chmod 0644 "$STATE/ssh_ca.pub"
    [[ -s $STATE/ssh/ssh_host_ed25519_key ]] \
        || ssh-keygen -q -t ed25519 -N '' -C '' -f "$STATE/ssh/ssh_host_ed25519_key"
    chmod 0600 "$STATE/ssh/ssh_host_ed25519_key"
    # munge key of this root (the package creates one; chroots each get their own).
    if [[ ! -s $RP/etc/munge/munge.key ]]; then
        (umask 077; head -c 128 /dev/urandom >"$RP/etc/munge/munge.key")
    fi
    rt chown munge:munge /etc/munge/munge.key; chmod 0600 "$RP/etc/munge/munge.key"
    # Fake GPUs: character devices with NVIDIA's major number. Slurm drops a gres
    # count that has no File=, and plain files are rejected.
    local i
    for i in 0 1 2 3; do
        [[ -c $STATE/gpu/nvidia$i ]] || { rm -f "$STATE/gpu/nvidia$i"; mknod -m 666 "$STATE/gpu/nvidia$i" c 195 "$i"; }
    done
}

ensure_dirs() {
    mkdir -p "$STATE/log" "$STATE/run" "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/munge"
    chmod 0755 "$STATE/log" "$STATE/run" "$STATE/spool"
    # slurmctld/slurmdbd chdir to their log dir (for core files) as SlurmUser.
    rt chown slurm:slurm "$STATE/spool/ctld" "$STATE/run" "$STATE/log"
    # munged checks that its log dir belongs to it and is not world-writable.
    rt chown munge:munge "$STATE/munge"; chmod 0700 "$STATE/munge"
    local f
    for f in slurmctld slurmdbd; do
        touch "$STATE/log/$f.log"; rt chown slurm:slurm "$STATE/log/$f.log"
    done
    mkdir -p "$RP/run/munge" "$RP/run/sshd"
    rt chown munge:munge /run/munge; chmod 0755 "$RP/run/munge" "$RP/run/sshd"
}

# put_file PATH MODE OWNER: write stdin to PATH (in the root) if it differs.
# Returns 0 when the file changed.
put_file() {
    local dest=$RP$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat >"$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"; return 1
    fi
    chmod "$mode" "$tmp"; mv -f "$tmp" "$dest"; rt chown "$owner" "$1"
    return 0
}

write_configs() {
    CHANGED_SLURM=0; CHANGED_DBD=0; CHANGED_SSHD=0
    mkdir -p "$RP/etc/slurm"
    put_file /etc/slurm/slurm.conf 0644 root:root <<EOF && CHANGED_SLURM=1
# Written by deploy/slurm-dev/up.sh $RELEASE — rewritten on every run, do not edit.
ClusterName=$CLUSTER
SlurmctldHost=$HOST_SHORT(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=slurm
AuthType=auth/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$STATE/jwt_hs256.key
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Portable on VMs/containers: no cgroups needed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
# Fast scheduling: start queued jobs at once (default batch_sched_delay is 3 s).
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# Declare the node bigger than the VM (8 CPUs) so jobs run side by side.
SlurmdParameters=config_overrides
# Without multifactor, GrpTRESMins usage is never counted (needs a restart, not a reconfigure).
PriorityType=priority/multifactor
PriorityDecayHalfLife=0
PriorityUsageResetPeriod=NONE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStorageEnforce=associations,limits,safe
AccountingStorageTRES=gres/gpu
# Deliberately NOT AccountingStoreFlags=job_comment: real sites may not set it.
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$HOST_SHORT CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=16000 Gres=gpu:4 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    put_file /etc/slurm/gres.conf 0644 root:root <<EOF && CHANGED_SLURM=1
# Written by deploy/slurm-dev/up.sh — fake GPUs (char devices, NVIDIA major 195).
AutoDetect=off
NodeName=$NODE Name=gpu File=$STATE/gpu/nvidia[0-3]
EOF
    if [[ $MODE == chroot ]]; then
        # 24.11+ slurmd dies with "No filesystem mounted on /sys/fs/cgroup" otherwise.
        put_file /etc/slurm/cgroup.conf 0644 root:root <<EOF && CHANGED_SLURM=1
CgroupPlugin=disabled
EOF
    fi
    put_file /etc/slurm/slurmdbd.conf 0600 slurm:slurm <<EOF && CHANGED_DBD=1
# Written by deploy/slurm-dev/up.sh $RELEASE — rewritten on every run, do not edit.
AuthType=auth/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$STATE/jwt_hs256.key
DbdHost=$HOST_SHORT
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=slurm
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    # OpenSSH >= 9.8 penalises a source address after connections that never try to
    # log in (health probes, "unreachable" tests) — on loopback that would lock the
    # broker itself out for a while. Older sshd rejects the option: add it only if known.
    local penalties="# PerSourcePenalties: not supported by this sshd"
    if rt /usr/sbin/sshd -G -f /dev/null -o PerSourcePenalties=no >/dev/null 2>&1; then
        penalties="PerSourcePenalties no"
    fi
    put_file "$STATE/ssh/sshd_config" 0644 root:root <<EOF && CHANGED_SSHD=1
# Written by deploy/slurm-dev/up.sh $RELEASE — the dev cluster's own sshd.
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $STATE/ssh/ssh_host_ed25519_key
PidFile $STATE/run/sshd.pid
TrustedUserCAKeys $STATE/ssh_ca.pub
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
# The broker multiplexes many channels over one pooled connection.
MaxSessions 64
MaxStartups 64:30:256
$penalties
Subsystem sftp internal-sftp
EOF
    return 0
}

# ------------------------------------------------------------- accounting --
sacctmgr_q() { rt sacctmgr -nP "$@" 2>/dev/null; }

ensure_accounts() {
    sacctmgr_q show cluster format=cluster | grep -qx "$CLUSTER" \
        || rt sacctmgr -i add cluster "$CLUSTER" >/dev/null
    local acct pair user
    for acct in proj-a proj-b; do
        sacctmgr_q show account "$acct" format=account | grep -qx "$acct" \
            || rt sacctmgr -i add account "$acct" cluster="$CLUSTER" \
                   description="dev project $acct" organization=aifa-dev >/dev/null
    done
    for pair in alice:proj-a bob:proj-a bob:proj-b; do
        user=${pair%%:*}; acct=${pair#*:}
        sacctmgr_q show assoc cluster="$CLUSTER" user="$user" account="$acct" format=account \
            | grep -qx "$acct" \
            || rt sacctmgr -i add user "$user" account="$acct" cluster="$CLUSTER" >/dev/null
    done
    # AdminLevel=Operator may add/modify/remove accounts, users and limits: what the
    # broker's enforcement sync needs (connection.admin_username = "aifa-admin").
    sacctmgr_q show user aifa-admin format=adminlevel | grep -qx Operator \
        || rt sacctmgr -i add user aifa-admin account=root adminlevel=Operator cluster="$CLUSTER" >/dev/null
}

# ------------------------------------------------------ generated files --
write_definitions() {
    mkdir -p "$GEN_DIR"
    local host_key short=${CLUSTER#dev}
    host_key=$(awk '{print $1" "$2}' "$STATE/ssh/ssh_host_ed25519_key.pub")
    cat >"$GEN_DIR/slurm_ssh.toml" <<EOF
# Written by deploy/slurm-dev/up.sh $RELEASE. Register with:
#   aifa-broker cluster add --from-file $GEN_DIR/slurm_ssh.toml
name = "dev${short}-ssh"
adapter = "slurm_ssh"
default_partition = "cpu"
poll_interval_seconds = 2
description = "Slurm $RELEASE dev cluster (deploy/slurm-dev)"

[connection]
host = "127.0.0.1"
port = $SSH_PORT
host_key = "$host_key"
auth = "certificate"
ssh_ca_key_file = "$STATE/ssh_ca"
certificate_validity_seconds = 300
# cluster-wide reads (poll, usage import, discovery) run as this account; the dev
# clusters keep PrivateData off, so any user sees all jobs (a site uses a reader account)
query_username = "alice"
# Slurm operator (AdminLevel=Operator) for budget enforcement: sacctmgr writes
admin_username = "aifa-admin"
slurm_release = "$RELEASE"
EOF
    cat >"$GEN_DIR/slurm_rest.toml" <<EOF
# Written by deploy/slurm-dev/up.sh $RELEASE. Register with:
#   aifa-broker cluster add --from-file $GEN_DIR/slurm_rest.toml
name = "dev${short}-rest"
adapter = "slurm_rest"
default_partition = "cpu"
poll_interval_seconds = 2
description = "Slurm $RELEASE dev cluster via slurmrestd (deploy/slurm-dev)"

[connection]
url = "http://127.0.0.1:$REST_PORT"
auth = "jwt_key"
jwt_key_file = "$STATE/jwt_hs256.key"
token_lifetime_seconds = 300
# cluster-wide reads and the slurmdbd health check: the dev SlurmUser (an operator-level reader)
query_username = "slurm"
# Slurm operator for budget enforcement: slurmdb writes (slurmrestd v0.0.40+)
admin_username = "aifa-admin"
slurm_release = "$RELEASE"
EOF
    write_info true
}

# ------------------------------------------------------------------- main --
STARTED=()
ensure_chroot
ensure_packages
ensure_mariadb
ensure_database
ensure_users
ensure_keys
ensure_dirs
write_configs

ensure munged
ensure slurmdbd "$CHANGED_DBD"
ensure_accounts
ensure slurmctld "$CHANGED_SLURM"
ensure slurmd "$CHANGED_SLURM"
wait_node_idle
ensure slurmrestd
ensure sshd "$CHANGED_SSHD"
write_definitions

cat <<EOF

Slurm $SLURM_VERSION dev cluster "$CLUSTER" is up ($MODE${ROOT:+, root $ROOT}) in $((SECONDS - T0))s
  (re)started : ${STARTED[*]:-nothing (all healthy)}
  node        : $NODE, 8 CPUs, gres/gpu:4, partitions cpu (default), gpu
  users       : alice (proj-a), bob (proj-a, proj-b)
  slurmctld   : 127.0.0.1:$CTLD_PORT   slurmd :$SLURMD_PORT   slurmdbd :$DBD_PORT (db $DB_NAME)
  slurmrestd  : http://127.0.0.1:$REST_PORT (JWT key $STATE/jwt_hs256.key)
  sshd        : 127.0.0.1:$SSH_PORT (user CA $STATE/ssh_ca)
  state/logs  : $STATE, $STATE/log
  definitions : $GEN_DIR/slurm_ssh.toml, $GEN_DIR/slurm_rest.toml
  commands    : deploy/slurm-dev/run-in $RELEASE sinfo | status.sh $RELEASE | down.sh $RELEASE
EOF
