import math

import pytest
import torch

from trl_arcopo import RolloutNoise, neighbor_noise
from trl_arcopo.sampling import consistency_step, get_schedule, ode_step, self_forcing_scheduler, x0_from_velocity


def test_self_forcing_schedule():
    timesteps, sigmas = get_schedule(self_forcing_scheduler())
    assert torch.allclose(timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9375, 0.833333, 0.625, 0.0]), atol=1e-5)
    t2, s2 = get_schedule(self_forcing_scheduler(), sigmas=[1.0, 0.5])
    assert len(t2) == 2 and s2[-1] == 0
    with pytest.raises(ValueError, match="decreasing"):
        get_schedule(self_forcing_scheduler(), sigmas=[0.5, 0.75])


def test_step_closed_forms():
    g = torch.Generator().manual_seed(0)
    x0, eps, eta = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    sigma, sigma_next = 0.9375, 0.625
    x_t = (1 - sigma) * x0 + sigma * eps
    v = eps - x0  # the exact flow-matching velocity
    assert torch.allclose(x0_from_velocity(x_t, sigma, v), x0, atol=1e-6)
    assert torch.allclose(consistency_step(x0, sigma_next, eta), (1 - sigma_next) * x0 + sigma_next * eta)
    # the ODE step with the exact velocity lands on the same straight path
    assert torch.allclose(ode_step(x_t, sigma, sigma_next, v), (1 - sigma_next) * x0 + sigma_next * eps, atol=1e-6)


def test_noise_is_drawn_in_documented_order():
    shape = (2, 3, 6, 4, 4)
    noise = RolloutNoise.sample(shape, 3, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    initial = torch.randn(shape, generator=g)
    assert torch.equal(noise.initial, initial)
    for c in range(2):
        for j in range(3):
            assert torch.equal(noise.chunk_renoise(c)[:, j], torch.randn((2, 3, 3, 4, 4), generator=g))
    assert RolloutNoise.sample(shape, 3, 4, sampler="ode").renoise is None
    with pytest.raises(ValueError, match="multiple"):
        RolloutNoise.sample((1, 3, 5, 4, 4), 3, 4)
    with pytest.raises(ValueError, match="latents"):
        RolloutNoise.sample(shape, 3, 4, latents=torch.zeros(1, 3, 6, 4, 4))


def test_noise_replace_repeat_select():
    noise = RolloutNoise.sample((2, 3, 6, 4, 4), 3, 4, generator=torch.Generator().manual_seed(0))
    rep = noise.repeat_interleave(3)
    assert rep.batch_size == 6 and torch.equal(rep.initial[1], noise.initial[0])
    assert torch.equal(rep.renoise[5], noise.renoise[1])
    new = torch.zeros(6, 3, 3, 4, 4)
    swapped = rep.with_chunk_initial(1, new)
    assert torch.equal(swapped.chunk_initial(1), new)
    assert torch.equal(swapped.chunk_initial(0), rep.chunk_initial(0))
    assert torch.equal(rep.chunk_initial(1), noise.chunk_initial(1).repeat_interleave(3, 0))  # original untouched
    assert torch.equal(rep.select([4]).initial[0], noise.initial[1])


def test_neighbor_noise_closed_form():
    base = torch.randn(2, 3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = neighbor_noise(base, 4, 0.5, generator=torch.Generator().manual_seed(2))
    delta = torch.randn(8, 3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    expected = math.sqrt(0.75) * base.repeat_interleave(4, 0) + 0.5 * delta
    assert torch.allclose(out, expected)
    with pytest.raises(ValueError, match="scale"):
        neighbor_noise(base, 2, 1.5)
