"""FID: equal to torch-fidelity on real images, closed-form Fréchet distance, offline weights
handling, the reference-statistics cache and image-folder loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from eval.fid import (
    INCEPTION_FILE,
    INCEPTION_URL,
    FidStatistics,
    InceptionFeatures,
    InvalidWeightsError,
    MissingWeightsError,
    find_inception_weights,
    frechet_distance,
    load_image_folder,
    reference_cache_paths,
    reference_statistics,
    statistics,
)


def write_png_folder(folder: Path, images: torch.Tensor) -> Path:
    """Write uint8 (N, 3, H, W) images as lossless 000.png, 001.png, ... in `folder`."""
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """One BLAS and one torch thread while this module runs Inception and 2048-d eigvals.

    On a busy 2-core machine two spin-waiting threads fight the other processes: a 2-thread
    OpenBLAS `eigvals` of a 2048x2048 matrix took 20-30 s instead of ~5 s single-threaded, and
    Inception forward passes ran 2x slower. Results are unchanged beyond round-off, and the
    in-process torch-fidelity reference run is under the same limits.
    """
    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(torch_threads)


@pytest.fixture(scope="module")
def extractor(inception_weights) -> InceptionFeatures:
    return InceptionFeatures(inception_weights, batch_size=64)


@pytest.fixture(scope="module")
def features(extractor, sample_images) -> dict[str, torch.Tensor]:
    return {"photos": extractor(sample_images.photos), "digits": extractor(sample_images.digits)}


@pytest.fixture(scope="module")
def photos_vs_digits(features) -> float:
    """Our FID between the two sample sets (one 2048x2048 eigendecomposition: seconds)."""
    return frechet_distance(statistics(features["photos"]), statistics(features["digits"]))


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory, sample_images) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid_pngs")
    return {
        "photos": write_png_folder(root / "photos", sample_images.photos),
        "digits": write_png_folder(root / "digits", sample_images.digits),
    }


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def test_fid_equals_torch_fidelity_on_the_same_image_folders(
    inception_weights, png_folders, sample_images, photos_vs_digits
):
    import torch_fidelity

    reference = torch_fidelity.calculate_metrics(
        input1=str(png_folders["photos"]),
        input2=str(png_folders["digits"]),
        fid=True,
        feature_extractor_weights_path=str(inception_weights),
        cuda=False,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )["frechet_inception_distance"]
    # Our pipeline on the same pixels: the folders read back exactly the tensors whose features
    # the `features` fixture holds (PNG is lossless), so no second Inception pass is needed.
    for name in ("photos", "digits"):
        read_back = torch.cat(list(load_image_folder(png_folders[name])))
        assert torch.equal(read_back, getattr(sample_images, name))
    ours = photos_vs_digits
    assert reference > 1.0  # two different image sets: a real, non-degenerate distance
    # torch-fidelity averages float32 features in float32; we average in float64.
    assert ours == pytest.approx(reference, rel=1e-6, abs=0)


def test_features_are_float64_2048_finite_and_image_dependent(features):
    photos = features["photos"]
    assert photos.shape == (16, 2048) and photos.dtype == torch.float64
    assert torch.isfinite(photos).all()
    # The random Inception must still separate images, or every FID test would be vacuous.
    assert (photos.std(dim=0) > 1e-4).float().mean() > 0.5
    assert not torch.allclose(photos.mean(0), features["digits"].mean(0), atol=1e-3)


def test_features_do_not_depend_on_batching_or_input_size(extractor):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=generator)
    whole = extractor(images)
    extractor.batch_size = 1  # same network, one image per forward pass
    try:
        one_by_one = extractor(images)
    finally:
        extractor.batch_size = 64
    assert whole.shape == (2, 2048)
    assert not torch.allclose(whole[0], whole[1])
    torch.testing.assert_close(one_by_one, whole, rtol=1e-4, atol=1e-6)


def test_statistics_are_numpy_mean_and_unbiased_covariance(features):
    feats = features["photos"]
    stats = statistics(feats)
    x = feats.numpy()
    assert stats.count == 16
    np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False, ddof=1), rtol=1e-12, atol=1e-15)


def test_fid_of_a_set_against_itself_is_zero(features, photos_vs_digits):
    stats = statistics(features["photos"])
    self_fid = frechet_distance(stats, stats)
    # torch-fidelity's eigenvalue route leaves round-off of ~1e-6 of the trace when the
    # covariance is rank-deficient (16 samples in 2048 dimensions).
    assert abs(self_fid) < 1e-5 * np.trace(stats.sigma)
    assert photos_vs_digits > 1e5 * abs(self_fid)


@pytest.mark.parametrize("dim", [1, 3, 8])
def test_frechet_distance_matches_the_scipy_closed_form(dim):
    rng = np.random.default_rng(dim)

    def gaussian() -> FidStatistics:
        a = rng.normal(size=(dim, dim))
        sigma = a @ a.T + 0.5 * np.eye(dim)  # symmetric positive definite
        return FidStatistics(mu=rng.normal(size=dim) * 3, sigma=sigma, count=100)

    s1, s2 = gaussian(), gaussian()
    diff = s1.mu - s2.mu
    covmean = scipy.linalg.sqrtm(s1.sigma @ s2.sigma).real
    expected = diff @ diff + np.trace(s1.sigma + s2.sigma - 2 * covmean)
    assert expected > 0.1
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(s2, s1) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_shifted_identical_gaussians_is_the_squared_shift():
    sigma = np.diag([1.0, 2.0, 3.0])
    a = FidStatistics(mu=np.zeros(3), sigma=sigma, count=10)
    b = FidStatistics(mu=np.array([3.0, 4.0, 0.0]), sigma=sigma, count=10)
    assert frechet_distance(a, b) == pytest.approx(25.0, rel=1e-9)


def test_statistics_and_distance_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        statistics(torch.zeros(1, 2048))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        statistics(torch.zeros(2048))
    with pytest.raises(ValueError, match="NaN"):
        statistics(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    small = FidStatistics(mu=np.zeros(2), sigma=np.eye(2), count=2)
    big = FidStatistics(mu=np.zeros(3), sigma=np.eye(3), count=2)
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(small, big)


def test_extractor_rejects_non_uint8_and_wrong_shapes(extractor):
    with pytest.raises(TypeError, match="uint8"):
        extractor(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        extractor(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        extractor(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Tensor"):
        extractor(np.zeros((2, 3, 32, 32), dtype=np.uint8))


def test_statistics_file_roundtrip_needs_no_pickle(tmp_path, features):
    stats = statistics(features["digits"])
    path = stats.save(tmp_path / "sub" / "stats.npz")
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["count", "mu", "sigma"]
    loaded = FidStatistics.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 16
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file behind


# --------------------------------------------------------------------------------------------
# Weights: finding, refusing, identity
# --------------------------------------------------------------------------------------------


def test_missing_inception_weights_error_says_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError) as info:
        find_inception_weights(None)
    message = str(info.value)
    assert INCEPTION_FILE in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert INCEPTION_URL in message
    assert "--inception-weights" in message and "eval.inception_weights" in message
    assert isinstance(info.value, FileNotFoundError)

    explicit = tmp_path / "elsewhere" / INCEPTION_FILE
    with pytest.raises(MissingWeightsError, match=str(explicit)):
        InceptionFeatures(explicit)


def test_inception_weights_are_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights(None) == cached
    assert find_inception_weights("") == cached
    assert find_inception_weights(str(cached)) == cached


class _RunsCodeWhenUnpickled:
    """Unpickling this creates `marker`: stands in for a malicious weights file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    weights = tmp_path / INCEPTION_FILE
    torch.save({"Conv2d_1a_3x3.conv.weight": _RunsCodeWhenUnpickled(marker)}, weights)

    with pytest.raises(InvalidWeightsError, match="weights_only=True") as info:
        InceptionFeatures(weights)
    assert str(weights) in str(info.value)
    assert not marker.exists()
    # Control: torch-fidelity's own loading (weights_only=False) would have run the payload.
    payload_result = torch.load(weights, weights_only=False)["Conv2d_1a_3x3.conv.weight"]
    payload_result.close()  # the open file the payload returned
    assert marker.exists()


