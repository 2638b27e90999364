"""Models: the autoencoder (stage 1) and the latent denoiser (stage 2)."""
