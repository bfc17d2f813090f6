"""A FUSE filesystem that can lose what was not fsynced: a power cut for the tests.

    python tests/powercut.py BACKING MOUNTPOINT

Every call is served from a model of a disk: what a file was given since
its last fsync or fdatasync, and what a directory's entries became since
its last fsync, stay in this process's memory (the volatile layer, which
every read sees, as a page cache is seen).  fsync writes a file's pages
into BACKING; fsync of a directory writes its entries.  So BACKING always
holds exactly what a disk would keep after a power cut, and killing this
process is the power cut: the memory is gone.

A line on stdin pulls the plug, then the process exits at once:
    drop          lose everything unsynced
    pages SEED    keep a random half of the unsynced 4 KiB pages (the disk
                  wrote some of the page cache back before the cut)
    tear SEED     keep the first 1 to 7 512-byte sectors of one unsynced
                  page and nothing else (a torn write)
Two more lines make a disk that hangs, without a cut:
    freeze        every fsync from now on waits (reads and writes do not)
    thaw          the waiting fsyncs go on, and later ones do not wait
Directory entries are only ever kept by an fsync of their directory, as
POSIX promises (ext4 happens to keep more).  There are no hard links.  Mapped files (MAP_SHARED, as
SQLite's -shm and kvapp's -gen) work: the kernel writes their dirty pages
back through write(), into the volatile layer.

BACKING/namespace.json holds the durable entries, BACKING/inodes/N the
durable bytes of each file.  A new process on the same BACKING mounts the
state after the cut.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import sys
import threading
import time
from typing import Any

import mfusepy as fuse

PAGE = 4096
SECTOR = 512


class Node:
    """One file's content: durable bytes in BACKING/inodes/N, unsynced pages in memory."""

    def __init__(self, backing: str, ino: int) -> None:
        self.path = os.path.join(backing, "inodes", str(ino))
        try:
            self.durable_size = os.path.getsize(self.path)
        except FileNotFoundError:
            self.durable_size = 0
        self.size = self.durable_size
        self.clip = self.durable_size  # durable bytes at or past clip read as zeros (a truncate)
        self.pages: dict[int, bytearray] = {}

    def _durable(self, start: int, length: int) -> bytes:
        end = min(start + length, self.clip, self.durable_size)
        if end <= start:
            return bytes(length)
        with open(self.path, "rb") as file:
            file.seek(start)
            data = file.read(end - start)
        return data + bytes(length - len(data))

    def _page(self, index: int) -> bytearray:
        page = self.pages.get(index)
        if page is None:
            page = self.pages[index] = bytearray(self._durable(index * PAGE, PAGE))
        return page

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        out = bytearray()
        position = offset
        while position < end:
            index, within = divmod(position, PAGE)
            take = min(PAGE - within, end - position)
            page = self.pages.get(index)
            if page is not None:
                out += page[within : within + take]
            else:
                out += self._durable(position, take)
            position += take
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        position, view = offset, memoryview(data)
        while view:
            index, within = divmod(position, PAGE)
            take = min(PAGE - within, len(view))
            self._page(index)[within : within + take] = view[:take]
            position += take
            view = view[take:]
        self.size = max(self.size, offset + len(data))

    def truncate(self, length: int) -> None:
        if length < self.size:
            for index in [index for index in self.pages if index * PAGE >= length]:
                del self.pages[index]
            index, within = divmod(length, PAGE)
            if within:
                self._page(index)[within:] = bytes(PAGE - within)
            self.clip = min(self.clip, length)
        self.size = length

    def sync(self) -> None:
        """Write every unsynced page and the size to BACKING (fsync, fdatasync)."""
        mode = "r+b" if os.path.exists(self.path) else "w+b"
        with open(self.path, mode) as file:
            file.truncate(min(self.clip, self.durable_size))  # a truncate since the last sync
            for index in sorted(self.pages):
                file.seek(index * PAGE)
                file.write(self.pages[index])
            file.truncate(self.size)
            file.flush()
            os.fsync(file.fileno())
        self.pages.clear()
        self.durable_size = self.clip = self.size

    def cut(self, indexes: list[int], sectors: int = PAGE // SECTOR) -> None:
        """At the cut: some pages (or their first sectors) reached the disk, nothing else did."""
        if not indexes:
            return
        end = max((index + 1) * PAGE for index in indexes)
        mode = "r+b" if os.path.exists(self.path) else "w+b"
        with open(self.path, mode) as file:
            for index in indexes:
                file.seek(index * PAGE)
                file.write(self.pages[index][: sectors * SECTOR])
            file.truncate(max(self.durable_size, min(end, self.size)))


class PowerCut(fuse.Operations):
    """The filesystem: entries by path, each a directory or a Node."""

    use_ns = True  # utimens gets nanoseconds (it ignores them: no test reads times)

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.mutex = threading.Lock()
        self.thawed = threading.Event()  # cleared: fsync waits, as on a disk that hangs
        self.thawed.set()
        os.makedirs(os.path.join(backing, "inodes"), exist_ok=True)
        self.namespace_path = os.path.join(backing, "namespace.json")
        try:
            with open(self.namespace_path) as file:
                saved = json.load(file)
        except FileNotFoundError:
            saved = {"next_ino": 1, "entries": {"/": {"ino": 0, "mode": stat.S_IFDIR | 0o755}}}
        self.next_ino: int = saved["next_ino"]
        self.durable: dict[str, dict[str, int]] = saved["entries"]
        self.entries: dict[str, dict[str, int]] = {p: dict(e) for p, e in self.durable.items()}
        self.nodes: dict[int, Node] = {}
        live = {entry["ino"] for entry in self.entries.values()}
        for name in os.listdir(os.path.join(backing, "inodes")):
            if int(name) not in live:  # an inode no durable entry names: gone at the cut
                os.unlink(os.path.join(backing, "inodes", name))

    # -- the plug ------------------------------------------------------------------------

    def pull(self, command: str) -> None:
        """Apply the cut that command names, then end the process: nothing else is kept."""
        with self.mutex:
            words = command.split()
            unsynced = [(ino, i) for ino, node in self.nodes.items() for i in sorted(node.pages)]
            if words and words[0] == "pages":
                rng = random.Random(int(words[1]))
                kept = [item for item in unsynced if rng.random() < 0.5]
                for ino in {ino for ino, _ in kept}:
                    self.nodes[ino].cut([i for n, i in kept if n == ino])
            elif words and words[0] == "tear" and unsynced:
                rng = random.Random(int(words[1]))
                ino, index = rng.choice(unsynced)
                self.nodes[ino].cut([index], sectors=rng.randint(1, PAGE // SECTOR - 1))
            os._exit(0)

    # -- helpers ---------------------------------------------------------------------------

    def _entry(self, path: str) -> dict[str, int]:
        entry = self.entries.get(path)
        if entry is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return entry

    def _node(self, path: str | None, fh: int | None = None) -> Node:
        """Return the Node of an open file (fh: its ino) or of the file at path."""
        if fh is None or fh not in self.nodes:
            if path is None:
                raise fuse.FuseOSError(errno.EBADF)
            entry = self._entry(path)
            if stat.S_ISDIR(entry["mode"]):
                raise fuse.FuseOSError(errno.EISDIR)
            fh = entry["ino"]
        ino = fh
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(self.backing, ino)
        return node

    def _new(self, path: str, mode: int) -> int:
        if _parent(path) not in self.entries:
            raise fuse.FuseOSError(errno.ENOENT)
        if path in self.entries:
            raise fuse.FuseOSError(errno.EEXIST)
        ino, self.next_ino = self.next_ino, self.next_ino + 1
        self.entries[path] = {"ino": ino, "mode": mode}
        return ino

    def _children(self, path: str, entries: dict | None = None) -> list[str]:
        """Return the paths of the entries directly in the directory path."""
        return [p for p in (self.entries if entries is None else entries) if _parent(p) == path]

    # -- operations --------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self.mutex:
            entry = self._entry(path)
            now = time.time()
            attrs: dict[str, Any] = {
                "st_mode": entry["mode"],
                "st_nlink": 2 if stat.S_ISDIR(entry["mode"]) else 1,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
                "st_atime": now,
                "st_mtime": now,
                "st_ctime": now,
                "st_size": 0,
            }
            if not stat.S_ISDIR(entry["mode"]):
                size = self._node(path).size
                attrs["st_size"] = size
                attrs["st_blocks"] = (size + 511) // 512
            return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        with self.mutex:
            self._entry(path)
            return [".", "..", *(os.path.basename(p) for p in self._children(path))]

    def mkdir(self, path: str, mode: int) -> int:
        with self.mutex:
            self._new(path, stat.S_IFDIR | (mode & 0o7777))
            return 0

    def rmdir(self, path: str) -> int:
        with self.mutex:
            if self._children(path):
                raise fuse.FuseOSError(errno.ENOTEMPTY)
            self._entry(path)
            del self.entries[path]
            return 0

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self.mutex:
            ino = self._new(path, stat.S_IFREG | (mode & 0o7777))
            self.nodes[ino] = Node(self.backing, ino)
            return ino

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            node = self._node(path)
            if flags & os.O_TRUNC:
                node.truncate(0)
            return self._entry(path)["ino"]

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            return self._node(path, fh).read(offset, size)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            self._node(path, fh).write(offset, data)
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.mutex:
            self._node(path, fh).truncate(length)
            return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        with self.mutex:
            if mode != 0:
                raise fuse.FuseOSError(errno.EOPNOTSUPP)
            node = self._node(path, fh)
            if offset + size > node.size:
                node.write(node.size, bytes(offset + size - node.size))
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self.thawed.wait()
        with self.mutex:
            self._node(path, fh).sync()
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self.thawed.wait()
        with self.mutex:
            for name in self._children(path, self.durable):
                del self.durable[name]
            for name in self._children(path):
                self.durable[name] = dict(self.entries[name])
            temporary = self.namespace_path + ".new"
            with open(temporary, "w") as file:
                json.dump({"next_ino": self.next_ino, "entries": self.durable}, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.namespace_path)
            return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            self._node(path)
            del self.entries[path]
            return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            entry = self._entry(old)
            if stat.S_ISDIR(entry["mode"]):
                raise fuse.FuseOSError(errno.EXDEV)  # kvapp renames files only
            if os.path.dirname(new) not in self.entries:
                raise fuse.FuseOSError(errno.ENOENT)
            self.entries[new] = self.entries.pop(old)
            return 0

    def link(self, target: str, source: str) -> int:
        # No hard links, as on FAT or exFAT: kvapp's data tools then name a
        # finished file with renameat2(RENAME_NOREPLACE), which is the path
        # the power-cut tests cut; link(2) itself is tested on the usual disks.
        raise fuse.FuseOSError(errno.EPERM)

    def chmod(self, path: str, mode: int) -> int:
        with self.mutex:
            entry = self._entry(path)
            entry["mode"] = (entry["mode"] & ~0o7777) | (mode & 0o7777)
            return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: Any = None) -> int:
        return 0

    def access(self, path: str, amode: int) -> int:
        with self.mutex:
            self._entry(path)
            return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {
            "f_bsize": PAGE,
            "f_frsize": PAGE,
            "f_blocks": 1 << 20,
            "f_bfree": 1 << 19,
            "f_bavail": 1 << 19,
            "f_files": 1 << 16,
            "f_ffree": 1 << 15,
            "f_namemax": 255,
        }

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        return 0


def _parent(path: str) -> str | None:
    """Return the directory holding path, or None for the root."""
    return None if path == "/" else os.path.dirname(path)


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    filesystem = PowerCut(backing)

    def control() -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "freeze":
                filesystem.thawed.clear()
            elif command == "thaw":
                filesystem.thawed.set()
            elif command:
                filesystem.pull(command)
        filesystem.pull("drop")  # stdin closed: the test went away

    threading.Thread(target=control, daemon=True).start()
    fuse.FUSE(filesystem, mountpoint, foreground=True, nothreads=False, fsname="powercut")


if __name__ == "__main__":
    main()
