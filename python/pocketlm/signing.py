"""Detached signatures of a model file in the OpenSSF Model Signing format (docs/security.md).

The format is what the `model-signing` package (OpenSSF, PyPI) writes and reads for a single file
signed with an elliptic-curve key, offline (no Sigstore transparency log): a Sigstore bundle
(`application/vnd.dev.sigstore.bundle.v0.3+json`) whose DSSE envelope carries an in-toto statement:

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": <file name>, "digest": {"sha256": sha256(<the resource digests' bytes>)}}],
     "predicateType": "https://model_signing/signature/v1.0",
     "predicate": {"serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": false,
                                     "ignore_paths": [...]},
                   "resources": [{"name": ".", "algorithm": "sha256", "digest": <sha256 of the file>}]}}

signed as ECDSA over the DSSE pre-authentication encoding, with the hash the curve calls for (P-256:
SHA-256, P-384: SHA-384, P-521: SHA-512). A single file's one resource is named "." (its path
relative to itself); the subject's name is informational. Signatures made here verify with
`model_signing verify key` and theirs verify here (tests/test_signing.py).

Needs the `cryptography` package (`pip install 'pocketlm[sign]'`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pocketlm.errors import InvalidInputError, PocketLMError, StorageError

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
IGNORE_PATHS = [".git", ".gitattributes", ".github", ".gitignore"]  # model-signing's defaults, recorded as it does
SIGNATURE_SUFFIX = ".sig"
MAX_SIGNATURE_BYTES = 1 << 20  # a key-based signature is ~1.5 KB; anything this large is not one
_CHUNK = 1 << 20


class SignatureError(PocketLMError, ValueError):
    """A model's signature is missing, malformed, made by another key, or over other bytes."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise SignatureError("signing and verifying models needs the `cryptography` package: "
                             "pip install 'pocketlm[sign]'") from None
    return hashes, serialization, ec


def _bad_key_errors() -> tuple:
    """What cryptography raises for a key file it cannot use: not PEM, encrypted, or an algorithm
    it does not support (SM2 curves: UnsupportedAlgorithm, an Exception only)."""
    from cryptography.exceptions import UnsupportedAlgorithm

    return ValueError, TypeError, UnsupportedAlgorithm


SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def default_signature_path(model: str | os.PathLike) -> Path:
    """Where a model's signature sits unless told otherwise: MODEL.plm.sig beside it."""
    p = Path(model)
    return p.with_name(p.name + SIGNATURE_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pae(payload: bytes, payload_type: str = PAYLOAD_TYPE) -> bytes:
    """DSSE's pre-authentication encoding: what the signature is over."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _hash_for(curve) -> object:
    """The hash the OpenSSF format pairs with a curve (P-256: SHA-256, P-384: SHA-384, P-521: SHA-512)."""
    hashes, _, _ = _crypto()
    return {"secp256r1": hashes.SHA256(), "secp384r1": hashes.SHA384(), "secp521r1": hashes.SHA512()}[curve.name]


def _pem_hint(public_key) -> str:
    _, serialization, _ = _crypto()
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def statement(model: Path, digest_hex: str) -> dict:
    """The in-toto statement of a single file with this sha256."""
    root = hashlib.sha256(bytes.fromhex(digest_hex)).hexdigest()
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model.name, "digest": {"sha256": root}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": IGNORE_PATHS},
            "resources": [{"name": ".", "algorithm": "sha256", "digest": digest_hex}],
        },
    }


def sign_bytes(model: str | os.PathLike, private_key: str | os.PathLike, password: bytes | None = None,
               name: str | None = None) -> bytes:
    """The signature file's bytes for the file `model`, signed with the PEM elliptic-curve private
    key at `private_key`; `name`: the subject's (informational) name, default the file's."""
    _, serialization, ec = _crypto()
    model = Path(model)
    if not model.is_file():
        raise InvalidInputError(f"{model}: no such file")
    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password)
    except _bad_key_errors() as e:
        raise SignatureError(f"{private_key}: not a usable PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in SUPPORTED_CURVES:
        raise SignatureError(f"{private_key}: not a P-256, P-384 or P-521 elliptic-curve key (what the OpenSSF "
                             "model signing format signs with)")
    st = statement(model.with_name(name) if name else model, file_sha256(model))
    payload = json.dumps(st, sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(pae(payload), ec.ECDSA(_hash_for(key.curve)))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": _pem_hint(key.public_key())}, "tlogEntries": []},
        "dsseEnvelope": {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE,
                         "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}]},
    }
    return json.dumps(bundle, separators=(",", ":")).encode()


def sign(model: str | os.PathLike, private_key: str | os.PathLike, signature: str | os.PathLike | None = None,
         password: bytes | None = None) -> Path:
    """Signs the file `model` with the PEM elliptic-curve private key at `private_key`; writes the
    signature atomically to `signature` (default MODEL.sig) and returns its path."""
    from pocketlm.bundle.atomic import Sink, replacing

    model = Path(model)
    out = Path(signature) if signature is not None else default_signature_path(model)
    for other in (model, Path(private_key)):
        if out.resolve() == other.resolve():
            raise InvalidInputError(f"{out}: the signature would overwrite {other}")
    data = sign_bytes(model, private_key, password)
    try:
        with replacing(str(out)) as tmp, Sink(str(out), tmp) as f:
            f.write(data)
            f.sync()
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"{out}: cannot write the signature: {e.strerror or e}") from None
    return out


@dataclass(frozen=True)
class Verified:
    model: Path
    sha256: str        # the file's, as signed
    key_hint: str      # sha256 of the signing key's PEM public key


def _usable_public_key(key, where):
    """`key`, if the format can verify with it (an EC public key on P-256/384/521); else SignatureError."""
    _, _, ec = _crypto()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in SUPPORTED_CURVES:
        raise SignatureError(f"{where}: not a P-256, P-384 or P-521 elliptic-curve public key")
    return key


def load_public_keys(keys: str | os.PathLike | list) -> list:
    """PEM public keys from a file, a directory of .pem/.pub files, or a list of those."""
    _, serialization, _ = _crypto()
    paths: list[Path] = []
    for k in keys if isinstance(keys, (list, tuple)) else [keys]:
        p = Path(k)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix in (".pem", ".pub") and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise InvalidInputError(f"{p}: no such key file or folder")
    out = []
    for p in paths:
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except _bad_key_errors() as e:
            raise SignatureError(f"{p}: not a usable PEM public key ({e})") from None
        out.append(_usable_public_key(key, p))
    if not out:
        raise InvalidInputError(f"{keys}: no public keys (.pem or .pub files)")
    return out


def _field(obj, key, kind, where):
    v = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(v, kind):
        raise SignatureError(f"{where}: malformed signature ({key!r} missing or not a {kind.__name__})")
    return v


def verify(model: str | os.PathLike, public_keys, signature: str | os.PathLike | None = None) -> Verified:
    """Checks that `signature` (default MODEL.sig) is a valid signature, by one of `public_keys`
    (load_public_keys' argument, or keys it returned), over exactly the bytes of the file `model`.
    Returns what was verified; raises SignatureError naming what is wrong."""
    _, _, ec = _crypto()
    from cryptography.exceptions import InvalidSignature

    model = Path(model)
    sig_path = Path(signature) if signature is not None else default_signature_path(model)
    if isinstance(public_keys, (list, tuple)) and public_keys and all(hasattr(k, "public_bytes") for k in public_keys):
        keys = [_usable_public_key(k, type(k).__name__) for k in public_keys]  # loaded already
    else:
        keys = load_public_keys(public_keys)
    where = str(sig_path)
    try:
        with open(sig_path, "rb") as f:
            raw = f.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        raise SignatureError(f"{model}: no signature ({sig_path} does not exist)") from None
    except OSError as e:
        raise SignatureError(f"{where}: cannot read the signature: {e.strerror or e}") from None
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{where}: over {MAX_SIGNATURE_BYTES} bytes: not a signature")
    try:
        bundle = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested past Python's limit
        raise SignatureError(f"{where}: not a signature (bad JSON: {type(e).__name__})") from None
    if not isinstance(bundle, dict) or bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"{where}: not a Sigstore bundle v0.3 (mediaType {shown_type(bundle)})")
    env = _field(bundle, "dsseEnvelope", dict, where)
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"{where}: the envelope does not carry an in-toto statement")
    sigs = _field(env, "signatures", list, where)
    if not sigs:
        raise SignatureError(f"{where}: the envelope holds no signature")
    payload_b64, sig_b64 = _field(env, "payload", str, where), _field(sigs[0], "sig", str, where)
    try:
        payload = base64.b64decode(payload_b64, validate=True)
        raw_sig = base64.b64decode(sig_b64, validate=True)
    except ValueError:
        raise SignatureError(f"{where}: malformed signature (bad base64)") from None
    material = bundle.get("verificationMaterial")
    public_key = material.get("publicKey") if isinstance(material, dict) else None
    hint = public_key.get("hint") if isinstance(public_key, dict) else None
    signer = None
    for key in keys:
        if isinstance(hint, str) and hint and hint != _pem_hint(key):
            continue  # made by another key, says the signature: the PAE check would fail too
        try:
            key.verify(raw_sig, pae(payload), ec.ECDSA(_hash_for(key.curve)))
        except InvalidSignature:
            continue
        signer = key
        break
    if signer is None:
        raise SignatureError(f"{model}: the signature is not by a trusted key (or its statement was altered)")
    try:
        st = json.loads(payload)
    except (ValueError, RecursionError):
        raise SignatureError(f"{where}: the signed statement is not JSON") from None
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != PREDICATE_TYPE:
        raise SignatureError(f"{where}: not an OpenSSF model signing v1.0 statement")
    pred = _field(st, "predicate", dict, where)
    ser = _field(pred, "serialization", dict, where)
    if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
        raise SignatureError(f"{where}: signed with serialization {ser.get('method')!r}/{ser.get('hash_type')!r}; "
                             "pocketlm verifies single files hashed with sha256")
    res = _field(pred, "resources", list, where)
    if len(res) != 1 or not isinstance(res[0], dict) or res[0].get("name") != "." or res[0].get("algorithm") != "sha256":
        raise SignatureError(f"{where}: the statement does not describe one file")
    digest = _field(res[0], "digest", str, where)
    subjects = _field(st, "subject", list, where)
    root = hashlib.sha256(bytes.fromhex(digest)).hexdigest() if _is_hex(digest, 64) else None
    subject_digest = subjects[0].get("digest") if len(subjects) == 1 and isinstance(subjects[0], dict) else None
    if root is None or not isinstance(subject_digest, dict) or subject_digest.get("sha256") != root:
        raise SignatureError(f"{where}: the statement's subject does not match its resource")
    if not model.is_file():
        raise SignatureError(f"{model}: no such file")
    actual = file_sha256(model)
    if actual != digest:
        raise SignatureError(f"{model}: its bytes are not the signed ones (sha256 {actual[:16]}..., "
                             f"signed {digest[:16]}...)")
    return Verified(model, digest, _pem_hint(signer))


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and all(c in "0123456789abcdef" for c in s)


def shown_type(bundle) -> str:
    v = bundle.get("mediaType") if isinstance(bundle, dict) else None
    return repr(v)[:80]


# ---- load-time policy: Engine(trusted_keys=...), --trusted-keys, $POCKETLM_TRUSTED_KEYS ----
TRUSTED_KEYS_ENV = "POCKETLM_TRUSTED_KEYS"
_HEAD_BYTES = 4096  # a .plm's header (its metadata, index and data SHA-256s) and a GGUF's start


def verified_cache_path() -> Path:
    """Where verifications are remembered: $POCKETLM_CACHE/verified.json (default ~/.cache/pocketlm)."""
    return Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")).expanduser() / "verified.json"


def _identity(model: Path, sig: Path) -> list:
    """What must not change for a remembered verification to stand: the file's device, inode, size
    and modification time, the SHA-256 of its first 4 KiB (a bundle's header with its own hashes),
    and the signature file's bytes."""
    st = model.stat()
    with open(model, "rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, head, hashlib.sha256(sig.read_bytes()).hexdigest()]


def check_trusted(model: str | os.PathLike, trusted_keys, signature: str | os.PathLike | None = None) -> Verified:
    """The load-time policy: raises SignatureError unless `model` carries a valid signature by one of
    `trusted_keys` (a key file, a folder of them, or a list). A file verified before, unchanged since
    (same identity, _identity) and signed by a key still trusted, is not hashed again: its
    verification is remembered in verified_cache_path()."""
    from pocketlm.bundle.atomic import Sink, replacing

    model = Path(model)
    keys = load_public_keys(trusted_keys)
    if not model.is_file():
        raise SignatureError(f"{model}: a trusted-keys policy loads signed files only (a .plm or a .gguf "
                             "with its signature), not a folder or a name")
    sig = Path(signature) if signature is not None else default_signature_path(model)
    if not sig.is_file():
        raise SignatureError(f"{model}: unsigned ({sig} does not exist), refused by the trusted-keys policy")
    hints = {_pem_hint(k) for k in keys}
    cache_path = verified_cache_path()
    name = str(model.resolve())
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    ident = _identity(model, sig)
    hit = cache.get(name)
    if isinstance(hit, dict) and hit.get("identity") == ident and hit.get("key") in hints:
        return Verified(model, hit["sha256"], hit["key"])
    v = verify(model, keys, sig)
    if _identity(model, sig) == ident:  # unchanged while it was hashed: remember it
        cache[name] = {"identity": ident, "sha256": v.sha256, "key": v.key_hint}
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(str(cache_path)) as tmp, Sink(str(cache_path), tmp) as f:
                f.write(json.dumps(cache, sort_keys=True).encode())
        except OSError:
            pass  # a read-only cache: verify again next time
    return v


def check_trusted_any(model: str | os.PathLike, trusted_keys, signatures: list | None = None) -> Verified:
    """check_trusted with any of several signatures (a store entry's attached ones): the first that
    verifies; SignatureError naming each failure if none does. None: the file's own MODEL.sig."""
    if signatures is None:
        return check_trusted(model, trusted_keys)
    if not signatures:
        raise SignatureError(f"{model}: unsigned (no signature attached in the store), refused by the "
                             "trusted-keys policy")
    errors = []
    for sig in signatures:
        try:
            return check_trusted(model, trusted_keys, sig)
        except SignatureError as e:
            errors.append(str(e))
    raise SignatureError("no attached signature verifies with the trusted keys: " + "; ".join(errors))


def trusted_keys_from_env(trusted_keys=None):
    """The policy's keys: the argument if given, else $POCKETLM_TRUSTED_KEYS (None: no policy)."""
    if trusted_keys is not None:
        return trusted_keys
    return os.environ.get(TRUSTED_KEYS_ENV) or None
