#!/usr/bin/env bash
# Long pre-training on a lent GPU (H100/H200), then fine-tuning and certification, in one call:
#
#   bash benchmarks/gpu_study.sh [--cpu] [--minutes M] [--batch B] [--steps N] [--lr LR]
#                                [--sigma S] [--stages pretrain,finetune,certify,e2e,gpu_check,replication]
#                                [--carry DIR] [--out DIR] [--resume-from DIR]
#                                [--budget-scales 4,16] [--replication-sigmas 0.5]
#                                [--replication-methods rrcm,consistency] [--replication-minutes M]
#                                [--replication-root DIR]
#
# Stages (default: pretrain,finetune,certify):
#   pretrain   configs/fashion_mnist_pretrain.py with the on-device input pipeline
#              (data.pipeline=device) at a widened batch (default 2048). The schedules'
#              horizon is the run's length: total_steps = the measured step rate
#              (`--config.estimate=True`, input included, compilation excluded) x M minutes
#              x 0.85 (the k-NN monitor and checkpoints take the rest), unless --steps N fixes
#              it; warm-up, target-EMA decay and the icm horizon follow total_steps. The plan
#              is written to DIR/study/plan.json and reused when the same DIR is run again
#              (the run resumes; a changed total_steps would be refused). The "latest"
#              checkpoint every minute (latest_every = one minute of steps), a kept one at
#              the end, the k-NN monitor 8 times (and at step 0). `timeout` stops it
#              with SIGTERM 3 minutes after its planned length (compilation and the k-NN
#              monitor included): it checkpoints and exits 75, and the next stages use
#              that checkpoint.
#   finetune   configs/fashion_mnist_finetune.py from that checkpoint at sigma S (default
#              0.25): 2 epochs of consistency fine-tuning, device pipeline.
#   certify    CERTIFY on every 100th test image (100 images), n0 = 100, n = 10,000,
#              alpha = 0.001, then the Markdown table (rrcm_jax.report).
#   e2e        benchmarks/pipeline_end_to_end.py: the step alone vs the device pipeline
#              (no tf.data on the GPU host) for Fashion-MNIST at 256 and 2048 and RCM-B at
#              32x32 (patch 4), batch 256.
#   gpu_check  benchmarks/gpu_check.sh --stages matmul,train_step (about 2 minutes).
#   replication  python -m experiments.replication (configs/fashion_mnist_replication.py,
#              full sizes) at the larger budgets: --sigmas 0.5 (--replication-sigmas), --methods
#              rrcm,consistency (--replication-methods), --budget-scales 4,16, data from the
#              carried IDX files (--arrays); everything at 1x first (the pre-training, rRCM's
#              three starts, the choice), then 4x and 16x. Root: --replication-root (default
#              workdirs/gpu_replication, ignored by git, so a second call on the still-warm machine
#              resumes it; $OUT is emptied before each call and brings back at most 8 files).
#              SIGTERM after --replication-minutes (default 8): the running stage checkpoints
#              and the driver stops (status 124); the same command resumes. Then
#              DIR/replication.tar.gz (the root without checkpoints: summary.md, figures,
#              stages.jsonl, metrics, certification logs) and DIR/replication_summary.md.
#              --cpu: --quick sizes, sigma 0.25, rRCM from the EMA start only, no larger budget,
#              root DIR/replication.
# Everything lands in DIR (default $OUT when set, else benchmarks/results/gpu_study):
# study/{pretrain,finetune,certify}/ workdirs (so the checkpoints come back with $OUT),
# gpu_study.log, pipeline_end_to_end.json, gpu_check/.
#
# Needs jax, flax, optax, orbax-checkpoint, absl-py, etils, scipy: NOT TensorFlow, TFDS or
# CLU. ml_collections and the Fashion-MNIST IDX files travel in the carry folder (default
# workdirs/gpu_carry, see benchmarks/README.md "The GPU study"): site/ (ml_collections,
# put on PYTHONPATH) and fashion-mnist/ (train-*-ubyte.gz, t10k-*-ubyte.gz).
#
# --resume-from DIR: copy DIR/study (an earlier call's $OUT, brought back and carried) into
# this call's DIR first, so that a run longer than one call's limit resumes where it stopped.
#
# --cpu: the same stages on the CPU with tiny sizes (batch 32, 12 steps unless --minutes is
# given, 5 images, n = 200), what the tests run.
set -euo pipefail
cd "$(dirname "$0")/.."

