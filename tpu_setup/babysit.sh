#!/usr/bin/env bash
# Keeps a (spot) run going: when the queued resource is preempted or fails, deletes it,
# recreates it, sets it up again and relaunches; training resumes from the newest
# checkpoint in WORKDIR. Usage: babysit.sh EXPERIMENT WORKDIR [--config.KEY=VALUE ...]
set -euo pipefail
here="$(dirname "$0")"
source "${here}/env.sh"
while true; do
  state="$(gcloud compute tpus queued-resources describe "${TPU_NAME}" --project="${PROJECT}" \
    --zone="${ZONE}" --format='value(state.state)' 2>/dev/null || echo MISSING)"
  case "${state}" in
    ACTIVE)
      done_file="$(gsutil cat "$2/metrics.jsonl" 2>/dev/null | tail -n 1 || true)"
      echo "$(date -u +%FT%TZ) ACTIVE; last metrics: ${done_file:-none}"
      ;;
    SUSPENDED|FAILED|MISSING)
      echo "$(date -u +%FT%TZ) ${state}: recreating ${TPU_NAME}."
      bash "${here}/delete.sh" || true
      bash "${here}/create.sh" && bash "${here}/setup.sh" && bash "${here}/launch.sh" "$@"
      ;;
    *)
      echo "$(date -u +%FT%TZ) ${state}: waiting."
      ;;
  esac
  sleep 300
done
