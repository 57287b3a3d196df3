r"""The replication experiment: rRCM against the classic baselines at equal training FLOPs.

  python -m experiments.replication --root results/replication   # runs every stage below

Fashion-MNIST, one small ViT for every method, σ ∈ {0.25, 0.5} (pixel space;
the classifiers see 2σ in model space). The argument (`stage=`, `sigma=`,
`quick=`; `config_arg` writes it) picks the stage:

  stage=pretrain               rRCM pre-training (one run, shared by every σ)
      python -m rrcm_jax.pretrain --config=configs/fashion_mnist_replication.py:stage=pretrain \
          --workdir=ROOT/pretrain
  stage=rrcm,sigma=S           (a) rRCM: consistency fine-tuning of the pre-trained encoder
      python -m rrcm_jax.finetune \
          --config=configs/fashion_mnist_replication.py:stage=rrcm,sigma=0.25 \
          --workdir=ROOT/rrcm_sigma0.25 --config.init_from=ROOT/pretrain
  stage=gaussian,sigma=S       (b) Gaussian noise augmentation from scratch (Cohen et al. 2019)
  stage=consistency,sigma=S    (c) consistency regularization from scratch (Jeong & Shin 2020)
      python -m rrcm_jax.finetune \
          --config=configs/fashion_mnist_replication.py:stage=gaussian,sigma=0.25 \
          --workdir=ROOT/gaussian_sigma0.25
  stage=certify,sigma=S        CERTIFY, n0 = 100, n = 10,000, α = 0.001, every 50th test image
      python -m rrcm_jax.certify \
          --config=configs/fashion_mnist_replication.py:stage=certify,sigma=0.25 \
          --workdir=ROOT/certify_rrcm_sigma0.25 --config.init_from=ROOT/rrcm_sigma0.25

  stage=rrcm,sigma=S,init=I    rRCM from start I of INITS (ema, online, ema_debiased:
                               config.init_weights); the driver keeps the best on validation
  stage=clean,share=F          DDS's clean classifier (task "clean") on F of the budget,
                               F in CLEAN_SHARES = 0.125, 0.25, 0.5
  stage=denoiser,share=F       DDS's denoiser (python -m rrcm_jax.diffusion, U-Net
                               fashion_mnist_tiny, 0.096 GFLOP per forward, batch 64) on 1 − F
  stage=dds_certify,sigma=S    CERTIFY of DDS, the protocol below on every 200th test image
                               (50 images), with --config.dds.denoiser / .classifier
  scale=4 or 16                (pretrain, rrcm, gaussian, consistency) the budget × 4 or × 16:
                               pre-training steps, rRCM's epochs, a baseline's steps per epoch

`quick=True` gives the same model and the same FLOP matching on a few steps,
images and samples (the smoke test of `experiments.replication --quick`).

The model: ViT width 128, depth 4, 4 heads, patch 7 on 28×28×1 (16 patches,
18 tokens with cls and time), MLP ratio 4: 801,930 classifier parameters;
pre-training adds the projection head 128 → 512 → 512 → 128 (1,195,904
parameters). One classifier forward = 14.59 M multiply-adds
(`rrcm_jax.flops.forward_flops` / 2 = 29.18 MFLOP; 29.96 MFLOP with the
projection head). Data: train[:90%] for training (pre-training included), train[90%:]
for validation and best checkpoints, test for the test accuracies and the
certification. Seed 0 everywhere (initialization, data order, training
noise, certification noise).

Equal training FLOPs (a forward without gradient counts 1, forward + backward
3, `rrcm_jax.flops.FORWARD_EQUIVALENTS`; the target network's forwards count): the
budget is rRCM's *whole* pre-training plus its fine-tuning at one σ
(`experiments/budgets.py`, `budget_flops`), though the one pre-training
serves both σ. The baselines' steps per epoch (`SIZES`) are the budget's
(`budgets.scratch_schedule`; tests/test_replication.py checks that they
match):

  rRCM         pre-training 800 steps × 256 images × 12 forwards  = 73.64 TFLOP
               + fine-tuning 2 epochs × 421 steps × 128 images × 6 = 18.87 TFLOP
  budget       92.50 TFLOP per σ and method
  Gaussian     8 × 1,032 steps × 128 images × 3 forwards (19.6 epochs; +0.001 %)
  consistency  8 × 516 steps × 128 images × 6 forwards   (9.8 epochs; +0.001 %)

Measured throughput, from which the budget was sized (this 2-core AMD EPYC
VM, jax 0.10.2 on CPU, 1 device, the real Fashion-MNIST pipelines, steady
state after compilation, 2026-11-26, while other benchmarks and tests ran:
load average 7.5-9.8):

  stage           images/s   GFLOP/s   CPU-s per s   GFLOP per CPU-s
  pre-training      47.3       17.0        0.49           34.5
  consistency       89.2       15.6        0.48           32.6
  Gaussian         249         21.8        0.72           30.4
  certification   900-1,076 noisy samples/s (≈ 29 GFLOP/s)   0.72    ≈ 40

Training does ≈ 33 GFLOP per CPU-second whatever the method. With the
machine to itself we assume 1.6 CPU-seconds per second (80 % of the 2 cores;
an assumption, not a measurement): ≈ 53 GFLOP/s, so the 92.5 TFLOP budget is
≈ 29 minutes per method and σ (rRCM: 23 min pre-training, shared, + 6 min
fine-tuning), and one certification (200 × 10,100 forwards = 58.9 TFLOP, at
≈ 64 GFLOP/s) ≈ 15 minutes. At the measurement's load everything takes about
3× as long.
"""
import ml_collections

