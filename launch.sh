#!/usr/bin/env bash
# rpo launcher. Each mode prints what it will run, then runs it; CONFIG is a config file[:arg].
#
#   ./launch.sh test [pytest args]                   the test suite (CPU; fakes 8 devices where a test needs them;
#                                                    RPO_TEST_WORKERS processes, default 2)
#   ./launch.sh local [CONFIG] [rpo.main flags]      the job on this machine (no CONFIG: configs/arith_tiny.py)
#   ./launch.sh sweep CONFIG [--dry-run] [--base-workdir DIR] [--config.<field>=<value> ...]
#                                                    one local run per point of the config's get_sweep (rpo/sweep.py)
#   ./launch.sh tpu TPU_NAME ZONE CONFIG [flags]     every worker of a Cloud TPU VM, through gcloud
#   ./launch.sh slurm CONFIG [flags]                 srun: one process per GPU on every node of the allocation
#
# Environment:
#   PYTHON             the interpreter that creates .venv (default python3; needs 3.11+), here and on TPU workers
#   RPO_SKIP_SETUP=1   use .venv as it is: no pip (tests; offline machines)
#   RPO_GPUS_PER_NODE  slurm: processes per node (default: SLURM_GPUS_ON_NODE, or SLURM_GPUS_PER_NODE)
#   RPO_SRUN_FLAGS     slurm: more srun flags, e.g. "--nodes=2 --gpus-per-node=8 --time=4:00:00"
#   RPO_JAX_EXTRA      slurm: the jax extra installed into .venv (default cuda12)
#
# tpu: copies this checkout (git's tracked and unignored files) to ~/rpo on every worker, makes
# ~/rpo/.venv there with jax[tpu] on first use (again only when requirements.txt changes), then runs
# rpo.main on all workers at once; rpo.distributed joins them. On a pod (several workers) pass
# --workdir=<a filesystem every worker mounts>: the workers write one run together.
# slurm: one process per GPU, each seeing all the node's GPUs (jax's SLURM detection gives process
# SLURM_LOCALID the GPU of that index, so do not bind GPUs per task); the checkout and .venv (made
# here, before srun) must be on a filesystem every node mounts. Run it inside an allocation (salloc,
# or an sbatch script), or give srun the resources in RPO_SRUN_FLAGS.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "launch.sh: $*" >&2; exit 1; }

usage() { sed -n '2,26p' "$0" >&2; exit 2; }

# Prints a command, shell-quoted, before it runs.
show() { echo "launch.sh: will run:$(printf ' %q' "$@")" >&2; }

need() {  # need TOOL WHAT-TO-DO
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH: $2"
}

setup() {  # setup REQUIREMENTS_FILE [more pip requirements]
  if [ "${RPO_SKIP_SETUP:-}" = 1 ]; then
    [ -x .venv/bin/python ] || die "RPO_SKIP_SETUP=1 but there is no .venv/bin/python: run once without it"
    return
  fi
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$@" 2>&1 | grep -v "^WARNING: Location" || true
  # pip's own exit status is lost in the pipe above: check the install really happened.
  .venv/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
      ('jax', 'flax', 'optax', 'orbax.checkpoint', 'transformers', 'ml_collections', 'tensorflow_datasets',
       'math_verify', 'gguf')))" \
    || die "dependencies failed to install from $*"
}

# rpo.main's arguments from "[CONFIG] [flags]": a first argument that is not a flag is the config file[:arg].
main_args=()
config_args() {
  main_args=()
  if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    [ -f "${1%%:*}" ] || die "config file ${1%%:*} not found"
    main_args=("--config=$1")
    shift
  fi
  main_args+=("$@")
}

jax_version() {
  sed -n 's/^jax==\([^ ]*\).*/\1/p' requirements.txt | head -1
}

