"""Transport: interpolant identities, velocity conversions, time sampling, and a tiny SiT that learns."""
from __future__ import annotations

import math

import pytest
import torch

from maetok.config import ConfigError, TransportConfig, from_dict
from maetok.diffusion import SiT, sit_config
from maetok.diffusion.transport import (interpolate, path_coefficients, sample_time, training_loss,
                                        velocity_to_eps, velocity_to_score, velocity_to_x0)

PATHS = ["linear", "cosine"]


def _batch(seed: int = 0, shape=(5, 8, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.rand(shape[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x0, eps, t


@pytest.mark.parametrize("path", PATHS)
def test_interpolant_endpoints(path):
    x0, eps, _ = _batch()
    zeros, ones = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    assert torch.equal(interpolate(x0, eps, zeros, path)[0], x0)  # t = 0 is data
    torch.testing.assert_close(interpolate(x0, eps, ones, path)[0], eps, rtol=0, atol=1e-15)  # t = 1 is noise


@pytest.mark.parametrize("path", PATHS)
def test_velocity_target_is_time_derivative(path):
    x0, eps, t = _batch()
    h = 1e-6
    ahead, behind = interpolate(x0, eps, t + h, path)[0], interpolate(x0, eps, t - h, path)[0]
    torch.testing.assert_close(interpolate(x0, eps, t, path)[1], (ahead - behind) / (2 * h), rtol=0, atol=1e-8)


def test_linear_path_formulas():
    x0, eps, t = _batch()
    x_t, v = interpolate(x0, eps, t, "linear")
    tt = t[:, None, None]
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * eps, rtol=0, atol=1e-14)
    torch.testing.assert_close(v, eps - x0, rtol=0, atol=1e-14)
    # the official sampler's simplified score
    torch.testing.assert_close(velocity_to_score(v, x_t, t, "linear"), -((1 - tt) * v + x_t) / tt)


def test_cosine_path_coefficients():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, "cosine")
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones(3, dtype=torch.float64))  # variance preserving
    torch.testing.assert_close(d_sigma[0], torch.tensor(math.pi / 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown transport path"):
        path_coefficients(t, "vp")


@pytest.mark.parametrize("path", PATHS)
def test_velocity_conversions_recover_x0_eps_score(path):
    x0, eps, t = _batch()
    x_t, v = interpolate(x0, eps, t, path)
    torch.testing.assert_close(velocity_to_x0(v, x_t, t, path), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(velocity_to_eps(v, x_t, t, path), eps, rtol=0, atol=1e-12)
    sigma = path_coefficients(t, path)[1][:, None, None]
    torch.testing.assert_close(velocity_to_score(v, x_t, t, path), -eps / sigma, rtol=0, atol=1e-10)


def test_score_of_gaussian_data_is_exact():
    """For x0 ~ N(0, s^2 I), x_t ~ N(0, ((1-t)^2 s^2 + t^2) I): the score of the E[v | x_t] field is -x / var."""
    s, t = 1.7, torch.full((3,), 0.3, dtype=torch.float64)
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    var = (0.7 * s) ** 2 + 0.3 ** 2
    # E[eps | x] = 0.3 x / var, E[x0 | x] = 0.7 s^2 x / var
    v = (0.3 - 0.7 * s ** 2) * x / var
    torch.testing.assert_close(velocity_to_score(v, x, t, "linear"), -x / var)


def test_time_sampling_ranges():
    g = torch.Generator().manual_seed(0)
    uniform = sample_time(20000, TransportConfig(time_sampling="uniform"), g)
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    lognormal = sample_time(20000, TransportConfig(time_sampling="lognormal", lognormal_mean=0.5), g)
    assert lognormal.min() > 0 and lognormal.max() < 1
    assert abs(lognormal.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01  # median = sigmoid(mean)
    narrow = sample_time(20000, TransportConfig(time_sampling="lognormal", lognormal_std=0.2), g)
    assert narrow.std() < lognormal.std() / 3
    again = sample_time(5, TransportConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(again, sample_time(5, TransportConfig(), torch.Generator().manual_seed(1)))


def test_transport_config_validation():
    with pytest.raises(ConfigError, match="lognormal_std"):
        from_dict(TransportConfig, {"lognormal_std": 0.0})
    with pytest.raises(ConfigError, match="path"):
        from_dict(TransportConfig, {"path": "vp"})


class Oracle(torch.nn.Module):
    """Returns a fixed tensor, so the loss terms can be checked by hand."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, y):
        return self.out


def test_loss_terms():
    x0 = torch.randn(4, 8, 3)
    zero = training_loss(Oracle(torch.zeros_like(x0)), x0, None, TransportConfig(), torch.Generator().manual_seed(0))
    # v_target = eps - x0 and the model says 0: mse = mean((eps - x0)^2), cos = 1 - cos(0, .) = 1
    g = torch.Generator().manual_seed(0)
    torch.rand(4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(zero["mse"], (eps - x0).pow(2).mean())
    torch.testing.assert_close(zero["cos"], torch.tensor(1.0))
    torch.testing.assert_close(zero["loss"], zero["mse"])
    out = torch.randn(4, 8, 3)
    cfg = TransportConfig(cos_loss_weight=0.5)
    both = training_loss(Oracle(out), x0, None, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(both["loss"], both["mse"] + 0.5 * both["cos"])
    assert 0 < both["cos"] < 2
    with pytest.raises(ValueError, match="shape"):
        training_loss(Oracle(out[:, :4]), x0, None, cfg)


def _toy_latents(labels: torch.Tensor, means: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return means[labels] + 0.1 * torch.randn(labels.shape[0], *means.shape[1:], generator=g)


@pytest.fixture
def one_thread():
    """A width-64 model gains nothing from threads, and a single one is robust to a CPU shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("variant,cos_weight", [("sit", 0.0), ("lightningdit", 0.1)])
def test_tiny_sit_learns_toy_latents(variant, cos_weight, one_thread):
    """Four classes, each a fixed (8, 4) token pattern plus small noise: the flow-matching loss must fall well
    below its value at initialisation (where adaLN-Zero makes the model output 0)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(4, 8, 4, generator=g)
    model = SiT(sit_config("tiny", variant=variant, in_channels=4, num_tokens=8, num_classes=4, class_dropout=0.1))
    cfg = TransportConfig(time_sampling="lognormal", cos_loss_weight=cos_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    eval_y = torch.arange(4).repeat(16)
    eval_x = _toy_latents(eval_y, means, torch.Generator().manual_seed(99))

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = training_loss(model, eval_x, eval_y, cfg, torch.Generator().manual_seed(7))["mse"].item()
        model.train()
        return loss

    before = eval_loss()
    for _ in range(200):
        y = torch.randint(0, 4, (32,), generator=g)
        loss = training_loss(model, _toy_latents(y, means, g), y, cfg, g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"{variant}: eval mse {before:.3f} -> {after:.3f}")
    assert after < 0.3 * before


def test_low_precision_latents_are_mixed_at_the_time_the_model_is_told():
    """bf16 latents: x_t must be mixed at the float32 t the model receives, not at t rounded to bf16."""
    seen = {}

    def model(x_t, t, y):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    x0 = torch.randn(64, 4, 3).bfloat16()
    gen = torch.Generator().manual_seed(0)
    training_loss(model, x0, None, TransportConfig(), generator=gen)
    gen = torch.Generator().manual_seed(0)
    t = sample_time(64, TransportConfig(), gen)
    eps = torch.randn(x0.shape, generator=gen)
    assert seen["x_t"].dtype == torch.float32 and torch.equal(seen["t"], t)
    want = (1 - t.double()[:, None, None]) * x0.double() + t.double()[:, None, None] * eps.double()
    assert (seen["x_t"].double() - want).abs().max() < 1e-6
