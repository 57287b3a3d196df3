#!/usr/bin/env bash
# Every result of the rRCM paper as the exact rrcm-jax command that produces it.
#
# Usage:
#   launch/paper.sh list                      rows: name and what each produces
#   launch/paper.sh print ROW [-- FLAGS...]   the command of ROW (FLAGS are appended)
#   launch/paper.sh run ROW [--launcher gpu|tpu|slurm] [--dry-run] [LAUNCHER ARGS...] [-- FLAGS...]
#
# Rows run in order: pre-training (pretrain-*), then fine-tuning at each certification
# noise level (finetune-*, from the pre-training workdir), then certification of 500
# test images (certify-*, from the fine-tuning workdir). Each row has its own workdir,
# $RRCM_ROOT/ROW, where RRCM_ROOT defaults to ./workdirs (relative to the repository
# root) and may be a gs:// path. A training row re-run with the same workdir resumes
# from its newest checkpoint.
#
# The dds-* rows certify diffusion denoised smoothing (Carlini et al. 2023) with the
# public denoiser and classifier of each dataset, read from $RRCM_PUBLIC (default
# $RRCM_ROOT/public): cifar10_uncond_50M_500K.pt (improved-diffusion) and
# vit-base-patch16-224-in21k-finetuned-cifar10/model.safetensors (Hugging Face);
# 256x256_diffusion_uncond.pt (guided-diffusion) and
# beit_large_patch16_512/model.safetensors (timm). README.md, "Diffusion denoised smoothing".
#
# Launchers (LAUNCHER ARGS go to them; FLAGS after '--' go to the rrcm-jax command,
# e.g. -- --config.data.data_dir=gs://my-bucket/tfds):
#   gpu    launch/gpu_local.sh: this host, all its GPUs, one process (the default);
#   tpu    launch/tpu_pod.sh: a Cloud TPU slice; needs --name, --zone,
#          --accelerator-type (and RRCM_ROOT=gs://... so every worker shares the workdir);
#   slurm  sbatch launch/slurm.sbatch: LAUNCHER ARGS are sbatch options (e.g. --nodes=4).
# --dry-run prints instead of running: the gpu and tpu launchers print their commands,
# the slurm launcher prints the sbatch command.
#
# Example:
#   RRCM_ROOT=gs://my-bucket/rrcm launch/paper.sh run pretrain-imagenet-rcmb \
#     --launcher tpu --name rrcm-b --zone us-east5-a --accelerator-type v5p-64 --spot
#
# Figure 1 (certified accuracy at r = 0.25, 0.5 against seconds per certified image) from
# the certify-* and dds-* rows' logs, $RRCM_ROOT/ROW/certify_sigmaSIGMA.tsv; their settings
# record the FLOPs per noisy sample (README.md, "Figure 1 from any logs"), e.g. CIFAR-10:
#   R=${RRCM_ROOT:-./workdirs}; python -m experiments.figure1 --out "$R/figure1_cifar10.png" \
#     --table "$R/figure1_cifar10.md" --logs \
#     "rRCM σ=0.25=$R/certify-cifar10-0.25/certify_sigma0.25.tsv" \
#     "rRCM σ=0.5=$R/certify-cifar10-0.5/certify_sigma0.5.tsv" \
#     "DDS σ=0.25=$R/dds-cifar10-0.25/certify_sigma0.25.tsv" \
#     "DDS σ=0.5=$R/dds-cifar10-0.5/certify_sigma0.5.tsv"
set -euo pipefail

readonly PROG="paper.sh"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
readonly LAUNCH_DIR REPO_ROOT

