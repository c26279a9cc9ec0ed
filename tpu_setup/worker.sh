#!/usr/bin/env bash
# Runs on each TPU worker, where launch.sh starts it:
#   worker.sh start WORKDIR COMMAND [ARG ...]
# starts COMMAND in the background, unless the one it started last still runs (then it
# is left as it is), with its output in ./train.log. The log is copied to
# WORKDIR/.tpu_setup/START-HOST.log every LOG_SYNC_S seconds and when COMMAND ends (the
# VM's disk goes with the VM); COMMAND's exit status then goes to
# WORKDIR/.tpu_setup/HOST.exit, which babysit.sh reads. The folder's name starts with a
# dot: llm.train ignores such entries when it checks that WORKDIR is a run's directory.
set -euo pipefail
: "${LOG_SYNC_S:=60}"
mode="$1"
workdir="${2%/}"
shift 2
host="$(hostname)"
status_dir="${workdir}/.tpu_setup"

case "${mode}" in
  start)
    if [[ -f worker.pid ]] && kill -0 "$(cat worker.pid)" 2> /dev/null; then
      echo "${host}: the job started here (pid $(cat worker.pid)) still runs; left as it is."
      exit 0
    fi
    log="${status_dir}/$(date -u +%Y%m%dT%H%M%SZ)-${host}.log"
    WORKER_LOG="${log}" nohup bash "$0" run "${workdir}" "$@" > worker.log 2>&1 < /dev/null &
    echo $! > worker.pid
    echo "${host}: started (pid $!); log: ${log}"
    ;;
  run)
    # On a preempted VM every process gets SIGTERM: this one waits for COMMAND to save
    # and exit (75), then records that. (A trap, unlike an ignored signal, is not
    # inherited: COMMAND still gets SIGTERM's default.)
    trap 'echo "SIGTERM: waiting for the job to save and exit."' TERM
    copy_log() {
      gcloud storage cp train.log "${WORKER_LOG}" > /dev/null 2>&1 \
        || echo "could not copy train.log to ${WORKER_LOG}"
    }
    (while sleep "${LOG_SYNC_S}"; do copy_log; done) &
    syncer=$!
    status=0
    "$@" > train.log 2>&1 || status=$?
    kill "${syncer}" 2> /dev/null || true
    copy_log
    echo "${status}" > exit_status
    gcloud storage cp exit_status "${status_dir}/${host}.exit"
    echo "exit status ${status}"
    ;;
  *)
    echo "usage: worker.sh start WORKDIR COMMAND [ARG ...]" >&2
    exit 2
    ;;
esac
