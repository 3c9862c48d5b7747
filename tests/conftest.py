"""Shared test fixtures. Parity and real-data tests read ../shared (or $MAETOK_SHARED) in place."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maetok.layers import timestep_features

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_root() -> Path | None:
    root = Path(os.environ.get("MAETOK_SHARED", REPO.parent / "shared"))
    return root if root.is_dir() else None


# The library finds pretrained files through $MAETOK_SHARED_DATA (or ../shared/data beside the checkout); point it
# at the same folder the tests use, so a relocated $MAETOK_SHARED serves both.
if shared_root() is not None and "MAETOK_SHARED_DATA" not in os.environ:
    os.environ["MAETOK_SHARED_DATA"] = str(shared_root() / "data")


# Tests never download: pretrained networks come from ../shared, the installed packages, or the tests' own fakes.
# On a machine with internet a test that reached a hub would otherwise fetch hundreds of MB (VGG16, DINOv2).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    def offline(url, *args, **kwargs):
        raise OSError(f"tests run offline: no download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if root is None:
        pytest.skip("../shared (or $MAETOK_SHARED) is not present: official-parity fixtures and real data unavailable")
    return root


@pytest.fixture(scope="session")
def parity_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "official_parity"


@pytest.fixture(scope="session")
def fixture_cpu_rounding(parity_dir: Path) -> bool:
    """Whether this CPU's float32 exp / sin / cos round like those of the CPU that made the official fixtures.

    Vectorised transcendental kernels (SLEEF, glibc) may differ in the last bit between instruction sets. The SiT's
    timestep features are such values, and a one-ulp difference there moves v by about 1e-5. Where the roundings
    agree, the parity tests hold their bit-exact bounds; elsewhere they inject the fixture's own features where
    it recorded them, and otherwise use the fixture README's acceptance thresholds."""
    sit = parity_dir / "sit_tiny"
    t = load_file(str(sit / "inputs.safetensors"))["t"]
    recorded = load_file(str(sit / "outputs.safetensors"))["t_freq"]
    return torch.equal(timestep_features(t, recorded.shape[1]), recorded)


def close_run_logs() -> None:
    """Training attaches a file handler for <run>/train.log to the "maetok" logger: take it off and close it (for
    module-scoped fixtures that train, which the function-scoped `maetok_logger_as_found` cannot serve)."""
    logger = logging.getLogger("maetok")
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


@pytest.fixture
def maetok_logger_as_found():
    """Training and sweeps add handlers to the "maetok" logger (stderr, train.log): take them off after the test,
    so a later test's captured stderr does not get them."""
    logger = logging.getLogger("maetok")
    handlers, level = list(logger.handlers), logger.level
    yield
    for handler in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    # OMP_NUM_THREADS, when set, wins: two processes with two threads each on two cores slow down tenfold.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or min(2, os.cpu_count() or 1))
    yield


def pytest_collection_modifyitems(config, items):
    """Slow tests run with `-m slow` (or MAETOK_TEST_ALL=1); the default suite stays under 10 minutes."""
    if config.getoption("-m") or os.environ.get("MAETOK_TEST_ALL") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or MAETOK_TEST_ALL=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class BackendCompilerFailed(RuntimeError):
    """Stands in for torch.compile's own error (same module name, which is how the fallback recognises it)."""


BackendCompilerFailed.__module__ = "torch._dynamo.exc"


@pytest.fixture
def failing_compile(monkeypatch) -> list:
    """torch.compile whose compiled callables fail as a missing C compiler would; returns the list of attempts."""
    attempts = []

    def compile(module, **kwargs):
        def compiled(*args, **kw):
            attempts.append(module)
            raise BackendCompilerFailed("no C compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", compile)
    return attempts


@pytest.fixture
def passthrough_compile(monkeypatch) -> None:
    """torch.compile that returns the module itself: errors raised inside are the module's own."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
