"""The server tests share one running `lva serve` per test module, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.lva_server import LvaServer, store_with_tiny_model


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return store_with_tiny_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(home: Path):
    with LvaServer(home, "--model", "tiny-a") as running:
        yield running
