#!/usr/bin/env bash
# Starts a run and keeps it going until it ends:
#   babysit.sh EXPERIMENT WORKDIR [--config.KEY=VALUE ...]    (arguments as launch.sh's)
# It launches the job (creating and setting up the TPU first when it is missing), then
# every POLL_S seconds (default 300) reads the queued resource's state, each slice's
# node state and the job's exit statuses (each worker's, in WORKDIR/.tpu_setup/*.exit),
# and acts on them:
#   TPU preempted: queued resource SUSPENDING, SUSPENDED, FAILED or missing, or a node
#     PREEMPTED, TERMINATED, STOPPED or missing -> delete, create, set up, launch
#     again (training resumes from the newest checkpoint in WORKDIR)
#   exit status 75 on a worker (llm.train saved on SIGTERM: llm/preemption.py)
#     -> launch again on the same TPU
#   exit status 0, no other -> the run is done: delete the TPU, exit 0
#   any other exit status -> a crash: delete the TPU, exit 1 naming the status and the
#     logs (WORKDIR/.tpu_setup/); never launched again
#   anything else (queued, provisioning, an error reading the state) -> wait
# KEEP_TPU=1 keeps the TPU when the run ends (to debug on it: delete.sh removes it later).
# A step that fails (create, setup, launch) is retried at the next poll; after
# MAX_RESTARTS relaunches and retries (default 100) it stops with exit 1.
# DRY_RUN=1: prints the commands of the first poll (as if the TPU were ready), and stops.
set -euo pipefail
here="$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR source=env.sh
source "${here}/env.sh"
: "${POLL_S:=300}"
: "${MAX_RESTARTS:=100}"
: "${KEEP_TPU:=0}"
if [[ $# -lt 2 ]]; then
  die "usage: babysit.sh EXPERIMENT WORKDIR [--config.KEY=VALUE ...]"
fi
workdir="${2%/}"
if [[ "${workdir}" != gs://?* ]]; then
  die "WORKDIR must be a gs:// path shared by all workers, got '${workdir}'."
fi
restarts=0
attempts=0
launched=0

say() { echo "$(date -u +%FT%TZ) ${TPU_NAME}: $*"; }

# The workers' exit statuses, one a line; nothing while the job runs.
exit_statuses() {
  query_gcloud storage cat "${workdir}/.tpu_setup/*.exit" 2> /dev/null || true
}

# Deletes the TPU unless KEEP_TPU=1.
release() {
  if [[ "${KEEP_TPU}" == 1 ]]; then
    say "kept (KEEP_TPU=1); tpu_setup/delete.sh deletes it."
  else
    bash "${here}/delete.sh" || say "could not delete it: run tpu_setup/delete.sh."
  fi
}

# Counts an attempt to (re)start the job after the first, and stops after too many.
count_restart() {
  if ((attempts > 0)); then
    restarts=$((restarts + 1))
    if ((restarts > MAX_RESTARTS)); then
      release
      die "relaunched or recreated ${MAX_RESTARTS} times (MAX_RESTARTS); stopping." \
        "Logs: ${workdir}/.tpu_setup/"
    fi
  fi
  attempts=$((attempts + 1))
}

launch() {
  count_restart
  if bash "${here}/launch.sh" "$@"; then
    launched=1
  else
    say "launch failed; retrying at the next poll."
  fi
}

recreate() {
  count_restart
  bash "${here}/delete.sh" > /dev/null 2>&1 || true  # Fails when it is gone already.
  if bash "${here}/create.sh" && bash "${here}/setup.sh" && bash "${here}/launch.sh" "$@"; then
    launched=1
  else
    say "recreating failed; retrying at the next poll."
  fi
}

while true; do
  state="$(queued_resource_state ACTIVE)"
  case "${state}" in
    ACTIVE)
      nodes="$(node_states | sort -u | tr '\n' ' ')"
      if [[ "${nodes}" != "READY " ]]; then
        if [[ "${nodes}" =~ PREEMPTED|TERMINATED|STOPPED|MISSING ]]; then
          say "node ${nodes% }: recreating."
          recreate "$@"
        else
          say "node ${nodes% }: waiting."
        fi
      elif [[ "${launched}" == 0 ]]; then
        say "ACTIVE: launching."
        launch "$@"
      else
        statuses="$(exit_statuses)"
        verdict=running
        for status in ${statuses}; do
          if [[ "${status}" == 0 ]]; then
            if [[ "${verdict}" == running ]]; then verdict=finished; fi
          elif [[ "${status}" == 75 ]]; then
            if [[ "${verdict}" != crashed ]]; then verdict=preempted; fi
          else
            verdict=crashed
            failure="${status}"
          fi
        done
        case "${verdict}" in
          running) say "ACTIVE: the job runs." ;;
          preempted)
            say "the job exited 75 (preempted): launching again."
            launch "$@"
            ;;
          finished)
            say "the job finished (exit status 0)."
            release
            exit 0
            ;;
          crashed)
            release
            die "the job crashed with exit status ${failure}; not relaunched. Logs:" \
              "${workdir}/.tpu_setup/"
            ;;
        esac
      fi
      ;;
    SUSPENDING|SUSPENDED|FAILED|MISSING)
      say "${state}: recreating."
      recreate "$@"
      ;;
    *)
      say "${state}: waiting."
      ;;
  esac
  if [[ "${DRY_RUN}" == 1 ]]; then
    echo "DRY_RUN=1: stopping after the first poll."
    exit 0
  fi
  sleep "${POLL_S}"
done
