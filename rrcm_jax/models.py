"""The rRCM encoder (a ViT with a time token), its projection head, the classifier.

Linen modules. Inputs are model-space images already scaled by c_in(σ)
(see `denoiser.encode_at_sigma`), NHWC, and the time condition τ(σ), [B].
Parameters are float32; `dtype` is the compute dtype of the matrix
multiplies. LayerNorm, BatchNorm, the softmax of attention and the returned
features, projections and logits are float32.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-5
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name):
  if name not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}.")
  return _DTYPES[name]


def _dense_init(init):
  if init == "mocov3":
    return nn.initializers.xavier_uniform()
  return nn.initializers.truncated_normal(0.02)


def _qkv_init(init, width):
  """MoCo-v3 treats qkv as three D×D matrices: bound sqrt(6 / (D + D))."""
  if init != "mocov3":
    return nn.initializers.truncated_normal(0.02)
  bound = math.sqrt(6.0 / (2 * width))
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _patch_init(init, patch_size, width):
  if init == "mocov3":
    bound = math.sqrt(6.0 / (3 * patch_size ** 2 + width))
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return nn.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform")   # torch's conv default


def timestep_embedding(t, dim, max_period=10000.0):
  """Sinusoidal embedding of τ, [B] -> [B, dim], cosines first (docs/method.md, Encoder)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def gelu(x):
  """Exact GELU, x/2 (1 + erf(x/sqrt 2)), as torch's nn.GELU computes it; x's shape and dtype.

  `jax.nn.gelu(x, approximate=False)` evaluates erfc(-x/sqrt 2) instead: the
  same function up to float rounding, whose XLA:CPU kernel (both erfc branches,
  an exp and two divides per element) takes about twice the time of erf's.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class Attention(nn.Module):
  num_heads: int
  init: str = "vit"
  dtype: jnp.dtype = jnp.float32
  attention: str | None = None   # jax.nn.dot_product_attention implementation

  @nn.compact
  def __call__(self, x):
    b, l, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, use_bias=False, dtype=self.dtype,
                   kernel_init=_qkv_init(self.init, d), name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, l, 3, self.num_heads, head_dim), 3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                       scale=head_dim ** -0.5,
                                       implementation=self.attention)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_dense_init(self.init),
                    name="proj")(out.reshape(b, l, d))


class Block(nn.Module):
  """Pre-norm transformer block: x += Attn(LN(x)); x += MLP(LN(x))."""
  num_heads: int
  mlp_ratio: int = 4
  init: str = "vit"
  dtype: jnp.dtype = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_dense_init(self.init))
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm1")(x)
    x = x + Attention(self.num_heads, self.init, self.dtype, self.attention, name="attn")(y)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm2")(x)
    y = dense(self.mlp_ratio * d, name="fc1")(y)
    y = dense(d, name="fc2")(gelu(y))
    return x + y


class ViT(nn.Module):
  """Tokens [cls, time, patch_1 … patch_P] + learned position embedding.

  __call__(x [B,H,W,C] scaled model space, t [B] time condition) returns
  (cls token after the last block [B,D], feature h = LN(cls) [B,D]), float32.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: int = 4
  time_mlp: bool = False
  frozen_patch_embed: bool = False
  init: str = "vit"
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  attention: str | None = None

  @nn.compact
  def __call__(self, x, t):
    b = x.shape[0]
    p, d = self.patch_size, self.width
    patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                      kernel_init=_patch_init(self.init, p, d), name="patch_embed")(x)
    if self.frozen_patch_embed:   # MoCo-v3: no gradient reaches the patch embedding
      patches = jax.lax.stop_gradient(patches)
    patches = patches.reshape(b, -1, d).astype(jnp.float32)
    temb = timestep_embedding(t, d)
    if self.time_mlp:
      temb = nn.Dense(4 * d, name="time_mlp_1")(temb)
      temb = nn.Dense(d, name="time_mlp_2")(nn.silu(temb))
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 2 + patches.shape[1], d))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), temb[:, None], patches], axis=1)
    tokens = tokens + pos
    block = nn.remat(Block) if self.remat else Block
    for k in range(self.depth):
      tokens = block(self.num_heads, self.mlp_ratio, self.init, self.dtype, self.attention,
                     name=f"blocks_{k}")(tokens)
    cls_out = tokens[:, 0].astype(jnp.float32)
    feature = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm")(cls_out)
    return cls_out, feature


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm1d over the leading axes of [..., C], float32.

  Training mode normalizes with the batch mean and biased variance and moves
  the running statistics as torch does: r ← m·r + (1 − m)·s with s = (batch
  mean, *unbiased* batch variance) and m = `momentum` (torch's 0.1 is 0.9
  here, flax's convention). `nn.BatchNorm` would keep the biased variance;
  this one keeps the authors' running statistics step for step. Variables
  are named as `nn.BatchNorm`'s: params scale, bias; batch_stats mean, var.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)   # two-pass, as torch
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class ProjectionHead(nn.Module):
  """Linear → BN → ReLU → Linear → BN → ReLU → Linear, no biases.

  BatchNorm normalizes over the whole (global) batch of the call in training
  mode: under `jit` with a batch sharded over devices, XLA reduces the
  statistics across devices. Running statistics follow torch (see
  `BatchNorm`); they are never used downstream.
  """
  hidden: int
  out: int
  init: str = "vit"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, train):
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                              kernel_init=_dense_init(self.init))
    norm = functools.partial(BatchNorm, use_running_average=not train)
    z = nn.relu(norm(name="bn_0")(dense(self.hidden, name="linear_0")(h)))
    z = nn.relu(norm(name="bn_1")(dense(self.hidden, name="linear_1")(z)))
    return dense(self.out, name="linear_2")(z).astype(jnp.float32)


