"""Shared fixtures: tiny random-weight models built from the shipped configs (no downloads)."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("RCOD_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_merged():
    from rcod_core.testing.tiny import tiny_pipeline

    return tiny_pipeline(kind="rcod_o", seed=0, merge=True)


@pytest.fixture(scope="session")
def tiny_unmerged():
    from rcod_core.testing.tiny import tiny_pipeline

    return tiny_pipeline(kind="rcod_o", seed=0, merge=False)


@pytest.fixture
def lr_images():
    g = torch.Generator().manual_seed(123)
    return torch.rand(3, 3, 21, 27, generator=g)
