"""Samplers: replay of the official sampling runs, classifier-free guidance, exactness on a Gaussian target."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from maetok.config import ConfigError, SampleConfig
from maetok.diffusion import SiT, euler_maruyama, euler_ode, heun_ode, sample, sit_config
from maetok.io.convert_sit import convert_official_sit
from maetok.io.pretrained import load_sit

RUNS = {  # the fixture's sampler/config.json, in SampleConfig terms
    "euler_cfg": SampleConfig("euler", steps=8, cfg_scale=1.9, cfg_interval=(0.0, 0.75)),
    "heun_cfg": SampleConfig("heun", steps=8, cfg_scale=1.9, cfg_interval=(0.0, 0.75)),
    "euler_nocfg": SampleConfig("euler", steps=8, cfg_scale=1.0, cfg_interval=(0.0, 1.0)),
    "sde_cfg": SampleConfig("sde", steps=8, cfg_scale=1.9, cfg_interval=(0.0, 0.75), sde_t_min=0.04),
}
NULL = 1000
# Bounds where this CPU's float32 kernels round like the fixture's (see conftest.fixture_cpu_rounding), and the
# fixture README's acceptance thresholds elsewhere: a one-ulp difference in the SiT's timestep features moves v
# by about 1e-5, and the float64 model computes those features in float32 as the official one does.
EXACT = {"sample": 1e-5, "call": 1e-6, "math_sample": 1e-12, "float64": 1e-10}
OTHER_CPU = {"sample": 5e-5, "call": 5e-5, "math_sample": 5e-5, "float64": 5e-6}


class Recorder(torch.nn.Module):
    """Wraps a model and keeps every call's inputs and raw output."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.eval()

    def forward(self, x, t, y=None):
        out = self.model(x, t, y)
        self.calls.append({"x_in": x, "t_in": t, "y_in": y, "v_out": out})
        return out


