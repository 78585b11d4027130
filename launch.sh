#!/usr/bin/env bash
# rpo launcher. Every mode makes (or reuses) .venv and installs what it needs first.
#
#   ./launch.sh test [pytest args]        run the test suite (CPU; fakes 8 devices where a test needs them)
#   ./launch.sh local [rpo.main flags]    run the main job on this machine
#
# PYTHON selects the interpreter that creates the venv (default python3; needs 3.11+).
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$1" 2>&1 | grep -v "^WARNING: Location" || true
  # pip's own exit status is lost in the pipe above: check the install really happened.
  .venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
      ('jax', 'flax', 'optax', 'orbax.checkpoint', 'transformers', 'ml_collections', 'tensorflow_datasets')))" \
    || { echo "launch.sh: dependencies failed to install from $1" >&2; exit 1; }
}

mode="${1:-}"
shift || true
case "$mode" in
  test)
    setup requirements-test.txt
    # pytest exits 5 when it collects no test: that is a failure here, like any non-zero code.
    exec .venv/bin/python -m pytest -q tests "$@"
    ;;
  local)
    setup requirements.txt
    exec .venv/bin/python -m rpo.main "$@"
    ;;
  *)
    sed -n '2,8p' "$0" >&2
    exit 2
    ;;
esac
