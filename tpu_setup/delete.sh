#!/usr/bin/env bash
# Deletes the queued resource and its TPU VM(s). The workdir in gs:// (checkpoints,
# metrics, the logs in WORKDIR/.tpu_setup/) is kept.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"
run_tpus queued-resources delete "${TPU_NAME}" --force --quiet