mode="${1:-}"
shift || true
case "$mode" in
  test)
    setup requirements-test.txt
    # pytest exits 5 when it collects no test: that is a failure here, like any non-zero code.
    # Two worker processes (RPO_TEST_WORKERS): most tests are single-threaded JAX compiles, so two
    # cores run the suite in about half the time.
    exec .venv/bin/python -m pytest -q -n "${RPO_TEST_WORKERS:-2}" --dist loadgroup tests "$@"
    ;;
  local)
    config_args "$@"
    setup requirements.txt
    show .venv/bin/python -m rpo.main "${main_args[@]}"
    exec .venv/bin/python -m rpo.main "${main_args[@]}"
    ;;
  sweep)
    [ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
    [ -f "${1%%:*}" ] || die "config file ${1%%:*} not found"
    setup requirements.txt
    show .venv/bin/python -m rpo.sweep "$@"
    exec .venv/bin/python -m rpo.sweep "$@"
    ;;
  tpu)
    [ $# -ge 3 ] || usage
    name="$1" zone="$2"
    shift 2
    need gcloud "install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'"
    config_args "$@"
    version="$(jax_version)"
    [ -n "$version" ] || die "requirements.txt pins no jax==<version> (the TPU workers install jax[tpu]==<version>)"
    tarball="$(mktemp "${TMPDIR:-/tmp}/rpo-src.XXXXXX")"
    trap 'rm -f "$tarball"' EXIT
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -czf "$tarball"
    else
      tar --exclude=./.git --exclude='./.venv*' --exclude=./runs --exclude=__pycache__ -czf "$tarball" .
    fi
    py="${PYTHON:-python3}"
    # On each worker (in its home directory): unpack, make the venv on first use, run.
    remote="set -e
mkdir -p rpo && tar -xzf rpo-src.tgz -C rpo && cd rpo
if ! cmp -s requirements.txt .venv/rpo-requirements.txt; then
  $(printf %q "$py") -c 'import sys; sys.exit(sys.version_info < (3, 11))' \\
    || { echo \"rpo needs Python 3.11+ on the TPU VM: set PYTHON to one (e.g. PYTHON=python3.11)\" >&2; exit 1; }
  $(printf %q "$py") -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt $(printf %q "jax[tpu]==$version")
  cp requirements.txt .venv/rpo-requirements.txt
fi
exec .venv/bin/python -m rpo.main$(printf ' %q' "${main_args[@]}")"
    scp=(gcloud compute tpus tpu-vm scp "$tarball" "$name:rpo-src.tgz" "--zone=$zone" --worker=all)
    ssh=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone" --worker=all "--command=$remote")
    echo "launch.sh: TPU $name in $zone, all workers: copy this checkout to ~/rpo, then on each worker:" >&2
    sed 's/^/    /' <<<"$remote" >&2
    show "${scp[@]}"
    "${scp[@]}"
    rm -f "$tarball"
    show "${ssh[@]:0:8}" "--command=<the script above>"
    exec "${ssh[@]}"
    ;;
  slurm)
    [ $# -ge 1 ] || usage
    need srun "run this on a SLURM cluster's login or batch node (srun comes with SLURM)"
    config_args "$@"
    gpus="${RPO_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
    gpus="${gpus##*:}"  # SLURM_GPUS_PER_NODE may read "a100:8"
    [[ "$gpus" =~ ^[1-9][0-9]*$ ]] \
      || die "how many GPUs per node? set RPO_GPUS_PER_NODE, or run inside an allocation made with --gpus-per-node"
    version="$(jax_version)"
    [ -n "$version" ] || die "requirements.txt pins no jax==<version> (the GPU venv installs jax[cuda12]==<version>)"
    setup requirements.txt "jax[${RPO_JAX_EXTRA:-cuda12}]==$version"
    # shellcheck disable=SC2206  # RPO_SRUN_FLAGS is a list of flags: word splitting wanted
    cmd=(srun "--ntasks-per-node=$gpus" --kill-on-bad-exit=1 ${RPO_SRUN_FLAGS:-}
         "$PWD/.venv/bin/python" -m rpo.main "${main_args[@]}")
    show "${cmd[@]}"
    exec "${cmd[@]}"
    ;;
  *)
    usage
    ;;
esac