@pytest.fixture(scope="module")
def sit_tiny_dir(parity_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sit_tiny")
    convert_official_sit(parity_dir / "sit_tiny", out)
    return out


@pytest.fixture(scope="module")
def sampler_data(parity_dir):
    d = parity_dir / "sampler"
    return (load_file(str(d / "inputs.safetensors")), load_file(str(d / "outputs.safetensors")),
            load_file(str(d / "outputs_f64.safetensors")))


def _recorded_eps(inputs):
    return [inputs[f"sde_cfg.eps{i:02d}"] for i in range(7)]


# --------------------------------------------------------------------------------------------------------------
# Official replay
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run", list(RUNS))
def test_replays_official_run(run, sit_tiny_dir, sampler_data, fixture_cpu_rounding):
    inputs, outputs, _ = sampler_data
    bound = EXACT if fixture_cpu_rounding else OTHER_CPU
    model = load_sit(sit_tiny_dir).eval()
    # Default attention kernel: the final sample is within 1e-5 (measured <= 3.3e-6).
    x = sample(model, inputs["noise"], inputs["y"], RUNS[run], NULL, noise_fn=_recorded_eps(inputs))
    assert x.dtype == torch.float64 and x.shape == (4, 16, 12)
    err = (x - outputs[f"{run}.sample"]).abs().max().item()
    print(f"{run}: max abs error {err:.2e} (default attention)")
    assert err < bound["sample"]

    # Math attention = the official softmax: every model call matches the trace, in order.
    recorder = Recorder(model)
    with sdpa_kernel(SDPBackend.MATH):
        x = sample(recorder, inputs["noise"], inputs["y"], RUNS[run], NULL, noise_fn=_recorded_eps(inputs))
    n_calls = len({k.split(".")[1] for k in outputs if k.startswith(f"{run}.call")})
    assert len(recorder.calls) == n_calls
    for i, call in enumerate(recorder.calls):
        for name, value in call.items():
            want = outputs[f"{run}.call{i:02d}.{name}"]
            assert value.dtype == want.dtype and value.shape == want.shape, (run, i, name)
            assert (value.double() - want.double()).abs().max() <= bound["call"], (run, i, name)
    assert (x - outputs[f"{run}.sample"]).abs().max() < bound["math_sample"]


@pytest.mark.parametrize("run", list(RUNS))
def test_replays_official_run_float64(run, sit_tiny_dir, sampler_data, fixture_cpu_rounding):
    inputs, _, outputs_f64 = sampler_data
    model = load_sit(sit_tiny_dir).double().eval()
    x = sample(model, inputs["noise"].double(), inputs["y"], RUNS[run], NULL, noise_fn=_recorded_eps(inputs))
    bound = (EXACT if fixture_cpu_rounding else OTHER_CPU)["float64"]  # measured ~1e-14 where rounding agrees
    assert (x - outputs_f64[f"{run}.sample"]).abs().max() < bound


def test_time_grids_and_cfg_decisions(sit_tiny_dir, sampler_data):
    """Batch 8 marks a guided call; t_cur = 0.75 is on the grid and guided (inclusive bound); Heun's second call
    at t_next = 0.75 keeps the unguided decision of t_cur = 0.875; no correction on the last step."""
    inputs, outputs, _ = sampler_data
    model = Recorder(load_sit(sit_tiny_dir).eval())
    sample(model, inputs["noise"], inputs["y"], RUNS["heun_cfg"], NULL)
    got = [(round(c["t_in"][0].item(), 6), c["x_in"].shape[0]) for c in model.calls]
    assert got == [(1.0, 4), (0.875, 4), (0.875, 4), (0.75, 4), (0.75, 8), (0.625, 8), (0.625, 8), (0.5, 8),
                   (0.5, 8), (0.375, 8), (0.375, 8), (0.25, 8), (0.25, 8), (0.125, 8), (0.125, 8)]
    model.calls.clear()
    sample(model, inputs["noise"], inputs["y"], RUNS["sde_cfg"], NULL, noise_fn=_recorded_eps(inputs))
    t_grid = outputs["sde_cfg.t_grid"]
    assert [c["t_in"][0].item() for c in model.calls] == t_grid[:-1].float().tolist()


# --------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------------------
def test_cfg_scale_one_is_the_conditional_prediction(sit_tiny_dir, sampler_data):
    inputs, _, _ = sampler_data
    model = Recorder(load_sit(sit_tiny_dir).eval())
    noise, y = inputs["noise"], inputs["y"]
    x = sample(model, noise, y, SampleConfig("euler", steps=4, cfg_scale=1.0), NULL)
    assert all(c["x_in"].shape[0] == 4 and torch.equal(c["y_in"], y) for c in model.calls)  # never the null label
    manual = noise.double()
    with torch.no_grad():
        for t_cur, t_next in zip([1.0, 0.75, 0.5, 0.25], [0.75, 0.5, 0.25, 0.0]):
            t = torch.full((4,), t_cur)
            manual = manual + (t_next - t_cur) * model.model(manual.float(), t, y).double()
    assert torch.equal(x, manual)


class LabelTable(torch.nn.Module):
    """v depends on the label only, and the conditional and null rows differ at every token and channel."""

    def __init__(self, classes: int, shape: tuple[int, int]):
        super().__init__()
        self.table = torch.randn(classes + 1, *shape, dtype=torch.float64) + 3.0
        self.table[classes] = -self.table[classes]  # null row: far from every class row, everywhere
        self.eval()

    def forward(self, x, t, y):
        return self.table[y].to(x.dtype) + 0 * x


def test_guidance_reaches_every_channel_of_every_token():
    model = LabelTable(classes=5, shape=(7, 3))
    noise, y = torch.randn(4, 7, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 4])
    one_step = dict(steps=1, cfg_interval=(0.0, 1.0), null_label=5)
    guided = euler_ode(model, noise, y, cfg_scale=3.0, **one_step)
    plain = euler_ode(model, noise, y, cfg_scale=1.0, **one_step)
    v_c, v_u = model.table[y], model.table[5]
    torch.testing.assert_close(guided, noise - (v_u + 3.0 * (v_c - v_u)), rtol=0, atol=1e-12)
    assert ((guided - plain).abs() > 1e-3).all()