from configs import common

SIGMAS = (0.25, 0.5)                      # the experiment's σ (the configs also take 1.0)
METHODS = ("rrcm", "gaussian", "consistency")
# DDS's training stages: the clean classifier and the denoiser (no σ), and its certification
DDS_STAGES = ("clean", "denoiser", "dds_certify")
STAGES = ("pretrain", "certify") + METHODS + DDS_STAGES
NO_SIGMA = ("pretrain", "clean", "denoiser")
INITS = ("ema", "online", "ema_debiased")  # rRCM's start (config.init_weights), chosen on val
SCALES = (1, 4, 16)                       # budget multiples (`scale=`): 4 and 16 are later points
SCALED = ("pretrain",) + METHODS          # the stages `scale=` multiplies
# DDS: budget shares of the clean classifier tried (validation picks one; the denoiser gets
# the rest). Per share: (classifier steps at batch `batch`, denoiser steps at batch
# `denoiser_batch`), each spending its share of the budget (experiments/budgets.py,
# dds_schedule; tests/test_replication.py checks them).
CLEAN_SHARES = (0.125, 0.25, 0.5)
CLEAN_EPOCHS = 4                          # validations of a clean classifier
DENOISER_PRESET = "fashion_mnist_tiny"    # rrcm_jax.diffusion.unet.UNET_PRESETS
DDS_STEPS = {False: {0.125: (1032, 4396), 0.25: (2064, 3768), 0.5: (4128, 2512)},
             True: {0.125: (3, 11), 0.25: (6, 10), 0.5: (11, 7)}}
SEED = 0
NUM_CLASSES = 10
WARMUP = 0.1                              # lr warm-up: this fraction of every fine-tuning run

# The typed part of the budget: rRCM's schedule. Everything else is computed.
SIZES = {
    False: ml_collections.ConfigDict(dict(
        pretrain_steps=800, pretrain_batch=256,
        batch=128, rrcm_epochs=2, steps_per_epoch=54_000 // 128,   # train[:90%] / batch
        scratch_epochs=8,                 # validations (and best checkpoints) of a baseline
        # steps per epoch of each baseline: its scratch_epochs spend the budget
        # (experiments/budgets.py, scratch_schedule)
        scratch_steps=dict(gaussian=1032, consistency=516),
        train_split="train[:90%]", val_split="train[90%:]", eval_split="test",
        eval_batch=1000, log_every=50, latest_every=100, save_every=400,
        every=50, num_images=200, n0=100, n=10_000, alpha=0.001, chunk=1000,
        # DDS: its denoiser's batch; certified on every 200th test image (every 4th of the
        # 200 above: 50 images), chunks of 32 (its U-Net is slow on a CPU)
        denoiser_batch=64, dds_every=200, dds_chunk=32)),
    True: ml_collections.ConfigDict(dict(
        pretrain_steps=4, pretrain_batch=32,
        batch=32, rrcm_epochs=1, steps_per_epoch=2,
        scratch_epochs=1,
        scratch_steps=dict(gaussian=21, consistency=11),
        train_split="train[:512]", val_split="train[512:640]", eval_split="test[:256]",
        eval_batch=128, log_every=2, latest_every=2, save_every=2,
        every=64, num_images=3, n0=16, n=128, alpha=0.001, chunk=64,
        denoiser_batch=16, dds_every=128, dds_chunk=32)),
}


