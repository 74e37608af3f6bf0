"""Rectified-flow math: sigma densities, shift, objective and Euler/CFG sampler."""

from __future__ import annotations

import math

import pytest
import torch

from mmdit import flow

N = 200_000  # samples for the distribution checks; the seed is fixed, tolerances are ~5 sigma


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("m", "s"), [(0.0, 1.0), (0.5, 0.6), (-1.0, 1.5)])
def test_logit_normal_moments(m, s):
    sigma = flow.sample_sigmas(N, "logit_normal", logit_mean=m, logit_std=s, generator=_gen())
    assert sigma.shape == (N,) and sigma.dtype == torch.float32
    assert bool(((sigma > 0) & (sigma < 1)).all())
    z = torch.logit(sigma.double())
    # Standard errors of the sample mean and variance of a Gaussian.
    assert abs(z.mean().item() - m) < 5 * s / math.sqrt(N)
    assert abs(z.var().item() - s**2) < 5 * s**2 * math.sqrt(2 / N)


def test_uniform_moments():
    sigma = flow.sample_sigmas(N, "uniform", generator=_gen())
    assert bool(((sigma >= 0) & (sigma < 1)).all())
    assert abs(sigma.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / N)
    assert abs(sigma.var().item() - 1 / 12) < 2e-3


def test_mode_scale_zero_is_uniform():
    u = flow.sample_sigmas(N, "uniform", generator=_gen(3))
    m = flow.sample_sigmas(N, "mode", mode_scale=0.0, generator=_gen(3))
    # f_mode(u) = 1 - u at scale 0: the same draws, mirrored, i.e. uniform again.
    torch.testing.assert_close(m, 1 - u)


def test_mode_heavy_middle_and_in_range():
    sigma = flow.sample_sigmas(N, "mode", mode_scale=1.29, generator=_gen())
    assert bool(((sigma >= 0) & (sigma <= 1)).all())
    # The map is symmetric around 1/2 and its slope at u=1/2 is 1 - 1.29 (pi/2 - 1) ~ 0.26,
    # so the middle fifth holds far more than the uniform 20% of the mass.
    assert abs(sigma.mean().item() - 0.5) < 5 * 0.3 / math.sqrt(N)
    mid = ((sigma > 0.4) & (sigma < 0.6)).double().mean().item()
    assert 0.44 < mid < 0.48  # exactly 0.460 by inverting the map; uniform gives 0.2
    # The formula itself, SD3 eq. (20), on the same uniform draws.
    u = flow.sample_sigmas(1000, "uniform", generator=_gen(1)).double()
    m = flow.sample_sigmas(1000, "mode", mode_scale=1.29, generator=_gen(1)).double()
    expected = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    torch.testing.assert_close(m, expected, atol=1e-6, rtol=0)


def test_unknown_density_and_weighting_raise():
    with pytest.raises(ValueError):
        flow.sample_sigmas(4, "cosine")
    with pytest.raises(ValueError):
        flow.loss_weight(torch.rand(4), "snr")


def test_loss_weight_values():
    sigma = torch.tensor([0.0, 0.5, 1.0, 0.25])
    torch.testing.assert_close(flow.loss_weight(sigma, "none"), torch.ones(4))
    expected = torch.tensor([2 / math.pi, 4 / math.pi, 2 / math.pi, 2 / (math.pi * 0.625)])
    torch.testing.assert_close(flow.loss_weight(sigma, "cosmap"), expected)


def test_shift_known_points_and_monotonic():
    assert flow.shift_sigmas(0.0, 3.0) == 0.0
    assert flow.shift_sigmas(1.0, 3.0) == 1.0
    assert flow.shift_sigmas(0.5, 3.0) == pytest.approx(0.75)
    assert flow.shift_sigmas(0.5, 1.0) == pytest.approx(0.5)
    s = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = flow.shift_sigmas(s, 3.0)
    assert bool((shifted.diff() > 0).all())
    assert bool((shifted[1:-1] > s[1:-1]).all())  # alpha > 1 moves towards noise


