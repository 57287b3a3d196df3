"""Clean and noisy top-1 accuracy of a classifier, every example exactly once.

  evaluator = accuracy.Evaluator(classifier.level_logits_fn(model, N, denoiser_cfg),
                                 batches, levels=[0.0, 0.5], mesh=mesh,
                                 param_shardings=shardings.params)
  dict(evaluator.run(params))   # {"clean": 0.91, "noisy_0.5": 0.84}

Levels are model-space noise stds s (s = 2σ for a pixel-space σ; 0 = clean):
the classifier sees x + s·ε, conditioned on the grid point nearest s. The
noise of an example comes from its index in the split, so the accuracies do
not depend on the batch size, the padding or the number of devices.
"""
import jax
import jax.numpy as jnp
import numpy as np

from rrcm_jax import denoiser, parallel


def metric_name(s):
  """"clean" for s = 0, else "noisy_<s>" with s the model-space level (noisy_0.5 is σ = 0.25)."""
  return "clean" if s == 0 else f"noisy_{float(s)}"


def per_example_noise(key, index, shape):
  """ε [B, *shape] with example `index[b]` drawn from fold_in(key, index[b]):
  independent of the batch size, the padding and the number of devices."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape))(index)


def make_eval_step(predict_fn, levels, mesh, param_shardings, seed=0):
  """Jitted (params, batch) -> {"count", metric_name(s): correct} summed over the batch.

  predict_fn(params, x_noisy, s) -> logits [B, K]: model-space inputs, s a
  Python float (`classifier.level_logits_fn`).
  batch: image uint8 [B, H, W, C], label int32 [B], mask bool [B] (False on
  padding), index int32 [B] (the example's index in the split: its noise).
  """
  key = jax.random.key(seed)

  def step(params, batch):
    x = denoiser.pixels_to_model(batch["image"])
    valid = batch["mask"].astype(jnp.float32)
    out = {"count": jnp.sum(valid)}
    for i, s in enumerate(levels):
      noisy = x
      if s > 0:
        index = jnp.maximum(batch["index"], 0)   # padding: -1
        noisy = x + s * per_example_noise(jax.random.fold_in(key, i), index, x.shape[1:])
      logits = predict_fn(params, noisy, s)
      out[metric_name(s)] = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * valid)
    return out

  return jax.jit(step, in_shardings=(param_shardings, parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def _global_batch(batch, mesh):
  """An eval batch as one global array per key: jax.Arrays (the device pipeline's global
  batches) as they are, per-process numpy through `parallel.global_batch`; index -1
  (padding) becomes 0, a valid key for its masked-out noise."""
  if all(isinstance(v, jax.Array) for v in batch.values()):
    return batch   # the step clamps the index itself
  local = dict(image=np.asarray(batch["image"]), mask=np.asarray(batch["mask"]),
               label=np.asarray(batch["label"], np.int32),
               index=np.maximum(np.asarray(batch["index"]), 0).astype(np.int32))
  return parallel.global_batch(local, mesh)


class Evaluator:
  """Accuracy at each model-space level in `levels` over `batches()`.

  Args:
    predict_fn: (params, x_noisy model space [B, H, W, C], s) -> logits [B, K].
    batches: () -> finite iterator of eval batches {image uint8, label, mask, index
      (-1 on padding)}: per-process numpy, or global jax.Arrays sharded on "data"
      (`device.DeviceData.eval_batches`), passed as they are.
    levels: model-space noise levels s (0 = clean).
    mesh, param_shardings: where the batches and the parameters live.
    seed: the noise key.
  """

  def __init__(self, predict_fn, batches, levels, mesh, param_shardings, seed=0, step=None):
    self.batches, self.mesh = batches, mesh
    self.levels = [float(s) for s in levels]
    self.names = [metric_name(s) for s in self.levels]
    self.step = step or make_eval_step(predict_fn, self.levels, mesh, param_shardings, seed)
    self._args = (predict_fn, levels, mesh, param_shardings, seed)

  def with_batches(self, batches):
    """The same evaluator (same compiled step) on other batches, e.g. the test split."""
    return Evaluator(*self._args[:1], batches, *self._args[1:], step=self.step)

  def run(self, params):
    """Yields (metric_name(s), fraction correct) for each level, in `levels` order."""
    totals = None
    for batch in self.batches():
      out = self.step(params, _global_batch(batch, self.mesh))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
      raise ValueError("the evaluation split is empty.")
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    for name in self.names:
      yield name, float(totals[name]) / count
