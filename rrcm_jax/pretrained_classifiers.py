"""The public classifiers of diffusion denoised smoothing, called on pixel-space images.

Each entry of `CLASSIFIERS` pairs a `pretrained_vits` network with the input
it was trained on (`Preprocess`) and the public checkpoint it loads, so that
DDS (or anything else) calls every classifier the same way:

    clf = pretrained_classifier("hf_vit_b16_cifar10")
    params = clf.load("model.safetensors")
    logits = clf.apply(params, x_pixel)   # x_pixel [B, 224, 224, 3] in [0, 1]

What DDS's code does before the classifier (Carlini et al. 2023, their
`DRM.py`): the one-shot denoised x̂0 stays in model space [−1, 1] (clamped,
not normalized) and is resized to the classifier's resolution with
antialiased bicubic interpolation (`F.interpolate(..., "bicubic",
antialias=True)`; CIFAR-10 32 → 224; ImageNet 224 → 512). Both classifiers
were trained on inputs normalized with mean = std = 0.5 per channel, so
[−1, 1] is their normalized range: x_model = (x_pixel − 0.5) / 0.5 with
x_pixel = (x̂0 + 1) / 2. `resize_to` is that bicubic resize in JAX; resizing
before or after the affine map gives the same image (bicubic weights sum
to 1), up to rounding.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from rrcm_jax import pretrained_import
from rrcm_jax import pretrained_vits

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """A classifier's expected input: square `resolution`, per-channel mean/std on pixel [0, 1]."""
  resolution: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize: str = "bicubic"   # how DDS brings a smaller image to `resolution` (antialiased)

  def normalize(self, x_pixel):
    """[B, H, W, 3] pixel [0, 1] -> the network's input, (x − mean) / std, float32."""
    return (x_pixel.astype(jnp.float32) - jnp.asarray(self.mean)) / jnp.asarray(self.std)


def resize_to(x_pixel, resolution, method="bicubic"):
  """[B, h, w, C] -> [B, resolution, resolution, C]; bicubic with antialiasing.

  jax.image.resize's bicubic (a = −0.5 kernel, antialiased) matches torch's
  F.interpolate(mode="bicubic", antialias=True) to ~3e-6 on DDS's 32 → 224
  resize. No clipping afterwards (DDS does not clip: bicubic overshoots).
  """
  b, _, _, c = x_pixel.shape
  return jax.image.resize(x_pixel, (b, resolution, resolution, c), method)


@dataclasses.dataclass(frozen=True)
class PretrainedClassifier:
  """A network, its preprocessing and its public checkpoint."""
  name: str
  network: nn.Module
  preprocess: Preprocess
  num_classes: int
  checkpoint: str   # where the published weights live (Hugging Face Hub id)

  def input_spec(self, batch=1):
    r = self.preprocess.resolution
    return jax.ShapeDtypeStruct((batch, r, r, 3), jnp.float32)

  def param_shapes(self):
    """The params tree as jax.ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(self.network.init, jax.random.key(0), self.input_spec())["params"]

  def num_params(self):
    return sum(int(x.size) for x in jax.tree.leaves(self.param_shapes()))

  def apply(self, params, x_pixel):
    """params, x_pixel [B, R, R, 3] pixel space [0, 1] (R = resolution) -> logits [B, classes] f32."""
    r = self.preprocess.resolution
    if x_pixel.ndim != 4 or x_pixel.shape[1:] != (r, r, 3):
      raise ValueError(f"{self.name} takes images [B, {r}, {r}, 3] in pixel space [0, 1], got "
                       f"shape {tuple(x_pixel.shape)}; resize with resize_to(x, {r}).")
    return self.network.apply({"params": params}, self.preprocess.normalize(x_pixel))

  def load(self, source, which=None, trusted=False):
    """A checkpoint file (.safetensors / .bin / .pth) or state dict -> params (numpy f32)."""
    return pretrained_import.load_params(source, self.network, self.input_spec(), self.name,
                                         which=which, trusted=trusted)


_HALF = (0.5, 0.5, 0.5)


def _hf_vit_b16_cifar10(dtype):
  return PretrainedClassifier(
      "hf_vit_b16_cifar10",
      pretrained_vits.HFViTForImageClassification(10, dtype=dtype),
      Preprocess(224, _HALF, _HALF), 10,
      "aaraki/vit-base-patch16-224-in21k-finetuned-cifar10")


def _timm_beit_large_patch16_512(dtype):
  network = pretrained_vits.TimmBeit(
      1000, patch_size=16, width=1024, depth=24, num_heads=16, init_values=1e-5,
      use_abs_pos_emb=False, use_rel_pos_bias=True, dtype=dtype)
  return PretrainedClassifier("beit_large_patch16_512", network, Preprocess(512, _HALF, _HALF),
                              1000, "timm/beit_large_patch16_512.in22k_ft_in22k_in1k")


def _timm_vit_base_patch16_224(dtype):
  network = pretrained_vits.TimmVisionTransformer(1000, dtype=dtype)
  return PretrainedClassifier("vit_base_patch16_224", network, Preprocess(224, _HALF, _HALF),
                              1000, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")


CLASSIFIERS = {
    "hf_vit_b16_cifar10": _hf_vit_b16_cifar10,            # DDS, CIFAR-10
    "beit_large_patch16_512": _timm_beit_large_patch16_512,   # DDS, ImageNet
    "vit_base_patch16_224": _timm_vit_base_patch16_224,
}


def pretrained_classifier(name, dtype="float32"):
  """One of `CLASSIFIERS` with its compute dtype ("float32" or "bfloat16")."""
  if name not in CLASSIFIERS:
    raise ValueError(f"classifier must be one of {sorted(CLASSIFIERS)}, got {name!r}.")
  if dtype not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
  return CLASSIFIERS[name](_DTYPES[dtype])
