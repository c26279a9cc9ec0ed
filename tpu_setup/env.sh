# shellcheck shell=bash
# Settings and helpers shared by the scripts in this folder (sourced, not run). Override
# any setting in the environment, e.g.
#   TPU_NAME=my-pod ACCELERATOR=v5p-64 ZONE=us-east5-a bash tpu_setup/create.sh
# DRY_RUN=1: every gcloud command is printed, shell-quoted, one a line, instead of run.
# PROJECT and ZONE set empty are left out of the gcloud commands: gcloud's configured
# project and compute/zone apply.

: "${PROJECT:=}"                      # empty: `gcloud config get-value project`
: "${ZONE=us-central1-a}"             # must offer ACCELERATOR (v5e: us-central1-a, us-west4-a...)
: "${ACCELERATOR:=v5litepod-16}"      # Cloud name (v5litepod-16, v5p-64, v6e-8, v4-8) or
                                      # topology (v5e:4x4, v5p:2x4x4): see tpu_topology below
: "${NUM_SLICES:=1}"                  # > 1 creates a multi-slice queued resource
: "${SPOT:=0}"                        # 1: spot capacity (cheaper, preempted; babysit.sh resumes)
: "${REPO_DIR:=llm}"                  # checkout location on every worker, under its home
: "${COORDINATOR_PORT:=8482}"         # jax.distributed's port on worker 0 (JAX_COORDINATOR_PORT)
# The runtime images below ship Ubuntu 22.04 with Python 3.10, and this project needs
# 3.11+: setup.sh installs PYTHON from Ubuntu's archive when the image lacks it.
: "${PYTHON:=python3.11}"
: "${DRY_RUN:=0}"
if [[ -z "${TPU_NAME:-}" ]]; then
  # Node names take lowercase letters, digits and hyphens. $USER is unset under cron,
  # in containers and in some CI runners.
  _user="${USER:-$(id -un 2>/dev/null || echo user)}"
  TPU_NAME="llm-$(printf '%s' "${_user}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9-' '-')"
fi

# Accelerator names <-> the topologies `python -m llm.compile --topology=` takes. Cloud
# names count chips for v5e (v5litepod-N) and v6e (v6e-N), TensorCores (two a chip) for
# v4-N and v5p-N. The common sizes:
#   v5litepod-4  v5e:2x2     v5litepod-16  v5e:4x4    v5litepod-64   v5e:8x8
#   v5litepod-8  v5e:2x4     v5litepod-32  v5e:4x8    v5litepod-256  v5e:16x16
#   (v6e-N: the same shapes, v6e:...; v4-N: the same shapes as v5p-N, v4:...)
#   v5p-8    v5p:2x2x1   v5p-64   v5p:2x4x4   v5p-512   v5p:4x8x8   v5p-4096  v5p:8x16x16
#   v5p-16   v5p:2x2x2   v5p-128  v5p:4x4x4   v5p-1024  v5p:8x8x8
#   v5p-32   v5p:2x2x4   v5p-256  v5p:4x4x8   v5p-2048  v5p:8x8x16
# `bash tpu_setup/topology.sh v5p-1024` prints v5p:8x8x8 (and back).
_SHAPES_2D=(4:2x2 8:2x4 16:4x4 32:4x8 64:8x8 128:8x16 256:16x16)
_SHAPES_3D=(4:2x2x1 8:2x2x2 16:2x2x4 32:2x4x4 64:4x4x4 128:4x4x8 256:4x8x8 512:8x8x8
            1024:8x8x16 2048:8x16x16 4096:16x16x16)

# Prints the topology of a Cloud accelerator name (a topology is printed as it is);
# fails on a name or size not in the table above.
tpu_topology() {
  local name="$1" family chips entry
  [[ "${name}" == *:* ]] && { echo "${name}"; return 0; }
  local count="${name##*-}"
  [[ "${count}" =~ ^[0-9]+$ ]] || return 1
  local shapes=("${_SHAPES_3D[@]}")
  case "${name}" in
    v5litepod-*) family=v5e; chips="${count}"; shapes=("${_SHAPES_2D[@]}") ;;
    v6e-*) family=v6e; chips="${count}"; shapes=("${_SHAPES_2D[@]}") ;;
    v5p-*) family=v5p; chips=$((count / 2)) ;;
    v4-*) family=v4; chips=$((count / 2)) ;;
    *) return 1 ;;
  esac
  for entry in "${shapes[@]}"; do
    if [[ "${entry%%:*}" == "${chips}" ]]; then
      echo "${family}:${entry#*:}"
      return 0
    fi
  done
  return 1
}

# Prints the Cloud accelerator name of a topology (a Cloud name is printed as it is).
tpu_accelerator() {
  local topology="$1"
  [[ "${topology}" != *:* ]] && { echo "${topology}"; return 0; }
  local family="${topology%%:*}" shape="${topology#*:}" chips=1 dim
  [[ "${shape}" =~ ^[0-9]+(x[0-9]+)+$ ]] || return 1
  for dim in ${shape//x/ }; do chips=$((chips * dim)); done
  case "${family}" in
    v5e) echo "v5litepod-${chips}" ;;
    v6e) echo "v6e-${chips}" ;;
    v5p|v4) echo "${family}-$((chips * 2))" ;;
    *) return 1 ;;
  esac
}

