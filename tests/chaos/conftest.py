"""Fixtures for the fault-injection scenarios (see ``tests/chaos/harness.py``)."""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dispatcher.postgres import ProvidedPostgres
from tests.chaos.harness import Harness


@pytest.fixture(scope="session", autouse=True)
def _collect_probe_leaks(postgres: ProvidedPostgres) -> None:
    # dispatcher.postgres.docker_available() leaks the unix socket of a failed Docker probe
    # (docker.from_env raises before there is a client to close). Collected later, inside
    # some test, it fails that test through filterwarnings=error; collect it now.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
async def chaos(postgres: ProvidedPostgres, dsn: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """A harness on this test's database, with the execution ledger created; every process
    it started is killed at the end."""
    harness = Harness(postgres, dsn, tmp_path)
    await harness.setup()
    try:
        yield harness
    finally:
        await harness.close()
