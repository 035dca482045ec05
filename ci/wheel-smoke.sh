#!/usr/bin/env bash
# ci/wheel-smoke.sh [PYTHON]: build pyworker's wheel, install it in a fresh venv and run it
# from there in isolated mode, so nothing from the source tree can leak in: the C I/O core
# must load, `pyworker --version` must work, and `pyworker bench --quick` must pass.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-python3}"
DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT

"$PY" -m pip wheel -q --no-deps -w "$DIR/dist" "$ROOT"
ls -l "$DIR"/dist/
python3 -m venv "$DIR/venv"
"$DIR/venv/bin/pip" install -q "$DIR"/dist/pyworker-*.whl 2>&1 | grep -v "^WARNING: Location 'file:" || true
"$DIR/venv/bin/python" -c 'import pyworker' # fails loudly if the install did not happen
cd "$DIR"
"$DIR/venv/bin/python" -I -c '
import pyworker.iocore as m
assert m.BACKEND == "c", f"the wheel has no working C core: {m.C_IMPORT_ERROR}"
print("wheel I/O backend:", m.BACKEND)'
"$DIR/venv/bin/pyworker" --version
"$DIR/venv/bin/pyworker" bench --quick --no-progress
