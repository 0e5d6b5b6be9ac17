"""OCI image layout folders (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): the local store is one,
and `oci:DIR[:TAG]` names one for air-gapped transfer (the OCI image-layout spec; `oras --oci-layout`
and `skopeo oci:` read and write the same).

Blobs are content addressed and immutable: a blob appears under its final name only once its bytes
were hashed and matched its digest (written under `ingest/`, fsynced, then renamed), and is made
read-only. `index.json` is replaced atomically under a lock, so readers never see half of one.
An interrupted download leaves `ingest/<hex>`, which the next one continues from (resume).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pocketlm.bundle.atomic import Sink, remove_stale_temporaries, replacing, storage_error
from pocketlm.errors import PocketLMError, StorageError
from pocketlm.store.manifest import REF_NAME, Descriptor, ManifestError, index_json, parse_index
from pocketlm.store.reference import is_digest

WRITE_PIECE = 64 << 10
MAX_INDEX_BYTES = 64 << 20  # index.json: ~200,000 entries
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'
CHUNK = 1 << 20


class DigestMismatchError(PocketLMError, ValueError):
    """Bytes that do not hash to the digest that names them (a corrupt or tampered transfer)."""


def hex_of(digest: str) -> str:
    if not is_digest(digest):
        raise ManifestError(f"unsupported digest {digest!r} (sha256 only)")
    return digest.split(":", 1)[1]


def sha256_file(path: str | os.PathLike, h=None) -> tuple[str, int]:
    h = h or hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return "sha256:" + h.hexdigest(), size


class Layout:
    """An OCI image layout folder. `create` makes it if missing."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root).expanduser()
        if create:
            self._init()
        elif not (self.root / "oci-layout").is_file() or not (self.root / "index.json").is_file():
            raise StorageError(f"{self.root}: not an OCI image layout (no oci-layout and index.json)")

    def _init(self) -> None:
        try:
            (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            (self.root / "ingest").mkdir(exist_ok=True)
        except OSError as e:
            raise storage_error(str(self.root), e) from e
        if not (self.root / "oci-layout").is_file():
            self._write_file(self.root / "oci-layout", LAYOUT_FILE)
        if not (self.root / "index.json").is_file():
            with self.locked():
                if not (self.root / "index.json").is_file():
                    self._write_file(self.root / "index.json", index_json([]))

    # ---- blobs ----
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / hex_of(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        try:
            st = self.blob_path(digest).stat()
        except OSError:
            return False
        return size is None or st.st_size == size

    def read_blob(self, digest: str, limit: int) -> bytes:
        """A small blob's bytes, checked against its digest (a blob changed on disk is refused)."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise StorageError(f"{self.root}: blob {digest} is missing") from None
        if len(data) > limit:
            raise ManifestError(f"blob {digest} is larger than {limit} bytes")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DigestMismatchError(f"{path}: its bytes do not match its digest {digest} (changed on disk)")
        return data

    def add_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest, len(data)):
            path = self.blob_path(digest)
            self._write_file(path, data)
            _read_only(path)
        return digest

    def add_file(self, src: str | os.PathLike, progress=None, move: bool = False) -> tuple[str, int]:
        """Copies a file in (hashing as it copies); returns (digest, size). A copy, not a link: the
        blob stays what it was when the file changes. move: `src` is a temporary file on this
        filesystem, hashed and renamed in."""
        src_path = Path(src)
        if src_path.parent.resolve() == (self.root / "blobs" / "sha256").resolve() and not move:
            digest = "sha256:" + src_path.name  # a blob of this layout already (create FROM a store entry)
            if self.has_blob(digest):
                actual, size = sha256_file(src_path)  # shared by a new manifest: only if intact
                if actual != digest:
                    raise DigestMismatchError(f"{src_path}: its bytes no longer match its digest (changed on disk); "
                                              "pull or create the model it belongs to again")
                return digest, size
        if move:
            digest, size = sha256_file(src)
            if self.has_blob(digest, size):
                _unlink(Path(src))
            else:
                self._name_blob(src, digest)
            return digest, size
        remove_stale_temporaries(self.root / "ingest" / "copy")  # of killed copies
        tmp = self.root / "ingest" / f".copy.tmp-{os.getpid()}"
        try:
            h = hashlib.sha256()
            size = 0
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            with open(src, "rb", buffering=0) as f, Sink(str(self.root), str(tmp)) as out:
                while n := f.readinto(buf):
                    h.update(view[:n])
                    out.write(view[:n])
                    size += n
                    if progress:
                        progress(n)
                out.sync()
            digest = "sha256:" + h.hexdigest()
            if not self.has_blob(digest, size):
                self._name_blob(tmp, digest)
            return digest, size
        finally:
            _unlink(tmp)

    def _name_blob(self, verified: str | os.PathLike, digest: str) -> None:
        """Renames a file whose bytes were checked against `digest` to its blob name, read-only."""
        final = self.blob_path(digest)
        try:
            os.replace(verified, final)
        except OSError as e:
            raise storage_error(str(final), e) from e
        _read_only(final)

    @contextlib.contextmanager
    def ingest(self, digest: str, size: int) -> Iterator[Partial | None]:
        """Receives a blob: yields a Partial (its file open for appending, the bytes already there from
        an interrupted transfer and a sha256 fed with them), or None if the blob is here already. On a
        clean exit the file must hold exactly `size` bytes hashing to `digest` (the caller feeds the
        hash as it writes; Partial.write does both); then it is renamed into blobs/. On an error the
        partial file stays for the next attempt to continue. Two processes receiving the same blob
        take turns (a lock on the partial file)."""
        partial = self.root / "ingest" / hex_of(digest)
        if self.has_blob(digest, size):
            yield None
            return
        try:  # never through a symbolic link a hostile layout folder planted: only our own regular file
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                os.close(fd)
                raise StorageError(f"{partial}: not a plain file (refused)")
            f = open(fd, "ab+", buffering=0)
        except OSError as e:
            if isinstance(e, StorageError):
                raise
            raise storage_error(str(partial), e) from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            if self.has_blob(digest, size):  # the other process finished it
                yield None
                return
            p = Partial(f, str(partial))
            try:
                if p.have > size:
                    p.restart()
                yield p
                p.flush()
                actual = "sha256:" + p.hexdigest()
            finally:
                p.close()
            if p.have != size or actual != digest:
                p.restart()  # wrong bytes: the next attempt starts over
                raise DigestMismatchError(f"blob {digest}: received {p.have} bytes hashing to {actual}, expected "
                                          f"{size} bytes (a corrupt or tampered transfer; nothing was stored)")
            self._name_blob(partial, digest)
        finally:
            f.close()

    # ---- index.json ----
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise storage_error(str(self.root / ".lock"), e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def index(self) -> list[Descriptor]:
        try:
            with open(self.root / "index.json", "rb") as f:
                data = f.read(MAX_INDEX_BYTES + 1)
            if len(data) > MAX_INDEX_BYTES:
                raise ManifestError(f"{self.root / 'index.json'} is larger than {MAX_INDEX_BYTES} bytes")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"cannot read {self.root / 'index.json'}: {e.strerror or e}") from None
        try:
            return parse_index(data)
        except ManifestError as e:
            raise ManifestError(f"{self.root / 'index.json'}: {e}") from None

    def write_index(self, descriptors: list[Descriptor]) -> None:
        """Call with locked() held."""
        self._write_file(self.root / "index.json", index_json(descriptors))

    def tagged(self, name: str) -> Descriptor | None:
        return next((d for d in self.index() if d.annotations.get(REF_NAME) == name), None)

    def set_tag(self, name: str, desc: Descriptor) -> None:
        """Points ref.name `name` at `desc` (replacing what it named)."""
        with self.locked():
            rest = [d for d in self.index() if d.annotations.get(REF_NAME) != name]
            self.write_index(rest + [Descriptor(desc.media_type, desc.digest, desc.size,
                                                {**desc.annotations, REF_NAME: name}, desc.artifact_type)])

    def add_untagged(self, desc: Descriptor) -> None:
        """Lists a manifest without a name (a signature, found by its subject)."""
        with self.locked():
            index = self.index()
            if not any(d.digest == desc.digest and REF_NAME not in d.annotations for d in index):
                self.write_index(index + [desc])

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        with replacing(str(path)) as tmp, Sink(str(path), tmp) as f:
            f.write(data)
            f.sync()


class Partial:
    """A blob being received: `have` bytes so far, appended to by write(). The SHA-256 runs on a
    second thread, one piece behind the writes (hashlib and file writes release the GIL), so hashing
    costs little time beside the download; a caller reads each piece into next_buffer(), which
    alternates between two buffers so the one being hashed is never overwritten."""

    def __init__(self, f, name: str):
        self.f, self.name = f, name
        self._buffers = (bytearray(CHUNK), bytearray(CHUNK))
        self._turn = 0
        self._pending = None
        self._pool = None
        self._reset_hash()
        self.have = f.seek(0, os.SEEK_END)
        self.resumed = self._flushed = self.have
        if self.have:
            f.seek(0)
            left = self.have
            while left:
                buf = self.next_buffer()
                n = f.readinto(memoryview(buf)[:min(left, CHUNK)])
                if not n:
                    break
                self._hash(memoryview(buf)[:n])
                left -= n
            f.seek(0, os.SEEK_END)

    def _reset_hash(self) -> None:
        self._wait()
        self._h = hashlib.sha256()

    def next_buffer(self) -> bytearray:
        self._turn ^= 1
        return self._buffers[self._turn]

    def _hash(self, view) -> None:
        self._wait()  # the previous piece (in the other buffer) is hashed before this one starts
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pocketlm-sha256")
        self._pending = self._pool.submit(self._h.update, view)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def write(self, view) -> None:
        """Appends `view`, a piece of the buffer next_buffer() last returned."""
        try:  # in 64 KiB writes: 1 MiB ones made the first pull after a push ~2x slower here, the
            # kernel's page-cache copy (copy_folio_from_iter_atomic) taking 1.0-1.3 s instead of ~0.1
            done = 0
            while done < len(view):
                done += self.f.write(view[done:done + WRITE_PIECE])
        except OSError as e:
            raise storage_error(self.name, e) from e
        self._hash(view)
        self.have += len(view)
        if self.have - self._flushed >= WRITEBACK:
            _start_writeback(self.f.fileno(), self._flushed, self.have - self._flushed)
            self._flushed = self.have

    def hexdigest(self) -> str:
        self._wait()
        return self._h.hexdigest()

    def restart(self) -> None:
        """Drops what was received (a source that does not resume, or bytes that did not verify)."""
        self._reset_hash()
        self.f.truncate(0)
        self.f.seek(0)
        self.have = self.resumed = self._flushed = 0

    def flush(self) -> None:
        try:
            os.fsync(self.f.fileno())
        except OSError as e:
            raise storage_error(self.name, e) from e

    def close(self) -> None:
        self._wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


WRITEBACK = 8 << 20  # bytes written before their writeback to disk is started (see _start_writeback)


def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing a range that is complete to disk without waiting (Linux's sync_file_range with
    SYNC_FILE_RANGE_WRITE), so the fsync before a blob is named waits for the last few megabytes,
    not the whole blob: the disk writes while the network delivers."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, 2)  # an error here only means the fsync does it all


def _read_only(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fchmod(fd, 0o444)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