def model_config():
  """The replication ViT: width 128, depth 4, 4 heads, patch 7, 28×28 grayscale."""
  return common.model_config(width=128, depth=4, num_heads=4, patch_size=7, image_size=28,
                             channels=1, proj_hidden=512, proj_out=128)


def data_config(sizes):
  data = common.data_config("fashion_mnist", image_size=28, channels=1, num_classes=NUM_CLASSES)
  data.train_split = sizes.train_split
  data.eval_split = sizes.eval_split
  return data


def config_arg(stage, sigma=None, quick=False, init=None, scale=1, share=None):
  """("rrcm", 0.25, True) -> "stage=rrcm,sigma=0.25,quick=True", the config argument
  (init=, scale= and share= are written only when given / not 1)."""
  arg = f"stage={stage}" + ("" if sigma is None else f",sigma={sigma}")
  arg += "" if init is None else f",init={init}"
  arg += "" if scale == 1 else f",scale={scale}"
  arg += "" if share is None else f",share={share}"
  return arg + (",quick=True" if quick else "")


def parse_options(arg):
  """"stage=rrcm,sigma=0.25,init=online,scale=4" -> ConfigDict(stage, sigma, quick, init,
  scale, share); one ValueError naming what is allowed for anything else."""
  a = common.parse_arg(arg, stage=(str, common.REQUIRED), sigma=(float, None), quick=False,
                       init=(str, None), scale=1, share=(float, None))
  if a.stage not in STAGES or (a.stage in NO_SIGMA) != (a.sigma is None):
    raise ValueError(f"the config argument must be 'stage=<stage>' with stage in {NO_SIGMA} "
                     f"or 'stage=<stage>,sigma=<σ>' with stage in "
                     f"{tuple(s for s in STAGES if s not in NO_SIGMA)} (and optionally "
                     f"quick=True), got {arg!r}.")
  if a.init is not None and (a.stage != "rrcm" or a.init not in INITS):
    raise ValueError(f"the config argument init= is for stage=rrcm only, one of {INITS}, "
                     f"got {arg!r}.")
  if a.scale != 1 and (a.stage not in SCALED or a.scale not in SCALES):
    raise ValueError(f"the config argument scale= must be one of {SCALES} and is for the "
                     f"stages {SCALED}, got {arg!r}.")
  if (a.share is not None) != (a.stage in ("clean", "denoiser")) or (
      a.share is not None and a.share not in CLEAN_SHARES):
    raise ValueError(f"the config argument share= (the clean classifier's share of the DDS "
                     f"budget, one of {CLEAN_SHARES}) is required for stage=clean and "
                     f"stage=denoiser and allowed for no other, got {arg!r}.")
  if a.sigma is not None:
    a.sigma = common.check_sigma(a.sigma)
  return a


def parse_arg(arg):
  """"stage=rrcm,sigma=0.25,quick=True" -> ("rrcm", 0.25, True) (the other keys:
  `parse_options`)."""
  a = parse_options(arg)
  return a.stage, a.sigma, a.quick


# ----------------------------------------------------------------------------
# The stages.
# ----------------------------------------------------------------------------
def pretrain_config(quick=False, scale=1):
  """rRCM pre-training: the demo's hyperparameters (configs/fashion_mnist_pretrain.py)
  on the replication ViT, batch 256; `scale` multiplies its steps (and the k-NN interval)."""
  s = SIZES[quick]
  config = common.pretrain_config(total_steps=s.pretrain_steps * scale,
                                  batch_size=s.pretrain_batch,
                                  lr=1e-3, weight_decay=0.0, warmup_divisor=20, ema_rate=0.999,
                                  target_ema_A=15)
  config.seed = SEED
  config.data = data_config(s)
  config.model = model_config()
  config.log_every, config.latest_every = s.log_every, s.latest_every
  config.save_every = s.save_every
  # k-NN monitor (README, "Pre-training"): 4 evaluations in 800 steps, about 5 % of the run
  config.knn_every = 0 if quick else 200 * scale
  return config


