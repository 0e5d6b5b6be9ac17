"""Encryption at rest: a bundle sealed with AES-256-GCM (`pocketlm encrypt`), opened with a key from a
provider (docs/security.md, "Encryption at rest", for what it protects and what it does not).

    magic     8 bytes  b"PLMENC1\\0"
    header    u32 n, then n bytes of JSON: {"cipher": "AES-256-GCM", "chunk_bytes": C, "plain_bytes": N,
              "nonce_prefix": 8 random bytes (hex), "key_id": first 16 hex of SHA-256("pocketlm key id" + key)}
    chunks    ceil(N / C) of them (at least one): the next C plaintext bytes (fewer in the last), encrypted,
              then their 16-byte tag

Chunk i is sealed with the nonce nonce_prefix || i (4 bytes, big-endian) and authenticates, as
associated data, the magic and the header bytes, i, and whether it is the last chunk: a chunk that
was changed, moved, dropped, or taken from another file (or the file cut after a chunk) fails its
tag, and nothing is used. A new file gets a new random nonce prefix, so one key seals many files.

Opening decrypts into an anonymous in-memory file (Linux memfd, close-on-exec), which the bundle
reader then maps like any bundle: the plaintext never touches the disk, and costs its size in RAM
(no sharing through the page cache, no zero-copy mmap of the file).

Key providers (`--decryption-key`, `Engine(decryption_key=...)`, $POCKETLM_DECRYPTION_KEY):
    env:VAR                  the key in an environment variable (64 hex digits, or base64 of 32 bytes)
    file:PATH                a file holding the key (32 raw bytes, or hex/base64 text)
    keyring:SERVICE/USER     the OS keyring through the `keyring` package (macOS Keychain, Windows
                             Credential Locker, Secret Service on Linux), holding hex or base64 text
Needs the `cryptography` package (`pip install 'pocketlm[sign]'`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mmap
import os
import stat
import struct
import weakref
from pathlib import Path

from pocketlm.errors import BundleError, InvalidInputError, PocketLMError, StorageError

MAGIC = b"PLMENC1\0"
CIPHER = "AES-256-GCM"
CHUNK_BYTES = 4 << 20
TAG_BYTES = 16
MAX_HEADER_BYTES = 1 << 16
KEY_ENV = "POCKETLM_DECRYPTION_KEY"


class DecryptionError(PocketLMError, ValueError):
    """An encrypted bundle that cannot be opened: no key, the wrong key, or bytes that were changed."""


def is_encrypted(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file that starts as a sealed bundle (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return os.pread(fd, 8, 0) == MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _aesgcm():
    """(AESGCM, InvalidTag) from `cryptography`, or DecryptionError saying how to install it."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise DecryptionError("encrypted bundles need the `cryptography` package: pip install 'pocketlm[sign]'") \
            from None
    return AESGCM, InvalidTag


def parse_key(text: bytes | str, where: str, raw_ok: bool = False) -> bytes:
    """32 key bytes from 64 hex digits or base64 of 32 bytes (whitespace around them ignored), or, from a
    key file (raw_ok), 32 raw bytes that are not printable text (a passphrase is not a key)."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if raw_ok and len(raw) == 32 and not all(32 <= b < 127 or b in (9, 10, 13) for b in raw):
        return raw
    s = raw.strip()
    if len(s) == 64:
        try:
            return bytes.fromhex(s.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    try:
        key = base64.b64decode(s, validate=True)
        if len(key) == 32:
            return key
    except (binascii.Error, ValueError):
        pass
    raise InvalidInputError(f"{where}: not a 256-bit key (32 raw bytes, 64 hex digits or base64 of 32 bytes)")


def key_from_provider(spec: str | bytes) -> bytes:
    """The key a provider spec names: env:VAR, file:PATH or keyring:SERVICE/USER (or 32 key bytes)."""
    if isinstance(spec, (bytes, bytearray)):
        if len(spec) != 32:
            raise InvalidInputError("a key given as bytes must be 32 bytes (AES-256)")
        return bytes(spec)
    kind, sep, rest = str(spec).partition(":")
    if not sep or not rest:  # (never echoed: it may be the key itself, put where a provider goes)
        raise InvalidInputError("a key provider is env:VAR, file:PATH or keyring:SERVICE/USER (the value given is "
                                "none of these; if it is the key itself, put it in a variable and give env:VAR)")
    if kind == "env":
        value = os.environ.get(rest)
        if not value:
            raise DecryptionError(f"key provider env:{rest}: the environment variable is not set")
        return parse_key(value, f"${rest}")
    if kind == "file":
        try:
            return parse_key(Path(rest).expanduser().read_bytes()[:4096], rest, raw_ok=True)
        except OSError as e:
            raise DecryptionError(f"key provider file:{rest}: cannot read it: {e.strerror or e}") from None
    if kind == "keyring":
        service, slash, user = rest.partition("/")
        if not slash or not service or not user:
            raise InvalidInputError(f"key provider keyring:{rest}: use keyring:SERVICE/USER")
        try:
            import keyring
        except ImportError:
            raise DecryptionError("key provider keyring: needs the `keyring` package (pip install keyring)") from None
        try:
            value = keyring.get_password(service, user)
        except Exception as e:  # keyring's backends raise their own errors (no D-Bus, locked keychain, ...)
            raise DecryptionError(f"key provider keyring:{rest}: the keyring failed: {e}") from None
        if not value:
            raise DecryptionError(f"key provider keyring:{rest}: no such entry in the keyring")
        return parse_key(value, f"keyring:{rest}")
    raise InvalidInputError("a key provider is env:VAR, file:PATH or keyring:SERVICE/USER (the value given starts "
                            "with none of these)")


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"pocketlm key id\0" + key).hexdigest()[:16]


def new_key_file(path: str | os.PathLike) -> Path:
    """Writes a fresh random key (hex text, mode 0600) to a new file `path`."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInputError(f"{path}: exists (a key file is never overwritten)") from None
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before anything is sealed with it
    return path


