#!/usr/bin/env bash
# Deletes the queued resource and its TPU VM(s). Checkpoints in gs:// are kept.
set -euo pipefail
source "$(dirname "$0")/env.sh"
gcloud compute tpus queued-resources delete "${TPU_NAME}" --project="${PROJECT}" \
  --zone="${ZONE}" --force --quiet
