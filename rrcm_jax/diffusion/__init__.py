"""Diffusion denoised smoothing (Carlini et al., ICLR 2023): the ADM U-Net denoiser, its
noise schedules, the one-shot DDS base classifier and the PyTorch checkpoint import."""
