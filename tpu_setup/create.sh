#!/usr/bin/env bash
# Creates the TPU VM(s) through a queued resource (one slice or NUM_SLICES), spot with
# SPOT=1, unless it exists already, and waits until it is ACTIVE: at most CREATE_TIMEOUT_S seconds (default 2 h:
# spot and large slices can wait long for capacity), polling every CREATE_POLL_S.
# Stops with one sentence and a nonzero status when the resource FAILED or is
# SUSPENDED, or when the timeout passes (the resource then stays queued;
# tpu_setup/delete.sh removes it).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"
: "${CREATE_TIMEOUT_S:=7200}"
: "${CREATE_POLL_S:=30}"

args=(queued-resources create "${TPU_NAME}" --accelerator-type="${ACCELERATOR}"
      --runtime-version="${RUNTIME}")
if [[ "${SPOT}" == 1 ]]; then args+=(--spot); fi
if [[ "${NUM_SLICES}" -gt 1 ]]; then
  args+=(--node-count="${NUM_SLICES}" --node-prefix="${TPU_NAME}")
else
  args+=(--node-id="${TPU_NAME}")
fi
state="$(queued_resource_state MISSING)"
if [[ "${state}" == MISSING || "${state}" == UNKNOWN ]]; then
  run_tpus "${args[@]}"
else
  echo "${TPU_NAME} exists already (${state}): not created again."
fi

echo "Waiting for ${TPU_NAME} (${ACCELERATOR}) to become ACTIVE..."
start="${SECONDS}"
while true; do
  state="$(queued_resource_state ACTIVE)"
  case "${state}" in
    ACTIVE)
      echo "${TPU_NAME} is ready."
      exit 0
      ;;
    FAILED|SUSPENDING|SUSPENDED)
      die "queued resource ${TPU_NAME} is ${state} (gcloud compute tpus queued-resources" \
        "describe ${TPU_NAME} says why); delete it with tpu_setup/delete.sh, then retry," \
        "perhaps in another ZONE or with SPOT=1."
      ;;
  esac
  if (( SECONDS - start >= CREATE_TIMEOUT_S )); then
    die "queued resource ${TPU_NAME} is still ${state} after ${CREATE_TIMEOUT_S} s" \
      "(CREATE_TIMEOUT_S); it stays queued: run tpu_setup/create.sh again to keep waiting" \
      "or tpu_setup/delete.sh to remove it."
  fi
  echo "$(date -u +%FT%TZ) ${TPU_NAME}: ${state}"
  sleep "${CREATE_POLL_S}"
done
