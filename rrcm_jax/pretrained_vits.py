"""Off-the-shelf ViT classifiers of diffusion denoised smoothing, as Linen modules.

Diffusion denoised smoothing (Carlini et al., 2023) classifies its one-shot
denoised images with public PyTorch classifiers: on CIFAR-10 a Hugging Face
`ViTForImageClassification` (ViT-B/16, ImageNet-21k pre-trained, fine-tuned
at 224×224), on ImageNet timm's `beit_large_patch16_512`. This module
rebuilds those architectures (and timm's plain `VisionTransformer`) so that
their weights, converted by `pretrained_import`, give the same logits.

Parameter names mirror the PyTorch ones: torch `blocks.3.attn.qkv.weight`
is `blocks_3/attn/qkv/kernel` here (see `pretrained_import`).

The networks take normalized NHWC images; `PixelClassifier` wraps one with
its preprocessing so that every classifier is called as
`logits = apply(params, x_pixel)`, x_pixel [B, H, W, 3] in pixel space
[0, 1] at the network's resolution. All three published checkpoints expect
mean = std = 0.5 per channel, i.e. model space 2x − 1 ∈ [−1, 1], which is
exactly what DDS feeds them (its denoised x̂0 in [−1, 1], unnormalized).

Parameters are float32; `dtype` is the compute dtype of the matrix
multiplies; LayerNorm and the returned logits are float32.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TIMM_LN_EPS = 1e-6   # timm's LayerNorm default
HF_LN_EPS = 1e-12    # ViTConfig.layer_norm_eps
QKV_BIAS = ("full", "qv", "none")
GLOBAL_POOLS = ("token", "avg")


def relative_position_index(grid):
  """BEiT's lookup of (query, key) token pairs into the bias table, [T, T] int, T = gh·gw + 1.

  Patch pairs index by their offset (dy, dx); the last three table rows are
  cls→patch, patch→cls and cls→cls (timm `gen_relative_position_index`).
  """
  gh, gw = grid
  num_distances = (2 * gh - 1) * (2 * gw - 1)
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  index = np.zeros((gh * gw + 1,) * 2, np.int32)
  index[1:, 1:] = (rel[0] + gh - 1) * (2 * gw - 1) + rel[1] + gw - 1
  index[0, :] = num_distances
  index[:, 0] = num_distances + 1
  index[0, 0] = num_distances + 2
  return index


def _attend(q, k, v, bias=None):
  """q, k, v [B, T, heads, head_dim] -> [B, T, heads·head_dim]; bias [1, heads, T, T]."""
  b, t, h, hd = q.shape
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=hd ** -0.5)
  return out.reshape(b, t, h * hd)


def _layer_norm(eps, name):
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class PatchEmbed(nn.Module):
  """Conv patchify, [B, H, W, C] -> [B, (H/p)·(W/p), width] float32, row-major patches.

  timm calls it `patch_embed` with the conv `proj`; HF `patch_embeddings`
  with the conv `projection` (conv_name).
  """
  width: int
  patch_size: int
  conv_name: str = "proj"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not a multiple of the patch size {p}.")
    y = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name=self.conv_name)(x)
    return y.reshape(x.shape[0], -1, self.width).astype(jnp.float32)


def _check_choice(value, allowed, what):
  if value not in allowed:
    raise ValueError(f"{what} must be one of {allowed}, got {value!r}.")


class Mlp(nn.Module):
  """fc1 → exact GELU → fc2 (timm `Mlp`, HF `ViTMLP`)."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))
    return y.astype(jnp.float32)


