r"""Does the DDS denoiser work? PSNR and accuracy on noisy test images, with and without it.

  python -m experiments.dds_check --denoiser results/fashion_mnist_dds/diffusion \
      --classifier results/fashion_mnist_dds/clean_classifier --sigma 0.25 --num_images 500 \
      --out results/fashion_mnist_dds/denoiser_check.json

For the first `num_images` test images (in the files' order) and one noise
draw each at pixel-space σ: the PSNR (pixel space [0, 1]) of the noisy image
x + σ'ε (σ' = sigma_added, what DDS's x_t carries) and of the one-shot
denoised x̂0 against the clean image, and the accuracy of the classifier on
the clean images, on the noisy images directly (model space, the clean grid
point) and on x̂0 (the DDS base classifier, exactly as certification calls it).
Configuration: configs/fashion_mnist_dds_certify.py (or --config).
"""
import argparse
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from rrcm_jax import parallel
from rrcm_jax.data import arrays
from rrcm_jax.diffusion import base_classifier, dds


def psnr(a, b):
  """PSNR in dB of pixel-space images [B, H, W, C] in [0, 1], per image, then averaged."""
  mse = np.mean(np.square(np.asarray(a) - np.asarray(b)), axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def check(config, num_images, batch=100, seed=0):
  """{psnr_noisy, psnr_denoised, acc_clean, acc_noisy, acc_dds, t_star, sigma_added, ...}."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  unet, schedule, sizes, den_record, load_unet = base_classifier.denoiser_spec(config)
  step = base_classifier.check_denoiser(config, unet, schedule, sizes, config.dds.denoiser)
  size, clf_record, load_clf = base_classifier.classifier_spec(config)
  clf_fn, clf_params = load_clf(mesh)
  unet_vars = load_unet(mesh)
  resize = None if size == config.data.image_size else size

  @jax.jit
  def one_batch(x, eps):
    x_t = dds.noisy_x_t(x, eps, step)
    x0 = dds.denoise(unet, unet_vars, x_t, step)
    noisy_model = x_t / step.sqrt_alpha_bar        # 2(x + σ'ε) − 1
    logits = {"clean": clf_fn(clf_params, dds.resize_for_classifier(x * 2 - 1, resize)),
              "noisy": clf_fn(clf_params, dds.resize_for_classifier(noisy_model, resize)),
              "dds": clf_fn(clf_params, dds.resize_for_classifier(x0, resize))}
    return (x0 + 1) / 2, (noisy_model + 1) / 2, {k: jnp.argmax(v, -1) for k, v in logits.items()}

  data = arrays.load_split(config.data, config.data.eval_split)
  images = data.images[:num_images].astype(np.float32) / 255.0
  labels = np.asarray(data.labels[:num_images])
  key = jax.random.key(seed)
  sums, correct = dict(noisy=0.0, denoised=0.0), dict(clean=0, noisy=0, dds=0)
  for start in range(0, len(images), batch):
    x = jnp.asarray(images[start:start + batch])
    eps = jax.random.normal(jax.random.fold_in(key, start), x.shape, jnp.float32)
    x0, noisy, predictions = one_batch(x, eps)
    sums["denoised"] += psnr(x0, x) * len(x)
    sums["noisy"] += psnr(noisy, x) * len(x)
    for k, p in predictions.items():
      correct[k] += int(np.sum(np.asarray(p) == labels[start:start + batch]))
  n = len(images)
  return dict(images=n, sigma=float(config.sigma), sigma_added=step.sigma_added, t_star=step.t,
              psnr_noisy=sums["noisy"] / n, psnr_denoised=sums["denoised"] / n,
              acc_clean=correct["clean"] / n, acc_noisy=correct["noisy"] / n,
              acc_dds=correct["dds"] / n, denoiser=den_record, classifier=clf_record)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs.fashion_mnist_dds_certify")
  parser.add_argument("--denoiser", required=True)
  parser.add_argument("--classifier", required=True)
  parser.add_argument("--sigma", type=float, default=0.25)
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--out")
  args = parser.parse_args()
  config = importlib.import_module(args.config).get_config()
  config.dds.denoiser, config.dds.classifier, config.sigma = (args.denoiser, args.classifier,
                                                              args.sigma)
  result = check(config, args.num_images)
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