def test_a_state_dict_without_tensors_or_with_wrong_keys_is_refused(tmp_path):
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"a": 1, "b": [2, 3]}, not_tensors)
    with pytest.raises(InvalidWeightsError, match="not a state dict of tensors"):
        InceptionFeatures(not_tensors)

    wrong_net = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2)}, wrong_net)
    with pytest.raises(InvalidWeightsError, match="not torch-fidelity's InceptionV3"):
        InceptionFeatures(wrong_net)


def test_identity_fingerprints_the_weights_file(extractor, inception_weights):
    import hashlib

    import torch_fidelity

    identity = extractor.identity
    assert identity == {
        "extractor": "torch-fidelity-inception-v3-compat",
        "layer": "2048",
        "weights_file": INCEPTION_FILE,
        "weights_size": inception_weights.stat().st_size,
        "weights_sha256": hashlib.sha256(inception_weights.read_bytes()).hexdigest(),
        "torch_fidelity": torch_fidelity.__version__,
    }
    json.dumps(identity)  # must be JSON for the cache key


# --------------------------------------------------------------------------------------------
# Reference-statistics cache
# --------------------------------------------------------------------------------------------


class ImageSource:
    """The `images` callable for reference_statistics, counting how often it is opened."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return iter([self.images[:1], self.images[1:]])  # two batches


def test_reference_statistics_cache_hits_and_misses(
    tmp_path, inception_weights, extractor, sample_images, features, caplog
):
    images = sample_images.photos[:2]
    cache = tmp_path / "fid_cache"
    key = {"shards": ["a.tar", "b.tar"], "sizes": [10, 20], "resolution": 64, "count": 2}

    source = ImageSource(images)
    first = reference_statistics(
        source, data_key=key, extractor=extractor, cache_dir=cache, progress=False
    )
    assert source.calls == 1 and first.count == 2
    # The same numbers as the photos' first two feature rows (computed in another batching).
    expected_mu = statistics(features["photos"][:2]).mu
    np.testing.assert_allclose(first.mu, expected_mu, rtol=1e-4, atol=1e-6)

    # Same key and extractor: a hit, the images are not even opened.
    with caplog.at_level(logging.INFO, logger="eval.fid"):
        second = reference_statistics(
            source, data_key=dict(reversed(key.items())), extractor=extractor, cache_dir=cache
        )
    assert source.calls == 1
    assert "cache hit" in caplog.text
    np.testing.assert_array_equal(second.mu, first.mu)
    np.testing.assert_array_equal(second.sigma, first.sigma)

    # The cache files: loadable without pickle, with a human-readable description beside them.
    npz_path, json_path = reference_cache_paths(key, extractor.identity, cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([npz_path.name, json_path.name])
    with np.load(npz_path, allow_pickle=False) as data:
        assert int(data["count"]) == 2
    sidecar = json.loads(json_path.read_text())
    assert sidecar["data_key"] == key and sidecar["extractor"] == extractor.identity

    # A different data key misses.
    other_key = dict(key, resolution=32)
    source2 = ImageSource(images)
    reference_statistics(
        source2, data_key=other_key, extractor=extractor, cache_dir=cache, progress=False
    )
    assert source2.calls == 1

    # A different weights file (same name, other bytes) changes the identity: a miss.
    state = torch.load(inception_weights, map_location="cpu", weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1.0  # not on the path to the 2048 features
    other_weights = tmp_path / "other" / INCEPTION_FILE
    other_weights.parent.mkdir()
    torch.save(state, other_weights)
    other_extractor = InceptionFeatures(other_weights)
    assert other_extractor.identity["weights_sha256"] != extractor.identity["weights_sha256"]
    source3 = ImageSource(images)
    third = reference_statistics(
        source3, data_key=key, extractor=other_extractor, cache_dir=cache, progress=False
    )
    assert source3.calls == 1
    # fc is not on the feature path: a fresh computation must reproduce the cached numbers.
    np.testing.assert_allclose(third.mu, first.mu, rtol=1e-12)
    np.testing.assert_allclose(third.sigma, first.sigma, rtol=1e-10, atol=1e-15)
    assert len(list(cache.glob("*.npz"))) == 3


class PixelFeatures:
    """A fast stand-in extractor: the first 4 pixel values of each image as its features."""

    identity = {"extractor": "first-4-pixels"}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :4].double()  # (B, 4)


def test_reference_statistics_without_cache_dir_always_computes(sample_images):
    source = ImageSource(sample_images.photos[:4])
    for _ in range(2):
        stats = reference_statistics(
            source, data_key={"k": 1}, extractor=PixelFeatures(), cache_dir=None, progress=False
        )
    assert source.calls == 2
    pixels = sample_images.photos[:4].flatten(1)[:, :4].double().numpy()
    np.testing.assert_allclose(stats.mu, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(pixels, rowvar=False), rtol=1e-12)


def test_a_corrupt_cache_file_is_recomputed(tmp_path, sample_images):
    key = {"count": 4}
    extractor = PixelFeatures()
    npz_path, _ = reference_cache_paths(key, extractor.identity, tmp_path)
    npz_path.write_bytes(b"not an npz")
    source = ImageSource(sample_images.photos[:4])
    stats = reference_statistics(
        source, data_key=key, extractor=extractor, cache_dir=tmp_path, progress=False
    )
    assert source.calls == 1 and stats.count == 4
    assert FidStatistics.load(npz_path).count == 4


def test_a_data_key_that_is_not_json_is_a_clear_error(tmp_path, extractor):
    with pytest.raises(TypeError, match="JSON"):
        reference_cache_paths({"path": Path("/x")}, extractor.identity, tmp_path)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def test_load_image_folder_returns_the_pixels_sorted_and_batched(tmp_path, sample_images):
    folder = write_png_folder(tmp_path / "imgs", sample_images.photos[:5])
    (folder / "notes.txt").write_text("ignored")
    batches = list(load_image_folder(folder, batch_size=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert all(b.dtype == torch.uint8 for b in batches)
    assert torch.equal(torch.cat(batches), sample_images.photos[:5])
    limited = torch.cat(list(load_image_folder(folder, limit=3)))
    assert torch.equal(limited, sample_images.photos[:3])


def test_load_image_folder_resizes_and_centre_crops_mixed_sizes(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # white centre third: all that survives a centre crop
    Image.fromarray(wide).save(folder / "a.png")
    Image.fromarray(np.full((30, 30), 7, dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(np.full((16, 8, 4), 100, dtype=np.uint8)).save(folder / "c.webp")

    with pytest.raises(ValueError, match="size="):
        list(load_image_folder(folder))
    (batch,) = list(load_image_folder(folder, size=10))
    assert batch.shape == (3, 3, 10, 10) and batch.dtype == torch.uint8
    assert batch[0, :, :, 2:8].min() >= 250  # the crop is the white centre of the wide image
    assert abs(int(batch[1].float().mean()) - 7) <= 1  # grey -> RGB
    assert abs(int(batch[2].float().mean()) - 100) <= 2  # RGBA -> RGB


def test_load_image_folder_fails_early_for_missing_or_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match="no .png"):
        load_image_folder(tmp_path / "empty")


def test_an_explicit_folder_is_searched_for_the_inception_file(tmp_path):
    (tmp_path / INCEPTION_FILE).write_bytes(b"x")
    assert find_inception_weights(tmp_path) == tmp_path / INCEPTION_FILE
    (tmp_path / "sub").mkdir()
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "sub" / INCEPTION_FILE)):
        find_inception_weights(tmp_path / "sub")
