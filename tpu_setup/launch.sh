#!/usr/bin/env bash
# Starts training on every worker of every slice, the same command on each:
#   launch.sh EXPERIMENT WORKDIR [--config.KEY=VALUE ...]
# EXPERIMENT: a config in experiments/ (`synthetic`, `synthetic:llama3_8b`) or a path
# (`experiments/synthetic.py:llama3_8b`). WORKDIR: a gs:// path every worker can write
# (checkpoints, metrics, and in WORKDIR/.tpu_setup/ each worker's train.log and exit
# status). Each argument reaches the workers as it was given (spaces, `*`). A worker
# whose last job still runs leaves it as it is. The workers find jax.distributed's
# coordinator (worker 0) themselves; COORDINATOR_PORT sets its port.
set -euo pipefail
here="$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR source=env.sh
source "${here}/env.sh"
if [[ $# -lt 2 ]]; then
  die "usage: launch.sh EXPERIMENT WORKDIR [--config.KEY=VALUE ...]"
fi
experiment="$1"
workdir="${2%/}"
shift 2
if [[ "${workdir}" != gs://?* ]]; then
  die "WORKDIR must be a gs:// path shared by all workers, got '${workdir}'."
fi
if [[ "${experiment}" == *.py || "${experiment}" == *.py:* ]]; then
  config="${experiment}"
elif [[ "${experiment}" == *:* ]]; then
  config="experiments/${experiment%%:*}.py:${experiment#*:}"
else
  config="experiments/${experiment}.py"
fi

train=(python -m llm.train --multihost --config="${config}" --workdir="${workdir}" "$@")
# printf %q: each argument is one word in the worker's shell, never split or globbed.
command="cd $(printf %q "${REPO_DIR}") && . .venv/bin/activate"
command+=" && JAX_COORDINATOR_PORT=$(printf %q "${COORDINATOR_PORT}")"
command+=" bash tpu_setup/worker.sh start$(printf ' %q' "${workdir}" "${train[@]}")"

# The exit statuses of the previous job would read as this one's.
run_gcloud storage rm --quiet "${workdir}/.tpu_setup/*.exit" > /dev/null 2>&1 || true
on_all_workers "${command}"
echo "Started. Logs: gcloud storage ls ${workdir}/.tpu_setup/ (copied every minute); or"
echo "  gcloud compute tpus tpu-vm ssh $(slice_names | head -n 1) --worker=0" \
  "--command='tail -f ${REPO_DIR}/train.log'"
