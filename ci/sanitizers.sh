#!/usr/bin/env bash
# ci/sanitizers.sh - build the C I/O core with -fsanitize=address,undefined and
# run tests/test_iocore.py against it with the C backend (PYWORKER_IO=c).
#
#   bash ci/sanitizers.sh                 # from anywhere; uses .venv/bin/python
#   PYTHON=/path/to/python bash ci/sanitizers.sh [extra pytest args]
#
# What it does: copies setup.py, pyproject.toml, csrc/, pyworker/ and
# tests/test_iocore.py into a scratch directory (the in-place .so of the work
# tree is left alone), builds there with PYWORKER_IOCORE_SANITIZE=1 (see
# pyworker/iocore/_build.py), then runs pytest with
#   LD_PRELOAD=$(cc -print-file-name=libasan.so)   # ASan must come first in a Python host
#   ASAN_OPTIONS=detect_leaks=0:abort_on_error=1   # CPython's exit-time allocations are not leaks
#   UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
#   PYTHONMALLOC=malloc                            # let ASan see every Python allocation
# Needs: gcc with libasan/libubsan, zlib1g-dev, libbz2-dev, cffi + pytest + hypothesis.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
CC=${CC:-cc}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/iocore-san.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/tests"
cp "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/"
cp -r "$ROOT/csrc" "$WORK/csrc"
cp "$ROOT/tests/test_iocore.py" "$ROOT/tests/test_iocore_pump.py" "$WORK/tests/"
(cd "$ROOT" && find pyworker -name '*.py' -print0 | tar --null -cf - -T -) | tar -xf - -C "$WORK"

cd "$WORK"
echo "== building the sanitized C core in $WORK"
PYWORKER_IOCORE_SANITIZE=1 "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || {
    cat build.log
    exit 1
}

SO=$(ls pyworker/iocore/_iocore*.so)
if ! nm -D "$SO" | grep -q __asan_; then
    echo "$SO is not instrumented with ASan" >&2
    exit 1
fi

LIBASAN=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "libasan.so not found (install gcc's libasan)" >&2
    exit 1
fi

export LD_PRELOAD="$LIBASAN"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONMALLOC=malloc
export PYWORKER_IO=c

# make sure the sanitized module is the one under test
"$PY" -c 'import pyworker.iocore as m, pyworker.iocore._iocore as c, sys
assert m.BACKEND == "c" and c.__file__.startswith(sys.argv[1]), c.__file__
print("== testing", c.__file__)' "$WORK"

"$PY" -m pytest -q -p no:cacheprovider --rootdir "$WORK" tests/test_iocore.py tests/test_iocore_pump.py "$@"
