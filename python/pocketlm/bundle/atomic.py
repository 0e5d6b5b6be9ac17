"""Writing a file atomically: through a temporary file next to it (`.NAME.tmp-PID`), renamed into
place only once complete, removed on any failure; temporaries that killed writers left behind are
removed by the next write of the same file. OSErrors of the write are StorageErrors naming the
file the user asked for (the temporary file's name means nothing to them)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator

from pocketlm.errors import StorageError

_TMP_NAME = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<pid>[0-9]+)$")

# No temporary file of this process is older: it makes them only through this module. A file with
# our PID but older than this was left by an earlier process that had our PID (containers start
# their processes with the same few PIDs every time).
_PROCESS_STARTED = time.time()


def temp_path(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process (or no way to tell): keep its file
        return True
    return True


def _is_stale(file: str, pid: int) -> bool:
    if pid != os.getpid():
        return not _pid_alive(pid)
    try:
        return os.lstat(file).st_mtime < _PROCESS_STARTED  # the entry itself: a planted link counts too
    except OSError:
        return False


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Removes the temporary files that writes of `path` left behind when their process was killed
    (`.NAME.tmp-PID` next to it, PID no longer running, or PID ours but the file older than this
    process); returns their paths. A file whose PID is another running process (a write in
    progress, or an unrelated process that reused the PID) is kept."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if not m or m["base"] != base:
            continue
        file = os.path.join(folder, name)
        if not _is_stale(file, int(m["pid"])):
            continue
        try:
            os.unlink(file)
            removed.append(file)
        except OSError:
            pass
    return removed


def storage_error(path: str, e: OSError) -> StorageError:
    """The OSError of a failed write, as a StorageError naming `path`."""
    err = StorageError(f"cannot write {path}: {e.strerror or e}")
    err.errno = e.errno  # for `except OSError as e: e.errno == ENOSPC`; filename and strerror stay
    return err           # unset, or str() would become "[Errno 28] ..." instead of the message


def _fsync_dir(path: str) -> None:
    try:  # makes the rename durable; not possible on every platform/filesystem
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields the temporary path to write `path` through. When the block ends normally, the
    temporary file is renamed onto `path` (durably where the filesystem allows); when it raises,
    the temporary file is removed and `path` left as it was. Stale temporaries of `path` are
    removed first."""
    remove_stale_temporaries(path)
    tmp = temp_path(path)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise storage_error(path, e) from e
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:  # never written (open failed), or the folder went away
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


class Sink:
    """A temporary file open for writing, its OSErrors raised as StorageError naming `path` (the
    file it becomes). Only the file's own calls are wrapped: an OSError of whatever produces the
    bytes (reading a source) stays itself."""

    def __init__(self, path: str, tmp: str):
        self.path = path
        self.f = self._do(self._open_new, tmp)

    @staticmethod
    def _open_new(tmp: str):
        """A new file at `tmp`, never through a symbolic link (a folder someone else can write, such as an
        oci: layout, may hold one where the temporary file goes)."""
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        return os.fdopen(fd, "wb")

    def _do(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise storage_error(self.path, e) from e

    def write(self, b) -> None:
        self._do(self.f.write, b)

    def seek(self, pos: int) -> None:
        self._do(self.f.seek, pos)

    def sync(self) -> None:
        self._do(self.f.flush)
        self._do(os.fsync, self.f.fileno())

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._do(self.f.close)
        else:
            try:
                self.f.close()
            except OSError:  # the first error is the one to report
                pass
