"""The tests' throwaway PostgreSQL cluster: bench/pgcluster.py's, skipped when initdb is missing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from bench.pgcluster import Cluster, find_bindir, running, server_owner

__all__ = ["Cluster", "find_bindir", "running_cluster", "server_owner"]


@contextlib.contextmanager
def running_cluster() -> Iterator[Cluster]:
    """Yield a started throwaway Cluster, destroyed afterwards; skip if initdb is missing."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql)")
    with running(Cluster(bindir)) as cluster:
        yield cluster