# name|entry point|config|row whose workdir is --config.init_from (or dds:DENOISER:CLASSIFIER,
# files under $RRCM_PUBLIC)|what it produces
readonly ROWS=(
  "pretrain-cifar10-rcmb|pretrain|configs/cifar10_pretrain_rcmb.py||CIFAR-10 RCM-B pre-training (batch 2048, 300k steps)"
  "pretrain-imagenet-rcmb|pretrain|configs/imagenet_pretrain_rcmb.py||ImageNet RCM-B pre-training (batch 4096, 600k steps)"
  "pretrain-imagenet-rcms|pretrain|configs/imagenet_pretrain_rcms.py||ImageNet RCM-S pre-training (batch 4096, 600k steps)"
  "finetune-cifar10-0.25|finetune|configs/cifar10_finetune.py:sigma=0.25|pretrain-cifar10-rcmb|CIFAR-10 fine-tuning for sigma 0.25"
  "finetune-cifar10-0.5|finetune|configs/cifar10_finetune.py:sigma=0.5|pretrain-cifar10-rcmb|CIFAR-10 fine-tuning for sigma 0.5"
  "finetune-cifar10-1.0|finetune|configs/cifar10_finetune.py:sigma=1.0|pretrain-cifar10-rcmb|CIFAR-10 fine-tuning for sigma 1.0"
  "finetune-imagenet-0.25|finetune|configs/imagenet_finetune.py:sigma=0.25|pretrain-imagenet-rcmb|ImageNet fine-tuning of RCM-B for sigma 0.25"
  "finetune-imagenet-0.5|finetune|configs/imagenet_finetune.py:sigma=0.5|pretrain-imagenet-rcmb|ImageNet fine-tuning of RCM-B for sigma 0.5"
  "finetune-imagenet-1.0|finetune|configs/imagenet_finetune.py:sigma=1.0|pretrain-imagenet-rcmb|ImageNet fine-tuning of RCM-B for sigma 1.0"
  "certify-cifar10-0.25|certify|configs/cifar10_certify.py:sigma=0.25|finetune-cifar10-0.25|CIFAR-10 certified accuracy at sigma 0.25 (500 images, n=100,000)"
  "certify-cifar10-0.5|certify|configs/cifar10_certify.py:sigma=0.5|finetune-cifar10-0.5|CIFAR-10 certified accuracy at sigma 0.5 (500 images, n=100,000)"
  "certify-cifar10-1.0|certify|configs/cifar10_certify.py:sigma=1.0|finetune-cifar10-1.0|CIFAR-10 certified accuracy at sigma 1.0 (500 images, n=100,000)"
  "certify-imagenet-0.25|certify|configs/imagenet_certify.py:sigma=0.25|finetune-imagenet-0.25|ImageNet certified accuracy at sigma 0.25 (500 images, n=100,000)"
  "certify-imagenet-0.5|certify|configs/imagenet_certify.py:sigma=0.5|finetune-imagenet-0.5|ImageNet certified accuracy at sigma 0.5 (500 images, n=100,000)"
  "certify-imagenet-1.0|certify|configs/imagenet_certify.py:sigma=1.0|finetune-imagenet-1.0|ImageNet certified accuracy at sigma 1.0 (500 images, n=100,000)"
  "dds-cifar10-0.25|certify|configs/cifar10_dds_certify.py:sigma=0.25|dds:cifar10_uncond_50M_500K.pt:vit-base-patch16-224-in21k-finetuned-cifar10/model.safetensors|CIFAR-10 DDS certified accuracy at sigma 0.25 (public denoiser and classifier, 500 images, n=100,000)"
  "dds-cifar10-0.5|certify|configs/cifar10_dds_certify.py:sigma=0.5|dds:cifar10_uncond_50M_500K.pt:vit-base-patch16-224-in21k-finetuned-cifar10/model.safetensors|CIFAR-10 DDS certified accuracy at sigma 0.5 (public denoiser and classifier, 500 images, n=100,000)"
  "dds-cifar10-1.0|certify|configs/cifar10_dds_certify.py:sigma=1.0|dds:cifar10_uncond_50M_500K.pt:vit-base-patch16-224-in21k-finetuned-cifar10/model.safetensors|CIFAR-10 DDS certified accuracy at sigma 1.0 (public denoiser and classifier, 500 images, n=100,000)"
  "dds-imagenet-0.25|certify|configs/imagenet_dds_certify.py:sigma=0.25|dds:256x256_diffusion_uncond.pt:beit_large_patch16_512/model.safetensors|ImageNet DDS certified accuracy at sigma 0.25 (public denoiser and classifier, 500 images, n=100,000)"
  "dds-imagenet-0.5|certify|configs/imagenet_dds_certify.py:sigma=0.5|dds:256x256_diffusion_uncond.pt:beit_large_patch16_512/model.safetensors|ImageNet DDS certified accuracy at sigma 0.5 (public denoiser and classifier, 500 images, n=100,000)"
  "dds-imagenet-1.0|certify|configs/imagenet_dds_certify.py:sigma=1.0|dds:256x256_diffusion_uncond.pt:beit_large_patch16_512/model.safetensors|ImageNet DDS certified accuracy at sigma 1.0 (public denoiser and classifier, 500 images, n=100,000)"
)

usage() {
  header_help
}