def finetune_config(method, sigma, quick=False, init=None, scale=1):
  """(a) rRCM fine-tuning, (b) Gaussian or (c) consistency from scratch at `sigma`.

  All three: the fine-tuning optimizer of configs/fashion_mnist_finetune.py
  (AdamW, base lr 2e-3 × batch/256, warm-up over the first 10 % of the steps,
  then cosine per step, no weight decay), no augmentation, evaluation at
  model-space s = 0, 0.5, 1.0, 2.0.
  rRCM: layer decay 0.75, EMA weights, and the head trained: with the
  reference's frozen 2e-5 head the Fashion-MNIST demo stalls at 15 % accuracy
  (README, "Results so far"), so the frozen head is one of the controlled
  runs (`--config.train_head=False`), not the headline.
  The baselines: every parameter trains, no layer decay, N = 81 grid.
  init: rRCM's start, one of INITS (None: "ema"). scale: the budget's multiple (rRCM:
  `scale` × the epochs, its pre-training `scale` × the steps; a baseline: `scale` × the
  steps per epoch).
  """
  s = SIZES[quick]
  pre = pretrain_config(quick)
  epochs = (s.rrcm_epochs if method == "rrcm" else s.scratch_epochs) * scale
  config = common.finetune_config(
      pre, sigma=sigma, epochs=epochs, warmup_epochs=WARMUP * epochs, batch_size=s.batch, lr=2e-3,
      layer_decay=0.75 if method == "rrcm" else 1.0)
  config.seed = SEED
  config.optim.per_epoch_lr = False
  config.data.train_split = s.train_split
  config.data.val_split = s.val_split
  config.eval_batch_size = s.eval_batch
  config.log_every, config.latest_every = s.log_every, s.latest_every
  config.steps_per_epoch = s.steps_per_epoch
  config.train_head = True
  if method == "rrcm" and init is not None:
    config.init_weights = init
  if method != "rrcm":
    if method == "gaussian":
      config.task = "finetune"
      config.entropy_weight = 0.0         # Cohen et al.: cross-entropy only
    config.epochs = s.scratch_epochs
    config.steps_per_epoch = s.scratch_steps[method] * scale
    config.optim.warmup_epochs = WARMUP * config.epochs
  return config


def clean_config(share, quick=False):
  """DDS's base classifier: the replication ViT trained from scratch on clean images (task
  "clean", as configs/fashion_mnist_clean_classifier.py) with `share` of the budget, in
  CLEAN_EPOCHS validations; the baselines' optimizer, every parameter trained."""
  config = finetune_config("gaussian", SIGMAS[0], quick)
  config.task = "clean"
  steps = DDS_STEPS[quick][share][0]
  config.epochs, config.steps_per_epoch = CLEAN_EPOCHS, -(-steps // CLEAN_EPOCHS)
  config.optim.warmup_epochs = WARMUP * CLEAN_EPOCHS
  return config


def denoiser_config(share, quick=False):
  """DDS's denoiser: configs/fashion_mnist_diffusion.py's U-Net (DENOISER_PRESET) on
  train[:90%], its steps spending 1 − `share` of the budget."""
  from configs import fashion_mnist_diffusion  # pylint: disable=g-import-not-at-top
  s = SIZES[quick]
  config = fashion_mnist_diffusion.get_config(f"preset={DENOISER_PRESET}")
  config.seed = SEED
  config.total_steps = DDS_STEPS[quick][share][1]
  config.batch_size = s.denoiser_batch
  config.optim.warmup_steps = min(config.optim.warmup_steps, config.total_steps // 10)
  config.data.train_split = s.train_split
  config.data.eval_split = s.eval_split
  config.log_every, config.latest_every = s.log_every, s.latest_every
  return config


def certify_config(sigma, quick=False):
  """CERTIFY of any method's classifier (same architecture): every 50th test image."""
  s = SIZES[quick]
  config = common.certify_config(
      finetune_config("rrcm", sigma, quick), sigma=sigma, every=s.every, num_images=s.num_images,
      chunk_size=s.chunk)
  config.seed = SEED
  config.n0, config.n, config.alpha = s.n0, s.n, s.alpha
  return config


def dds_certify_config(sigma, quick=False):
  """CERTIFY of DDS (configs/fashion_mnist_dds_certify.py's method) with the protocol of
  `certify_config` on every 4th of its images; the CLI names the two workdirs
  (--config.dds.denoiser, --config.dds.classifier)."""
  s = SIZES[quick]
  config = certify_config(sigma, quick)
  config.method = "dds"
  config.every, config.num_images = s.dds_every, -(-s.num_images * s.every // s.dds_every)
  config.chunk_size = s.dds_chunk
  return config


def get_config(arg=None):
  a = parse_options(arg)
  if a.stage == "pretrain":
    return pretrain_config(a.quick, a.scale)
  if a.stage == "certify":
    return certify_config(a.sigma, a.quick)
  if a.stage == "dds_certify":
    return dds_certify_config(a.sigma, a.quick)
  if a.stage == "clean":
    return clean_config(a.share, a.quick)
  if a.stage == "denoiser":
    return denoiser_config(a.share, a.quick)
  return finetune_config(a.stage, a.sigma, a.quick, a.init, a.scale)
