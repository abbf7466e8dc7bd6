#!/usr/bin/env bash
# The whole test suite, as `make test` runs it (and CI through .ci/run).
#
# 1. test dependencies (chromium, promtool, IdP, web assets) — scripts/setup-test-deps.sh
# 2. services: PostgreSQL must answer (started if installed but stopped);
#    Slurm dev clusters (22.05 on the host, 24.11 and 26.05 in chroots) where this
#    machine can run them (root, Debian, package mirrors) — else those tests skip
#    and this script says why.
# 3. pytest over tests/, with a summary of every skip and its reason.
#
# Environment knobs: SLURM_RELEASES="22.05 24.11 26.05" (which clusters to bring up;
# empty = none), AIFA_REQUIRE_POSTGRES=1 / AIFA_REQUIRE_SLURM=1 (fail instead of skip),
# PYTEST_ARGS (extra pytest arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
say() { echo "== test.sh: $*"; }

# --- 1. test dependencies ------------------------------------------------------------
if [ -x scripts/setup-test-deps.sh ]; then
    ./scripts/setup-test-deps.sh || say "WARNING: some test dependencies could not be set up (see above)"
fi
[ -d .tools/bin ] && export PATH="$PWD/.tools/bin:$PATH"

# --- 2a. PostgreSQL ---------------------------------------------------------------------
pg_up() { "$VENV/bin/python" -c "import psycopg; psycopg.connect('host=127.0.0.1 user=postgres dbname=postgres', connect_timeout=3).close()" 2>/dev/null; }
if ! pg_up && command -v pg_ctlcluster >/dev/null && [ "$(id -u)" = 0 ]; then
    say "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    sleep 2
fi
if pg_up; then say "PostgreSQL: up (every DB test runs on SQLite and PostgreSQL)";
else say "PostgreSQL: NOT reachable on 127.0.0.1:5432 — the PostgreSQL variants will skip"; fi

# --- 2b. Slurm dev clusters ---------------------------------------------------------------
SLURM_RELEASES=${SLURM_RELEASES-22.05 24.11 26.05}
slurm_up=()
if [ -z "$SLURM_RELEASES" ]; then
    say "Slurm: SLURM_RELEASES is empty — Slurm tests will skip"
elif [ -x deploy/slurm-dev/can-run.sh ] && reason=$(deploy/slurm-dev/can-run.sh 2>&1); then
    for rel in $SLURM_RELEASES; do
        say "Slurm $rel: bringing up the dev cluster (make slurm-up SLURM_RELEASE=$rel)"
        start=$(date +%s)
        if deploy/slurm-dev/up.sh "$rel" > "/tmp/aifa-slurm-up-$rel.log" 2>&1; then
            slurm_up+=("$rel")
            say "Slurm $rel: up in $(( $(date +%s) - start )) s"
        else
            say "Slurm $rel: FAILED to start — its tests will skip; last lines of /tmp/aifa-slurm-up-$rel.log:"
            tail -n 15 "/tmp/aifa-slurm-up-$rel.log" | sed 's/^/    /'
        fi
    done
else
    say "Slurm: this machine cannot run the dev clusters (${reason:-deploy/slurm-dev/can-run.sh missing}) — Slurm tests will skip"
fi
export AIFA_SLURM_RELEASES_UP="${slurm_up[*]:-}"

# --- 3. pytest ------------------------------------------------------------------------------
# The Slurm tests of each release run in their own pytest process, concurrently with
# the rest of the suite (they mostly wait on the scheduler: one release at a time
# would triple the wall time). Each release's tests only touch that release's cluster.
say "running pytest (Slurm releases up: ${AIFA_SLURM_RELEASES_UP:-none})"
logdir=$(mktemp -d /tmp/aifa-test-XXXXXX)
# Each pytest process has its own --basetemp: in the shared /tmp/pytest-of-$USER each new
# session deletes all but the three newest others — five concurrent ones deleted each
# other's files mid-test (CI: "No such file or directory", "Directory not empty").
pids=()
names=()
logs=()
for rel in $SLURM_RELEASES; do
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pytest tests -m slurm -k "$rel" -q -rs -p no:cacheprovider \
        --basetemp="$logdir/tmp-slurm-$rel" ${PYTEST_ARGS:-} \
        > "$logdir/slurm-$rel.log" 2>&1 &
    pids+=($!)
    names+=("slurm-$rel")
    logs+=("$logdir/slurm-$rel.log")
done
# The non-Slurm tests run as two processes too: the long, mostly waiting end-to-end,
# fuzz and load tests beside the many short ones (one process: 20 of the 21 minutes).
LONG_TESTS=(tests/e2e tests/integration/test_schemathesis.py tests/integration/test_load.py)
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest "${LONG_TESTS[@]}" -m "not slurm" -q -rs -p no:cacheprovider \
    --basetemp="$logdir/tmp-long" ${PYTEST_ARGS:-} \
    > "$logdir/non-slurm-long.log" 2>&1 &
pids+=($!)
names+=("non-Slurm long (e2e, fuzz, load)")
logs+=("$logdir/non-slurm-long.log")
ignores=()
for t in "${LONG_TESTS[@]}"; do ignores+=("--ignore=$t"); done
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest tests "${ignores[@]}" -m "not slurm" -q -rs -p no:cacheprovider \
    --basetemp="$logdir/tmp-rest" ${PYTEST_ARGS:-}
rc=$?
say "non-Slurm tests (the rest): exit status $rc"
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    status=$?
    say "${names[$i]} tests (exit status $status):"
    cat "${logs[$i]}"
    # exit status 5 = no tests collected (release not configured): not a failure by itself
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then rc=1; fi
done
[ "$rc" -eq 0 ] && rm -rf "$logdir"/tmp-*  # kept for a look after a failure
say "overall exit status $rc (skipped tests and their reasons are listed under each 'short test summary info')"
exit $rc
