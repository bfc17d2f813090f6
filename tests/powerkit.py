"""Mounting tests/powercut.py, and pulling its plug, for the power-cut tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

POWERCUT = Path(__file__).with_name("powercut.py")
VARIANTS = ("drop", "pages", "tear")


def fuse_missing() -> str | None:
    """Return why the power-cut filesystem cannot run here, or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: this machine cannot mount FUSE filesystems"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse3.so.3 is not installed
        return f"mfusepy cannot load libfuse ({exc}); apt-get install fuse3"
    return None


needs_fuse = pytest.mark.skipif(fuse_missing() is not None, reason=fuse_missing() or "")


class Disk:
    """A power-cut filesystem on backing, mounted at mountpoint while mounted."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.log = log
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def mount(self) -> Disk:
        """Start the filesystem on what the backing folder kept; wait for the mount."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(POWERCUT), str(self.backing), str(self.mountpoint)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the power-cut filesystem did not mount: {self.output()}")
            time.sleep(0.02)
        return self

    def _send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def freeze(self) -> None:
        """Make every fsync wait from now on, as on a disk that hangs."""
        self._send("freeze")

    def thaw(self) -> None:
        """Let the waiting fsyncs finish, and later ones run at once."""
        self._send("thaw")

    def pull(self, variant: str, seed: int = 0) -> None:
        """Cut the power: keep what variant says of the unsynced writes, lose the rest."""
        assert self.proc is not None and self.proc.stdin is not None
        command = variant if variant == "drop" else f"{variant} {seed}"
        try:
            self.proc.stdin.write(f"{command}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=30)
        self.proc.stdin.close()
        self.proc = None

    def unmount(self) -> None:
        """Detach the dead filesystem (a lazy unmount: killed processes may still hold it)."""
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mountpoint)], check=False, capture_output=True
        )
        deadline = time.monotonic() + 15
        while os.path.ismount(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        """At the end of a test: cut and unmount, whatever state it is in."""
        if self.proc is not None:
            self.pull("drop")
        self.unmount()

    def output(self) -> str:
        return self.log.read_bytes().decode("utf-8", "replace") if self.log.exists() else ""
