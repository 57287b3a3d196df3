"""The ADM U-Net (Nichol & Dhariwal's improved-diffusion / guided-diffusion) in Flax Linen.

The denoiser of diffusion denoised smoothing (docs/method.md, "Diffusion
denoised smoothing"). Layout is NHWC inside; submodules are named after the
PyTorch modules (`input_blocks_3_1` is `input_blocks.3.1`) so that
`diffusion.torch_import` maps state dicts name for name.

Every GroupNorm has 32 groups, eps 1e-5, and is computed in float32 whatever
the torso's dtype (the reference's `GroupNorm32`). Attention is over the
H·W positions; `use_new_attention_order=False` is the improved-diffusion /
guided-diffusion "legacy" order (heads split before q, k, v), True is
guided-diffusion's `QKVAttention` (q, k, v split before heads). Both scale q
and k each by ch^(-1/4), ch the head width, and take the softmax in float32.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# Constructor arguments of the public DDS denoisers (as the authors' `create_model` builds
# them; attention_resolutions are downsample rates: image_size // pixels).
UNET_PRESETS = {
    # improved-diffusion cifar10_uncond_50M_500K.pt: attention at 16 and 8 px of 32.
    "cifar10_uncond_50M_500K": dict(
        in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
        attention_resolutions=(2, 4), dropout=0.3, channel_mult=(1, 2, 2, 2), num_heads=4,
        use_scale_shift_norm=True),
    # guided-diffusion 256x256_diffusion_uncond.pt: attention at 32, 16, 8 px of 256.
    "256x256_diffusion_uncond": dict(
        in_channels=3, model_channels=256, out_channels=6, num_res_blocks=2,
        attention_resolutions=(8, 16, 32), dropout=0.0, channel_mult=(1, 1, 2, 2, 4, 4),
        num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True),
    # Not a published model: a Fashion-MNIST-size denoiser (28×28×1, ε only, 1.19 M
    # parameters) for the demo's DDS comparison; 28 → 14 → 7 px, attention at 7 px.
    "fashion_mnist_small": dict(
        in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
        attention_resolutions=(4,), dropout=0.1, channel_mult=(1, 2, 2), num_heads=4,
        use_scale_shift_norm=True),
    # Not a published model: a quarter of fashion_mnist_small's FLOPs (0.09 GFLOP, 0.30 M
    # parameters; 16 channels at 28 px, GroupNorm with 8 groups) so that certifying with
    # n = 10,000 fits a CPU; 28 → 14 → 7 px, attention at 7 px.
    "fashion_mnist_tiny": dict(
        in_channels=1, model_channels=16, out_channels=1, num_res_blocks=1,
        attention_resolutions=(4,), dropout=0.1, channel_mult=(1, 2, 2), num_heads=4,
        use_scale_shift_norm=True, norm_groups=8),
}

# Torch constructor arguments that do not change the function (or are handled elsewhere).
_TORCH_ONLY_ARGS = ("image_size", "use_checkpoint", "use_fp16", "dims", "num_classes")


def timestep_embedding(timesteps, dim, max_period=10000):
  """Sinusoidal embedding [b, dim] of timesteps [b] (float; the reference's cos-then-sin order)."""
  half = dim // 2
  # Same operation order as the reference so that freqs round identically in float32.
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def group_norm(x, name, groups=32):
  """GroupNorm(groups, eps 1e-5) in float32, cast back to x's dtype (32 groups: the reference)."""
  norm = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False,
                      name=name)
  return norm(x.astype(jnp.float32)).astype(x.dtype)


