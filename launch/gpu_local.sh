#!/usr/bin/env bash
# Runs one rrcm-jax command on this host: one process drives all local GPUs.
#
# Usage:
#   launch/gpu_local.sh [--gpus 0,1,...] [--mem-fraction F] [--dry-run] -- COMMAND...
#
# Example (CIFAR-10 RCM-B pre-training on an 8-GPU host):
#   launch/gpu_local.sh -- python -m rrcm_jax.pretrain \
#     --config=configs/cifar10_pretrain_rcmb.py --workdir=workdirs/pretrain-cifar10-rcmb
#
# Install once (in the environment that runs COMMAND):
#   pip install -U "jax[cuda12]"     # CUDA 12 wheels, NVIDIA driver >= 525
#   pip install -U "jax[cuda13]"     # or CUDA 13 wheels, NVIDIA driver >= 580
#   pip install -e ".[data]"          # rrcm-jax with its tf.data input pipelines
# The wheels bring their own CUDA, cuDNN and NCCL; no system CUDA toolkit is needed.
# Check with: python -c "import jax; print(jax.devices())"
#
# One process sees every GPU: the mesh's "data" axis spans them and XLA's collectives
# (NCCL) give the global InfoNCE and synchronized BatchNorm their all-device view.
# jax.distributed is not started: RRCM_DISTRIBUTED and the explicit RRCM_COORDINATOR /
# RRCM_NUM_PROCESSES / RRCM_PROCESS_ID are removed from COMMAND's environment.
#
# Memory: JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of each GPU (its own default
# is 0.75). This script sets 0.90 unless --mem-fraction or the variable says otherwise:
# the large-batch steps need the room, and TensorFlow (input pipeline) stays off the
# GPUs. A preempted or interrupted run resumes from its --workdir when started again.
#
# Exit status: COMMAND's. SIGTERM and SIGINT sent to this script are passed on to it.
# 75 means preempted with a checkpoint written: --max-resumes N runs COMMAND again (it
# resumes) up to N times; any other non-zero status is a failure and is reported once.
set -euo pipefail

readonly PROG="gpu_local.sh"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  header_help
  cat <<'EOF'
Options:
  --gpus IDS          comma-separated GPU indices to use (sets CUDA_VISIBLE_DEVICES; default all).
  --mem-fraction F    fraction of each GPU's memory JAX preallocates, 0 < F <= 1 (default 0.90).
  --max-resumes N     run COMMAND again, resuming, up to N times when it exits 75 (default 0).
  --dry-run           print the command instead of running it.
  -h, --help          this text.
EOF
}

main() {
  local gpus="" fraction="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}" dry_run=0 max_resumes=0
  local command=()
  while (($# > 0)); do
    case $1 in
      --gpus | --mem-fraction | --max-resumes)
        if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then die "$1 needs a value."; fi
        case $1 in
          --gpus) gpus=$2 ;;
          --mem-fraction) fraction=$2 ;;
          --max-resumes) max_resumes=$2 ;;
        esac
        shift 2
        ;;
      --dry-run) dry_run=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; command=("$@"); break ;;
      *) die "unknown argument '$1' (options come before '--', the command after it; see --help)." ;;
    esac
  done
  [[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || die "--gpus '$gpus' is not a comma-separated list of GPU indices like 0,1,2,3."
  [[ $fraction =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] \
    || die "--mem-fraction '$fraction' must be a number in (0, 1], e.g. 0.9."
  [[ $max_resumes =~ ^[0-9]+$ ]] || die "--max-resumes must be a whole number (got '$max_resumes')."
  ((${#command[@]} > 0)) \
    || die "no command given; put it after '--', e.g. -- python -m rrcm_jax.pretrain --config=... --workdir=..."

  local launch=(env -u RRCM_DISTRIBUTED -u RRCM_COORDINATOR -u RRCM_NUM_PROCESSES -u RRCM_PROCESS_ID
    XLA_PYTHON_CLIENT_MEM_FRACTION="$fraction")
  [[ -z $gpus ]] || launch+=(CUDA_VISIBLE_DEVICES="$gpus")
  launch+=("${command[@]}")
  if [[ $dry_run == 1 ]]; then
    quote_words "${launch[@]}"
    printf '\n'
    return 0
  fi
  local status=0 resumes=0
  while :; do
    status=0
    run_forwarding "${launch[@]}" || status=$?
    if ((status != EX_PREEMPTED || resumes >= max_resumes || STOP_REQUESTED)); then
      break
    fi
    resumes=$((resumes + 1))
    echo "$PROG: the command was preempted (exit 75, checkpoint written); running it again to resume ($resumes of at most $max_resumes)." >&2
  done
  if ((status == EX_PREEMPTED)); then
    echo "$PROG: the command was preempted (exit 75, checkpoint written); run the same launch again to resume from its workdir." >&2
  elif ((status != 0)); then
    echo "$PROG: the command failed with exit status $status ($(describe_status "$status"))." >&2
  fi
  return "$status"
}

main "$@"
