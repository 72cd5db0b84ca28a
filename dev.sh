#!/usr/bin/env bash
# Project entry point on a fresh machine. Creates (or reuses) the virtual environment
# .venv, installs vpure editable with its test extras, then:
#   ./dev.sh main [ARGS]   the main job: `vpure demo` on the shipped mini-world models
#   ./dev.sh test [ARGS]   the test suite (pytest ARGS); python -P keeps the checkout's root,
#                          which is the vpure package, off sys.path: there its folders would
#                          also import as bare top-level names (transformers probes for a
#                          package named `kernels` and would import vpure's a second time)
#   ./dev.sh setup         only the environment
# torch is pinned to exactly 2.13.0: on machines that serve a local CPU wheel (pip
# find-links) that is what pip takes. Elsewhere set VPURE_TORCH_INDEX to a CPU wheel index
# (e.g. the PyTorch CPU index) or pip fetches the multi-GB CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VPURE_VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "vpure needs Python >= 3.10" >&2; exit 1; }
    "$PY" -m venv "$VENV"
  fi
  local stamp
  stamp=$(cat pyproject.toml CMakeLists.txt kernels/src/* | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$VENV/.vpure-stamp" 2>/dev/null)" != "$stamp" ] || ! "$VENV/bin/python" -c 'import vpure.kernels._native' 2>/dev/null; then
    echo "dev.sh: installing vpure into $VENV" >&2
    local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    if [ -n "${VPURE_TORCH_INDEX:-}" ]; then
      "${pip[@]}" --index-url "$VPURE_TORCH_INDEX" torch==2.13.0
    else
      "${pip[@]}" torch==2.13.0
    fi
    "${pip[@]}" "scikit-build-core>=0.11" "nanobind>=2.4"
    # No build isolation: the build tools above are reused and torch is never re-resolved.
    "${pip[@]}" --no-build-isolation -e ".[test]"
    echo "$stamp" > "$VENV/.vpure-stamp"
  fi
}

cmd=${1:-main}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  main) setup; exec "$VENV/bin/vpure" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -P -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh [main|test|setup] [ARGS]" >&2; exit 2 ;;
esac
