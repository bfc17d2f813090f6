"""Property-based API test: schemathesis drives a real server from its own /openapi.json.

Every check is on (server errors, status codes, content types, headers and
bodies against the document, negative data rejected, 405 with Allow for
undocumented methods, use after delete), over all four phases.  The run is
bounded (few examples per operation, a fixed seed, no example database), so
it is reproducible; tests/schemathesis.toml says why 412 counts as accepting
valid data, and tests/schemathesis_hooks.py how POST /txn's valid bodies are
kept clear of a rule that the schema cannot state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("schemathesis.toml")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


def test_schemathesis_finds_no_failure(server_factory, tmp_path):
    # No watch stream (it would never end: 503 instead), no long-poll wait.
    server = server_factory({"KVAPP_MAX_WATCHERS": "0", "KVAPP_MAX_WAIT_SECONDS": "0"})
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [
            str(st), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
            "--checks", "all", "--max-examples", "10", "--seed", "1",
            "--generation-database", "none", "--request-timeout", "10",
            "--max-failures", "20", "--workers", "1", "--no-color",
        ],
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert "Tested: 20" in output, output[-5000:]
    assert " passed" in output and "failed" not in output.split("SUMMARY")[-1], output[-5000:]
