#!/usr/bin/env bash
# Translates between the two spellings of a TPU slice (table in env.sh):
#   topology.sh v5p-1024    prints v5p:8x8x8    (for python -m llm.compile --topology=)
#   topology.sh v5p:8x8x8   prints v5p-1024     (for ACCELERATOR / gcloud)
# Without an argument: the topology of ACCELERATOR.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"
name="${1:-${ACCELERATOR}}"
if [[ "${name}" == *:* ]]; then
  tpu_accelerator "${name}" || die "${name} is not a topology such as v5e:4x4 or v5p:2x2x1."
else
  tpu_topology "${name}" \
    || die "no topology known for ${name}; the table in tpu_setup/env.sh lists the common sizes."
fi
