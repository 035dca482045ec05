#!/usr/bin/env bash
# The one test command: `bash ci/test.sh` (CI runs it through .ci/run).
#
# Stages: setup (ci/setup.sh) -> ruff -> imports (ci/check_imports.py: no import cycle, no
# import across the architecture's layers) -> mypy (pyworker/, config in pyproject.toml;
# skipped with a NOTE while the worker venv has no mypy) -> pytest tests/ once per I/O
# backend (PYWORKER_IO=c, PYWORKER_IO=python) -> Buildbot's interop suite against pyworker
# (cases in ci/interop-cases.txt) -> Buildbot's integration suite against pyworker (modules in
# ci/integration-cases.txt), each once per I/O backend -> wheel (ci/wheel-smoke.sh) -> sanitizers
# (ci/sanitizers.sh) -> bench/ in short mode. Every stage after setup runs even if an
# earlier one failed; the exit code is non-zero if any stage failed.
# pytest's exit code 5 ("no tests collected") counts as success.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MASTER_VENV="$ROOT/.venvs/master"
WORKER_VENV="$ROOT/.venvs/worker"
# Seconds per stage, so a hang cannot eat CI. A pytest stage took 925-936 s on 2026-12-01;
# on 2026-12-02 the same machine ran the same tests 25-40% slower (test_fuzz_realmaster's
# longest test: 45.9 s in that green run, 57.9-63.6 s for the same code a day later), and
# both pytest stages of two fresh-clone runs hit 1200 s at about 70%.
STAGE_TIMEOUT="${CI_STAGE_TIMEOUT:-1800}"

STAGES=()
RESULTS=()
TIMES=()

banner() { printf '\n======== %s ========\n' "$*"; }

# run_stage <name> <allow-exit-5: yes|no> <command...>
run_stage() {
    local name="$1" allow5="$2"
    shift 2
    banner "$name"
    local start rc
    start=$(date +%s)
    timeout --kill-after=30 "$STAGE_TIMEOUT" "$@" </dev/null
    rc=$?
    local took=$(($(date +%s) - start))
    local status=ok
    if ((rc == 5)) && [[ "$allow5" == yes ]]; then
        status="ok (no tests collected)"
    elif ((rc == 124 || rc == 137)); then
        status="FAILED (timed out after ${STAGE_TIMEOUT}s)"
    elif ((rc != 0)); then
        status="FAILED (exit $rc)"
    fi
    STAGES+=("$name")
    RESULTS+=("$status")
    TIMES+=("$took")
    printf -- '-------- %s: %s in %ss\n' "$name" "$status" "$took"
}

