"""dplatent: differentially private synthetic image data through latent diffusion.

Data flow (one module per step):
    data -> models.autoencoder (DP stage 1) -> latents -> models.denoiser (DP stage 2)
    -> diffusion.sampler -> decode -> eval -> report
with privacy.accounting / privacy.ledger spanning both private stages.
"""

__version__ = "0.1.0"