CPU=0
MINUTES=4
MINUTES_SET=0
BATCH=""
STEPS=""
LR=""
SIGMA=0.25
STAGES="pretrain,finetune,certify"
CARRY="workdirs/gpu_carry"
DIR="${OUT:-benchmarks/results/gpu_study}"
FROM=""
SCALES=""
REP_SIGMAS=""
REP_METHODS="rrcm,consistency"
REP_MINUTES=8
REP_ROOT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --minutes) MINUTES="$2"; MINUTES_SET=1; shift ;;
    --batch) BATCH="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --lr) LR="$2"; shift ;;
    --sigma) SIGMA="$2"; shift ;;
    --stages) STAGES="$2"; shift ;;
    --carry) CARRY="$2"; shift ;;
    --out) DIR="$2"; shift ;;
    --resume-from) FROM="$2"; shift ;;
    --budget-scales) SCALES="$2"; shift ;;
    --replication-sigmas) REP_SIGMAS="$2"; shift ;;
    --replication-methods) REP_METHODS="$2"; shift ;;
    --replication-minutes) REP_MINUTES="$2"; shift ;;
    --replication-root) REP_ROOT="$2"; shift ;;
    *) echo "error: unknown argument $1 (allowed: --cpu, --minutes M, --batch B, --steps N," \
            "--lr LR, --sigma S, --stages A,B, --carry DIR, --out DIR, --resume-from DIR," \
            "--budget-scales A,B, --replication-sigmas A,B, --replication-methods A,B," \
            "--replication-minutes M, --replication-root DIR)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${STAGES//,/ }; do
  case "$s" in pretrain|finetune|certify|e2e|gpu_check|replication) ;;
    *) echo "error: --stages: unknown stage $s (allowed: pretrain, finetune, certify, e2e," \
            "gpu_check, replication)" >&2; exit 2 ;;
  esac
done
has() { [[ ",$STAGES," == *",$1,"* ]]; }

PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if [ -d "$CARRY/site" ]; then
  export PYTHONPATH="$(cd "$CARRY/site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import ml_collections, absl, etils, orbax.checkpoint" 2>/dev/null; then
  echo "error: ml_collections (or absl-py, etils, orbax-checkpoint) cannot be imported; carry" \
       "it in $CARRY/site (pip install --no-deps --target $CARRY/site ml_collections)." >&2
  exit 2
fi
DATA="$CARRY/fashion-mnist"
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist
if ! ls "$DATA"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "error: no Fashion-MNIST IDX files in $CARRY/fashion-mnist (copy train-*-ubyte.gz and" \
       "t10k-*-ubyte.gz there)." >&2
  exit 2
fi
DATA="$(cd "$DATA" && pwd)"

if [ -n "$FROM" ] && [ ! -d "$FROM/study" ]; then
  echo "error: --resume-from $FROM has no study/ folder (give an earlier call's output folder)." >&2
  exit 2
