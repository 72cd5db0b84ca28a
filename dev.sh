#!/usr/bin/env bash
# Project entry point on a fresh machine. Creates (or reuses) the virtual environment
# .venv, installs vpure editable with its test extras at the versions in
# requirements-lock.txt, then:
#   ./dev.sh main [ARGS]   the main job: `vpure demo` on the shipped mini-world models
#   ./dev.sh test [ARGS]   the test suite (pytest ARGS)
#   ./dev.sh setup         only the environment
#   ./dev.sh latest [ARGS] today's latest resolvable versions in a fresh .venv-latest, then
#                          the suite there: catches dependency drift before users do
#   ./dev.sh lock [ARGS]   the same, and if the suite passes, rewrites requirements-lock.txt
#                          from that environment (the deliberate way to move the pins)
# torch is pinned to exactly 2.13.0: on machines that serve a local CPU wheel (pip
# find-links) that is what pip takes. Elsewhere set VPURE_TORCH_INDEX to a CPU wheel index
# (e.g. the PyTorch CPU index) or pip fetches the multi-GB CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VPURE_VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=requirements-lock.txt

# install VENV [pip constraint args]: vpure editable with its test extras into VENV.
install() {
  local venv=$1; shift
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "vpure needs Python >= 3.10" >&2; exit 1; }
    "$PY" -m venv "$venv"
  fi
  local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  if [ -n "${VPURE_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --index-url "$VPURE_TORCH_INDEX" torch==2.13.0
  else
    "${pip[@]}" torch==2.13.0
  fi
  "${pip[@]}" "$@" "scikit-build-core>=0.11" "nanobind>=2.4"
  # No build isolation: the build tools above are reused and torch is never re-resolved.
  "${pip[@]}" "$@" --no-build-isolation -C "build-dir=build/$(basename "$venv")/{wheel_tag}" -e ".[test]"
}

setup() {
  local stamp
  stamp=$(cat pyproject.toml CMakeLists.txt "$LOCK" src/vpure/kernels/src/* | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$VENV/.vpure-stamp" 2>/dev/null)" != "$stamp" ] || ! "$VENV/bin/python" -c 'import vpure.kernels._native' 2>/dev/null; then
    echo "dev.sh: installing vpure into $VENV (versions from $LOCK)" >&2
    install "$VENV" -c "$LOCK"
    echo "$stamp" > "$VENV/.vpure-stamp"
  fi
}

# refresh NAME: a fresh venv resolved without the lock, then the suite in it.
refresh() {
  local venv=.venv-$1; shift
  rm -rf "$venv"
  echo "dev.sh: resolving today's latest versions into $venv (no lock)" >&2
  install "$venv"
  "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' > "$venv/freeze.txt"
  echo "dev.sh: versions that differ from $LOCK:" >&2
  diff <(grep '==' "$LOCK" | sed 's/+.*//' | sort -f) <(sed 's/+.*//' "$venv/freeze.txt" | sort -f) >&2 || true
  VPURE_UNLOCKED=1 "$venv/bin/python" -m pytest -q "$@"
}

cmd=${1:-main}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  main) setup; exec "$VENV/bin/vpure" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  latest) refresh latest "$@" ;;
  lock)
    refresh lock "$@"
    { sed -n '/^#/p' "$LOCK"; sed 's/^torch==\(.*\)+cpu$/torch==\1/' .venv-lock/freeze.txt | sort -f; } > "$LOCK.new" && mv "$LOCK.new" "$LOCK"
    echo "dev.sh: the suite passed; $LOCK rewritten (review and commit it)" >&2 ;;
  *) echo "usage: ./dev.sh [main|test|setup|latest|lock] [ARGS]" >&2; exit 2 ;;
esac
