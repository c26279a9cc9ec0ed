#!/usr/bin/env bash
# Copies this checkout to every worker (as it is: committed or not; `git add` new files)
# and installs the TPU requirements there, in REPO_DIR/.venv under PYTHON.
# The TPU runtime images (v2-alpha-tpuv5-lite, v2-alpha-tpuv5, v2-alpha-tpuv6e,
# tpu-ubuntu2204-base) ship Ubuntu 22.04 and its Python 3.10, and this project needs
# 3.11+: when PYTHON (python3.11) is missing, it is installed from Ubuntu's archive.
# Fails, naming the slices, when the copy or the install failed on any worker.
set -euo pipefail
here="$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR source=env.sh
source "${here}/env.sh"
root="$(cd "${here}/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT
archive="${tmp}/repo.tar.gz"
# `stash create` makes a commit of the working tree (tracked files) without touching
# the branch, the index or the files; it prints nothing when nothing changed.
tree="$(git -C "${root}" -c user.name=tpu_setup -c user.email=tpu_setup@localhost stash create)"
git -C "${root}" archive --format=tar.gz -o "${archive}" "${tree:-HEAD}"
untracked="$(git -C "${root}" ls-files --others --exclude-standard -- llm experiments tpu_setup)"
if [[ -n "${untracked}" ]]; then
  echo "Not copied (untracked; \`git add\` them to copy them): $(tr '\n' ' ' <<< "${untracked}")"
fi

while read -r name; do
  run_tpus tpu-vm scp "${archive}" "${name}:repo.tar.gz" --worker=all
done < <(slice_names)

py="$(printf %q "${PYTHON}")"
repo="$(printf %q "${REPO_DIR}")"
apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600"
steps=(
  "{ command -v ${py} > /dev/null || { ${apt} update && ${apt} install -y ${py} ${py}-venv; }; }"
  "${py} -c 'import sys; assert sys.version_info >= (3, 11), sys.version'"
  "mkdir -p ${repo}" "tar -xzf repo.tar.gz -C ${repo}" "cd ${repo}"
  "${py} -m venv .venv" ". .venv/bin/activate" "pip install -q -U pip"
  "pip install -q -r requirements.txt -r requirements-tpu.txt"
  "python -c 'import jax; print(jax.devices())'"
)
command="${steps[0]}"
for step in "${steps[@]:1}"; do command+=" && ${step}"; done
on_all_workers "${command}"
echo "Set up ${TPU_NAME}: ${REPO_DIR}/.venv on every worker."
