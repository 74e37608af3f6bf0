"""mmdit-make-tiny-components --fit-vae: the tiny VAE fitted to an image folder.

Small on purpose (64 digits, 60 steps): the demo-sized fit (1,800 images, 400 steps) is
measured by hand, not here. The fit is seeded, so the numbers these tests see are fixed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit.conditioning import VAE
from mmdit.testing import components as tiny_set
from mmdit.testing.spec import COMPONENT_DIRS, SEED_OFFSETS, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR
from mmdit.testing.vae import (
    VaeFit,
    find_fit_images,
    fit_vae_to_images,
    load_fit_images,
    write_random_vae,
)

N_FIT, N_HELD_OUT = 64, 16
RESOLUTION = 32
STEPS = 60
BATCH = 16


def _digit_png(path: Path, image: np.ndarray) -> None:
    """An 8x8 scikit-learn digit as dark ink on white, bicubic-upsampled to RESOLUTION."""
    pixels = (255 - image * 255 / 16).astype(np.uint8)
    img = Image.fromarray(pixels).resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path)


@pytest.fixture(scope="module")
def digit_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(fit folder, held-out folder). Half the fit images sit in a subfolder (recursion)."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    root = tmp_path_factory.mktemp("digits")
    for i in range(N_FIT):
        sub = "nested/" if i % 2 else ""
        _digit_png(root / "fit" / f"{sub}digit_{i:03d}.png", images[i])
    for i in range(N_FIT, N_FIT + N_HELD_OUT):
        _digit_png(root / "held_out" / f"digit_{i:03d}.png", images[i])
    (root / "fit" / "notes.txt").write_text("not an image: ignored")
    return root / "fit", root / "held_out"


def _fit(images_dir: Path, steps: int = STEPS) -> VaeFit:
    return VaeFit(images_dir, steps=steps, resolution=RESOLUTION, batch_size=BATCH)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, digit_dirs) -> tuple[Path, str]:
    """Components written through the CLI with --fit-vae; (directory, printed output)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("fitted") / "components"
    printed = io.StringIO()
    argv = ["--out", str(out), "--fit-vae", str(digit_dirs[0]), "--vae-steps", str(STEPS)]
    argv += ["--vae-resolution", str(RESOLUTION), "--vae-batch-size", str(BATCH)]
    with contextlib.redirect_stdout(printed):
        assert tiny_set.main(argv) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def random_vae_dir(tmp_path_factory) -> Path:
    """The VAE that the same seed writes without --fit-vae."""
    folder = tmp_path_factory.mktemp("random") / "vae"
    write_random_vae(folder, seed=0 * 100 + SEED_OFFSETS["vae"])
    return folder


def _mse(vae: VAE, images: torch.Tensor) -> float:
    recon = vae.decode(vae.encode_to_model(images, sample=False))
    return float((recon - images).pow(2).mean())


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- quality ----------------------------------------------------------------------------------


def test_fit_clearly_beats_the_random_vae_on_held_out_images(fitted, digit_dirs, random_vae_dir):
    held_out = load_fit_images(digit_dirs[1], RESOLUTION)
    random_mse = _mse(VAE.from_pretrained(path=random_vae_dir), held_out)
    fitted_mse = _mse(VAE.from_pretrained(path=fitted[0] / "vae"), held_out)
    assert fitted_mse < 0.25 * random_mse, (fitted_mse, random_mse)