def test_guidance_reaches_every_element_with_sit(sit_tiny_dir, sampler_data):
    inputs, outputs, _ = sampler_data
    diff = (outputs["euler_cfg.sample"] - outputs["euler_nocfg.sample"]).abs()
    model = load_sit(sit_tiny_dir).eval()
    guided = sample(model, inputs["noise"], inputs["y"], RUNS["euler_cfg"], NULL)
    plain = sample(model, inputs["noise"], inputs["y"], RUNS["euler_nocfg"], NULL)
    assert (diff > 0).all() and ((guided - plain).abs() > 1e-6).all()


# --------------------------------------------------------------------------------------------------------------
# Exactness on a Gaussian target: the linear-path velocity of N(mu, Sigma) data is known in closed form
# --------------------------------------------------------------------------------------------------------------
class GaussianVelocity:
    """E[eps - x0 | x_t] for x0 ~ N(mu, Sigma), eps ~ N(0, I), x_t = (1-t) x0 + t eps:
    v = (t I - (1-t) Sigma) S^-1 (x - (1-t) mu) - mu, with S = (1-t)^2 Sigma + t^2 I = Cov(x_t)."""

    def __init__(self, shape: tuple[int, int], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.shape, d = shape, shape[0] * shape[1]
        a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5
        self.sigma = a @ a.T + 0.2 * torch.eye(d, dtype=torch.float64)
        self.mu = torch.randn(d, generator=g, dtype=torch.float64)

    def __call__(self, x, t, y=None):
        b, d = x.shape[0], self.mu.numel()
        a, s = (1 - t.double())[:, None], t.double()[:, None]
        cov = a[:, :, None] ** 2 * self.sigma + s[:, :, None] ** 2 * torch.eye(d, dtype=torch.float64)
        r = torch.linalg.solve(cov, x.reshape(b, d).double() - a * self.mu)
        return (s * r - a * (r @ self.sigma) - self.mu).reshape(x.shape).to(x.dtype)

    def errors(self, x) -> tuple[float, float]:
        x = x.reshape(x.shape[0], -1)
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / x.shape[0]
        return (mean - self.mu).abs().max().item(), (cov - self.sigma).abs().max().item()


def _whitened_noise(n: int, shape: tuple[int, int]) -> torch.Tensor:
    """Standard-normal samples with sample mean exactly 0 and sample covariance exactly I: the ODE maps are
    affine here, so what remains in the output statistics is the integration error alone."""
    d = shape[0] * shape[1]
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T
    return z.reshape(n, *shape)


def test_ode_samplers_land_on_gaussian_target():
    target = GaussianVelocity((2, 3))
    noise = _whitened_noise(2000, (2, 3))
    cov_err = {}
    for name, solver in (("euler", euler_ode), ("heun", heun_ode)):
        for steps in (16, 32):
            mean_err, cov_err[name, steps] = target.errors(solver(target, noise, steps=steps))
            assert mean_err < 1e-10  # the mean follows (1 - t) mu, which both integrate exactly
    print("covariance errors:", {k: f"{v:.2e}" for k, v in cov_err.items()})
    assert cov_err["heun", 16] < 0.02 and cov_err["heun", 32] < 0.005
    assert cov_err["heun", 16] < cov_err["euler", 16] / 10
    # first and second order: halving the step halves Euler's error and quarters Heun's
    assert 1.7 < cov_err["euler", 16] / cov_err["euler", 32] < 2.3
    assert cov_err["heun", 16] / cov_err["heun", 32] > 3.5
    # and many Euler steps converge too
    assert target.errors(euler_ode(target, noise, steps=512))[1] < 0.02


def test_sde_sampler_lands_on_gaussian_target():
    target = GaussianVelocity((2, 3))
    noise = torch.randn(4000, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = euler_maruyama(target, noise, steps=100, generator=torch.Generator().manual_seed(3))
    mean_err, cov_err = target.errors(x)
    # statistical error of 4000 samples (largest variance ~2.7), not integration error
    assert mean_err < 0.1 and cov_err < 0.25


# --------------------------------------------------------------------------------------------------------------
# Determinism, unconditional models, errors
# --------------------------------------------------------------------------------------------------------------
def test_sde_is_deterministic_given_a_seed():
    model = SiT(sit_config("tiny", in_channels=4, num_tokens=8, num_classes=3)).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # a non-zero output
    noise, y = torch.randn(2, 8, 4), torch.tensor([0, 2])
    cfg = SampleConfig("sde", steps=4, cfg_scale=2.0, seed=5)
    a, b = sample(model, noise, y, cfg), sample(model, noise, y, cfg)
    c = sample(model, noise, y, SampleConfig("sde", steps=4, cfg_scale=2.0, seed=6))
    d = sample(model, noise, y, cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_unconditional_model_samples(sampler):
    model = SiT(sit_config("tiny", in_channels=4, num_tokens=8, num_classes=0)).eval()
    x = sample(model, torch.randn(3, 8, 4), None, SampleConfig(sampler, steps=3))
    assert x.shape == (3, 8, 4) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="labels"):
        sample(model, torch.randn(3, 8, 4), None, SampleConfig(sampler, steps=3, cfg_scale=2.0))


def test_sde_with_the_cosine_path_needs_the_cosine_score():
    """Exact velocity of Gaussian data on the cosine path: only the matching score lands on the data."""
    std = 0.5

    def velocity(x, t, y=None):  # E[v | x_t] for x0 ~ N(0, std^2), eps ~ N(0, 1) on the cosine path
        t = t.reshape(-1, 1, 1).double()
        a, s = torch.cos(torch.pi / 2 * t), torch.sin(torch.pi / 2 * t)
        da, ds = -torch.pi / 2 * s, torch.pi / 2 * a
        return (da * a * std**2 + ds * s) / (a**2 * std**2 + s**2) * x

    noise = torch.randn(4000, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    right = euler_maruyama(velocity, noise, steps=100, path="cosine", generator=torch.Generator().manual_seed(1))
    wrong = euler_maruyama(velocity, noise, steps=100, path="linear", generator=torch.Generator().manual_seed(1))
    assert abs(right.std().item() - std) < 0.03
    assert abs(wrong.std().item() - std) > 0.1


def test_sampler_input_errors():
    model = SiT(sit_config("tiny", in_channels=4, num_tokens=8, num_classes=3)).eval()
    with pytest.raises(ConfigError, match="the sde sampler needs at least 2 steps"):
        sample(model, torch.randn(2, 8, 4), torch.tensor([0, 1]), SampleConfig("sde", steps=1))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        sample(model, torch.randn(2, 8, 4), torch.tensor([0, 1, 2]), SampleConfig("euler", steps=2))
    with pytest.raises(ConfigError, match="cfg_interval"):
        sample(model, torch.randn(2, 8, 4), torch.tensor([0, 1]), SampleConfig("euler", cfg_interval=(0.8, 0.2)))
    with pytest.raises(ValueError, match="noise_fn holds 1"):
        euler_maruyama(model, torch.randn(2, 8, 4), torch.tensor([0, 1]), steps=3, noise_fn=[torch.zeros(2, 8, 4)])
    with pytest.warns(UserWarning, match="training mode"):
        sample(model.train(), torch.randn(2, 8, 4), torch.tensor([0, 1]), SampleConfig("euler", steps=1))


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
@pytest.mark.parametrize("cfg_scale, interval", [(1.0, (0.0, 1.0)), (2.0, (0.0, 1.0)), (1.9, (0.0, 0.75))])
def test_forward_passes_per_sample_counts_what_the_sampler_runs(sampler, cfg_scale, interval):
    from maetok.diffusion.samplers import forward_passes_per_sample

    model = SiT(sit_config("tiny", in_channels=4, num_tokens=8, num_classes=3)).eval()
    rows = []
    model.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    cfg = SampleConfig(sampler, steps=5, cfg_scale=cfg_scale, cfg_interval=interval)
    sample(model, torch.randn(3, 8, 4), torch.tensor([0, 1, 2]), cfg)
    assert forward_passes_per_sample(cfg) == sum(rows) // 3


def test_the_sampler_state_is_float64_except_on_mps_which_has_none():
    from maetok.diffusion.samplers import state_dtype

    assert state_dtype(torch.device("cpu")) == torch.float64 and state_dtype(torch.device("cuda")) == torch.float64
    assert state_dtype(torch.device("mps")) == torch.float32  # "Cannot convert a MPS Tensor to float64 dtype"
