#!/usr/bin/env bash
# Install what the dashboard/observability tests need on a fresh Debian machine.
# Idempotent and fast when everything is already there. Each step that fails only
# prints a warning: the tests that need it then skip with a clear reason.
#
#   chromium         Debian package (headless browser for tests/e2e, marker `browser`)
#   promtool         from Debian's `prometheus` package, extracted into .tools/bin
#                    (no Prometheus daemon is installed or started)
#   web assets       `make web`: the charting library from the npm registry
#   test IdP         `npm ci` in tests/e2e/idp (the real `oidc-provider`)
#   containers       podman, runc, catatonit, debootstrap, kubectl; the local base image
#   python deps      the `[dev]` extra (playwright etc.) in the project's venv
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
warn() { echo "setup-test-deps: WARNING: $*" >&2; }
say() { echo "setup-test-deps: $*"; }

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -qq >/dev/null 2>&1 || warn "apt-get update failed"
        apt_updated=1
    fi
}

# --- chromium -------------------------------------------------------------------
if [ -x /usr/bin/chromium ]; then
    say "chromium present"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_update_once
    say "installing chromium (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null 2>&1 || warn "chromium could not be installed"
else
    warn "chromium missing and apt-get not usable (not root?): browser tests will skip"
fi

# --- promtool (from Debian's prometheus package, without its daemon) -------------
mkdir -p .tools/bin
if command -v promtool >/dev/null || [ -x .tools/bin/promtool ]; then
    say "promtool present"
elif command -v apt-get >/dev/null; then
    apt_update_once
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) \
        && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" && [ -x "$tmp/x/usr/bin/promtool" ]; then
        cp "$tmp/x/usr/bin/promtool" .tools/bin/promtool
        say "promtool extracted to .tools/bin"
    else
        warn "promtool could not be installed: promtool tests will skip"
    fi
    rm -rf "$tmp"
fi

# --- npm: chart library (make web) and the test identity provider ----------------
if command -v npm >/dev/null; then
    make -s web || warn "make web failed: the dashboard chart will be missing"
    lock=tests/e2e/idp/package-lock.json
    stamp=tests/e2e/idp/node_modules/.installed
    if [ ! -f "$stamp" ] || [ "$lock" -nt "$stamp" ]; then
        say "npm ci in tests/e2e/idp"
        (cd tests/e2e/idp && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
            && touch "$stamp" || warn "npm ci for the test IdP failed: browser tests will skip"
    else
        say "test IdP node modules present"
    fi
else
    warn "npm missing: browser tests will skip"
fi

# --- container image: podman + runc (no registry: a local Debian base, see below) -------
#   podman runc catatonit   build and run the image, `podman kube play` (catatonit: pod pause)
#   debootstrap             the local base image's root (scripts/image-base.sh)
#   kubectl                 its built-in kustomize renders deploy/k8s (Debian's kubernetes-client
#                           when no kubectl is present)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for tool in podman runc catatonit debootstrap; do
        command -v "$tool" >/dev/null || [ -x "/usr/bin/$tool" ] || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
    done
    # the set the image tests were checked with (podman's usual companions)
    command -v podman >/dev/null || missing+=(uidmap slirp4netns fuse-overlayfs)
    command -v kubectl >/dev/null || missing+=(kubernetes-client)
    if [ ${#missing[@]} -gt 0 ]; then
        apt_update_once
        say "installing ${missing[*]} (Debian packages)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
            || warn "could not install ${missing[*]}: the container image tests will fail in CI"
    else
        say "podman, runc, catatonit, debootstrap, kubectl present"
    fi
    # the local base image (cold: debootstrap ~1.5 min, once per machine; cached tarball)
    ./scripts/image-base.sh >/dev/null || warn "local base image could not be made: image tests will fail"
else
    warn "not root or no apt-get: podman/debootstrap not installed, the image tests will skip"
fi

# --- python dev deps ------------------------------------------------------------------
if [ -x "$VENV/bin/python" ]; then
    if ! "$VENV/bin/python" -c "import playwright, kubernetes_validate, redis" 2>/dev/null; then
        say "installing the [dev] extra"
        "$VENV/bin/pip" install -q -e "$ROOT[dev]" || warn "pip install of the [dev] extra failed"
    else
        say "python dev deps present"
    fi
fi
exit 0
