#!/usr/bin/env bash
# One prepared run on a lent GPU host (H100/H200), at most about 5 minutes:
#
#   bash benchmarks/gpu_check.sh [--cpu] [--classifier FINETUNE_WORKDIR] [--images FILE]
#                                [--out DIR] [--budget SECONDS] [--stages NAME,NAME]
#
# Measures, in one Python process (so JAX starts once):
#   1. the bf16 and float32 matrix-multiply rates (8192^3 products);
#   2. the certification sampler on ViT-B/16 at 224 (RCM-B, ~35 GFLOP per sample) in
#      bfloat16 with cuDNN fused attention (jax.nn.dot_product_attention) and in float32,
#      samples/s and the fraction of the matching matmul rate (target: bf16 >= 40 %);
#   3. bfloat16 vs float32 prediction agreement on noisy inputs of a TRAINED classifier
#      (a fine-tuning workdir given with --classifier; --images: an .npz with images and
#      labels, or the Fashion-MNIST IDX file; skipped, with the reason, without one);
#   4. the RCM-B pre-training step (bfloat16, per-device batch 64, with and without remat),
#      images/s on a batch already on the device;
#   5. the compiled memory analysis of that step at 224 for per-device batches 64-512, with
#      and without remat (FSDP over 8 devices as an estimate: one GPU here);
#   6. diffusion denoised smoothing against rRCM (benchmarks/inference_cost.py): FLOPs per
#      noisy sample and samples/s of the CIFAR-10 and ImageNet pairs in bfloat16, the bare
#      per-chunk function and smoothing.Sampler end to end ("clean_and_noise" for DDS).
# Each stage is skipped once the time budget is spent. Results: DIR/gpu_check.json (all
# stages) and DIR/gpu_check.log; DIR defaults to $OUT when set (the device tool), else
# benchmarks/results/gpu.
#
# --cpu runs the same stages on the CPU with tiny sizes (the tests run it).
#
# Needs jax (with CUDA), flax, optax, orbax-checkpoint, scipy and ml_collections; NOT
# TensorFlow. ml_collections is pure Python: when it is missing, the script installs it
# from a wheel in $RRCM_WHEELS (default workdirs/gpu_carry/wheels), e.g. made here with
#   pip download --no-deps -d workdirs/gpu_carry/wheels ml_collections
set -euo pipefail
cd "$(dirname "$0")/.."

CPU=0
CLASSIFIER=""
IMAGES=""
DIR="${OUT:-benchmarks/results/gpu}"
BUDGET=280
STAGES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --classifier) CLASSIFIER="$2"; shift ;;
    --images) IMAGES="$2"; shift ;;
    --out) DIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --stages) STAGES="$2"; shift ;;
    *) echo "error: unknown argument $1 (allowed: --cpu, --classifier DIR, --images FILE," \
            "--out DIR, --budget SECONDS, --stages A,B)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  WHEELS="${RRCM_WHEELS:-workdirs/gpu_carry/wheels}"
  if ls "$WHEELS"/ml_collections-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/rrcm_site \
      "$WHEELS"/ml_collections-*.whl
    export PYTHONPATH="/tmp/rrcm_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "error: ml_collections is not installed and no wheel is in $WHEELS;" \
         "pip install ml_collections, or carry its wheel there (see the header)." >&2
    exit 2
  fi
fi

mkdir -p "$DIR"
if [ -n "$CLASSIFIER" ]; then CLASSIFIER="$(cd "$CLASSIFIER" && pwd)"; fi   # Orbax: absolute
if [ "$CPU" = 1 ]; then export JAX_PLATFORMS=cpu; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
LOG="$DIR/gpu_check.log"
: > "$LOG"
command -v nvidia-smi >/dev/null && [ "$CPU" = 0 ] && nvidia-smi -L | tee -a "$LOG"

"$PY" - "$CPU" "$CLASSIFIER" "$IMAGES" "$DIR" "$BUDGET" "$STAGES" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys, tempfile, time, traceback

