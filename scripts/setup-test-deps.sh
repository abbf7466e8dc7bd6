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

# --- python dev deps ------------------------------------------------------------------
if [ -x "$VENV/bin/python" ]; then
    if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
        say "installing the [dev] extra"
        "$VENV/bin/pip" install -q -e "$ROOT[dev]" || warn "pip install of the [dev] extra failed"
    else
        say "python dev deps present"
    fi
fi
exit 0
