"""Real processes for the deployment tests: `python -m kvapp serve`, and nginx
running deploy/nginx.conf in a throwaway prefix in front of it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import ROOT, free_port, server_environ

from kvapp.web.logs import FLUSH_INTERVAL

SITE = ROOT / "deploy" / "nginx.conf"
# Debian installs nginx in /usr/sbin, which an unprivileged PATH may lack.
NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
OPENSSL = shutil.which("openssl")
NGINX_WORKERS = 2  # what `worker_processes auto` gives on our 2-core machines


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    """Return once port accepts connections; raise if proc exits or 15 s pass."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening: {log.read_text()}")


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


class Kvapp:
    """`python -m kvapp serve --workers 2` on a free port of 127.0.0.1, its output in a file."""

    def __init__(self, db_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.db_path = db_path
        self.log_path = log_path
        self.env = {**server_environ(), "KVAPP_DATABASE": str(db_path), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Kvapp:
        self.port = free_port()
        # Two workers, as deployed: nginx's keep-alive connections spread over both.
        command = [sys.executable, "-m", "kvapp", "serve", "--port", str(self.port)]
        command += ["--workers", "2"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        wait_listening(self.port, self.proc, "kvapp", self.log_path)
        return self

    def stop(self) -> None:
        stop(self.proc)

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def access_lines(self) -> list[str]:
        """Return the access-log lines, each from the client address on.

        Under load kvapp writes access lines in bulk, within FLUSH_INTERVAL of
        the request; waiting a few intervals first lets every line land.
        """
        time.sleep(3 * FLUSH_INTERVAL)
        return [
            line.split(" kvapp.access: ", 1)[1]
            for line in self.output().splitlines()
            if " kvapp.access: " in line
        ]


TLS_LINE = re.compile(r"^(\s*)#tls ", re.M)


def render_site(
    upstream: str,
    listen: str,
    names: str,
    webroot: Path,
    tls: tuple[str, Path, Path] | None = None,
) -> str:
    """Return deploy/nginx.conf with every EDIT value replaced.

    webroot is certbot's folder for http-01 challenges.  tls is (listen,
    certificate, key): the #tls lines are switched on, as the file tells a user
    to do with sed.  Everything else is the shipped text.
    """
    text = SITE.read_text(encoding="utf-8")
    edits = {
        "server 127.0.0.1:4000;": f"server {upstream};",
        "listen 80;": f"listen {listen};",
        "server_name kv.example.com;": f"server_name {names};",
        "root /var/www/html;": f"root {webroot};",
    }
    if tls is not None:
        tls_listen, certificate, key = tls
        text = TLS_LINE.sub(r"\1", text)
        live = "/etc/letsencrypt/live/kv.example.com"
        edits |= {
            "listen 443 ssl;": f"listen {tls_listen} ssl;",
            f"ssl_certificate {live}/fullchain.pem;": f"ssl_certificate {certificate};",
            f"ssl_certificate_key {live}/privkey.pem;": f"ssl_certificate_key {key};",
        }
    for old, new in edits.items():
        assert text.count(old) == 1, f"deploy/nginx.conf should hold {old!r} exactly once"
        text = text.replace(old, new)
    for line in text.splitlines():
        if "# EDIT" in line and not line.lstrip().startswith("#"):
            assert any(new in line for new in edits.values()), f"no test value for: {line}"
    return text


def main_config(prefix: Path, site: Path) -> str:
    """Return an nginx.conf that keeps every file in prefix and includes site.

    It plays the part of Debian's /etc/nginx/nginx.conf, whose http block
    includes conf.d/*.conf, where a user copies deploy/nginx.conf.
    """
    # As root, nginx's workers would switch to nobody, who cannot enter pytest's tmp_path.
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
{user}
worker_processes {NGINX_WORKERS};
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{
    worker_connections 1024;
}}
http {{
    access_log {prefix / "access.log"};
{temp}
    include {site};
}}
"""


class Nginx:
    """nginx in the foreground, with its own prefix, pid file, logs and temp folders."""

    def __init__(self, prefix: Path, site_text: str) -> None:
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        self.site = prefix / "kvapp.conf"
        self.site.write_text(site_text, encoding="utf-8")
        self.config = prefix / "nginx.conf"
        self.config.write_text(main_config(prefix, self.site), encoding="utf-8")
        self.error_log = prefix / "error.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        assert NGINX is not None
        # -e: the log for errors before error_log is read (else /var/log/nginx).
        return [NGINX, "-p", str(self.prefix), "-c", str(self.config), "-e", str(self.error_log)]

    def check(self) -> subprocess.CompletedProcess:
        """Run `nginx -t` on the configuration."""
        return subprocess.run(
            [*self.command(), "-t"], capture_output=True, text=True, timeout=30, check=False
        )

    def start(self, port: int) -> Nginx:
        with open(self.prefix / "stderr.log", "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        wait_listening(port, self.proc, "nginx", self.error_log)
        return self

    def stop(self) -> None:
        stop(self.proc, signal.SIGQUIT)  # graceful: workers finish their requests

    def access_lines(self) -> list[str]:
        path = self.prefix / "access.log"
        return path.read_text().splitlines() if path.exists() else []


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """Return (certificate, key) of a new self-signed certificate for name."""
    certificate, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"]
        + ["-keyout", str(key), "-out", str(certificate)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return certificate, key


TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "0A": "LISTEN"}


def connections_to(port: int) -> list[tuple[int, str]]:
    """Return (peer port, state) of every IPv4 TCP socket whose local port is port."""
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local_port = int(fields[1].rpartition(":")[2], 16)
            peer_port = int(fields[2].rpartition(":")[2], 16)
            if local_port == port:
                found.append((peer_port, TCP_STATES.get(fields[3], fields[3])))
    return found
