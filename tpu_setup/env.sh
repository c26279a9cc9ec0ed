# Settings shared by the scripts in this folder. Override any of them in the
# environment, e.g. `TPU_NAME=my-pod ACCELERATOR=v5p-64 bash tpu_setup/create.sh`.
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-central2-b}"
: "${TPU_NAME:=llm-${USER}}"
: "${ACCELERATOR:=v4-8}"              # e.g. v5litepod-16, v5p-64, v6e-8
: "${RUNTIME:=tpu-ubuntu2204-base}"   # v5e/v6e: v2-alpha-tpuv5-lite / v2-alpha-tpuv6e
: "${NUM_SLICES:=1}"                  # > 1 creates a multi-slice queued resource
: "${SPOT:=0}"                        # 1: preemptible capacity (babysit.sh resumes)
: "${REPO_DIR:=llm}"                  # checkout location on every worker
export PROJECT ZONE TPU_NAME ACCELERATOR RUNTIME NUM_SLICES SPOT REPO_DIR

# Runs a command on every worker of every slice.
on_all_workers() {
  local slice
  for ((slice = 0; slice < NUM_SLICES; slice++)); do
    local name="${TPU_NAME}"
    [[ "${NUM_SLICES}" -gt 1 ]] && name="${TPU_NAME}-${slice}"
    gcloud compute tpus tpu-vm ssh "${name}" --project="${PROJECT}" --zone="${ZONE}" \
      --worker=all --command="$1" &
  done
  wait
}