class TimmAttention(nn.Module):
  """timm attention: one qkv matrix; BEiT's relative position bias when `grid` is set.

  qkv_bias "full" (timm ViT: a qkv bias), "qv" (BEiT: q_bias and v_bias, no
  key bias) or "none".
  """
  num_heads: int
  qkv_bias: str = "full"
  grid: tuple[int, int] | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _check_choice(self.qkv_bias, QKV_BIAS, "qkv_bias")
    b, t, d = x.shape
    h = self.num_heads
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias == "full", dtype=self.dtype, name="qkv")(x)
    if self.qkv_bias == "qv":
      q_bias = self.param("q_bias", nn.initializers.zeros, (d,))
      v_bias = self.param("v_bias", nn.initializers.zeros, (d,))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q, k, v = (a[:, :, 0] for a in jnp.split(qkv.reshape(b, t, 3, h, d // h), 3, axis=2))
    bias = None
    if self.grid is not None:
      gh, gw = self.grid
      table = self.param("relative_position_bias_table", nn.initializers.zeros,
                         ((2 * gh - 1) * (2 * gw - 1) + 3, h))
      bias = table[relative_position_index(self.grid)].transpose(2, 0, 1)[None]
    out = _attend(q, k, v, bias)
    return nn.Dense(d, dtype=self.dtype, name="proj")(out).astype(jnp.float32)


class LayerScale(nn.Module):
  """timm ViT's `ls1` / `ls2`: a learned per-channel gain `gamma`."""

  @nn.compact
  def __call__(self, x):
    return x * self.param("gamma", nn.initializers.ones, (x.shape[-1],))


class TimmBlock(nn.Module):
  """Pre-norm block: x += γ1·Attn(LN(x)); x += γ2·MLP(LN(x)).

  layer_scale: None (no γ), "ls" (timm ViT: submodules ls1/ls2 holding
  `gamma`) or "gamma" (BEiT: parameters gamma_1/gamma_2 of the block).
  """
  num_heads: int
  mlp_hidden: int
  qkv_bias: str = "full"
  grid: tuple[int, int] | None = None
  layer_scale: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    y = TimmAttention(self.num_heads, self.qkv_bias, self.grid, self.dtype, name="attn")(
        _layer_norm(TIMM_LN_EPS, "norm1")(x))
    z = _layer_norm(TIMM_LN_EPS, "norm2")
    mlp = Mlp(self.mlp_hidden, self.dtype, name="mlp")
    if self.layer_scale == "ls":
      x = x + LayerScale(name="ls1")(y)
      return x + LayerScale(name="ls2")(mlp(z(x)))
    if self.layer_scale == "gamma":
      x = x + self.param("gamma_1", nn.initializers.ones, (d,)) * y
      return x + self.param("gamma_2", nn.initializers.ones, (d,)) * mlp(z(x))
    x = x + y
    return x + mlp(z(x))


class TimmVisionTransformer(nn.Module):
  """timm `VisionTransformer` (cls token, learned position embedding incl. cls,
  pre-norm blocks, final norm or fc_norm after pooling, linear head).

  __call__(x [B, H, W, C] normalized, H = W = the size the position embedding
  was made for) -> logits [B, num_classes] float32. fc_norm None means
  global_pool == "avg", as in timm.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  init_values: float | None = None   # None: no LayerScale; else ls1/ls2 exist
  global_pool: str = "token"
  fc_norm: bool | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _check_choice(self.global_pool, GLOBAL_POOLS, "global_pool")
    b, d = x.shape[0], self.width
    tokens = PatchEmbed(d, self.patch_size, dtype=self.dtype, name="patch_embed")(x)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), tokens], axis=1)
    tokens = tokens + self.param("pos_embed", nn.initializers.normal(0.02), (1,) + tokens.shape[1:])
    for k in range(self.depth):
      tokens = TimmBlock(self.num_heads, int(d * self.mlp_ratio), "full" if self.qkv_bias else "none",
                         layer_scale=None if self.init_values is None else "ls", dtype=self.dtype,
                         name=f"blocks_{k}")(tokens)
    use_fc_norm = self.global_pool == "avg" if self.fc_norm is None else self.fc_norm
    if not use_fc_norm:
      tokens = _layer_norm(TIMM_LN_EPS, "norm")(tokens)
    pooled = tokens[:, 0] if self.global_pool == "token" else tokens[:, 1:].mean(axis=1)
    if use_fc_norm:
      pooled = _layer_norm(TIMM_LN_EPS, "fc_norm")(pooled)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled).astype(jnp.float32)


class TimmBeit(nn.Module):
  """timm `Beit`: q/v biases, relative position bias per block, layer scale
  gamma_1/gamma_2, mean of the patch tokens → fc_norm → head.

  __call__(x [B, H, W, C] normalized) -> logits [B, num_classes] float32. The
  bias tables' size follows the patch grid of x. The shared relative position
  bias (use_shared_rel_pos_bias) and token pooling are not implemented.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  init_values: float | None = None
  use_abs_pos_emb: bool = True
  use_rel_pos_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, d = x.shape[0], self.width
    grid = (x.shape[1] // self.patch_size, x.shape[2] // self.patch_size)
    tokens = PatchEmbed(d, self.patch_size, dtype=self.dtype, name="patch_embed")(x)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), tokens], axis=1)
    if self.use_abs_pos_emb:
      tokens = tokens + self.param("pos_embed", nn.initializers.normal(0.02), (1,) + tokens.shape[1:])
    block = functools.partial(
        TimmBlock, self.num_heads, int(d * self.mlp_ratio), "qv" if self.qkv_bias else "none",
        grid if self.use_rel_pos_bias else None, None if not self.init_values else "gamma",
        self.dtype)
    for k in range(self.depth):
      tokens = block(name=f"blocks_{k}")(tokens)
    pooled = _layer_norm(TIMM_LN_EPS, "fc_norm")(tokens[:, 1:].mean(axis=1))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled).astype(jnp.float32)


