"""The deploy/ files: the systemd unit, and nginx.conf's agreement with config.ini.

systemd does not run in CI (nor in most containers), so the unit is checked by
`systemd-analyze verify` and `security --offline`, which need no running
systemd, and its ExecStart is run as the unit would run it: from a checkout,
with its Environment=, and (as root) with the file system read-only but for
ReadWritePaths=, as ProtectSystem=strict makes it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, curl, free_port, server_environ
from proxykit import SITE, wait_listening

from kvapp.config import load_config

UNIT = ROOT / "deploy" / "kvapp.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install systemd)"
)


def unit_entries(text: str) -> dict[str, dict[str, list[str]]]:
    """Return {section: {key: [values in order]}} of a systemd unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a unit line: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


SERVICE = unit_entries(UNIT.read_text(encoding="utf-8"))["Service"]
CHECKOUT = SERVICE["WorkingDirectory"][0]  # /opt/kvapp in the unit
VENV_PYTHON = f"{CHECKOUT}/.venv/bin/python"


def local_unit(folder: Path) -> Path:
    """Return the unit with the checkout and venv of these tests in place of /opt/kvapp."""
    text = UNIT.read_text(encoding="utf-8")
    assert text.count(VENV_PYTHON) == 1
    text = text.replace(VENV_PYTHON, sys.executable).replace(CHECKOUT, str(ROOT))
    path = folder / "kvapp.service"
    path.write_text(text, encoding="utf-8")
    return path


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 even for an unknown key ("Unknown key ..., ignoring"): any
    # message at all is a mistake in the unit.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@needs_systemd_analyze
def test_unit_sandbox_is_rated_ok_by_systemd(tmp_path: Path):
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # A passed check is marked ✓ in a UTF-8 locale and + in any other (LC_ALL=C).
    for check in ("NoNewPrivileges=", "ProtectSystem=", "ProtectHome=", "PrivateTmp="):
        assert re.search(rf"^[✓+] {check}\s", result.stdout, re.M), check
    assert re.search(r"^[✓+] User=/DynamicUser=\s", result.stdout, re.M)
    level = re.search(r"Overall exposure level for kvapp.service: (\d+\.\d)", result.stdout)
    assert level, result.stdout
    # systemd's scale runs from 0 (safe) to 10 (unsafe); a unit without any
    # sandboxing rates 9.6, and 2 is the start of its "MEDIUM".
    assert float(level[1]) < 2.0, result.stdout


def test_unit_keeps_the_data_folder_writable_and_runs_kvapp():
    assert SERVICE["User"] == ["kvapp"] and "DynamicUser" not in SERVICE
    assert SERVICE["ReadWritePaths"] == ["/var/lib/kvapp"]
    assert SERVICE["Restart"] == ["on-failure"]
    assert shlex.split(SERVICE["ExecStart"][0]) == [VENV_PYTHON, "-m", "kvapp", "serve"]


def install_config(folder: Path, data: Path, port: int) -> Path:
    """Return /etc/kvapp/config.ini as docs/deployment.md's install steps make it."""
    text = (ROOT / "config.ini").read_text(encoding="utf-8")
    edits = {
        "database = data/kvapp.sqlite3": f"database = {data}/kvapp.sqlite3",
        "port = 4000": f"port = {port}",
        "trusted_proxy =\n": "trusted_proxy = 127.0.0.1\n",
        "allowed_hosts = localhost 127.0.0.1 [::1]\n": (
            "allowed_hosts = localhost 127.0.0.1 [::1] kv.example.com\n"
        ),
    }
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = folder / "config.ini"
    path.write_text(text, encoding="utf-8")
    return path


def unit_environment(config: Path) -> dict[str, str]:
    """Return the unit's Environment= variables, KVAPP_CONFIG pointing at config."""
    env = {}
    for line in SERVICE["Environment"]:
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            env[name] = value
    assert env["KVAPP_CONFIG"] == "/etc/kvapp/config.ini"
    env["KVAPP_CONFIG"] = str(config)
    return env


# ProtectSystem=strict plus ReadWritePaths=, as systemd builds them: in a mount
# namespace of its own, the data folder is bind-mounted on itself, then the
# root file system is made read-only; the data folder's own mount stays writable.
READ_ONLY_SYSTEM = """
data=$1; shift
mount --bind "$data" "$data"
mount -o remount,bind,ro /
exec "$@"
"""


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", ["plain", "read-only-system"])
def test_exec_start_serves_from_a_checkout(tmp_path: Path, sandbox: str):
    data = tmp_path / "var-lib-kvapp"  # ReadWritePaths=/var/lib/kvapp
    data.mkdir()
    port = free_port()
    config = install_config(tmp_path, data, port)
    argv = shlex.split(SERVICE["ExecStart"][0])
    command = [sys.executable, *argv[1:]]  # the unit's venv python is ours here
    if sandbox == "read-only-system":
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("needs root and unshare to build the read-only mounts (CI runs as root)")
        command = ["unshare", "--mount", "--propagation", "private"]
        command += ["sh", "-ec", READ_ONLY_SYSTEM, "sh", str(data), sys.executable, *argv[1:]]
    env = {**server_environ(), **unit_environment(config)}
    log = tmp_path / "journal.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=output)
    try:
        wait_listening(port, proc, "kvapp", log)
        url = f"http://127.0.0.1:{port}"
        status, _, body = curl(f"{url}/set?k=v")
        assert (status, body) == (200, b"stored 1 key\n")
        assert curl(f"{url}/get?key=k")[2] == b"v"
        assert curl(f"{url}/healthz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)  # what systemctl stop sends (KillMode=mixed)
        returncode = proc.wait(timeout=30)
    # systemd counts an exit by SIGTERM as a clean stop, like status 0.
    assert returncode in (0, -signal.SIGTERM), log.read_text()
    assert (data / "kvapp.sqlite3").exists()


# -- deploy/nginx.conf and config.ini ---------------------------------------------------


def nginx_directive(name: str, text: str) -> list[str]:
    return re.findall(rf"^[ \t]*{name}[ \t]+([^;{{}}]+);", text, re.M)


def test_nginx_conf_agrees_with_config_ini():
    settings = load_config(ROOT / "config.ini", environ={})
    text = SITE.read_text(encoding="utf-8")
    assert nginx_directive("server", text) == [f"{settings.host}:{settings.port}"]
    (body_limit,) = nginx_directive("client_max_body_size", text)
    assert body_limit == f"{settings.max_body_bytes // 2**20}m"
    assert settings.max_body_bytes % 2**20 == 0
    assert f"over {settings.max_body_bytes} bytes" in text  # the 413 message
    # In the upstream block, keepalive_timeout is how long nginx keeps an idle
    # connection to kvapp; waitress closes it after channel_timeout.
    upstream = text[text.index("upstream kvapp {") : text.index("}")]
    (idle,) = nginx_directive("keepalive_timeout", upstream)
    assert int(idle.removesuffix("s")) < settings.channel_timeout
