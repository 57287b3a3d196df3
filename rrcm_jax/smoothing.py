"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): sampler, CERTIFY, PREDICT.

The `Sampler` draws Gaussian noise on the device in fixed-size chunks,
classifies the noisy copies with one jitted function per chunk size and
accumulates class counts on the device; only the counts
[num_images, num_classes] reach the host, once per batch of images and stream.

Units (docs/method.md, Conventions): images and sigma are in pixel space [0, 1]. The
base classifier sees v = x + sigma * eps in model space, (v - 0.5) / 0.5, where
the same noise has std 2 * sigma. The caller's `logits_fn` already conditions
the classifier at the grid point nearest 2 * sigma; the sampler never does.

Two ways to hand a sample to `logits_fn` (`logits_input`):
  "noisy": `logits_fn(params, x_model)` with x_model = (x + sigma * eps - 0.5) / 0.5;
  "clean_and_noise": `logits_fn(params, x, eps)` with the clean image x (pixel
    space, repeated per sample) and the unit normal eps, for base classifiers
    that add the noise themselves, like diffusion denoised smoothing
    (`rrcm_jax.diffusion.dds.make_logits_fn`, docs/method.md, "Diffusion
    denoised smoothing"), whose x_t carries slightly more noise than sigma.
The eps of a sample is the same in both modes; the certificate uses the
nominal sigma either way (conservative when the classifier adds more).

Noise of sample j of image i in stream s:
`normal(fold_in(fold_in(fold_in(key, i), s), j))`, one key per sample, so the
counts depend neither on the chunk size nor on the number of devices
(`rrcm_jax.noise.normal` draws a chunk's normals, bit for bit `jax.random.normal`). The n0
selection samples, the n estimation samples and PREDICT's samples are separate
streams.
"""
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats

from rrcm_jax import noise

SELECTION_STREAM = 0   # CERTIFY's n0 samples that pick the class
ESTIMATION_STREAM = 1  # CERTIFY's n samples that bound its probability
PREDICTION_STREAM = 2  # PREDICT's n samples
ABSTAIN = -1
MAX_IN_FLIGHT = 8      # chunks dispatched ahead of the device before waiting
LOGITS_INPUTS = ("noisy", "clean_and_noise")   # what `Sampler.logits_fn` receives


class Sampler:
  """Monte Carlo class counts of a base classifier under Gaussian noise.

  Attributes:
    logits_fn: with logits_input "noisy", `logits_fn(params, x_model) -> logits`,
      x_model float32 [b, H, W, C] in model space [-1, 1] (noise std 2 * sigma);
      with "clean_and_noise", `logits_fn(params, x, eps) -> logits`, x float32
      [b, H, W, C] the clean images in pixel space [0, 1] (one row per sample) and
      eps float32 [b, H, W, C] unit normal. logits [b, num_classes].
    logits_input: "noisy" or "clean_and_noise" (`LOGITS_INPUTS`).
    num_classes: number of classes K.
    sigma: noise std in pixel space [0, 1] (model space sees 2 * sigma).
    chunk_size: noisy samples per image per jitted call; memory scales with
      chunk_size * num_images, not with n.
    mesh: optional `jax.sharding.Mesh` with axis "data": the chunk's noise and
      noisy inputs are sharded over it, params and images replicated. When
      processes certify disjoint images, give each a mesh of its local devices.
    key: typed base key of all noise.
    traces: {chunk size: number of Python traces of the chunk function}; a
      chunk size is traced once for a given image shape, batch and params
      structure, never again per image, index, stream or n.
  """

  def __init__(self, logits_fn, num_classes, sigma, *, chunk_size=1024, mesh=None, seed=0,
               logits_input="noisy"):
    if not (isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0):
      raise ValueError(f"sigma must be a finite number > 0 (pixel space [0, 1]), got {sigma!r}.")
    num_classes = _positive_int("num_classes", num_classes)
    if num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if mesh is not None and "data" not in mesh.axis_names:
      raise ValueError(f"mesh must have an axis named 'data', got axes {mesh.axis_names}.")
    if logits_input not in LOGITS_INPUTS:
      raise ValueError(f"logits_input must be one of {LOGITS_INPUTS}, got {logits_input!r}.")
    self.logits_fn = logits_fn
    self.logits_input = logits_input
    self.num_classes = num_classes
    self.sigma = float(sigma)
    self.mesh = mesh
    self.num_devices = 1 if mesh is None else mesh.shape["data"]
    self.chunk_size = _positive_int("chunk_size", chunk_size)
    if self.chunk_size % self.num_devices:
      raise ValueError(f"chunk_size ({chunk_size}) must be divisible by the number of devices on the "
                       f"mesh's 'data' axis ({self.num_devices}).")
    self.key = self.replicate(jax.random.key(seed))
    self.traces = {}
    self._chunk_fns = {}
    self._noisy_fns = {}
    self._clean_fns = {}

  @property
  def trace_count(self):
    """Python traces of the chunk function so far, over all chunk sizes."""
    return sum(self.traces.values())

  def replicate(self, tree):
    """Places `tree` on every device of the mesh (a no-op when already there)."""
    if self.mesh is None:
      return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def chunk_size_for(self, num):
    """The chunk size used to draw `num` samples.

    `chunk_size` when num >= chunk_size; otherwise the power of two >= num
    (rounded up to a multiple of the device count), so that CERTIFY's n0 = 100
    selection samples do not pay for a full chunk. Each size compiles once.
    """
    if num >= self.chunk_size:
      return self.chunk_size
    size = 1 << max(num - 1, 0).bit_length()
    size = -(-size // self.num_devices) * self.num_devices
    return min(self.chunk_size, size)

  def noisy_inputs(self, images, indices, stream, start, chunk_size):
    """The classifier's inputs for samples start ... start + chunk_size - 1.

    Args:
      images: [m, H, W, C] pixel space [0, 1] (or uint8).
      indices: [m] image indices (they key the noise).
      stream: noise stream (SELECTION_STREAM, ...).
      start: first sample index.
      chunk_size: number of samples per image.

    Returns:
      float32 [chunk_size * m, H, W, C] in model space [-1, 1], sample-major
      (row j * m + i is sample start + j of image i), sharded over "data".
    """
    images, indices = self._prepare(images, indices)
    if chunk_size not in self._noisy_fns:   # one jit per chunk size, like _chunk_fn
      self._noisy_fns[chunk_size] = jax.jit(
          functools.partial(self._noisy_batch, chunk_size=chunk_size))
    return self._noisy_fns[chunk_size](images, indices, self.key,
              *self.replicate((np.int32(stream), np.int32(start), np.float32(self.sigma))))

  def clean_and_noise(self, images, indices, stream, start, chunk_size):
    """What a "clean_and_noise" `logits_fn` receives for samples start ... start + chunk_size - 1.

    Arguments as `noisy_inputs`. Returns (x, eps), both float32 [chunk_size * m, H, W, C],
    sample-major and sharded over "data": x the clean images in pixel space [0, 1]
    (row j * m + i is image i), eps the unit normal draws that `noisy_inputs` scales by sigma.
    """
    images, indices = self._prepare(images, indices)
    if chunk_size not in self._clean_fns:
      self._clean_fns[chunk_size] = jax.jit(
          functools.partial(self._clean_and_noise_batch, chunk_size=chunk_size))
    return self._clean_fns[chunk_size](images, indices, self.key,
              *self.replicate((np.int32(stream), np.int32(start))))

  def dispatch_counts(self, params, images, indices, stream, num):
    """Starts counting the classes of `num` noisy samples per image; asynchronous.

    Args:
      params: the classifier's parameters (replicated on the mesh here).
      images: [m, H, W, C] pixel space [0, 1] float, or uint8 [0, 255].
      indices: [m] int image indices; the noise is a function of (index, stream, sample).
      stream: noise stream.
      num: samples per image (n0 or n), >= 1.

    Returns:
      int32 jax.Array [m, num_classes] on the device(s), still being computed.
    """
    num = _positive_int("num", num)
    images, indices = self._prepare(images, indices)
    params = self.replicate(params)
    chunk_size = self.chunk_size_for(num)
    chunk_fn = self._chunk_fn(chunk_size)
    counts = np.zeros((images.shape[0], self.num_classes), np.int32)
    counts, start, stream, num_device, sigma = self.replicate(
        (counts, np.int32(0), np.int32(stream), np.int32(num), np.float32(self.sigma)))
    for k, _ in enumerate(range(0, num, chunk_size)):  # no host transfer per chunk
      counts, start = chunk_fn(params, counts, start, images, indices, self.key, stream, num_device,
                               sigma)
      # At most MAX_IN_FLIGHT chunks queued: XLA:CPU aborts ("termination timeout for all
      # reduce") when dozens of collective programs wait on several devices.
      if k % MAX_IN_FLIGHT == MAX_IN_FLIGHT - 1:
        counts.block_until_ready()
    return counts

  def sample_counts(self, params, images, indices, stream, num):
    """`dispatch_counts` read back: int64 numpy [m, num_classes]."""
    return np.asarray(jax.device_get(self.dispatch_counts(params, images, indices, stream, num)),
                      np.int64)

  def _prepare(self, images, indices):
    """Checks and places a batch of images [m, H, W, C] and indices [m]."""
    images, indices = np.asarray(jax.device_get(images)), np.asarray(jax.device_get(indices))
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if images.ndim != 4 or indices.shape != images.shape[:1]:
      raise ValueError(f"images must be [m, H, W, C] with indices [m], got images {images.shape} "
                       f"and indices {indices.shape}.")
    if not np.issubdtype(indices.dtype, np.integer) or (indices < 0).any():
      raise ValueError(f"indices must be non-negative integers, got {indices}.")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
      raise ValueError(f"images must be in pixel space [0, 1], got values in "
                       f"[{images.min():.3g}, {images.max():.3g}] (model space [-1, 1] is a bug here).")
    return self.replicate(images), self.replicate(indices.astype(np.int32))

  def _chunk_fn(self, chunk_size):
    if chunk_size not in self._chunk_fns:
      self.traces[chunk_size] = 0
      out_shardings = None if self.mesh is None else NamedSharding(self.mesh, P())
      self._chunk_fns[chunk_size] = jax.jit(
          functools.partial(self._chunk_counts, chunk_size),
          donate_argnums=(1, 2), out_shardings=out_shardings)
    return self._chunk_fns[chunk_size]

  def _shard(self, x):
    """Constrains the leading (sample) axis of x to be split over "data"."""
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P("data")))

  def _unit_noise(self, images, indices, key, stream, start, chunk_size):
    """eps [chunk_size, m, H, W, C], unit normal, one key per (image, stream, sample)."""
    shape = images.shape[1:]
    samples = self._shard(start + jnp.arange(chunk_size, dtype=jnp.int32))
    image_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), stream))(indices)
    keys = jax.vmap(lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(image_keys))(samples)
    # = jax.random.normal(keys[j, i], shape) for each (sample, image), in one pass.
    return self._shard(noise.normal(keys, shape))

  def _noisy_batch(self, images, indices, key, stream, start, sigma, *, chunk_size):
    """Model-space noisy inputs [chunk_size * m, H, W, C]; see `noisy_inputs`."""
    m, shape = images.shape[0], images.shape[1:]
    eps = self._unit_noise(images, indices, key, stream, start, chunk_size)
    pixels = images[None] + sigma * eps                     # v = x + sigma * eps, pixel space
    x_model = (pixels - 0.5) / 0.5                          # model space: noise std 2 * sigma
    return self._shard(x_model.reshape((chunk_size * m,) + shape))

  def _clean_and_noise_batch(self, images, indices, key, stream, start, *, chunk_size):
    """(x [chunk_size * m, H, W, C] pixel space, eps of the same shape); see `clean_and_noise`."""
    m, shape = images.shape[0], images.shape[1:]
    eps = self._unit_noise(images, indices, key, stream, start, chunk_size)
    repeated = jnp.broadcast_to(images[None], eps.shape)
    flat = (chunk_size * m,) + shape
    return self._shard(repeated.reshape(flat)), self._shard(eps.reshape(flat))

  def _logits(self, params, images, indices, key, stream, start, sigma, chunk_size):
    """logits_fn on the chunk's samples, in the form `logits_input` names."""
    if self.logits_input == "noisy":
      inputs = (self._noisy_batch(images, indices, key, stream, start, sigma,
                                  chunk_size=chunk_size),)
    else:
      inputs = self._clean_and_noise_batch(images, indices, key, stream, start,
                                           chunk_size=chunk_size)
    return self.logits_fn(params, *inputs), inputs[0].shape

  def _chunk_counts(self, chunk_size, params, counts, start, images, indices, key, stream, num,
                    sigma):
    """(counts [m, K] + class counts of samples start ... min(start + chunk_size, num) - 1,
    start + chunk_size)."""
    self.traces[chunk_size] += 1  # runs only while tracing
    m = images.shape[0]
    logits, input_shape = self._logits(params, images, indices, key, stream, start, sigma,
                                       chunk_size)
    if logits.shape != (chunk_size * m, self.num_classes):
      raise ValueError(f"logits_fn must return logits [{chunk_size * m}, {self.num_classes}] for "
                       f"inputs {input_shape}, got {logits.shape}.")
    predictions = self._shard(jnp.argmax(logits, axis=-1).reshape(chunk_size, m))
    hits = jax.nn.one_hot(predictions, self.num_classes, dtype=jnp.int32)
    mask = (start + jnp.arange(chunk_size) < num).astype(jnp.int32)  # the last chunk is partial
    return counts + jnp.einsum("jmk,j->mk", hits, mask), start + chunk_size


def lower_confidence_bound(n_a, n, alpha):
  """One-sided (1 - alpha) Clopper-Pearson lower bound on p from n_a of n successes.

  Equals statsmodels' `proportion_confint(n_a, n, 2 * alpha, "beta")[0]` (Cohen et
  al.); 0 for n_a = 0, where scipy's Beta(0, .) ppf is NaN. n_a and n may be
  integer arrays of one shape (then an array is returned).
  """
  n_a, n = np.asarray(n_a), np.asarray(n)
  bound = stats.beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1)
  bound = np.where(n_a == 0, 0.0, bound)
  return float(bound) if bound.ndim == 0 else bound


def certify_from_counts(selection_counts, estimation_counts, sigma, alpha):
  """CERTIFY's decision from class counts (docs/method.md, Certification).

  Args:
    selection_counts: [K] counts of the n0 selection samples; picks c = argmax.
    estimation_counts: [K] counts of the n estimation samples.
    sigma: noise std in pixel space [0, 1].
    alpha: failure probability of the certificate.

  Returns:
    (prediction, radius): the class and the L2 radius (pixel space) certified
    with probability >= 1 - alpha, or (ABSTAIN, 0.0) when p_A < 0.5.
  """
  top = int(np.argmax(selection_counts))
  n = int(np.sum(estimation_counts))
  p_a = lower_confidence_bound(int(estimation_counts[top]), n, alpha)
  if p_a < 0.5:
    return ABSTAIN, 0.0
  return top, float(sigma * stats.norm.ppf(p_a))


def predict_from_counts(counts, alpha):
  """PREDICT's decision: the top class, or ABSTAIN when the two-sided binomial
  test of its count c1 against the runner-up c2 (c1 of c1 + c2 at p = 0.5) has
  p-value > alpha."""
  order = np.argsort(-np.asarray(counts), kind="stable")
  c1, c2 = int(counts[order[0]]), int(counts[order[1]])
  if c1 + c2 == 0 or stats.binomtest(c1, c1 + c2, p=0.5).pvalue > alpha:
    return ABSTAIN
  return int(order[0])


def certify_batch(sampler, params, images, indices, n0, n, alpha):
  """CERTIFY for a batch of images [m, H, W, C] (pixel space) with indices [m].

  Returns (predictions int [m], ABSTAIN = -1; radii float [m], pixel space).
  """
  check_certify_args(n0=n0, n=n, alpha=alpha)
  selection, estimation = certify_counts(sampler, params, images, indices, n0, n)
  results = [certify_from_counts(s, e, sampler.sigma, alpha) for s, e in zip(selection, estimation)]
  predictions = np.array([p for p, _ in results], np.int64)
  radii = np.array([r for _, r in results], np.float64)
  return predictions, radii


def certify_counts(sampler, params, images, indices, n0, n):
  """CERTIFY's class counts of images [m, H, W, C] (pixel space) with indices [m]: (n0
  selection counts, n estimation counts), int64 numpy [m, K] each; both streams are
  dispatched before either is read back."""
  check_certify_args(n0=n0, n=n)
  selection = sampler.dispatch_counts(params, images, indices, SELECTION_STREAM, n0)
  estimation = sampler.dispatch_counts(params, images, indices, ESTIMATION_STREAM, n)
  selection, estimation = jax.device_get((selection, estimation))
  return np.asarray(selection, np.int64), np.asarray(estimation, np.int64)


def certify(sampler, params, x, index, n0, n, alpha):
  """CERTIFY one image x [H, W, C] in pixel space [0, 1] (or uint8).

  Returns (prediction or ABSTAIN = -1, radius in pixel space).
  """
  predictions, radii = certify_batch(sampler, params, jax.device_get(x)[None], [index], n0, n, alpha)
  return int(predictions[0]), float(radii[0])


def predict_batch(sampler, params, images, indices, n, alpha):
  """PREDICT for images [m, H, W, C] (pixel space): int [m], ABSTAIN = -1."""
  check_certify_args(n=n, alpha=alpha)
  counts = sampler.sample_counts(params, images, indices, PREDICTION_STREAM, n)
  return np.array([predict_from_counts(c, alpha) for c in counts], np.int64)


def predict(sampler, params, x, index, n, alpha):
  """PREDICT one image x [H, W, C] in pixel space: the class or ABSTAIN = -1."""
  return int(predict_batch(sampler, params, jax.device_get(x)[None], [index], n, alpha)[0])


def check_certify_args(*, n0=1, n=1, alpha=0.5):
  """Raises ValueError for n0 < 1, n < 1 or alpha outside (0, 1)."""
  _positive_int("n0", n0)
  _positive_int("n", n)
  if not (isinstance(alpha, (int, float, np.floating)) and 0.0 < alpha < 1.0):
    raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}.")


def _positive_int(name, value):
  try:
    value_int = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.") from None
  if value_int < 1 or isinstance(value, bool):
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return value_int
