#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice, as one jax.distributed job.
#
#   launch/tpu_pod.sh [--setup] TPU_NAME ZONE -- python -m experiments.slim_finetune [ARGS...]
#
# --setup   first copy this checkout's committed files (git archive HEAD) to every worker and
#           install it there with JAX for TPU (pip install -e ".[tpu]": jax[tpu] and libtpu;
#           a plain install would give a CPU-only jax and the job would run on the hosts' CPUs)
#
# Before the command, every worker checks that JAX sees TPU devices
# (launch/check_platform.py) and stops with one line if not; the command itself runs with
# SLIM_JAX_EXPECT_PLATFORM=tpu, which initialize_distributed() checks again.
# Check first that the run fits the slice, on any machine, without a TPU:
#   python -m experiments.slim_finetune --preset pod_multi --compile-only true --topology v5p-64
#
# Every worker runs the same command in $REPO_DIR with SLIM_JAX_DISTRIBUTED=auto, so that
# slim_jax.parallel.initialize_distributed() lets JAX discover the slice (coordinator, process
# count and index) from the TPU metadata; each worker then feeds its own slice of every batch.
# Checkpoints and the run directory must be on storage every worker sees (a gs:// bucket).
# A TPU preemption sends SIGTERM: the trainer saves a checkpoint and stops; rerun the same
# command to resume.
#
# Environment: PROJECT (gcloud project, optional), REPO_DIR (remote checkout, default
# ~/slim_jax), SLIM_JAX_DATA_DIR (data folder on the workers, passed on when set),
# DRY_RUN=1 (print the gcloud commands instead of running them).
set -euo pipefail

usage() { sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

setup=0
if [[ "${1:-}" == "--setup" ]]; then setup=1; shift; fi
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -ge 4 && "$3" == "--" ]] || usage 2
tpu="$1" zone="$2"
shift 3

repo_dir="${REPO_DIR:-~/slim_jax}"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" --worker=all)
[[ -n "${PROJECT:-}" ]] && where+=(--project "$PROJECT")

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ $setup == 1 ]]; then
  archive="$(mktemp -d)/slim_jax.tar.gz"
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  run "${gcloud_tpu[@]}" scp "$archive" "$tpu:/tmp/slim_jax.tar.gz" "${where[@]}"
  run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command \
    "mkdir -p $repo_dir && tar -xzf /tmp/slim_jax.tar.gz -C $repo_dir && cd $repo_dir && python3 -m pip install -q -e '.[tpu]'"
fi

env_vars="SLIM_JAX_DISTRIBUTED=auto SLIM_JAX_EXPECT_PLATFORM=tpu"
[[ -n "${SLIM_JAX_DATA_DIR:-}" ]] && env_vars+=" SLIM_JAX_DATA_DIR=$(printf '%q' "$SLIM_JAX_DATA_DIR")"
remote="cd $repo_dir && python3 launch/check_platform.py tpu && $env_vars $(printf '%q ' "$@")"
run "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --command "$remote"
