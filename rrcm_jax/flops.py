"""FLOP accounting: analytic matmul FLOPs of the ViT, per forward and per training run.

Budgets, benchmarks and the fine-tuning metrics (`train_flops`, `total_flops`)
all count with these two functions (docs/method.md, "Encoder").
"""

# Forward-equivalents per image per step: a forward without gradient counts 1,
# forward + backward 3. Pre-training: 3 online calls with gradient (3 each),
# the no-gradient h(x + σ'ε) and 2 target calls (1 each); consistency: m = 2
# draws with gradient; a linear probe only runs the frozen encoder forward; "clean"
# (DDS's base classifier) one clean call with gradient.
FORWARD_EQUIVALENTS = {"pretrain": 12, "consistency": 6, "finetune": 3, "linear": 1,
                       "clean": 3}


def forward_flops(model_cfg, num_classes=0, projection=False):
  """Matmul FLOPs (2 per multiply-add) of one forward of one image.

  Counts the patch embedding, qkv, attention scores and values, projections,
  MLPs, the optional time MLP, and a linear head of `num_classes` outputs or
  (`projection`) the 3-layer projection head. Elementwise ops are left out.
  RCM-B at 224 with p = 16: 35.3 GFLOP (≈ 17.7 G multiply-adds).
  """
  d, p, r = model_cfg.width, model_cfg.patch_size, model_cfg.mlp_ratio
  patches = (model_cfg.image_size // p) ** 2
  tokens = patches + 2
  macs = patches * p * p * model_cfg.channels * d
  block = tokens * d * (3 * d + d + 2 * r * d) + 2 * tokens * tokens * d
  macs += model_cfg.depth * block
  if model_cfg.time_mlp:
    macs += 8 * d * d
  macs += d * num_classes
  if projection:
    h = model_cfg.proj_hidden
    macs += d * h + h * h + h * model_cfg.proj_out
  return 2 * macs


def training_flops(stage, model_cfg, images, num_classes=0):
  """FLOPs of training `images` images (summed over steps) in `stage`
  ("pretrain", "consistency", "finetune", "linear", "clean"), see FORWARD_EQUIVALENTS."""
  if stage not in FORWARD_EQUIVALENTS:
    raise ValueError(f"stage must be one of {sorted(FORWARD_EQUIVALENTS)}, got {stage!r}.")
  if stage == "pretrain":
    per_forward = forward_flops(model_cfg, projection=True)
  else:
    per_forward = forward_flops(model_cfg, num_classes)
  return FORWARD_EQUIVALENTS[stage] * per_forward * images