fi
mkdir -p "$DIR/study"
if [ -n "$FROM" ]; then cp -r "$FROM/study/." "$DIR/study/"; fi
DIR="$(cd "$DIR" && pwd)"   # Orbax wants absolute paths
W="$DIR/study"
if [ "$CPU" = 1 ]; then
  export JAX_PLATFORMS=cpu
  BATCH="${BATCH:-32}"; KNN_EVALS=2; SLACK=600
  [ "$MINUTES_SET" = 1 ] || STEPS="${STEPS:-12}"   # --minutes: the step rate sets the length
  PRE=("--config.knn.bank_split=train[:2%]" "--config.knn.query_split=test[:2%]")
  CERT=(--config.n=200 --config.every=40 --config.num_images=5 --config.chunk_size=100)
  FT=(--config.epochs=1 --config.steps_per_epoch=4 --config.batch_size=32
      --config.eval_batch_size=500 "--config.data.eval_split=test[:500]")
  E2E=(--quick)
  REPL=(--quick --sigmas "${REP_SIGMAS:-0.25}" --inits ema --budget-scales "${SCALES:-none}")
  REP_ROOT="${REP_ROOT:-$DIR/replication}"
else
  BATCH="${BATCH:-2048}"; KNN_EVALS=8; SLACK=180
  PRE=()
  CERT=(--config.n=10000 --config.every=100)
  FT=()
  E2E=(--cases fmnist-256,fmnist-2048,rcmb32-256 --modes resident,device --rounds 5 --steps 20)
  REPL=(--sigmas "${REP_SIGMAS:-0.5}" --budget-scales "${SCALES:-4,16}")
  REP_ROOT="${REP_ROOT:-workdirs/gpu_replication}"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
LOG="$DIR/gpu_study.log"
touch "$LOG"
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
command -v nvidia-smi >/dev/null && [ "$CPU" = 0 ] && nvidia-smi -L | tee -a "$LOG"
D=(--config.data.arrays="$DATA")
FAILED=0

if has pretrain; then
  log "pretrain: batch $BATCH, ${MINUTES} min"
  P=(--config=configs/fashion_mnist_pretrain.py --workdir="$W/pretrain" "${D[@]}"
     ${LR:+--config.optim.lr=$LR} "${PRE[@]}")
  if [ ! -f "$W/plan.json" ]; then
    if [ -z "$STEPS" ]; then
      EST="$("$PY" -m rrcm_jax.pretrain "${P[@]}" --config.batch_size="$BATCH" \
             --config.knn_every=0 --config.estimate=True \
             2>&1 | tee -a "$LOG")"
      RATE="$(echo "$EST" | sed -n 's/.* at \([0-9.e+-]*\) steps\/s.*/\1/p' | tail -1)"
      [ -n "$RATE" ] || { echo "error: the estimate printed no step rate" >&2; exit 1; }
    else
      RATE=0
    fi
    "$PY" - "$RATE" "$MINUTES" "$STEPS" "$BATCH" "$KNN_EVALS" > "$W/plan.json" <<'EOF'
import json, math, sys
rate, minutes, steps, batch, evals = (float(sys.argv[1]), float(sys.argv[2]), sys.argv[3],
                                      int(sys.argv[4]), int(sys.argv[5]))
