"""flowerdiff: Lightning + Hydra denoising diffusion on flower images."""
