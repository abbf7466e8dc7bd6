#!/usr/bin/env bash
# Can this machine run the dev Slurm cluster(s)? Prints "ok ..." and exits 0,
# or prints every reason why not and exits 1. The test runner uses this to skip
# Slurm tests with a clear reason.
#
#   deploy/slurm-dev/can-run.sh            # 22.05 (on the host)
#   deploy/slurm-dev/can-run.sh 24.11      # also needs a chroot (mount, debootstrap)
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

load_release "${1:-22.05}"
reasons=()
why() { reasons+=("$*"); }

[[ $(id -u) -eq 0 ]] || why "not root (uid $(id -u)): the dev cluster installs packages and starts daemons as root"

os_id=$( (. /etc/os-release 2>/dev/null && echo "${ID:-}") || true)
[[ $os_id == debian ]] || why "not Debian (os-release ID='${os_id:-?}'): the scripts use Debian's Slurm packages"
[[ $MODE == host && $os_id == debian ]] && {
    v=$(cut -d. -f1 /etc/debian_version 2>/dev/null || true)
    [[ $v == 12 ]] || why "Slurm 22.05 comes from Debian 12 (bookworm); this is Debian '$(cat /etc/debian_version 2>/dev/null)'"
}
if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then why "no apt-get/dpkg"; fi

# Capabilities: mknod (fake GPU devices) and, for chroots, mount.
cap_eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
has_cap() { (( (16#$cap_eff >> $1) & 1 )); }
has_cap 27 || why "no CAP_MKNOD: cannot create the fake GPU devices"
[[ $MODE == chroot ]] && ! has_cap 21 && why "no CAP_SYS_ADMIN: cannot mount proc/dev/tmpfs into the chroot"

# Network to the Debian mirror, needed only when something is not installed yet.
need_net=0
if [[ $MODE == host ]]; then
    for p in slurmctld slurmd slurm-client slurmdbd slurmrestd slurm-wlm-jwt-plugin munge openssh-server; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || { need_net=1; break; }
    done
else
    [[ -f $ROOT/.aifa-bootstrap-complete ]] || need_net=1
    [[ -f $ROOT/.aifa-bootstrap-complete ]] || command -v debootstrap >/dev/null || need_net=1
fi
port_open 3306 || [[ -x /usr/sbin/mariadbd ]] || need_net=1
if ((need_net)); then
    mirror_host=deb.debian.org
    timeout 5 bash -c "exec 3<>/dev/tcp/$mirror_host/80" 2>/dev/null \
        || why "packages/chroot not installed yet and the Debian mirror ($mirror_host:80) is unreachable"
fi

if ((${#reasons[@]})); then
    echo "cannot run the Slurm $RELEASE dev cluster here:"
    printf '  - %s\n' "${reasons[@]}"
    exit 1
fi
echo "ok: this machine can run the Slurm $RELEASE dev cluster ($MODE)"