summary_and_exit() {
    banner "summary"
    local i failed=()
    for i in "${!STAGES[@]}"; do
        printf '  %-32s %-36s %5ss\n' "${STAGES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
        [[ "${RESULTS[$i]}" == ok* ]] || failed+=("${STAGES[$i]}")
    done
    if ((${#failed[@]})); then
        echo "ci summary: FAILED ${#failed[@]} of ${#STAGES[@]} stages: ${failed[*]}"
        exit 1
    fi
    echo "ci summary: all ${#STAGES[@]} stages OK"
    exit 0
}

# ---- setup: nothing else can run without it ---------------------------------------------
run_stage setup no bash "$ROOT/ci/setup.sh"
if [[ "${RESULTS[0]}" != ok* ]]; then
    summary_and_exit
fi

export BUILDBOT_MASTER_VENV="$MASTER_VENV"
export REFERENCE_WORKER="$MASTER_VENV/bin/buildbot-worker"
export PYWORKER="$WORKER_VENV/bin/pyworker"
echo "BUILDBOT_MASTER_VENV=$BUILDBOT_MASTER_VENV"
echo "REFERENCE_WORKER=$REFERENCE_WORKER"
echo "PYWORKER=$PYWORKER"

# ---- lint ---------------------------------------------------------------------------------
run_stage ruff no "$WORKER_VENV/bin/ruff" check "$ROOT"

# ---- import layering: no cycle, no import across the architecture's lines -------------------
run_stage imports no "$WORKER_VENV/bin/python" "$ROOT/ci/check_imports.py"

# ---- types --------------------------------------------------------------------------------------
# From the repo root, so mypy reads [tool.mypy] in pyproject.toml.
if [[ -x "$WORKER_VENV/bin/mypy" ]]; then
    run_stage mypy no "$WORKER_VENV/bin/mypy" pyworker
else
    banner mypy
    echo "NOTE: no $WORKER_VENV/bin/mypy (mypy comes with the test extras), so the mypy" \
        "stage is skipped"
    STAGES+=(mypy)
    RESULTS+=("ok (skipped: no mypy)")
    TIMES+=(0)
fi

# ---- unit + end-to-end tests, once per I/O backend ------------------------------------------
# Run the installed package (not the source tree, which lacks the compiled extension):
# `bin/pytest` does not put the repo root on sys.path; tests/ has no __init__.py.
PYTEST=("$WORKER_VENV/bin/pytest" -ra -p no:cacheprovider --durations=10)
if (cd / && "$WORKER_VENV/bin/python" -I -c 'import pyworker.iocore') 2>/dev/null; then
    # The reference worker's runs of the tests that run against both workers go in the first
    # stage only: PYWORKER_IO does not change the reference.
    run_stage "pytest[PYWORKER_IO=c]" yes env PYWORKER_IO=c "${PYTEST[@]}" "$ROOT/tests"
    run_stage "pytest[PYWORKER_IO=python]" yes \
        env PYWORKER_IO=python "${PYTEST[@]}" --without-reference "$ROOT/tests"
else
    echo "NOTE: 'import pyworker.iocore' fails in $WORKER_VENV, so tests/ runs once," \
        "without PYWORKER_IO (not once per I/O backend)."
    (cd / && "$WORKER_VENV/bin/python" -I -c 'import pyworker.iocore') 2>&1 | tail -1
    run_stage pytest yes env -u PYWORKER_IO "${PYTEST[@]}" "$ROOT/tests"
fi

# ---- Buildbot's own trial suites against pyworker ----------------------------------------------
# trial_stages <stage name> <list file>: one stage per I/O backend, running the trial names in
# the list file (one a line, '#' starts a comment) with SANDBOXED_WORKER_PATH set to pyworker.
# Buildbot starts the worker with an empty environment, so each I/O backend gets a launcher
# that sets PYWORKER_IO itself.
trial_stages() {
    local stage="$1" list="$2" backend trial_dir launcher
    local cases=()
    mapfile -t cases < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$')
    ((${#cases[@]})) || return 0
    for backend in c python; do
        trial_dir="$(mktemp -d)"   # trial writes _trial_temp into its cwd
        launcher="$trial_dir/pyworker-$backend"
        printf '#!%s\nimport os, sys\nos.environ["PYWORKER_IO"] = "%s"\nos.execv(%s, [%s] + sys.argv[1:])\n' \
            "$WORKER_VENV/bin/python" "$backend" "'$PYWORKER'" "'$PYWORKER'" > "$launcher"
        chmod +x "$launcher"
        run_stage "$stage[PYWORKER_IO=$backend]" no env -C "$trial_dir" \
            SANDBOXED_WORKER_PATH="$launcher" \
            "$MASTER_VENV/bin/python" -m twisted.trial "${cases[@]}"
        if [[ "${RESULTS[-1]}" != ok* && -d "$trial_dir/_trial_temp" ]]; then
            echo "---- $stage: tail of _trial_temp/test.log ----"
            tail -n 80 "$trial_dir/_trial_temp/test.log" 2>/dev/null
        fi
        rm -rf "$trial_dir"
    done
}

# Buildbot's interop suite (ci/interop-cases.txt), then the modules of its integration suite
# that run with a sandboxed worker (ci/integration-cases.txt).
trial_stages interop "$ROOT/ci/interop-cases.txt"
trial_stages integration "$ROOT/ci/integration-cases.txt"

# ---- the wheel, from a clean venv (nothing from the source tree can leak in) ------------------
run_stage wheel no bash "$ROOT/ci/wheel-smoke.sh" "$WORKER_VENV/bin/python"

# ---- the C core under AddressSanitizer and UndefinedBehaviorSanitizer ----------------------------
run_stage sanitizers no env PYTHON="$WORKER_VENV/bin/python" bash "$ROOT/ci/sanitizers.sh"

# ---- benchmarks, short mode --------------------------------------------------------------------
if [[ -d "$ROOT/bench" ]]; then
    run_stage bench yes "${PYTEST[@]}" "$ROOT/bench" --benchmark-disable
else
    echo "NOTE: no bench/ directory in this tree; bench stage skipped"
fi

summary_and_exit