def _aad(head: bytes, index: int, last: bool) -> bytes:
    return MAGIC + head + struct.pack(">IB", index, 1 if last else 0)


def encrypt(src: str | os.PathLike, out: str | os.PathLike, key: str | bytes, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Seals the bundle `src` into `out` (written atomically) with the key a provider names."""
    from pocketlm.bundle import read_bundle
    from pocketlm.bundle.atomic import Sink, replacing

    aes = _aesgcm()[0](key := key_from_provider(key))
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise InvalidInputError(f"{out}: encrypting in place would destroy the bundle; name another file")
    read_bundle(src)  # only bundles are sealed: a bad one fails here, not after decryption
    size = src.stat().st_size
    prefix = os.urandom(8)
    head = json.dumps({"cipher": CIPHER, "chunk_bytes": chunk_bytes, "plain_bytes": size, "nonce_prefix": prefix.hex(),
                       "key_id": key_id(key)}, sort_keys=True, separators=(",", ":")).encode()
    n_chunks = max(1, -(-size // chunk_bytes))
    with replacing(str(out)) as tmp, Sink(str(out), tmp) as f, open(src, "rb") as s:
        f.write(MAGIC + struct.pack("<I", len(head)) + head)
        for i in range(n_chunks):
            plain = s.read(chunk_bytes)
            f.write(aes.encrypt(prefix + struct.pack(">I", i), plain, _aad(head, i, i == n_chunks - 1)))
        if s.read(1):
            raise StorageError(f"{src} grew while it was encrypted")
        f.sync()
    return out


def read_header(path: str | os.PathLike) -> tuple[dict, bytes, int]:
    """(header, its bytes, offset of the first chunk), checked; DecryptionError."""
    with open(path, "rb") as f:
        start = f.read(12)
        if len(start) < 12 or start[:8] != MAGIC:
            raise DecryptionError(f"{path}: not an encrypted pocketlm bundle")
        (n,) = struct.unpack("<I", start[8:])
        if not 2 <= n <= MAX_HEADER_BYTES:
            raise DecryptionError(f"{path}: corrupt header ({n} bytes)")
        head = f.read(n)
    if len(head) != n:
        raise DecryptionError(f"{path}: truncated header")
    try:
        h = json.loads(head)
    except (ValueError, RecursionError):
        raise DecryptionError(f"{path}: the header is not JSON (corrupt file)") from None
    ok = (isinstance(h, dict) and h.get("cipher") == CIPHER and isinstance(h.get("chunk_bytes"), int)
          and not isinstance(h.get("chunk_bytes"), bool) and 1 <= h["chunk_bytes"] <= 1 << 30
          and isinstance(h.get("plain_bytes"), int) and not isinstance(h.get("plain_bytes"), bool)
          and 0 <= h["plain_bytes"] < 1 << 48 and isinstance(h.get("nonce_prefix"), str)
          and len(h["nonce_prefix"]) == 16 and isinstance(h.get("key_id"), str))
    if not ok:
        raise DecryptionError(f"{path}: unsupported or corrupt header (cipher {str(h.get('cipher'))[:40]!r})"
                              if isinstance(h, dict) else f"{path}: corrupt header")
    try:
        bytes.fromhex(h["nonce_prefix"])
    except ValueError:
        raise DecryptionError(f"{path}: corrupt header (nonce_prefix)") from None
    return h, head, 12 + n


def open_decrypted(path: str | os.PathLike, key: str | bytes) -> tuple[int, str]:
    """Decrypts `path` into an anonymous memory file; returns (its descriptor, a path that opens it:
    /proc/self/fd/N). The caller keeps the descriptor open while anything may open that path (open_bundle:
    as long as the bundle). DecryptionError on
    a wrong key or any changed byte (nothing of the plaintext is then kept)."""
    aes_class, InvalidTag = _aesgcm()
    key = key_from_provider(key)
    h, head, offset = read_header(path)
    if h["key_id"] != key_id(key):
        raise DecryptionError(f"{path}: sealed with another key (key id {h['key_id'][:16]}, this key's "
                              f"{key_id(key)})")
    aes = aes_class(key)
    chunk, size, prefix = h["chunk_bytes"], h["plain_bytes"], bytes.fromhex(h["nonce_prefix"])
    n_chunks = max(1, -(-size // chunk))
    expected = offset + size + n_chunks * TAG_BYTES
    actual = os.stat(path).st_size
    if actual != expected:
        raise DecryptionError(f"{path}: {actual} bytes where its header says {expected} (truncated or extended)")
    if not hasattr(os, "memfd_create"):
        raise DecryptionError("encrypted bundles open into anonymous memory (memfd), which this OS lacks")
    try:
        fd = os.memfd_create("pocketlm-decrypted", os.MFD_CLOEXEC)
    except OSError as e:
        raise DecryptionError(f"{path}: no memory file to decrypt into: {e.strerror or e}") from None
    try:
        os.ftruncate(fd, size)
        # Each chunk is copied into a shared mapping of the memory file (2.5x faster than os.write here).
        out = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if size else None
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                for i in range(n_chunks):
                    n = min(chunk, size - i * chunk)
                    sealed = f.read(n + TAG_BYTES)
                    try:
                        plain = aes.decrypt(prefix + struct.pack(">I", i), sealed, _aad(head, i, i == n_chunks - 1))
                    except InvalidTag:
                        raise DecryptionError(f"{path}: chunk {i} does not authenticate (changed bytes, or another "
                                              "file's chunk): refused") from None
                    if n:
                        out[i * chunk:i * chunk + n] = plain
        finally:
            if out is not None:
                out.close()
    except OSError as e:
        os.close(fd)
        raise DecryptionError(f"{path}: cannot decrypt into memory ({size} bytes): {e.strerror or e}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, f"/proc/self/fd/{fd}"


def key_from_env(decryption_key=None):
    """The key provider: the argument if given, else $POCKETLM_DECRYPTION_KEY (None: none)."""
    if decryption_key is not None:
        return decryption_key
    return os.environ.get(KEY_ENV) or None


def open_bundle(path: str | os.PathLike, decryption_key=None):
    """read_bundle, for plain and encrypted bundles alike (an encrypted one needs a key)."""
    from pocketlm.bundle import read_bundle

    if not is_encrypted(path):
        if decryption_key is not None:  # the caller expects a sealed file: a plain one swapped in is refused
            raise DecryptionError(f"{path}: not encrypted, but a decryption key was given (a sealed bundle was "
                                  "expected; $POCKETLM_DECRYPTION_KEY alone does not refuse plain bundles)")
        return read_bundle(path)
    spec = key_from_env(decryption_key)
    if spec is None:
        raise DecryptionError(f"{path}: encrypted: give its key (--decryption-key env:VAR|file:PATH|keyring:SERVICE/USER, "
                              f"Engine(decryption_key=...) or ${KEY_ENV})")
    fd, proc_path = open_decrypted(path, spec)
    try:
        bundle = read_bundle(proc_path)
    except BundleError as e:
        os.close(fd)
        raise BundleError(f"{path} (decrypted): {e}") from None
    except BaseException:
        os.close(fd)
        raise
    # The descriptor stays open as long as the bundle: its path (/proc/self/fd/N) is read again by
    # what keys caches on a bundle's header (calibration), and must not name a reused descriptor.
    weakref.finalize(bundle, os.close, fd)
    # Caches named by the plaintext's header (calibration) would tell anyone holding a candidate
    # plaintext that this device has the model: their names are keyed by a secret derived from the key.
    bundle.cache_secret = hashlib.sha256(b"pocketlm cache names\0" + key_from_provider(spec)).digest()
    return bundle
