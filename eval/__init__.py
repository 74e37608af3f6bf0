"""Sampling, FID, CLIP score, validation loss and scaling curves from checkpoints."""
