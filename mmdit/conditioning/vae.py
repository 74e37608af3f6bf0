"""SD3's frozen 16-channel VAE: images <-> normalised latents.

Images are (B, 3, H, W) floats in [-1, 1] with H, W multiples of 8. `encode` returns the raw
posterior (mean, logvar): that is what a precompute cache stores, so training can draw a fresh
sample every epoch. The model sees normalised latents z' = (z - shift) * scale with SD3's
shift 0.0609 and scale 1.5305 (read from the VAE's config); `to_model` / `from_model` are the
only two places that apply them, so they are applied exactly once each way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mmdit.conditioning.components import (
    ComponentError,
    identity,
    load_pretrained,
    resolve,
)

SD3_SHIFT = 0.0609
SD3_SCALE = 1.5305
LATENT_CHANNELS = 16
SPATIAL_FACTOR = 8


class VAE:
    def __init__(self, autoencoder, *, chunk_size: int = 8, identity: dict | None = None):
        config = autoencoder.config
        if config.latent_channels != LATENT_CHANNELS:
            raise ComponentError(
                f"VAE has latent_channels={config.latent_channels}; SD3 models need the "
                f"{LATENT_CHANNELS}-channel SD3 VAE (the vae/ folder of the SD3 diffusers "
                "repository), not an SD1/SDXL 4-channel one"
            )
        factor = 2 ** (len(config.block_out_channels) - 1)
        if factor != SPATIAL_FACTOR:
            raise ComponentError(
                f"VAE downsamples by {factor}, SD3's by {SPATIAL_FACTOR}; latent buckets assume "
                f"{SPATIAL_FACTOR}x (sides multiple of 16 with patch size 2)"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        # SD3's VAE config carries both factors; an older config without shift_factor gets
        # SD3's published value rather than silently 0.
        shift = getattr(config, "shift_factor", None)
        self.shift = float(SD3_SHIFT if shift is None else shift)
        self.scale = float(config.scaling_factor)
        self.chunk_size = chunk_size
        self._identity = dict(identity or {})

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike | None = None,
        *,
        path: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_size: int = 8,
        tiling: bool = False,
    ) -> VAE:
        """Load `root/vae` (an SD3-layout directory) or the VAE folder `path`, offline.

        `tiling` decodes/encodes large images in overlapping tiles (diffusers' tiled VAE),
        bounding memory at the cost of speed; `chunk_size` bounds the images per VAE call."""
        from diffusers import AutoencoderKL

        directory = resolve("vae", root, {"vae": path} if path else {})
        autoencoder = load_pretrained(
            "vae", directory, AutoencoderKL.from_pretrained, torch_dtype=dtype
        ).to(device)
        if tiling:
            autoencoder.enable_tiling()
        return cls(
            autoencoder, chunk_size=chunk_size, identity=identity("vae", Path(directory)).as_dict()
        )

    def identity(self) -> dict:
        return {"vae": self._identity, "shift": self.shift, "scale": self.scale}

    @property
    def device(self) -> torch.device:
        return self.autoencoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.autoencoder.dtype

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % SPATIAL_FACTOR or W % SPATIAL_FACTOR:
            raise ValueError(f"image size {H}x{W} must be a multiple of {SPATIAL_FACTOR}")

    # ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> raw posterior (mean, logvar), each (B, 16, H/8, W/8), fp32."""
        self._check_images(images)
        means, logvars = [], []
        for chunk in images.split(self.chunk_size):
            dist = self.autoencoder.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(dist.mean.float())
            logvars.append(dist.logvar.float())
        return torch.cat(means).clone(), torch.cat(logvars).clone()

    @staticmethod
    def sample(
        mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One draw z ~ N(mean, exp(logvar)) of the raw (unnormalised) posterior."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the normalised latents the MMDiT is trained on."""
        return (z - self.shift) * self.scale

    def from_model(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift

    def encode_to_model(
        self,
        images: torch.Tensor,
        *,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images -> normalised latents (a posterior sample, or its mean with sample=False)."""
        mean, logvar = self.encode(images)
        return self.to_model(self.sample(mean, logvar, generator) if sample else mean)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [-1, 1], fp32."""
        if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"latents must be (B, 16, h, w), got {tuple(latents.shape)}")
        images = []
        for chunk in latents.split(self.chunk_size):
            z = self.from_model(chunk.to(self.device, torch.float32)).to(self.dtype)
            images.append(self.autoencoder.decode(z).sample.float().clamp(-1.0, 1.0))
        return torch.cat(images).clone()
