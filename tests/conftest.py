import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI draws the same examples every run (derandomize); locally `HYPOTHESIS_PROFILE=dev` explores more.
settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def graph_stand_in(monkeypatch):
    """psgrad's CUDA-graph backend replaced by the CPU stand-in of helpers.GraphStandIn, graphs and warnings fresh."""
    from helpers import GraphStandIn

    from psgrad.api import graphed

    graphed.clear()
    monkeypatch.setattr(graphed, "_WARNED", set())
    backend = GraphStandIn()
    monkeypatch.setattr(graphed, "BACKEND", backend)
    yield backend
    graphed.clear()