total = int(steps) if steps else max(1, int(rate * minutes * 60 * 0.85))
per_minute = max(1, int(rate * 60)) if rate else max(1, total // 4)
print(json.dumps(dict(steps_per_s=rate, minutes=minutes, batch_size=batch, total_steps=total,
                      latest_every=min(per_minute, total), save_every=total,
                      knn_every=max(1, total // evals), log_every=max(1, min(per_minute // 4, 100)))))
EOF
  fi
  cat "$W/plan.json" | tee -a "$LOG"
  plan() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$W/plan.json" "$1"; }
  set +e
  LIMIT="$("$PY" -c "import sys; print(int(float(sys.argv[1]) * 60) + int(sys.argv[2]))" \
           "$MINUTES" "$SLACK")"
  timeout --preserve-status --signal=TERM --kill-after=60 "$LIMIT" \
    "$PY" -m rrcm_jax.pretrain "${P[@]}" --config.batch_size="$(plan batch_size)" \
      --config.total_steps="$(plan total_steps)" --config.latest_every="$(plan latest_every)" \
      --config.save_every="$(plan save_every)" --config.knn_every="$(plan knn_every)" \
      --config.log_every="$(plan log_every)" 2>&1 | tee -a "$LOG"
  STATUS=${PIPESTATUS[0]}
  set -e
  log "pretrain exit status $STATUS (0 complete, 75 stopped at its time limit with a checkpoint)"
  [ "$STATUS" = 0 ] || [ "$STATUS" = 75 ] || FAILED=1
fi

if has finetune && [ "$FAILED" = 0 ]; then
  log "finetune: sigma $SIGMA"
  "$PY" -m rrcm_jax.finetune --config=configs/fashion_mnist_finetune.py --workdir="$W/finetune" \
    "${D[@]}" --config.init_from="$W/pretrain" --config.sigma="$SIGMA" "${FT[@]}" 2>&1 \
    | tee -a "$LOG" || FAILED=1
fi

if has certify && [ "$FAILED" = 0 ]; then
  log "certify: sigma $SIGMA"
  "$PY" -m rrcm_jax.certify --config=configs/fashion_mnist_certify.py --workdir="$W/certify" \
    "${D[@]}" --config.init_from="$W/finetune" --config.sigma="$SIGMA" "${CERT[@]}" 2>&1 \
    | tee -a "$LOG" || FAILED=1
  if [ "$FAILED" = 0 ]; then
    "$PY" -m rrcm_jax.report "$W/certify/certify_sigma$SIGMA.tsv" 2>&1 | tee -a "$LOG" || FAILED=1
  fi
fi

if has e2e; then
  log "e2e: the step alone vs the device pipeline"
  "$PY" -m benchmarks.pipeline_end_to_end "${E2E[@]}" --out "$DIR/pipeline_end_to_end.json" \
    2>&1 | tee -a "$LOG" || FAILED=1
fi

if has gpu_check; then
  log "gpu_check: matmul, train_step"
  CHECK=(--out "$DIR/gpu_check" --stages matmul,train_step --budget 150)
  [ "$CPU" = 1 ] && CHECK+=(--cpu)
  bash benchmarks/gpu_check.sh "${CHECK[@]}" 2>&1 | tee -a "$LOG" || FAILED=1
fi
if has replication; then
  log "replication: methods $REP_METHODS, ${REPL[*]}, at most $REP_MINUTES min, root $REP_ROOT"
  mkdir -p "$REP_ROOT"
  REP_ROOT="$(cd "$REP_ROOT" && pwd)"
  LIMIT="$("$PY" -c "import sys; print(int(float(sys.argv[1]) * 60))" "$REP_MINUTES")"
  set +e
  # the stages' compilations are shared through the persistent cache (rRCM's starts, the
  # certifications); a second call on the same machine finds it beside the root
  JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${REP_ROOT}_jax_cache}" \
    timeout --signal=TERM --kill-after=60 "$LIMIT" \
    "$PY" -m experiments.replication --root "$REP_ROOT" --data fashion_mnist --arrays "$DATA" \
      --methods "$REP_METHODS" "${REPL[@]}" 2>&1 | tee -a "$LOG"
  STATUS=${PIPESTATUS[0]}
  set -e
  log "replication exit status $STATUS (0 complete, 124 stopped at --replication-minutes: run" \
      "the same command to resume)"
  [ "$STATUS" = 0 ] || [ "$STATUS" = 124 ] || FAILED=1
  tar -czf "$DIR/replication.tar.gz" -C "$REP_ROOT" --exclude=checkpoints --exclude='best_*' \
    --exclude=tensorboard --exclude=plugins --exclude=.rrcm_lock . || FAILED=1
  if [ -f "$REP_ROOT/summary.md" ]; then cp "$REP_ROOT/summary.md" "$DIR/replication_summary.md"; fi
fi
log "gpu_study done, status $FAILED"
exit "$FAILED"
