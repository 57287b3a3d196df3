r"""Certify the Fashion-MNIST classifier of configs/fashion_mnist_finetune.py.

  python -m rrcm_jax.certify --config=configs/fashion_mnist_certify.py \
      --workdir=workdirs/fmnist/certify --config.init_from=workdirs/fmnist/finetune \
      --config.sigma=0.25 --config.n=10000

CERTIFY (Cohen et al. 2019) with n0 = 100, n = 100,000 (the paper's; the
README demo uses 10,000), alpha = 0.001, on every 100th test image (100
images). sigma is the pixel-space noise std ([0, 1] images); the classifier
sees 2 * sigma in model space. The log is <workdir>/certify_sigma<sigma>.tsv
(`--config.mode=predict`: predict_sigma<sigma>.tsv), its report table the
.md beside it.

`certify_config` holds the keys every certification config shares.
"""
import ml_collections

from configs import fashion_mnist_finetune

FieldReference = ml_collections.FieldReference


def certify_config(finetune, *, sigma, every, num_images, chunk_size=1000):
  """Everything `rrcm_jax.certify` reads. The data, model and denoiser sections
  are the fine-tuning config `finetune`'s; a checkpoint must match them."""
  config = ml_collections.ConfigDict()
  config.seed = 0                       # noise of sample j of image i: key(seed) with i, stream, j
  # The classifier: a fine-tuning workdir, or the authors' PyTorch checkpoint.
  config.init_from = FieldReference(None, field_type=str)        # fine-tuning workdir
  config.checkpoint = "last"            # "last", or "best_clean", "best_noisy_0.5", ...
  config.torch_checkpoint = FieldReference(None, field_type=str)  # or a .pth (needs torch)
  config.torch_network = FieldReference(None, field_type=str)     # its network; None: first known
  config.torch_trusted = False          # unpickle arbitrary objects (only files you trust)
  config.num_scales = FieldReference(None, field_type=int)  # N; None: init_from's, 81 for a .pth
  config.final_norm = finetune.final_norm   # used for a .pth only (init_from records its own)
  config.dtype = FieldReference(None, field_type=str)  # compute dtype; None: the classifier's
  # Randomized smoothing (docs/method.md, Certification).
  config.sigma = float(sigma)           # pixel-space noise std
  config.mode = "certify"               # "certify" or "predict"
  config.n0 = 100                       # selection samples (CERTIFY)
  config.n = 100_000                    # estimation samples (PREDICT: all its samples)
  config.alpha = 0.001
  config.chunk_size = chunk_size        # noisy samples per call (rounded up to the local devices)
  # Which test images: every k-th (Cohen et al.) or the first num_images (the rRCM code).
  config.subset = "every"               # "every" or "first"
  config.every = every
  config.num_images = num_images        # at most this many of the subset
  config.data = finetune.data.copy_and_resolve_references()   # data.eval_split is certified
  config.model = finetune.model.copy_and_resolve_references()
  config.denoiser = finetune.denoiser.copy_and_resolve_references()
  return config


def get_config(arg=None):
  sigma = fashion_mnist_finetune.parse_sigma(arg, default=0.25)
  return certify_config(fashion_mnist_finetune.get_config(str(sigma)), sigma=sigma, every=100,
                        num_images=100)