def test_fitted_vae_loads_with_the_stacks_loader_and_round_trips(fitted, digit_dirs):
    vae = VAE.from_pretrained(path=fitted[0] / "vae")
    images = load_fit_images(digit_dirs[1], RESOLUTION)[:4]
    latents = vae.encode_to_model(images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (4, 16, RESOLUTION // 8, RESOLUTION // 8)
    recon = vae.decode(latents)
    assert recon.shape == images.shape and torch.isfinite(recon).all()
    assert float((recon - images).pow(2).mean()) < 0.12  # PSNR > 15 dB after 60 steps
    cfg = json.loads((fitted[0] / "vae" / "config.json").read_text())
    assert cfg["latent_channels"] == 16 and cfg["block_out_channels"] == [16, 32, 32, 32]
    assert "_name_or_path" not in cfg  # no temporary path leaks into the saved config
    assert (fitted[0] / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_scale_and_shift_make_normalised_latents_unit_gaussian(fitted, digit_dirs):
    vae = VAE.from_pretrained(path=fitted[0] / "vae")
    assert (vae.scale, vae.shift) != (VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
    z = vae.encode_to_model(load_fit_images(digit_dirs[0], RESOLUTION), sample=False)
    assert abs(float(z.mean())) < 0.1
    assert 0.8 < float(z.std()) < 1.25


# ---- what the CLI writes and says ------------------------------------------------------------


def test_readme_and_progress_report_the_fit(fitted, digit_dirs):
    out, printed = fitted
    readme = (out / "README.md").read_text()
    assert "FITTED" in readme and str(digit_dirs[0]) in readme
    assert f"{N_FIT} images" in readme and f"{STEPS} Adam" in readme
    assert "final L1 loss" in readme and "PSNR" in readme
    cfg = json.loads((out / "vae" / "config.json").read_text())
    assert f"scaling_factor {cfg['scaling_factor']}" in readme
    assert f"vae fit step {STEPS:>5}/{STEPS}" in printed
    assert "img/s" in printed and "ETA" in printed and "vae fitted in" in printed
    # the other components are exactly what the seed gives without --fit-vae
    assert {p.name for p in out.iterdir() if p.is_dir()} == set(COMPONENT_DIRS)


def test_fit_is_deterministic_and_the_seed_matters(tmp_path, digit_dirs, random_vae_dir):
    fit = _fit(digit_dirs[0], steps=5)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        folder = shutil.copytree(random_vae_dir, tmp_path / name / "vae")
        fit_vae_to_images(folder, fit, seed=seed, progress=lambda _m: None)
        runs[name] = _files(folder)
    assert runs["a"] == runs["b"]  # byte-identical: weights and config
    weights = "diffusion_pytorch_model.safetensors"
    assert runs["a"][weights] != runs["c"][weights]
    assert runs["a"][weights] != _files(random_vae_dir)[weights]


def test_fit_leaves_the_callers_rng_alone(tmp_path, digit_dirs, random_vae_dir, monkeypatch):
    # _build is the expensive part and not under test here: only the VAE folder is needed.
    def vae_only(root: Path, seed: int, progress) -> None:
        write_random_vae(root / "vae", seed * 100 + SEED_OFFSETS["vae"])
        (root / "README.md").write_text("random")

    monkeypatch.setattr(tiny_set, "_build", vae_only)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_set.make_tiny_components(tmp_path / "c", fit_vae=_fit(digit_dirs[0], steps=2))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vae-resolution", "30"], "--vae-resolution 30 must be a multiple of 8"),
        (["--vae-steps", "0"], "--vae-steps 0 must be >= 1"),
        (["--vae-batch-size", "0"], "--vae-batch-size 0 must be >= 1"),
    ],
)
def test_bad_fit_settings_are_refused_before_any_work(tmp_path, digit_dirs, capsys, extra, message):
    out = tmp_path / "components"
    with pytest.raises(SystemExit) as exc:
        tiny_set.main(["--out", str(out), "--fit-vae", str(digit_dirs[0]), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_or_imageless_folders_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny_set.main(["--out", str(tmp_path / "c"), "--fit-vae", str(tmp_path / "nope")])
    assert "no such directory" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no .png/.jpg/.jpeg/.webp images"):
        load_fit_images(empty, RESOLUTION)


def test_images_are_found_recursively_and_squared(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a" / "wide.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "a" / "b" / "clear.png")
    Image.new("L", (50, 70), 0).save(tmp_path / "tall.jpg")
    names = [p.name for p in find_fit_images(tmp_path)]
    assert names == ["clear.png", "wide.png", "tall.jpg"]  # sorted by path
    x = load_fit_images(tmp_path, 16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones_like(x[0]))  # transparency -> white
    assert torch.allclose(x[1, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))  # red
    assert torch.allclose(x[2], -torch.ones_like(x[2]))  # black