cpu, classifier, images, out_dir = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4]
budget, only = float(sys.argv[5]), [s for s in sys.argv[6].split(",") if s]
start = time.time()
import flax, jax
from benchmarks import report
from benchmarks import inference_cost, matmul, memory, sampler, train_step

print(f"jax {jax.__version__}, flax {flax.__version__}, devices {jax.devices()}", flush=True)
tmp = tempfile.mkdtemp()
if cpu:
  stages = [
      ("matmul", matmul.main, ["--quick"]),
      ("sampler_bfloat16", sampler.main, ["--quick", "--dtype", "bfloat16"]),
      ("sampler_float32", sampler.main, ["--quick"]),
      ("train_step", train_step.main, ["--quick", "--no-pipeline"]),
      ("memory", memory.main, ["--quick", "--devices", "1"]),
      ("inference_cost", inference_cost.main, ["--quick", "--sampler"]),
  ]
  agreement_args = ["--agreement-count", "4", "--agreement-samples", "32"]
else:
  stages = [
      ("matmul", matmul.main, ["--dtypes", "bfloat16,float32", "--repeats", "3"]),
      ("sampler_bfloat16", sampler.main, ["--models", "rcmb", "--dtype", "bfloat16", "--attention",
                                          "cudnn", "--chunks", "256,1024", "--rounds", "2",
                                          "--seconds", "0.3"]),
      ("sampler_bfloat16_xla_attention", sampler.main, ["--models", "rcmb", "--dtype", "bfloat16",
                                                        "--chunks", "256", "--rounds", "2",
                                                        "--seconds", "0.3"]),
      ("sampler_float32", sampler.main, ["--models", "rcmb", "--chunks", "256", "--rounds", "2",
                                         "--seconds", "0.3"]),
      ("train_step", train_step.main, ["--configs", "rcmb", "--batch", "64", "--steps", "3",
                                       "--rounds", "2", "--no-pipeline"]),
      ("memory", memory.main, ["--batches", "128,512", "--devices", "1"]),
      ("train_step_remat", train_step.main, ["--configs", "rcmb", "--batch", "64", "--steps", "3",
                                             "--rounds", "2", "--no-pipeline", "--remat"]),
      ("inference_cost", inference_cost.main, ["--datasets", "cifar10,imagenet", "--dtype",
                                               "bfloat16", "--chunk", "32", "--sampler",
                                               "--seconds", "2"]),
  ]
  agreement_args = ["--agreement-count", "100", "--agreement-samples", "1000"]
if classifier:
  extra = ["--agreement-images", images] if images else []
  stages.insert(2, ("agreement", sampler.main, ["--models", "", "--agreement", classifier,
                                               *agreement_args, *extra]))

if only:
  unknown = set(only) - {name for name, _, _ in stages}
  if unknown:
    sys.exit(f"error: --stages {sorted(unknown)} are not among {[n for n, _, _ in stages]}.")
  stages = [stage for stage in stages if stage[0] in only]
results = {}
if not classifier and (not only or "agreement" in only):
  results["agreement"] = dict(skipped="no trained classifier given (--classifier)")


def save():   # after every stage: a run cut short still leaves what it measured
  return report.write_results("gpu_check", dict(stages=results, seconds=time.time() - start),
                                  os.path.join(out_dir, "gpu_check.json"))


for name, main, args in stages:
  if time.time() - start > budget:
    results[name] = dict(skipped=f"time budget of {budget:.0f} s spent")
    print(f"== {name}: skipped (budget)", flush=True)
    continue
  print(f"== {name} ({time.time() - start:.0f} s)", flush=True)
  try:
    results[name] = dict(result=main(args + ["--out", os.path.join(tmp, name + ".json")]))
    results[name]["json"] = json.load(open(os.path.join(tmp, name + ".json")))
    results[name].pop("result")
  except Exception as e:  # pylint: disable=broad-except  (report and go on to the next stage)
    traceback.print_exc()
    results[name] = dict(error=f"{type(e).__name__}: {e}")
  save()
path = save()
print(f"gpu_check done in {time.time() - start:.0f} s: {path}")
failed = [k for k, v in results.items() if "error" in v]
sys.exit(1 if failed else 0)
EOF
