"""Files that appear whole or not at all: written aside, fsynced, then renamed into place.

rename(2) replaces a name in one step, so whoever opens the destination finds
the old file or the complete new one, never a half-written one.  The data is
fsynced before the rename and the folder after it: without that, a power cut
can leave the new name on a file whose content never reached the disk.

An export is written to an unnamed O_TMPFILE file (Linux, open(2)) that the
kernel frees if the process dies, even by SIGKILL; it gets a name only when
it is complete.  SQLite opens files by name, so a backup is written to a
named temporary file beside the destination, .NAME.tmp-PID, which is removed
on any error or catchable signal.  A SIGKILL leaves that file behind, never a
destination; the next run that writes the same destination removes it.

A caller that must not replace a file already at the destination passes
replace=False: the complete file is then named with link(2), which fails
where rename(2) would replace (DestinationExists).  On a filesystem without
hard links (FAT, exFAT, many FUSE filesystems: link(2) fails with EPERM)
it is renamed with renameat2(2)'s RENAME_NOREPLACE, the same one step.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# SQLite's companions of a database file (https://sqlite.org/tempfiles.html),
# and kvapp's own -gen file of read-cache counters (kvapp.store.readcache).
SQLITE_SUFFIXES = ("", "-journal", "-wal", "-shm", "-gen")


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DestinationExists(FileExistsError):
    """There is a file at the destination, and it was not to be replaced."""

    def __init__(self, dest: Path) -> None:
        super().__init__(errno.EEXIST, "already exists", str(dest))


def check_destination(dest: Path, replace: bool = True) -> None:
    """Raise OSError if dest cannot be written: no folder, a folder, or a file unless replace."""
    if not dest.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(dest.parent))
    if dest.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(dest))
    if not replace and os.path.lexists(dest):
        raise DestinationExists(dest)


def _put(temp: Path, dest: Path, replace: bool) -> None:
    """Give temp's file the name dest, replacing a file there or (not replace) failing."""
    if replace:
        os.replace(temp, dest)
        return
    try:
        # link(2) fails with EEXIST where rename(2) would replace: the check and
        # the naming are one step, so a file that appeared meanwhile is kept.
        os.link(temp, dest)
    except FileExistsError:
        raise DestinationExists(dest) from None
    except OSError as exc:
        # EPERM: "The filesystem containing oldpath and newpath does not
        # support the creation of hard links" (link(2)).
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        _rename_noreplace(temp, dest, exc)
        return
    os.unlink(temp)


_AT_FDCWD = -100  # <fcntl.h>
_RENAME_NOREPLACE = 1  # <linux/fs.h>


def _rename_noreplace(temp: Path, dest: Path, refused: OSError) -> None:
    """Rename temp to dest unless a file is there (DestinationExists), in one step.

    renameat2(2) with RENAME_NOREPLACE (Linux 3.15, glibc 2.28; Python has no
    wrapper).  Where it is missing too, the link(2) error that led here is raised.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        raise refused from None
    old, new = os.fsencode(temp), os.fsencode(dest)
    if renameat2(_AT_FDCWD, old, _AT_FDCWD, new, _RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise DestinationExists(dest)
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the flag is not supported
        raise refused from None
    raise OSError(code, os.strerror(code), str(temp), None, str(dest))


def _temp_name(dest: Path, pid: int) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{pid}")


def remove_stale(dest: Path) -> None:
    """Remove the temporary files that killed runs writing dest left behind.

    A power cut can keep a companion (.NAME.tmp-PID-gen) without its file, so
    the PID is read from either name.
    """
    prefix = f".{dest.name}.tmp-"
    for path in dest.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :]
        for suffix in SQLITE_SUFFIXES[1:]:
            pid = pid.removesuffix(suffix)
        if not pid.isdigit() or _alive(int(pid)):
            continue
        for suffix in SQLITE_SUFFIXES:
            dest.with_name(f"{prefix}{pid}{suffix}").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def aside(dest: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside dest; on normal exit it is fsynced and renamed onto dest.

    On any exception the temporary file and its SQLite companions are removed
    and dest is untouched.  The caller closes every handle on the path first.
    Unless replace, a file at dest is never replaced: DestinationExists, before
    the work if it is there then, else at the end.
    """
    check_destination(dest, replace)
    for suffix in ("-wal", "-journal"):
        # SQLite would apply a WAL or hot journal left by the file that was
        # there before to the new file, and so damage it.
        companion = Path(f"{dest}{suffix}")
        if companion.exists():
            raise FileExistsError(
                errno.EEXIST,
                f"{companion.name} is beside it: the database there may be open, or was not"
                " closed cleanly; close it, or move it and its -wal and -shm files away",
                str(dest),
            )
    remove_stale(dest)
    temp = _temp_name(dest, os.getpid())
    try:
        yield temp
        wal = Path(f"{temp}-wal")
        if wal.exists() and wal.stat().st_size:
            # Renaming a database away from its WAL would lose the WAL's commits.
            raise RuntimeError(f"{temp} still has a WAL: close its connections first")
        fsync_file(temp)
        # The companions that opening temp made (its -gen, an empty -shm) go
        # before the rename, so that the fsync of the folder below records
        # their removal with it: a power cut after it leaves none of them.
        for suffix in SQLITE_SUFFIXES[1:]:
            Path(f"{temp}{suffix}").unlink(missing_ok=True)
        _put(temp, dest, replace)
        fsync_dir(dest.parent)
    finally:
        for suffix in SQLITE_SUFFIXES:
            Path(f"{temp}{suffix}").unlink(missing_ok=True)


@contextmanager
def replacing(dest: Path, unnamed: bool = True, replace: bool = True) -> Iterator[BinaryIO]:
    """Yield a file open for binary writing; on normal exit its content replaces dest.

    On any exception, dest is untouched and nothing is left behind.
    unnamed=False (for tests) takes the way of systems without O_TMPFILE.
    Unless replace, a file at dest is never replaced (DestinationExists), as in aside().
    """
    check_destination(dest, replace)
    remove_stale(dest)
    try:
        if not unnamed:
            raise OSError(errno.EOPNOTSUPP, "O_TMPFILE not wanted")
        fd = os.open(dest.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
        named = None
    except (AttributeError, OSError) as exc:
        # No O_TMPFILE on this system or filesystem: a named temporary file.
        if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
        named = _temp_name(dest, os.getpid())
        fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with open(fd, "wb", buffering=1024 * 1024) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            if named is None:
                # An O_TMPFILE file gets a name through linkat() of its /proc
                # entry with AT_SYMLINK_FOLLOW (open(2), O_TMPFILE); os.link
                # uses linkat only when given a dir fd.  A link cannot replace
                # a name, so it is linked beside dest and renamed over it.
                named = _temp_name(dest, os.getpid())
                named.unlink(missing_ok=True)
                proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.link(str(handle.fileno()), named, src_dir_fd=proc, follow_symlinks=True)
                finally:
                    os.close(proc)
        _put(named, dest, replace)
        named = None
        fsync_dir(dest.parent)
    finally:
        if named is not None:
            named.unlink(missing_ok=True)