# Stops the script with one sentence on stderr: `tpu_setup/NAME.sh: error: ...`.
die() {
  echo "tpu_setup/$(basename "$0"): error: $*" >&2
  exit 1
}

if ! _accelerator="$(tpu_accelerator "${ACCELERATOR}")"; then
  die "ACCELERATOR=${ACCELERATOR} is not a TPU topology such as v5e:4x4 or v5p:2x2x1."
fi
ACCELERATOR="${_accelerator}"
if [[ -z "${RUNTIME:-}" ]]; then
  case "${ACCELERATOR}" in
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;  # v4 and older
  esac
fi
[[ "${NUM_SLICES}" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES=${NUM_SLICES} must be a positive integer."
export PROJECT ZONE TPU_NAME ACCELERATOR RUNTIME NUM_SLICES SPOT REPO_DIR COORDINATOR_PORT \
  PYTHON DRY_RUN

# --zone and --project, each left out when empty.
SCOPE=()
[[ -n "${ZONE}" ]] && SCOPE+=(--zone="${ZONE}")
[[ -n "${PROJECT}" ]] && SCOPE+=(--project="${PROJECT}")

# Dry-run output goes to the script's stdout even from inside $(...).
exec 3>&1

# Prints its arguments as one line a shell reads back as the same words: plain words
# as they are, others in single quotes; one with a control character (a newline) as
# printf %q writes it, so that a command stays on one line.
shell_quote() {
  local arg sep="" q="'" qq="'\\''"
  for arg; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      printf '%s%s' "${sep}" "${arg}"
    elif [[ "${arg}" == *[[:cntrl:]]* ]]; then
      printf '%s%q' "${sep}" "${arg}"
    else
      printf "%s'%s'" "${sep}" "${arg//"${q}"/"${qq}"}"
    fi
    sep=" "
  done
  printf '\n'
}

# Runs gcloud with these arguments; with DRY_RUN=1 prints the command instead.
run_gcloud() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    shell_quote gcloud "$@"
  else
    gcloud "$@"
  fi >&3
}

# The same, for a command whose output the script reads.
query_gcloud() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    run_gcloud "$@"
  else
    gcloud "$@"
  fi
}

# `gcloud compute tpus ARGS... --zone=ZONE --project=PROJECT`, run / read. (The
# ${SCOPE[@]+...} form: bash before 4.4, macOS's included, calls an empty "${SCOPE[@]}"
# unbound under set -u.)
run_tpus() { run_gcloud compute tpus "$@" ${SCOPE[@]+"${SCOPE[@]}"}; }
query_tpus() { query_gcloud compute tpus "$@" ${SCOPE[@]+"${SCOPE[@]}"}; }

# The TPU node of each slice, one name a line.
slice_names() {
  if [[ "${NUM_SLICES}" -eq 1 ]]; then
    echo "${TPU_NAME}"
  else
    local slice
    for ((slice = 0; slice < NUM_SLICES; slice++)); do echo "${TPU_NAME}-${slice}"; done
  fi
}

# Prints the state a `gcloud compute tpus ... describe` prints (its arguments): MISSING
# when gcloud says NOT_FOUND, UNKNOWN (and its error on stderr) when it fails otherwise:
# a network or auth error is no reason to delete and recreate a running TPU.
# Dry run: prints the command and answers $DRY_RUN_STATE.
describe_state() {
  local state errors
  errors="$(mktemp)"
  if state="$(query_tpus "$@" 2>"${errors}")"; then
    state="${state:-UNKNOWN}"
  elif grep -qi 'not[_ ]found' "${errors}"; then
    state=MISSING
  else
    state=UNKNOWN
    echo "gcloud compute tpus $1 $2 failed: $(tail -n 1 "${errors}")" >&2
  fi
  rm -f "${errors}"
  if [[ "${DRY_RUN}" == 1 ]]; then state="${DRY_RUN_STATE}"; fi
  echo "${state}"
}

# The queued resource's state: ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE,
# SUSPENDING, SUSPENDED, FAILED, DELETING... or MISSING / UNKNOWN. $1: what a dry run
# answers.
queued_resource_state() {
  DRY_RUN_STATE="$1" describe_state queued-resources describe "${TPU_NAME}" \
    --format='value(state.state)'
}

# Each slice's node state, one a line: READY, PREEMPTED, TERMINATED... or MISSING / UNKNOWN.
node_states() {
  local name
  while read -r name; do
    DRY_RUN_STATE=READY describe_state tpu-vm describe "${name}" --format='value(state)'
  done < <(slice_names)
}

# Runs a shell command on every worker of every slice (each slice with --worker=all, the
# slices in parallel); fails, naming them, when it failed on any slice.
on_all_workers() {
  local command="$1" name i names=() pids=() failed=()
  while read -r name; do
    names+=("${name}")
    if [[ "${DRY_RUN}" == 1 ]]; then  # One line each, in order.
      run_tpus tpu-vm ssh "${name}" --worker=all --command="${command}"
    else
      run_tpus tpu-vm ssh "${name}" --worker=all --command="${command}" &
      pids+=($!)
    fi
  done < <(slice_names)
  for ((i = 0; i < ${#pids[@]}; i++)); do
    wait "${pids[i]}" || failed+=("${names[i]}")
  done
  if [[ "${#failed[@]}" -gt 0 ]]; then
    echo "tpu_setup/$(basename "$0"): error: the command failed on ${failed[*]}." >&2
    return 1
  fi
}