@pytest.mark.parametrize("steps", [1, 4, 28, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_sigmas_equal_diffusers_flow_match_euler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    ours = flow.sampling_sigmas(steps, shift=shift)
    assert ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=0, atol=1e-6)
    assert ours[0].item() == 1.0 and ours[-1].item() == 0.0
    assert bool((ours.diff() < 0).all())


def test_sampling_sigmas_with_shift_3_spend_more_steps_near_noise():
    g = flow.sampling_sigmas(28, shift=3.0)
    # Halfway through the steps the shifted grid is still near sigma 0.74, where an unshifted
    # grid is below 0.5: shift(u) = 3u / (1 + 2u) with u = 1 - 14/27 (1 - shift(1/1000)).
    u = 1 - 14 / 27 * (1 - flow.shift_sigmas(1e-3, 3.0))
    assert g[14].item() == pytest.approx(flow.shift_sigmas(u, 3.0), abs=1e-6)
    assert g[14].item() > 0.73 and flow.sampling_sigmas(28, shift=1.0)[14].item() < 0.49


def test_interpolate_and_velocity_are_consistent():
    x0, noise = torch.randn(3, 4, 6, 5), torch.randn(3, 4, 6, 5)
    sigma = torch.tensor([0.0, 0.3, 1.0])
    x_t = flow.interpolate(x0, noise, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    v = flow.velocity_target(x0, noise)
    s = sigma.view(-1, 1, 1, 1)
    # Moving along v from sigma to 0 (resp. 1) reaches the data (resp. the noise).
    torch.testing.assert_close(x_t + (0 - s) * v, x0)
    torch.testing.assert_close(x_t + (1 - s) * v, noise)


def _inputs(b=3, c=4, h=6, w=8, seed=0):
    g = _gen(seed)
    return (
        torch.randn(b, c, h, w, generator=g),
        torch.randn(b, c, h, w, generator=g),
        torch.randn(b, 5, 7, generator=g),
        torch.randn(b, 9, generator=g),
    )


def test_training_loss_matches_hand_mse():
    x0, noise, ctx, pooled = _inputs()
    sigma = torch.tensor([0.1, 0.5, 0.9])
    seen = {}

    def model_fn(x, s, c, p):
        seen["x"], seen["s"] = x, s
        return 0.5 * x + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    loss, s_used = flow.training_loss(
        model_fn, x0, context=ctx, pooled=pooled, sigma=sigma, noise=noise
    )
    s4 = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s4) * x0 + s4 * noise
    v = 0.5 * x_t + ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    expected = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    assert loss.shape == (3,) and s_used.shape == (3,)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(s_used, sigma)
    torch.testing.assert_close(seen["x"], x_t)
    torch.testing.assert_close(seen["s"], sigma)

    weighted, _ = flow.training_loss(
        model_fn, x0, context=ctx, pooled=pooled, sigma=sigma, noise=noise, weighting="cosmap"
    )
    w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(weighted, w * expected)


def test_training_loss_samples_sigma_and_noise_reproducibly():
    x0, _, ctx, pooled = _inputs(b=64)

    def model_fn(x, s, c, p):
        return torch.zeros_like(x)

    a, sa = flow.training_loss(model_fn, x0, context=ctx, pooled=pooled, generator=_gen(7))
    b, sb = flow.training_loss(model_fn, x0, context=ctx, pooled=pooled, generator=_gen(7))
    c, sc = flow.training_loss(model_fn, x0, context=ctx, pooled=pooled, generator=_gen(8))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(sa, sb)
    assert not torch.equal(sa, sc)
    assert bool(((sa > 0) & (sa < 1)).all()) and sa.std() > 0.05
    u, su = flow.training_loss(
        model_fn, x0, context=ctx, pooled=pooled, generator=_gen(7), density="uniform"
    )
    assert not torch.equal(su, sa)


def test_training_loss_passes_mask():
    x0, noise, ctx, pooled = _inputs()
    mask = torch.ones(3, 5, dtype=torch.bool)

    def model_fn(x, s, c, p, context_mask=None):
        assert context_mask is mask
        return torch.zeros_like(x)

    loss, _ = flow.training_loss(
        model_fn, x0, context=ctx, pooled=pooled, context_mask=mask, noise=noise
    )
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("steps", [1, 5, 28])
def test_euler_exact_on_straight_paths(steps):
    x0, noise, ctx, pooled = _inputs()

    # Constant field: the trajectory is a straight line, Euler is exact for any grid.
    def constant(x, s, c, p):
        return noise - x0

    out = flow.euler_sample(constant, noise, context=ctx, pooled=pooled, steps=steps)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)

    # The ideal velocity for a known x0, v(x, sigma) = (x - x0) / sigma, depends on x and sigma;
    # its flow lines are straight too, so Euler on the shifted grid also lands exactly on x0.
    def ideal(x, s, c, p):
        return (x - x0) / s.view(-1, 1, 1, 1)

    out = flow.euler_sample(ideal, noise, context=ctx, pooled=pooled, steps=steps, shift=3.0)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def _cond_field(calls):
    # v = the first 4 entries of pooled, broadcast over the image: depends only on conditioning.
    def model_fn(x, s, c, p):
        calls.append(x.shape[0])
        assert c.shape[0] == p.shape[0] == x.shape[0] == s.shape[0]
        return p[:, :4].view(-1, 4, 1, 1).expand_as(x).clone()

    return model_fn


