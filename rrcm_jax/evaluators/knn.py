"""k-NN accuracy of an encoder's features: a representation monitor for pre-training.

  evaluator = knn.KnnEvaluator(knn.encoder_features_fn(config.model),
                               train_images, train_labels, test_images, test_labels,
                               num_scales=81, denoiser_cfg=config.denoiser)
  dict(evaluator.run(state.ema_params))
  # {"knn_clean": 0.80, "knn_noisy_0.5": 0.74, "knn_noisy_1.0": 0.61}

The classifier is weighted k-NN as in InstDisc (Wu et al. 2018) and DINO
(Caron et al. 2021): features are L2-normalized, the k = 20 training
examples with the highest cosine similarity s_i vote for their labels with
weight exp(s_i / T), T = 0.07, and the class with the largest summed weight
wins (ties: the smaller class index).

Noise levels are model-space stds s (s = 2σ for a pixel-space σ; 0 = clean).
A test image at level s is x + s·ε, and the encoder is conditioned on the
grid point σ_j nearest s (s = 0 → σ_{N−1}), through `denoiser.encode_at_sigma`,
the one way the package calls the encoder at a noise level. The memory bank
holds the *clean* training features by default (`bank="clean"`): the accuracy
at s then measures how well noisy representations land near the clean ones
of their class, which is what the consistency objective trains for;
`bank="same"` encodes the training images at the same level as the queries.
ε of an example comes from its index in its split (`accuracy.per_example_noise`),
so the numbers do not depend on the batch size.

Features are extracted by one jitted function in fixed-size batches (the last
one padded): one compilation serves both splits and every level (s and σ_j
are traced). The bank lives on one device; for large training sets pass a
subset (a few thousand images per class are plenty for a monitor). In a
multi-process run every process passes the same images (host arrays enter
the jitted functions as replicated inputs) and gets the same numbers.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rrcm_jax import denoiser, models
from rrcm_jax.evaluators import accuracy

FEATURES = ("feature", "cls")
BANKS = ("clean", "same")


def encoder_features_fn(model_cfg, feature="feature", sigma_data=denoiser.SIGMA_DATA):
  """features_fn(params, x_noisy, sigma) -> [B, D] float32 for an rRCM encoder.

  Args:
    model_cfg: the model config (configs/common.py `model_config`).
    feature: "feature" (h = LN(cls), the feature pre-training's consistency
      term acts on) or "cls" (the cls token before the final LayerNorm, what
      the CIFAR-10 classifier's head reads).
  The returned function takes the encoder's parameters (a pre-training
  state's params, target_params or ema_params, or a classifier's: only
  params["vit"] is read), model-space inputs [B, H, W, C] and the grid σ the
  encoder is conditioned on (a scalar, may be traced).
  """
  if feature not in FEATURES:
    raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}.")
  vit = models.rcm_encoder(model_cfg).vit

  def features(params, x_noisy, sigma):
    cls, h = denoiser.encode_at_sigma(vit.apply, {"params": params["vit"]}, x_noisy, sigma,
                                      sigma_data=sigma_data)
    return cls if feature == "cls" else h
  return features


def pixel_features(params, x_noisy, sigma):
  """The raw-pixel baseline: the model-space image itself, flattened, [B, H·W·C]."""
  del params, sigma
  return x_noisy.reshape(x_noisy.shape[0], -1)


def normalize(features, eps=1e-12):
  features = features.astype(jnp.float32)
  return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_predict(bank, bank_labels, queries, *, k, num_classes, temperature):
  """Weighted k-NN labels [Q] of L2-normalized queries [Q, D] against bank [N, D].

  The k most similar bank rows vote for their labels (int [N]) with weight
  exp(cosine / temperature).
  """
  sim = jnp.matmul(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  top_sim, top_idx = jax.lax.top_k(sim, k)
  weights = jnp.exp((top_sim - 1.0) / temperature)    # shifted: exp(1/0.07) is 1.6e6
  votes = jnp.sum(jax.nn.one_hot(bank_labels[top_idx], num_classes) * weights[..., None], 1)
  return jnp.argmax(votes, axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _features(features_fn, params, images, index, key, s, sigma):
  """Normalized features of one padded batch of pixel-space images at level s,
  conditioned on σ (both traced: one compilation per features_fn and shape)."""
  x = denoiser.pixels_to_model(images)
  noise = accuracy.per_example_noise(key, index, x.shape[1:])
  return normalize(features_fn(params, x + s * noise, sigma))


def _check_split(images, labels, name):
  if images.ndim != 4:
    raise ValueError(f"{name}_images must be [N, H, W, C], got shape {images.shape}.")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"{name}_labels must have shape ({images.shape[0]},), got {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
    raise ValueError(f"{name}_labels must be non-negative integers.")


class KnnEvaluator:
  """k-NN accuracy of `features_fn` at each model-space level in `levels`.

  Args:
    features_fn: (params, x_noisy model space [B, H, W, C], sigma) -> [B, D]
      (`encoder_features_fn`, or `pixel_features`).
    train_images, test_images: uint8 [N, H, W, C] in [0, 255] or float in
      [0, 1] (pixel space), host arrays; train_labels, test_labels: int [N].
    levels: model-space noise levels s of the test images (0 = clean).
    num_scales: N of the noise grid the encoder is conditioned on (the
      checkpoint's N(k): 81 from K' steps on).
    denoiser_cfg: sigma_min, sigma_max, rho of the grid (default: the paper's).
    k, temperature: neighbours and vote temperature (20, 0.07).
    batch_size: images per feature-extraction call (and queries per k-NN call).
    bank: "clean" (training features at s = 0) or "same" (at the query's s).
    pixel_baseline: also yield the raw-pixel k-NN accuracies
      ("knn_pixels_clean", ...), computed once and cached.
    num_classes: default max label + 1.
    seed: the noise key.
  """

  def __init__(self, features_fn, train_images, train_labels, test_images, test_labels, *,
               levels=(0.0, 0.5, 1.0), num_scales=81, denoiser_cfg=None, k=20,
               temperature=0.07, batch_size=256, bank="clean", pixel_baseline=False,
               num_classes=None, seed=0, prefix="knn"):
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    _check_split(np.asarray(train_images), train_labels, "train")
    _check_split(np.asarray(test_images), test_labels, "test")
    if train_images.shape[1:] != test_images.shape[1:]:
      raise ValueError(f"train and test images differ in shape: {train_images.shape[1:]} vs "
                       f"{test_images.shape[1:]}.")
    if not 1 <= k <= len(train_images):
      raise ValueError(f"k={k} must be in [1, {len(train_images)}] (the training images).")
    if temperature <= 0 or batch_size < 1:
      raise ValueError(f"temperature={temperature} and batch_size={batch_size} must be positive.")
    if bank not in BANKS:
      raise ValueError(f"bank must be one of {BANKS}, got {bank!r}.")
    if any(s < 0 for s in levels):
      raise ValueError(f"levels must be model-space noise stds >= 0, got {list(levels)}.")
    grid = {} if denoiser_cfg is None else dict(
        sigma_min=denoiser_cfg.sigma_min, sigma_max=denoiser_cfg.sigma_max, rho=denoiser_cfg.rho)
    self.levels = [float(s) for s in levels]
    # σ_j of the grid point nearest each level (and of the clean bank).
    self.grid_sigmas = {s: float(denoiser.karras_sigma(
        denoiser.nearest_grid_index(s, num_scales, **grid), num_scales, **grid))
                        for s in {0.0, *self.levels}}
    self.train = (np.asarray(train_images), train_labels.astype(np.int32))
    self.test = (np.asarray(test_images), test_labels.astype(np.int32))
    self.num_classes = int(num_classes or max(train_labels.max(), test_labels.max()) + 1)
    self.k, self.temperature, self.batch_size, self.bank = k, temperature, batch_size, bank
    self.prefix, self.key = prefix, jax.random.key(seed)
    self._extract = functools.partial(_features, features_fn)
    self._pixels = functools.partial(_features, pixel_features) if pixel_baseline else None
    self._pixel_results = None

  def _split_features(self, extract, params, images, split, s):
    n, bs = len(images), self.batch_size
    # One noise stream per (split, level); the clean bank (s = 0) adds no noise.
    level = self.levels.index(s) if s in self.levels else len(self.levels)
    key = jax.random.fold_in(jax.random.fold_in(self.key, split), level)
    out = []
    for start in range(0, n, bs):
      index = np.arange(start, start + bs)
      batch = images[np.minimum(index, n - 1)]   # the last batch padded with its last image
      f = extract(params, batch, index.astype(np.int32), key, np.float32(s),
                  np.float32(self.grid_sigmas[s]))
      out.append(f[:min(bs, n - start)])
    return jnp.concatenate(out)

  def _accuracy(self, bank, queries):
    bank_labels, labels = jnp.asarray(self.train[1]), self.test[1]
    correct, bs = 0, self.batch_size
    for start in range(0, len(labels), bs):
      q = queries[start:start + bs]
      q = jnp.pad(q, ((0, bs - q.shape[0]), (0, 0)))   # fixed shape: one compilation
      pred = knn_predict(bank, bank_labels, q, k=self.k, num_classes=self.num_classes,
                         temperature=self.temperature)
      n = min(bs, len(labels) - start)
      correct += int(np.sum(np.asarray(pred[:n]) == labels[start:start + n]))
    return correct / max(len(labels), 1)

  def _evaluate(self, extract, params):
    results, bank = [], None
    for s in self.levels:
      if bank is None or self.bank == "same":
        bank = self._split_features(extract, params, self.train[0], 0,
                                    s if self.bank == "same" else 0.0)
      queries = self._split_features(extract, params, self.test[0], 1, s)
      results.append((accuracy.metric_name(s), self._accuracy(bank, queries)))
    return results

  def run(self, params):
    """Yields (f"{prefix}_{clean|noisy_<s>}", accuracy) per level, then the pixel baseline."""
    for name, value in self._evaluate(self._extract, params):
      yield f"{self.prefix}_{name}", value
    if self._pixels is not None:
      if self._pixel_results is None:
        self._pixel_results = self._evaluate(self._pixels, None)
      for name, value in self._pixel_results:
        yield f"{self.prefix}_pixels_{name}", value
