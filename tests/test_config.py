"""The config system: presets, dotted overrides, and errors that name the key before any work starts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from maetok.config import (CONFIG_DIR, ConfigError, DiffusionRunConfig, SampleConfig, TokenizerRunConfig,
                           dump_yaml, from_dict, ignored_settings, load_config, parse_override, to_dict)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "tokenizer").glob("*.yaml")))
def test_every_tokenizer_preset_loads(preset):
    overrides = ["decoder_ft.init_from=somewhere"] if "decoder-ft" in preset else []
    cfg = load_config(TokenizerRunConfig, preset, overrides)
    assert cfg.model.image_size == cfg.data.image_size


def test_maetok_b_128_preset_is_the_paper_model():
    m = load_config(TokenizerRunConfig, "maetok-b-128").model
    assert (m.image_size, m.patch_size, m.latent_tokens, m.latent_dim) == (256, 16, 128, 32)
    assert (m.enc_width, m.enc_depth, m.enc_heads) == (768, 12, 12)
    assert [t.name for t in m.aux_targets] == ["hog", "dinov2", "siglip"]
    assert (m.aux_width, m.aux_depth, m.aux_heads) == (192, 3, 3)


def test_overrides_and_roundtrip(tmp_path: Path):
    cfg = load_config(TokenizerRunConfig, "cpu-32", ["model.latent_tokens=64", "train.optim.lr=1e-3",
                                                     "model.mask.ratio_min=0.3", "data.random_flip=false"])
    assert cfg.model.latent_tokens == 64 and cfg.train.optim.lr == 1e-3 and cfg.model.mask.ratio_min == 0.3
    assert cfg.data.random_flip is False
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(TokenizerRunConfig, path) == cfg


@pytest.mark.parametrize("override, message", [
    ("model.latent_tokenz=3", "unknown config key model.latent_tokenz"),
    ("model.latent_tokens=0", "model.latent_tokens=0 must be a positive integer"),
    ("model.latent_tokens=abc", "model.latent_tokens must be an integer"),
    ("model.mask.ratio_max=1.5", "ratio_max=1.5 must lie in"),
    ("model.patch_size=5", "patch_size=5 does not divide"),
    ("model.variant=vqgan", "choose one of"),
    ("train.optim.lr=-1", "lr=-1.0 must lie in (0, 1]"),
    ("train.optim.lr=1e38", "lr=1e+38 must lie in (0, 1]"),
    ("data.image_size=64", "data.image_size=64 differs from model.image_size=32"),
    ("train", "must look like dotted.key=value"),
    ("train.steps.x=1", "train.steps is not a config section"),
    ("train.optim.lr=.nan", "train.optim.lr must be a finite number, got nan"),
    ("loss.gan.disc_lr=.inf", "loss.gan.disc_lr must be a finite number, got inf"),
    ("train.optim.min_lr_ratio=-5", "min_lr_ratio=-5.0 must lie in [0, 1]"),
    ("train.seed=100000000000000", "train.seed=100000000000000 must lie in [0, 2^32)"),
    ("train.seed=-1", "train.seed=-1 must lie in [0, 2^32)"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TokenizerRunConfig, "cpu-32", [override])


# What OmegaConf or pydantic would read differently (docs/architecture.md, "The config system"): each case
# here is kept on purpose, so a swap of the machinery shows up as a failure.
@pytest.mark.parametrize("override, message", [
    ("data.random_flip=1", "data.random_flip must be true or false, got 1"),
    ("data.spec=5", "data.spec must be a string, got int: 5"),
    ("train.steps=true", "train.steps must be an integer, got bool: True"),
    ("train.steps='5'", "train.steps must be an integer, got str: '5'"),
    ("model.aux_targets=[{name: hog, wieght: 2}]", "unknown config key model.aux_targets[0].wieght; allowed keys"),
    ("train.optim.betas=[0.9, x]", "train.optim.betas[1] must be a number, got str: 'x'"),
    ("train.optim.betas=[0.9]", "train.optim.betas must have 2 entries, got 1: [0.9]"),
    ("train.optim.betas={a: 1}", "train.optim.betas must be a list, got dict"),
    ("model.aux_targets={a: 1}", "model.aux_targets must be a list, got dict"),
])
def test_no_lenient_coercion(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TokenizerRunConfig, "cpu-32", [override])


@pytest.mark.parametrize("override, key, value", [
    ("train.steps=2.0", ("train", "steps"), 2),
    ("train.optim.lr=1e-3", ("train", "optim", "lr"), 1e-3),        # YAML 1.1 reads 1e-3 as a string
    ("data.spec=???", ("data", "spec"), "???"),
    ("data.cache_dir=/scratch/${USER}/cache", ("data", "cache_dir"), "/scratch/${USER}/cache"),
])
def test_values_read_as_written(override, key, value):
    node = to_dict(load_config(TokenizerRunConfig, "cpu-32", [override]))
    for part in key:
        node = node[part]
    assert node == value and type(node) is type(value)


def test_presets_are_found():
    """The preset tests above are parametrized over CONFIG_DIR: an empty folder would pass them vacuously."""
    assert (CONFIG_DIR / "tokenizer" / "cpu-32.yaml").is_file()
    assert (CONFIG_DIR / "diffusion" / "sit-cpu.yaml").is_file()


def test_cfg_interval_reversed_is_refused():
    with pytest.raises(ConfigError, match="cfg_interval"):
        from_dict(SampleConfig, {"cfg_interval": [0.8, 0.2]})
    # Below 1 the samplers (as the official ones) do not guide at all: refused rather than silently ignored.
    with pytest.raises(ConfigError, match=r"cfg_scale=0.5 must be >= 1 \(1 = no guidance"):
        from_dict(SampleConfig, {"cfg_scale": 0.5})
    with pytest.raises(ConfigError, match="needs `latents`"):
        load_config(DiffusionRunConfig, None, [])


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        load_config(TokenizerRunConfig, "no-such-preset")


# ---- property-based: whatever a user types, the parser either accepts a well-typed value or names the key ----
_scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False, width=32),
                     st.booleans(), st.text(alphabet="abcxyz_-.", max_size=8))


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(["model.latent_tokens", "model.latent_dim", "model.mask.ratio_min", "train.steps",
                            "train.optim.lr", "data.random_flip", "model.variant", "train.batch_size",
                            "model.rope_theta", "stage"]), value=_scalars)
def test_override_parser_property(key, value):
    text = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    try:
        cfg = load_config(TokenizerRunConfig, "cpu-32", [text])
    except ConfigError as e:
        assert key.split(".")[-1] in str(e) or "differs" in str(e) or "head" in str(e)
        return
    # Accepted: the stored value has the declared type and survives a YAML round trip.
    assert from_dict(TokenizerRunConfig, yaml.safe_load(dump_yaml(cfg))) == cfg
    node = to_dict(cfg)
    for part in key.split("."):
        node = node[part]
    assert not isinstance(node, str) or key in ("model.variant",)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_parse_override_never_crashes_unexpectedly(text):
    try:
        parse_override(text)
    except ConfigError:
        pass


def test_settings_a_variant_ignores_are_named_only_when_asked_for():
    # A MAETok preset made into the AE baseline carries its mask and targets: not reported.
    assert ignored_settings(load_config(TokenizerRunConfig, "cpu-32", ["model.variant=ae"])) == []
    asked = ignored_settings(load_config(TokenizerRunConfig, "cpu-32", [
        "model.variant=ae", "model.mask.ratio_mean=0.5", "loss.kl_weight=1e-3", "decoder_ft.anneal_steps=5",
        "model.aux_targets=[{name: sobel}]"]))
    assert [k for k, _ in asked] == ["model.mask.ratio_mean", "model.aux_targets", "loss.kl_weight",
                                     "decoder_ft.anneal_steps"]
    assert "model.variant=ae masks no patches" in dict(asked)["model.mask.ratio_mean"]
    # An override equal to the default, and a KL weight for the VAE, are used or harmless.
    assert ignored_settings(load_config(TokenizerRunConfig, "cpu-32", [
        "model.variant=vae", "loss.kl_weight=1e-3", "model.mask.ratio_mean=0.6"])) == []
    with pytest.raises(ConfigError, match=r"decoder_ft.init_from=runs/x is set but stage=1: add stage=2"):
        ignored_settings(load_config(TokenizerRunConfig, "cpu-32", ["decoder_ft.init_from=runs/x"]))
