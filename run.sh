#!/usr/bin/env bash
# rrcm-jax in one command.
#
#   ./run.sh            the main job on Fashion-MNIST, end to end: set-up (virtualenv,
#                       install, offline data preparation), pre-training, consistency
#                       fine-tuning, certification of a test subset, report. Demo sizes;
#                       interrupted, it picks up where it stopped.
#   ./run.sh test       the test suite (what CI runs).
#   ./run.sh setup      only the set-up.
#
# Exit statuses: a stage stopped by SIGTERM exits 75 (preempted, checkpoint written) and is
# run again, resuming, up to RRCM_MAX_RESUMES times (default 20); any other failure stops
# the pipeline with the stage's status (2 bad input, 65 no intact checkpoint, 69 workdir in
# use, 1 other), so fine-tuning never starts from a half-trained encoder.
#
# Environment: RRCM_WORKDIR (default workdirs/demo), RRCM_SIGMA (default 0.25),
# PYTHON (default python3), RRCM_VENV (default .venv: the virtualenv to create or reuse;
# an existing one elsewhere, e.g. another checkout's, is used as it is, which is how
# .ci/run tests a fresh clone without reinstalling).
set -euo pipefail
cd "$(dirname "$0")"
readonly PROG="run.sh"
# shellcheck source=launch/common.sh
source launch/common.sh

PYTHON=${PYTHON:-python3}
VENV=${RRCM_VENV:-.venv}
WORKDIR=${RRCM_WORKDIR:-workdirs/demo}
SIGMA=${RRCM_SIGMA:-0.25}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

stamp() { printf '\n=== %s  %s\n' "$(date +%H:%M:%S)" "$*"; }

# stage NAME COMMAND...: runs one stage of the pipeline, again while it is preempted (75);
# any other failure ends run.sh with the stage's exit status.
stage() {
  local name=$1 status=0
  shift
  run_resuming "$name" "${RRCM_MAX_RESUMES:-20}" "$@" || status=$?
  if ((status != 0)); then
    echo "$PROG: $name stopped with exit status $status ($(describe_status "$status")); the stages after it did not run." >&2
    exit "$status"
  fi
}

setup() {
  local t0=$SECONDS
  if [ ! -x "$VENV/bin/python" ]; then
    stamp "creating the virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import rrcm_jax, tensorflow_datasets, pytest, torch" 2>/dev/null; then
    stamp "installing rrcm-jax with its test, data and torch extras (first run only)"
    "$VENV/bin/pip" install -q -U pip
    # torch reads the authors' .pth checkpoints and the baselines' classifiers. The versions
    # are the ones the tests passed with (requirements/constraints.txt); this index offers
    # no CPU build of torchvision (which timm needs), so torch is its default build.
    "$VENV/bin/pip" install -q -c requirements/constraints.txt -e ".[test,torch]"
  fi
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      stamp "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
      (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; })
    else
      echo "note: Fashion-MNIST files not found; the prepare step will say how to get them."
    fi
  fi
  echo "set-up took $((SECONDS - t0)) s"
}

demo() {
  setup
  local py="$VENV/bin/python" t0=$SECONDS
  if "$py" -c "import tensorflow_datasets" 2>/dev/null; then
    stamp "preparing Fashion-MNIST for TFDS (offline)"
    "$py" -m rrcm_jax.data.prepare fashion_mnist
  else   # the on-device input path reads the IDX files itself
    stamp "TensorFlow Datasets absent: the stages read Fashion-MNIST's IDX files directly"
  fi
  stamp "1/4 pre-training (rRCM objective)"
  stage "pre-training" "$py" -m rrcm_jax.pretrain --config=configs/fashion_mnist_pretrain.py \
    --workdir="$WORKDIR/pretrain"
  stamp "2/4 consistency fine-tuning at sigma=$SIGMA"
  stage "fine-tuning" "$py" -m rrcm_jax.finetune --config=configs/fashion_mnist_finetune.py \
    --workdir="$WORKDIR/finetune_sigma$SIGMA" --config.init_from="$WORKDIR/pretrain" \
    --config.sigma="$SIGMA"
  stamp "3/4 certification (demo size: 50 test images, n0=100, n=2000)"
  stage "certification" "$py" -m rrcm_jax.certify --config=configs/fashion_mnist_certify.py \
    --workdir="$WORKDIR/certify" --config.init_from="$WORKDIR/finetune_sigma$SIGMA" \
    --config.sigma="$SIGMA" --config.n=2000 --config.every=200
  stamp "4/4 report"
  "$py" -m rrcm_jax.report "$WORKDIR/certify/certify_sigma$SIGMA.tsv" \
    --plot "$WORKDIR/certified_accuracy.png" --csv "$WORKDIR/certified_accuracy.csv"
  "$py" -m rrcm_jax.plot_metrics "$WORKDIR/pretrain" "$WORKDIR/knn.png" --csv "$WORKDIR/knn.csv"
  echo "pipeline took $((SECONDS - t0)) s after set-up; plots: $WORKDIR/certified_accuracy.png, $WORKDIR/knn.png"
}

tests() {
  setup
  local py="$VENV/bin/python"
  stamp "running the test suite"
  "$py" -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q --durations=15 tests/
}

case "${1:-demo}" in
  demo) demo ;;
  test) tests ;;
  setup) setup ;;
  *) echo "usage: ./run.sh [demo|test|setup] (got '$1')" >&2; exit 2 ;;
esac
