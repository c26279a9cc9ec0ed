#!/usr/bin/env bash
# Starts training on every worker: launch.sh EXPERIMENT WORKDIR [--config.KEY=VALUE ...]
# WORKDIR must be a gs:// path that every worker can write (checkpoints, metrics).
set -euo pipefail
source "$(dirname "$0")/env.sh"
experiment="$1"; workdir="$2"; shift 2
if [[ "${workdir}" != gs://* ]]; then
  echo "WORKDIR must be a gs:// path shared by all workers, got ${workdir}." >&2
  exit 2
fi
on_all_workers "cd ${REPO_DIR} && . .venv/bin/activate && nohup python -m llm.train --multihost \
  --config=experiments/${experiment}.py --workdir=${workdir} $* > train.log 2>&1 &"
echo "Started. Follow with: gcloud compute tpus tpu-vm ssh ${TPU_NAME} --zone=${ZONE} \
--worker=0 --command='tail -f ${REPO_DIR}/train.log'"
