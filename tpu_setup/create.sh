#!/usr/bin/env bash
# Creates the TPU VM(s) through a queued resource (works for one slice or many).
set -euo pipefail
source "$(dirname "$0")/env.sh"
args=(--project="${PROJECT}" --zone="${ZONE}" --accelerator-type="${ACCELERATOR}"
      --runtime-version="${RUNTIME}")
[[ "${SPOT}" == 1 ]] && args+=(--spot)
if [[ "${NUM_SLICES}" -gt 1 ]]; then
  args+=(--node-count="${NUM_SLICES}" --node-prefix="${TPU_NAME}")
else
  args+=(--node-id="${TPU_NAME}")
fi
gcloud compute tpus queued-resources create "${TPU_NAME}" "${args[@]}"
echo "Waiting for ${TPU_NAME} to become ACTIVE..."
until gcloud compute tpus queued-resources describe "${TPU_NAME}" --project="${PROJECT}" \
    --zone="${ZONE}" --format='value(state.state)' | grep -q ACTIVE; do
  sleep 30
done
echo "${TPU_NAME} is ready."
