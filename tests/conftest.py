"""Shared fixtures: small deterministic models on the CPU; every API response the session sees, recorded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from model.config import DiffusionConfig, UNetConfig
from tests.observed import Recorder
from tests.tiny_model import TINY_UNET


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # Tests use tiny models: on a small shared machine two intra-op threads only contend (5-20x slower).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def observed_responses() -> Iterator[Recorder]:
    """Every httpx exchange of the session (checked against the OpenAPI document by the last test to run,
    tests/service/test_observed_contract.py)."""
    recorder = Recorder().install()
    yield recorder
    recorder.uninstall()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_unet_config() -> UNetConfig:
    return TINY_UNET


@pytest.fixture
def short_diffusion_config() -> DiffusionConfig:
    return DiffusionConfig(num_timesteps=50)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="examples per API operation in tests/service/test_fuzz.py (default: a CI-sized budget; "
                          "`make fuzz` runs 2000)")
    parser.addoption("--chaos-scale", choices=("ci", "full"), default="ci",
                     help="load of tests/chaos: ci (make test) or full (make chaos)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)  # stable: the rest keep order
    examples = config.getoption("--fuzz-examples")
    if examples:  # a long fuzz run outlasts the suite's per-test timeout: about 0.2 s per example, doubled
        for item in items:
            if item.path.name == "test_fuzz.py":
                item.add_marker(pytest.mark.timeout(max(300, int(examples * 0.4) + 120)))