class HFViTAttention(nn.Module):
  """HF ViT self-attention: separate q_proj, k_proj, v_proj (with biases), o_proj."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    dense = functools.partial(nn.Dense, d, dtype=self.dtype)
    q, k, v = (dense(name=n)(x).reshape(b, t, self.num_heads, -1)
               for n in ("q_proj", "k_proj", "v_proj"))
    return dense(name="o_proj")(_attend(q, k, v)).astype(jnp.float32)


class HFViTLayer(nn.Module):
  num_heads: int
  intermediate_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x + HFViTAttention(self.num_heads, self.dtype, name="attention")(
        _layer_norm(HF_LN_EPS, "layernorm_before")(x))
    return x + Mlp(self.intermediate_size, self.dtype, name="mlp")(
        _layer_norm(HF_LN_EPS, "layernorm_after")(x))


class HFViTEmbeddings(nn.Module):
  """cls token + patch tokens + `position_embeddings` (HF `ViTEmbeddings`)."""
  width: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, d = x.shape[0], self.width
    tokens = PatchEmbed(d, self.patch_size, "projection", self.dtype, name="patch_embeddings")(x)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), tokens], axis=1)
    return tokens + self.param("position_embeddings", nn.initializers.normal(0.02),
                               (1,) + tokens.shape[1:])


class HFViTModel(nn.Module):
  """HF `ViTModel` without pooler: embeddings, layers, final `layernorm` -> [B, T, width]."""
  width: int
  depth: int
  num_heads: int
  intermediate_size: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    tokens = HFViTEmbeddings(self.width, self.patch_size, self.dtype, name="embeddings")(x)
    for k in range(self.depth):
      tokens = HFViTLayer(self.num_heads, self.intermediate_size, self.dtype,
                          name=f"layers_{k}")(tokens)
    return _layer_norm(HF_LN_EPS, "layernorm")(tokens)


class HFViTForImageClassification(nn.Module):
  """HF `ViTForImageClassification`: ViT, final LayerNorm, classifier on the cls token.

  __call__(x [B, H, W, C] normalized) -> logits [B, num_labels] float32.
  """
  num_labels: int
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  patch_size: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    tokens = HFViTModel(self.width, self.depth, self.num_heads, self.intermediate_size,
                        self.patch_size, self.dtype, name="vit")(x)
    return nn.Dense(self.num_labels, dtype=self.dtype, name="classifier")(tokens[:, 0]).astype(
        jnp.float32)
