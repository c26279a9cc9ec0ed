#!/usr/bin/env bash
# Copies this checkout to every worker and installs the TPU requirements there.
set -euo pipefail
source "$(dirname "$0")/env.sh"
root="$(cd "$(dirname "$0")/.." && pwd)"
archive="$(mktemp -d)/repo.tar.gz"
git -C "${root}" archive --format=tar.gz -o "${archive}" HEAD
for ((slice = 0; slice < NUM_SLICES; slice++)); do
  name="${TPU_NAME}"
  [[ "${NUM_SLICES}" -gt 1 ]] && name="${TPU_NAME}-${slice}"
  gcloud compute tpus tpu-vm scp "${archive}" "${name}:repo.tar.gz" --project="${PROJECT}" \
    --zone="${ZONE}" --worker=all
done
on_all_workers "mkdir -p ${REPO_DIR} && tar -xzf repo.tar.gz -C ${REPO_DIR} && cd ${REPO_DIR} \
  && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip \
  && pip install -q -r requirements.txt -r requirements-tpu.txt \
  && python -c 'import jax; print(jax.devices())'"