def conv(features, x, name, *, kernel=3, stride=1, dtype=jnp.float32):
  """Conv with the reference's symmetric padding (kernel // 2), NHWC."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)(x)


def upsample_nearest(x):
  """Nearest-neighbour ×2 of [b, H, W, C] (F.interpolate(scale_factor=2, mode="nearest"))."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x):
  """2×2 average pooling with stride 2 of [b, H, W, C]."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
  """Halves H and W: stride-2 3×3 conv (`op`), or 2×2 average pooling."""
  use_conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.use_conv:
      return conv(x.shape[-1], x, "op", stride=2, dtype=self.dtype)
    return downsample_avg(x)


class Upsample(nn.Module):
  """Doubles H and W: nearest neighbour, then a 3×3 conv (`conv`) when use_conv."""
  use_conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    return conv(x.shape[-1], x, "conv", dtype=self.dtype) if self.use_conv else x


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, timestep FiLM (scale-shift) or add, GroupNorm-SiLU-dropout-conv, skip.

  `updown` "up"/"down" resamples h and the skip between the first norm and conv
  (guided-diffusion's `resblock_updown`).
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  updown: str = ""
  dtype: Any = jnp.float32
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x, emb, train=False):
    h = nn.silu(group_norm(x, "in_layers_0", self.norm_groups))
    if self.updown:
      resample = upsample_nearest if self.updown == "up" else downsample_avg
      h, x = resample(h), resample(x)
    h = conv(self.out_channels, h, "in_layers_2", dtype=self.dtype)
    width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = nn.Dense(width, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
    emb_out = emb_out.astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = group_norm(h, "out_layers_0", self.norm_groups) * (1 + scale) + shift
    else:
      h = group_norm(h + emb_out, "out_layers_0", self.norm_groups)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.out_channels, h, "out_layers_3", dtype=self.dtype)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, x, "skip_connection", kernel=1, dtype=self.dtype)
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over the H·W positions of [b, H, W, C], residual."""
  num_heads: int
  new_order: bool = False
  dtype: Any = jnp.float32
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    heads = self.num_heads
    if c % heads:
      raise ValueError(f"attention channels {c} are not divisible by num_heads {heads}.")
    ch = c // heads
    tokens = x.reshape(b, height * width, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(group_norm(tokens, "norm", self.norm_groups))
    # Torch's qkv channel index is head·3ch + {q,k,v}·ch + i (legacy) or {q,k,v}·C + head·ch + i.
    if self.new_order:
      q, k, v = jnp.moveaxis(qkv.reshape(b, -1, 3, heads, ch), 2, 0)
    else:
      q, k, v = jnp.moveaxis(qkv.reshape(b, -1, heads, 3, ch), 3, 0)
    scale = 1 / math.sqrt(math.sqrt(ch))  # on q and k each: steadier in half precision
    weight = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
    weight = nn.softmax(weight.astype(jnp.float32), axis=-1).astype(weight.dtype)
    a = jnp.einsum("bhts,bshc->bthc", weight, v).reshape(b, -1, c)
    h = nn.Dense(c, dtype=self.dtype, name="proj_out")(a)
    return (tokens + h).reshape(b, height, width, c)


class UNet(nn.Module):
  """ADM U-Net: eps (and the variance interpolation when out_channels = 2 · in_channels).

  Arguments are the PyTorch constructor's (guided-diffusion `UNetModel`, which
  includes improved-diffusion's): attention_resolutions are downsample rates
  (4 = attention at 1/4 of the input size); num_head_channels > 0 overrides
  num_heads; num_heads_upsample -1 means num_heads; conv_resample False
  resamples without a conv; resblock_updown resamples with ResBlocks.
  `dtype` is the torso's compute dtype (parameters stay float32).
  """
  in_channels: int = 3
  model_channels: int = 128
  out_channels: int = 3
  num_res_blocks: int = 2
  attention_resolutions: tuple = ()
  dropout: float = 0.0
  channel_mult: tuple = (1, 2, 4, 8)
  conv_resample: bool = True
  num_heads: int = 1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  dtype: Any = jnp.float32
  norm_groups: int = 32   # GroupNorm groups; the published models' 32 needs >= 32 channels

  def _attention(self, ch, heads, name):
    if self.num_head_channels != -1:
      if ch % self.num_head_channels:
        raise ValueError(f"attention channels {ch} are not divisible by num_head_channels "
                         f"{self.num_head_channels}.")
      heads = ch // self.num_head_channels
    return AttentionBlock(heads, self.use_new_attention_order, self.dtype,
                          norm_groups=self.norm_groups, name=name)

  def _resblock(self, out_channels, name, updown=""):
    return ResBlock(out_channels, self.dropout, self.use_scale_shift_norm, updown, self.dtype,
                    norm_groups=self.norm_groups,
                    name=name)

  @nn.compact
  def __call__(self, x, timesteps, train=False):
    """x [b, H, W, in_channels] (model space), timesteps [b] float as the network was
    trained on them (see `diffusion.schedules.model_timesteps`) -> [b, H, W, out_channels]."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNet input must be [b, H, W, {self.in_channels}], got {x.shape}.")
    depth = 2 ** (len(self.channel_mult) - 1)
    if x.shape[1] % depth or x.shape[2] % depth:
      raise ValueError(f"UNet input height and width must be multiples of {depth} (one halving "
                       f"per level after the first), got {x.shape[1:3]}.")
    emb_dim = 4 * self.model_channels
    emb = timestep_embedding(timesteps, self.model_channels).astype(self.dtype)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_embed_0")(emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name="time_embed_2")(nn.silu(emb))
    up_heads = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    ch = int(self.channel_mult[0] * self.model_channels)
    h = conv(ch, x.astype(self.dtype), "input_blocks_0_0", dtype=self.dtype)
    skips, ds, block = [h], 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * self.model_channels)
        h = self._resblock(ch, f"input_blocks_{block}_0")(h, emb, train)
        if ds in self.attention_resolutions:
          h = self._attention(ch, self.num_heads, f"input_blocks_{block}_1")(h)
        skips.append(h)
        block += 1
      if level != len(self.channel_mult) - 1:
        name = f"input_blocks_{block}_0"
        if self.resblock_updown:
          h = self._resblock(ch, name, "down")(h, emb, train)
        else:
          h = Downsample(self.conv_resample, self.dtype, name=name)(h)
        skips.append(h)
        ds, block = 2 * ds, block + 1

    h = self._resblock(ch, "middle_block_0")(h, emb, train)
    h = self._attention(ch, self.num_heads, "middle_block_1")(h)
    h = self._resblock(ch, "middle_block_2")(h, emb, train)

    block = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        ch = int(mult * self.model_channels)
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._resblock(ch, f"output_blocks_{block}_0")(h, emb, train)
        sub = 1
        if ds in self.attention_resolutions:
          h = self._attention(ch, up_heads, f"output_blocks_{block}_1")(h)
          sub += 1
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{block}_{sub}"
          if self.resblock_updown:
            h = self._resblock(ch, name, "up")(h, emb, train)
          else:
            h = Upsample(self.conv_resample, self.dtype, name=name)(h)
          ds //= 2
        block += 1
    h = nn.silu(group_norm(h.astype(x.dtype), "out_0", self.norm_groups))
    return conv(self.out_channels, h, "out_2", dtype=self.dtype).astype(jnp.float32)


def unet_kwargs_from_torch(kwargs):
  """Our `UNet` arguments from a PyTorch `UNetModel` constructor dict (improved- or
  guided-diffusion); raises ValueError for a class-conditional or non-2D model."""
  kwargs = dict(kwargs)
  if kwargs.get("num_classes") is not None:
    raise ValueError(f"class-conditional U-Nets are not supported (num_classes "
                     f"{kwargs['num_classes']}); DDS uses unconditional denoisers.")
  if kwargs.get("dims", 2) != 2:
    raise ValueError(f"only 2-D U-Nets are supported, got dims {kwargs['dims']}.")
  for name in _TORCH_ONLY_ARGS:
    kwargs.pop(name, None)
  unknown = sorted(set(kwargs) - set(UNet.__dataclass_fields__) - {"parent", "name"})
  if unknown:
    raise ValueError(f"unknown U-Net constructor arguments {unknown}; allowed: "
                     f"{sorted(f for f in UNet.__dataclass_fields__ if f not in ('parent', 'name'))}.")
  for name in ("attention_resolutions", "channel_mult"):
    if name in kwargs:
      kwargs[name] = tuple(kwargs[name])
  return kwargs
