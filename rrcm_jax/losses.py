"""Losses: InfoNCE over the global batch, the rRCM pre-training objective,
soft-target cross-entropy and the consistency regularization of fine-tuning.

All losses are computed in float32. Images given to `pretrain_loss` are in
model space ([-1, 1]); its σ are model-space noise levels of the Karras grid.
"""
import jax
import jax.numpy as jnp

from rrcm_jax import denoiser


def _normalize(u, eps=1e-12):
  u = u.astype(jnp.float32)
  return u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), eps)


def info_nce(u, v, temperature=0.2):
  """Per-example InfoNCE, [B]: −⟨û_n, v̂_n⟩/τ + logsumexp_m ⟨û_n, v̂_m⟩/τ.

  u, v: [B, D] with B the *global* batch (under `jit` with a batch sharded
  over devices the negatives come from every device). Positives are rows
  with the same index.
  """
  logits = jnp.matmul(_normalize(u), _normalize(v).T,
                      precision=jax.lax.Precision.HIGHEST) / temperature
  return jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)


def pretrain_loss(params, target_params, batch_stats, target_batch_stats, views, noise,
                  index, num_scales, *, apply_fn, denoiser_cfg, temperature=0.2):
  """The rRCM objective (docs/method.md, Pre-training objective) for one global batch.

  Args:
    params, target_params: online θ and target ξ parameters of an `RCMEncoder`.
    batch_stats, target_batch_stats: their BatchNorm statistics.
    views: dict with "x", "a1", "a2", model-space images [B, H, W, C].
    noise: ε, [B, H, W, C], one draw per image shared by every term.
    index: grid index i in {0, …, N−2} (a scalar shared by the whole batch).
    num_scales: N (may be traced).
    apply_fn: `RCMEncoder.apply`.
    denoiser_cfg: sigma_min, sigma_max, rho, sigma_data.

  Returns:
    (mean loss, aux) with aux = dict(contrast [B], consistency [B],
    batch_stats, target_batch_stats): per-image L_c and L_t and the BatchNorm
    statistics after the six calls (each call normalizes over its own batch).
  """
  grid = dict(sigma_min=denoiser_cfg.sigma_min, sigma_max=denoiser_cfg.sigma_max,
              rho=denoiser_cfg.rho)
  sigma = denoiser.karras_sigma(index, num_scales, **grid)
  sigma_next = denoiser.karras_sigma(index + 1, num_scales, **grid)
  sigma_min = denoiser.karras_sigma(num_scales - 1, num_scales, **grid)

  def call(p, stats, x, s):
    (z, h), updates = denoiser.encode_at_sigma(
        apply_fn, {"params": p, "batch_stats": stats}, x, s,
        sigma_data=denoiser_cfg.sigma_data, train=True, mutable=["batch_stats"])
    return z, h, updates["batch_stats"]

  a1 = views["a1"] + sigma_min * noise
  a2 = views["a2"] + sigma_min * noise
  target_params = jax.lax.stop_gradient(target_params)
  z1, _, batch_stats = call(params, batch_stats, a1, sigma_min)
  z2_t, _, target_batch_stats = call(target_params, target_batch_stats, a2, sigma_min)
  z2, _, batch_stats = call(params, batch_stats, a2, sigma_min)
  z1_t, _, target_batch_stats = call(target_params, target_batch_stats, a1, sigma_min)
  _, h, batch_stats = call(params, batch_stats, views["x"] + sigma * noise, sigma)
  _, h_next, batch_stats = call(params, batch_stats, views["x"] + sigma_next * noise, sigma_next)

  contrast = info_nce(z1, z2_t, temperature) + info_nce(z2, z1_t, temperature)
  consistency = info_nce(h, jax.lax.stop_gradient(h_next), temperature)
  aux = dict(contrast=contrast, consistency=consistency, batch_stats=batch_stats,
             target_batch_stats=target_batch_stats)
  return jnp.mean(contrast + consistency), aux


def soft_cross_entropy(logits, targets):
  """Cross-entropy with soft targets (mixup, cutmix, label smoothing), [B]."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def mean_entropy(logits):
  """Mean over the batch of the softmax entropy, a scalar."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def consistency_loss(logits, targets, lam, eta):
  """Consistency regularization (Jeong & Shin 2020) for m noise draws per image.

  Args:
    logits: [m, B, K], m noisy copies of each of B images.
    targets: [B, K] soft targets.
    lam, eta: weights of the KL-to-the-mean term and of the mean's entropy.

  Returns:
    (loss, dict(ce, kl, entropy)): cross-entropy on all m·B logits
    + λ · mean_n (1/m) Σ_i KL(p̄_n ‖ p_{i,n}) + η · mean_n H(p̄_n).
  """
  logits = logits.astype(jnp.float32)
  ce = jnp.mean(soft_cross_entropy(logits, targets[None]))
  logp = jax.nn.log_softmax(logits)
  mean_p = jnp.mean(jnp.exp(logp), axis=0)                       # p̄, [B, K]
  log_mean_p = jnp.log(jnp.maximum(mean_p, 1e-20))
  kl = jnp.sum(mean_p[None] * (log_mean_p[None] - logp), axis=-1)   # [m, B]
  kl = jnp.mean(jnp.mean(kl, axis=0))
  entropy = jnp.mean(-jnp.sum(mean_p * log_mean_p, axis=-1))
  return ce + lam * kl + eta * entropy, dict(ce=ce, kl=kl, entropy=entropy)
