from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit import MMDiT
from mmdit.sampling import (
    encode_prompts,
    generate,
    image_grid,
    initial_noise,
    sample_encoded,
    sample_prompts,
    save_png,
    to_uint8,
)
from tests.mmdit.tiny_mmdit import randomize, tiny

H, W = 48, 32  # non-square, to catch swapped sides
STEPS = 3


@pytest.fixture(scope="module")
def vae(tiny_components):
    from mmdit.conditioning import VAE

    return VAE.from_pretrained(tiny_components)


PROMPTS = ["a photograph of a cat", "a red car on a mountain road"]


@pytest.fixture(scope="module")
def encoders(tiny_components):
    from mmdit.conditioning import TextEncoders

    return TextEncoders.from_pretrained(tiny_components, t5_max_length=8)


@pytest.fixture(scope="module")
def text(encoders):
    """(context, pooled) for two prompts and (neg_context, neg_pooled) for the empty one."""
    cond = encoders.encode(PROMPTS)
    neg = encoders.encode([""])
    return cond.context, cond.pooled, neg.context, neg.pooled


@pytest.fixture(scope="module")
def model(text):
    context, pooled, _, _ = text
    cfg = tiny(context_dim=context.shape[-1], pooled_dim=pooled.shape[-1])
    return randomize(MMDiT(cfg)).eval()


def run(model, vae, text, **kw):
    context, pooled, neg_context, neg_pooled = text
    args = dict(
        context=context,
        pooled=pooled,
        neg_context=neg_context,
        neg_pooled=neg_pooled,
        height=H,
        width=W,
        seed=7,
        steps=STEPS,
    )
    args.update(kw)
    return generate(model, vae, args.pop("context"), args.pop("pooled"), **args)


def test_images_have_the_requested_shape_and_range(model, vae, text):
    images = run(model, vae, text)
    assert images.shape == (2, 3, H, W)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.min() >= -1 and images.max() <= 1
    assert not torch.equal(images[0], images[1])


def test_same_seed_gives_identical_images(model, vae, text):
    assert torch.equal(run(model, vae, text), run(model, vae, text))
    assert not torch.equal(run(model, vae, text), run(model, vae, text, seed=8))


def test_a_batch_equals_single_samples_with_consecutive_seeds(model, vae, text):
    context, pooled, neg_context, neg_pooled = text
    batched = run(model, vae, text)
    singles = [
        run(model, vae, text, context=context[i : i + 1], pooled=pooled[i : i + 1], seed=7 + i)
        for i in range(2)
    ]
    torch.testing.assert_close(batched, torch.cat(singles), atol=1e-5, rtol=1e-5)
    chunked = run(model, vae, text, batch_size=1)
    torch.testing.assert_close(batched, chunked, atol=1e-5, rtol=1e-5)


def test_noise_of_sample_i_is_seeded_with_seed_plus_i():
    noise = initial_noise(3, 16, H, W, seed=5)
    assert noise.shape == (3, 16, H // 8, W // 8)
    assert torch.equal(noise[2:], initial_noise(1, 16, H, W, seed=7))


def test_without_guidance_the_negative_prompt_does_not_matter(model, vae, text):
    context, pooled, neg_context, neg_pooled = text
    a = run(model, vae, text, cfg_scale=1.0)
    b = run(model, vae, text, cfg_scale=1.0, neg_context=context, neg_pooled=pooled)
    assert torch.equal(a, b)
    guided = run(model, vae, text, cfg_scale=4.5, neg_context=context.flip(0))
    assert not torch.allclose(a, guided)


def test_the_grid_png_decodes_with_the_expected_size(model, vae, text, tmp_path):
    images = torch.cat([run(model, vae, text)] * 2 + [run(model, vae, text)[:1]])  # N = 5
    grid = image_grid(images, padding=2)  # 3 per row, 2 rows
    path = save_png(grid, tmp_path / "previews" / "step_000100.png")
    with Image.open(path) as decoded:
        decoded.load()
        assert decoded.mode == "RGB"
        assert decoded.size == (3 * (W + 2) + 2, 2 * (H + 2) + 2)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert image_grid(images, nrow=5, padding=0).size == (5 * W, H)


def test_grid_pixels_map_minus_one_to_black_and_one_to_white():
    images = torch.stack([-torch.ones(3, 16, 16), torch.ones(3, 16, 16)])
    grid = image_grid(images, nrow=2, padding=0)
    assert grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((16, 0)) == (255, 255, 255)


@pytest.mark.parametrize("size", [(40, 32), (48, 20), (0, 32)])
def test_sizes_that_are_not_multiples_of_16_are_rejected(model, vae, text, size):
    with pytest.raises(ValueError, match="multiple of 16"):
        run(model, vae, text, height=size[0], width=size[1])


def test_mismatched_batch_sizes_are_rejected(model, vae, text):
    context, pooled, neg_context, neg_pooled = text
    with pytest.raises(ValueError, match="pooled has batch size 1 but context has 2"):
        run(model, vae, text, pooled=pooled[:1])
    with pytest.raises(ValueError, match="neg_context has batch size 3"):
        run(model, vae, text, neg_context=torch.cat([neg_context] * 3))
    with pytest.raises(ValueError, match="together"):
        run(model, vae, text, neg_pooled=None)


def test_encoded_prompts_sample_exactly_as_generate_does(model, vae, text, encoders):
    encoded = encode_prompts(encoders, PROMPTS)
    assert len(encoded) == 2 and encoded.negative.context.shape[0] == 1
    images = sample_encoded(model, vae, encoded, height=H, width=W, seed=7, steps=STEPS)
    assert torch.equal(images, run(model, vae, text))


def test_sample_prompts_encodes_a_batch_at_a_time_with_consecutive_seeds(model, vae, encoders):
    """Bit-identical to encoding and generating each batch of prompts by hand (mmdit-eval's
    former loop): prompt i from seed + i, the empty prompt's embedding shared."""
    negative = encoders.encode([""])
    expected = []
    for i, prompt in enumerate(PROMPTS):
        cond = encoders.encode([prompt])
        images = generate(
            model,
            vae,
            cond.context.float(),
            cond.pooled.float(),
            neg_context=negative.context.float(),
            neg_pooled=negative.pooled.float(),
            height=H,
            width=W,
            seed=7 + i,
            steps=STEPS,
            batch_size=1,
        )
        expected.append(to_uint8(images))
    done = []
    pixels = sample_prompts(
        model,
        vae,
        encoders,
        PROMPTS,
        height=H,
        width=W,
        seed=7,
        steps=STEPS,
        batch_size=1,
        on_batch=done.append,
    )
    assert pixels.shape == (2, H, W, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, np.concatenate(expected))
    assert done == [1, 2]