def _vit_kwargs(cfg):
  return dict(patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth,
              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, time_mlp=cfg.time_mlp,
              frozen_patch_embed=cfg.frozen_patch_embed, init=cfg.init,
              dtype=compute_dtype(cfg.dtype), remat=cfg.remat,
              attention=cfg.get("attention", None))


class RCMEncoder(nn.Module):
  """The pre-training network: returns (projection z [B,out], feature h [B,D])."""
  vit: ViT
  projection_head: ProjectionHead

  def __call__(self, x, t, train=True):
    _, h = self.vit(x, t)
    return self.projection_head(h, train), h


class Classifier(nn.Module):
  """Encoder cls token (optionally through the final LayerNorm) → linear head.

  __call__(x [B,H,W,C] scaled model space, t [B]) -> logits [B, num_classes] float32.
  """
  vit: ViT
  num_classes: int
  final_norm: bool = False

  @nn.compact
  def __call__(self, x, t, train=False):
    cls, h = self.vit(x, t)
    rep = h if self.final_norm else cls
    head = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5),
                    name="head")
    return head(rep).astype(jnp.float32)


def rcm_encoder(cfg):
  """RCMEncoder from a model config (configs/common.py `model_config`)."""
  return RCMEncoder(vit=ViT(**_vit_kwargs(cfg), parent=None),
                    projection_head=ProjectionHead(cfg.proj_hidden, cfg.proj_out, cfg.init,
                                                   compute_dtype(cfg.dtype), parent=None))


def classifier(cfg, num_classes, final_norm):
  """Classifier from a model config; its "vit" parameters are the encoder's."""
  return Classifier(vit=ViT(**_vit_kwargs(cfg), parent=None), num_classes=num_classes,
                    final_norm=final_norm)


def sample_inputs(model_cfg, batch=2):
  """(x zeros [batch, S, S, C] model space, τ zeros [batch]): what `init` and shape checks call."""
  x = jnp.zeros((batch, model_cfg.image_size, model_cfg.image_size, model_cfg.channels))
  return x, jnp.zeros((batch,))


def count_params(params, exclude_patch_embed=False):
  """Number of parameters; `exclude_patch_embed` leaves out a frozen patch embedding."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total = 0
  for path, leaf in flat:
    names = [getattr(k, "key", "") for k in path]
    if exclude_patch_embed and "patch_embed" in names:
      continue
    total += int(np.prod(leaf.shape))
  return total


def validate_model_config(cfg):
  """Stops on impossible shapes before anything compiles (one sentence each)."""
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"model.patch_size={cfg.patch_size} must divide model.image_size="
                     f"{cfg.image_size}.")
  if cfg.width % cfg.num_heads:
    raise ValueError(f"model.num_heads={cfg.num_heads} must divide model.width={cfg.width}.")
  if cfg.init not in ("vit", "mocov3"):
    raise ValueError(f"model.init must be 'vit' or 'mocov3', got {cfg.init!r}.")
  compute_dtype(cfg.dtype)