def test_cfg_scale_one_and_no_negative_are_conditional_only():
    _, noise, ctx, pooled = _inputs()
    neg_ctx, neg_pooled = torch.zeros_like(ctx), torch.randn_like(pooled)
    v_c = pooled[:, :4].view(-1, 4, 1, 1)
    for kwargs in ({"cfg_scale": 1.0, "neg_context": neg_ctx, "neg_pooled": neg_pooled}, {}):
        calls = []
        out = flow.euler_sample(
            _cond_field(calls), noise, context=ctx, pooled=pooled, steps=4, **kwargs
        )
        torch.testing.assert_close(out, noise - v_c)
        assert calls == [3] * 4


@pytest.mark.parametrize("scale", [4.5, 7.0])
def test_cfg_mix_in_one_batched_call(scale):
    _, noise, ctx, pooled = _inputs()
    neg_ctx, neg_pooled = torch.zeros_like(ctx), torch.randn_like(pooled)
    calls = []
    out = flow.euler_sample(
        _cond_field(calls),
        noise,
        context=ctx,
        pooled=pooled,
        neg_context=neg_ctx,
        neg_pooled=neg_pooled,
        steps=6,
        cfg_scale=scale,
    )
    v_c = pooled[:, :4].view(-1, 4, 1, 1)
    v_u = neg_pooled[:, :4].view(-1, 4, 1, 1)
    torch.testing.assert_close(out, noise - (v_u + scale * (v_c - v_u)))
    assert calls == [6] * 6  # cond and uncond together, one call per step


def test_cfg_concatenates_masks():
    _, noise, ctx, pooled = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)

    def model_fn(x, s, c, p, context_mask=None):
        assert context_mask.shape == (6, 5)
        assert torch.equal(context_mask[:3], mask) and bool(context_mask[3:].all())
        return torch.zeros_like(x)

    flow.euler_sample(
        model_fn,
        noise,
        context=ctx,
        pooled=pooled,
        neg_context=ctx,
        neg_pooled=pooled,
        context_mask=mask,
        steps=2,
    )
    with pytest.raises(ValueError):
        flow.euler_sample(model_fn, noise, context=ctx, pooled=pooled, neg_context=ctx)


def test_fresh_mmdit_predicts_zero_velocity():
    model_mod = pytest.importorskip("mmdit.model")
    cfg = model_mod.MMDiTConfig.from_depth(2, context_dim=32, pooled_dim=16, sample_size=8)
    model = model_mod.MMDiT(cfg).eval()
    x0 = torch.randn(2, cfg.in_channels, 8, 8)
    ctx, pooled = torch.randn(2, 6, cfg.context_dim), torch.randn(2, cfg.pooled_dim)
    with torch.no_grad():
        v = model(x0, torch.tensor([0.2, 0.9]), ctx, pooled)
    # adaLN-Zero and the zero-initialised final layer: the untrained model is the zero field.
    assert v.shape == x0.shape
    assert torch.count_nonzero(v) == 0
    loss, _ = flow.training_loss(model, x0, context=ctx, pooled=pooled, generator=_gen())
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
