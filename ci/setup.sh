#!/usr/bin/env bash
# Set up everything the tests need, from nothing, idempotently:
#   .venvs/master  a real Buildbot 4.3.0 master (+ buildbot-www for the REST API, the
#                  reference worker buildbot-worker 4.3.0, and Buildbot's integration tests,
#                  interop suite included, which only ship in the sdist)
#   .venvs/worker  pyworker itself with its [test] extras
# A venv whose recorded stamp (pins, python version, project metadata hash) is unchanged
# is kept; pyworker itself is always reinstalled (non-editable) into .venvs/worker.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENVS="$ROOT/.venvs"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export DEBIAN_FRONTEND=noninteractive

# The master's pins: newer twisted/alembic break Buildbot 4.3.0's own tests. The
# 'configurable' extra (evalidate) is what test_steps_configurable in Buildbot's integration
# suite needs.
MASTER_PINS=(
    "buildbot[configurable]==4.3.0"
    "buildbot-www==4.3.0"
    "buildbot-worker==4.3.0"
    "twisted==25.5.0"
    "alembic==1.15.2"
    "parameterized"
)
SDIST_VERSION="4.3.0"

log() { printf '[setup] %s\n' "$*"; }

pip_quiet() {
    # pip prints one warning per unreachable extra index; keep the log readable.
    "$@" 2>&1 | grep -v "^WARNING: Location 'file:" || return "${PIPESTATUS[0]}"
}

stamp_of() {
    # stamp_of <text...>: a short hash of the given text plus the interpreter version.
    { "$PYTHON" -c 'import sys; print(sys.version)'; printf '%s\n' "$@"; } \
        | sha256sum | cut -c1-16
}

venv_is_current() {
    # venv_is_current <venv> <stamp>
    [[ -x "$1/bin/python" && -f "$1/.ci-stamp" && "$(cat "$1/.ci-stamp")" == "$2" ]] \
        && "$1/bin/python" -c 'pass' 2>/dev/null
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then "$@"; else sudo "$@"; fi
}

# --- system packages: a C compiler, Python headers, zlib and libbz2 headers ------------
ensure_system_packages() {
    local missing=()
    command -v gcc >/dev/null 2>&1 || missing+=(gcc)
    local inc
    inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    [[ -f "$inc/Python.h" ]] || missing+=(python3-dev)
    dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
    dpkg -s libbz2-dev >/dev/null 2>&1 || missing+=(libbz2-dev)
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    if ((${#missing[@]})); then
        log "installing system packages: ${missing[*]}"
        as_root apt-get update -q
        as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

# --- .venvs/master ----------------------------------------------------------------------
setup_master() {
    local venv="$VENVS/master"
    local stamp
    stamp="$(stamp_of "${MASTER_PINS[@]}" "interop-sdist-$SDIST_VERSION")"
    if venv_is_current "$venv" "$stamp"; then
        log "master venv up to date ($venv)"
        return
    fi
    log "creating master venv ($venv)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    pip_quiet "$venv/bin/python" -m pip install -q "${MASTER_PINS[@]}"

    # Buildbot's integration tests (interop suite) are only in the sdist.
    local tmp
    tmp="$(mktemp -d)"
    pip_quiet "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: \
        -d "$tmp" "buildbot==$SDIST_VERSION"
    tar -xzf "$tmp/buildbot-$SDIST_VERSION.tar.gz" -C "$tmp" \
        "buildbot-$SDIST_VERSION/buildbot/test/integration"
    local dest
    dest="$("$venv/bin/python" -c \
        'import buildbot.test, os; print(os.path.dirname(buildbot.test.__file__))')/integration"
    mkdir -p "$dest"
    cp -a "$tmp/buildbot-$SDIST_VERSION/buildbot/test/integration/." "$dest/"
    rm -rf "$tmp"
    "$venv/bin/python" -c 'import buildbot.test.integration.interop.test_commandmixin'
    "$venv/bin/python" -c 'import buildbot_worker, buildbot.www' >/dev/null
    echo "$stamp" >"$venv/.ci-stamp"
    log "master venv ready"
}

# --- .venvs/worker ----------------------------------------------------------------------
setup_worker() {
    local venv="$VENVS/worker"
    local meta=()
    local f
    for f in pyproject.toml setup.py setup.cfg; do
        [[ -f "$ROOT/$f" ]] && meta+=("$f:$(sha256sum <"$ROOT/$f")")
    done
    local stamp
    stamp="$(stamp_of "${meta[@]}")"
    if venv_is_current "$venv" "$stamp"; then
        log "worker venv dependencies up to date; reinstalling pyworker"
        pip_quiet "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$ROOT"
    else
        log "creating worker venv ($venv)"
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
        pip_quiet "$venv/bin/python" -m pip install -q "$ROOT[test]"
        # Make sure the freshly built package (not a cached one) is what is installed.
        echo "$stamp" >"$venv/.ci-stamp"
    fi
    [[ -x "$venv/bin/pyworker" ]] || { log "pyworker console script missing"; exit 1; }
    log "worker venv ready: $("$venv/bin/python" -m pip show pyworker 2>/dev/null \
        | sed -n 's/^Version: /pyworker /p')"
}

mkdir -p "$VENVS"
ensure_system_packages
setup_master
setup_worker
log "done"