# Sets ROW_FIELDS to the fields of row $1 (name, entry point, config, init row, text).
find_row() {
  local row
  for row in "${ROWS[@]}"; do
    IFS='|' read -r -a ROW_FIELDS <<<"$row"
    [[ ${ROW_FIELDS[0]} != "$1" ]] || return 0
  done
  die "unknown row '$1'; 'launch/paper.sh list' shows the rows."
}

# Sets COMMAND to the rrcm-jax command of row $1 followed by the extra flags $2...
row_command() {
  find_row "$1"
  shift
  local root="${RRCM_ROOT:-./workdirs}"
  root=${root%/}
  [[ -n $root ]] || die "RRCM_ROOT is empty; give a directory or gs:// path."
  COMMAND=(python -m "rrcm_jax.${ROW_FIELDS[1]}" --config="${ROW_FIELDS[2]}"
    --workdir="$root/${ROW_FIELDS[0]}")
  if [[ ${ROW_FIELDS[3]} == dds:* ]]; then
    local public="${RRCM_PUBLIC:-$root/public}" files
    IFS=':' read -r -a files <<<"${ROW_FIELDS[3]#dds:}"
    COMMAND+=(--config.dds.denoiser="${public%/}/${files[0]}"
      --config.dds.classifier_checkpoint="${public%/}/${files[1]}")
  elif [[ -n ${ROW_FIELDS[3]} ]]; then
    COMMAND+=(--config.init_from="$root/${ROW_FIELDS[3]}")
  fi
  COMMAND+=("$@")
}

list_rows() {
  local row
  for row in "${ROWS[@]}"; do
    IFS='|' read -r -a ROW_FIELDS <<<"$row"
    printf '%-24s %s\n' "${ROW_FIELDS[0]}" "${ROW_FIELDS[4]}"
  done
}

print_row() {
  (($# >= 1)) || die "print needs a row name; 'launch/paper.sh list' shows the rows."
  local name=$1
  shift
  if (($# > 0)); then
    [[ $1 == -- ]] || die "unexpected argument '$1' after the row name; put extra flags after '--'."
    shift
  fi
  row_command "$name" "$@"
  quote_words "${COMMAND[@]}"
  printf '\n'
}

run_row() {
  (($# >= 1)) || die "run needs a row name; 'launch/paper.sh list' shows the rows."
  local name=$1 launcher=gpu dry_run=0 launcher_args=() flags=()
  shift
  while (($# > 0)); do
    case $1 in
      --launcher)
        (($# >= 2)) || die "--launcher needs a value: gpu, tpu or slurm."
        launcher=$2
        shift 2
        ;;
      --launcher=*) launcher=${1#--launcher=}; shift ;;
      --dry-run) dry_run=1; shift ;;
      --) shift; flags=("$@"); break ;;
      *) launcher_args+=("$1"); shift ;;
    esac
  done
  row_command "$name" "${flags[@]}"
  cd "$REPO_ROOT"  # the configs/ paths and the default ./workdirs are relative to it
  case $launcher in
    gpu)
      ((dry_run == 0)) || launcher_args+=(--dry-run)
      exec "$LAUNCH_DIR/gpu_local.sh" "${launcher_args[@]}" -- "${COMMAND[@]}"
      ;;
    tpu)
      [[ ${RRCM_ROOT:-} == gs://* ]] \
        || die "--launcher tpu needs RRCM_ROOT=gs://BUCKET/PATH so that every worker reads and writes the same workdir (got '${RRCM_ROOT:-./workdirs}')."
      ((dry_run == 0)) || launcher_args+=(--dry-run)
      exec "$LAUNCH_DIR/tpu_pod.sh" "${launcher_args[@]}" -- "${COMMAND[@]}"
      ;;
    slurm)
      local submit=(sbatch "${launcher_args[@]}" launch/slurm.sbatch "${COMMAND[@]}")
      if ((dry_run == 1)); then quote_words "${submit[@]}"; printf '\n'; else exec "${submit[@]}"; fi
      ;;
    *) die "--launcher must be gpu, tpu or slurm (got '$launcher')." ;;
  esac
}

main() {
  (($# >= 1)) || die "give a subcommand: list, print ROW or run ROW (see --help)."
  local subcommand=$1
  shift
  case $subcommand in
    list) list_rows ;;
    print) print_row "$@" ;;
    run) run_row "$@" ;;
    -h | --help) usage ;;
    *) die "unknown subcommand '$subcommand'; use list, print or run." ;;
  esac
}

main "$@"
