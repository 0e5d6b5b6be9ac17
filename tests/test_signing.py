"""Signatures in the OpenSSF Model Signing format, against the reference implementation (the
`model-signing` package) both ways: what pocketlm signs, model-signing verifies, and the reverse;
a tampered byte, a truncated file, another key, an unsigned file and malformed signatures refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ec = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ec")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
model_signing = pytest.importorskip("model_signing")  # the reference (tests only)

from pocketlm.errors import InvalidInputError  # noqa: E402
from pocketlm.signing import SignatureError, default_signature_path, sign, verify  # noqa: E402


def _keys(d: Path, name: str, curve) -> tuple[Path, Path]:
    key = ec.generate_private_key(curve)
    priv, pub = d / f"{name}.pem", d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def model(tmp_path) -> Path:
    m = tmp_path / "model.plm"
    m.write_bytes(bytes(range(256)) * 5000 + b"tail")
    return m


def _theirs_verify(model: Path, pub: Path, sig: Path) -> None:
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(model, sig)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_ours_verified_by_the_reference_and_theirs_by_ours(tmp_path, model, curve):
    priv, pub = _keys(tmp_path, "k", curve)
    sig = sign(model, priv)
    assert sig == default_signature_path(model) == tmp_path / "model.plm.sig"
    _theirs_verify(model, pub, sig)
    v = verify(model, pub)
    assert v.sha256 == __import__("hashlib").sha256(model.read_bytes()).hexdigest()
    theirs = tmp_path / "theirs.sig"
    model_signing.signing.Config().use_elliptic_key_signer(private_key=priv).sign(model, theirs)
    assert verify(model, pub, theirs).sha256 == v.sha256
    bundle = json.loads(sig.read_text())  # the documented shape
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    statement = json.loads(__import__("base64").b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["predicate"]["resources"] == [{"name": ".", "algorithm": "sha256", "digest": v.sha256}]


def test_tampered_truncated_other_key_unsigned_are_refused(tmp_path, model):
    priv, pub = _keys(tmp_path, "k", ec.SECP256R1())
    _, other = _keys(tmp_path, "other", ec.SECP256R1())
    sig = sign(model, priv)
    with pytest.raises(SignatureError, match="not by a trusted key"):
        verify(model, other)
    data = model.read_bytes()
    for changed in (data[:100] + bytes([data[100] ^ 1]) + data[101:], data[:-1], data + b"\0"):
        model.write_bytes(changed)
        with pytest.raises(SignatureError, match="not the signed ones"):
            verify(model, pub)
        with pytest.raises(ValueError):  # the reference agrees
            _theirs_verify(model, pub, sig)
    model.write_bytes(data)
    verify(model, pub)
    sig.unlink()
    with pytest.raises(SignatureError, match="no signature"):
        verify(model, pub)


def _resign(sig: Path, priv: Path, change) -> None:
    """The signature at `sig` with its statement changed by `change(statement)` and signed again with
    the trusted key: the envelope is valid, only the statement's content is wrong."""
    import base64

    from pocketlm.signing import pae

    bundle = json.loads(sig.read_text())
    st = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    change(st)
    payload = json.dumps(st).encode()
    key = serialization.load_pem_private_key(priv.read_bytes(), None)
    from cryptography.hazmat.primitives import hashes

    raw = key.sign(pae(payload), ec.ECDSA(hashes.SHA256()))
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    bundle["dsseEnvelope"]["signatures"] = [{"sig": base64.b64encode(raw).decode(), "keyid": ""}]
    sig.write_text(json.dumps(bundle))


def test_keys_folder_and_malformed_signatures(tmp_path, model):
    keys = tmp_path / "trusted"
    keys.mkdir()
    _keys(keys, "a", ec.SECP256R1())
    _keys(keys, "b", ec.SECP384R1())
    for private in ("a.pem", "b.pem"):  # private keys out of the trusted folder: its public keys only
        (keys / private).rename(tmp_path / private)
    sig = sign(model, tmp_path / "b.pem")
    assert verify(model, keys).sha256
    good = json.loads(sig.read_text())
    env = good["dsseEnvelope"]
    cases = {
        b"{": "bad JSON",
        b"[" * 200_000: "bad JSON",                          # nested past Python's recursion limit
        b"\xff\xfe\x00": "bad JSON",
        json.dumps([1, 2]).encode(): "not a Sigstore bundle",
        json.dumps({**good, "mediaType": "x"}).encode(): "not a Sigstore bundle",
        json.dumps({**good, "dsseEnvelope": [1]}).encode(): "dsseEnvelope",
        json.dumps({**good, "dsseEnvelope": {**env, "payloadType": "text/plain"}}).encode(): "in-toto",
        json.dumps({**good, "dsseEnvelope": {**env, "signatures": []}}).encode(): "no signature",
        json.dumps({**good, "dsseEnvelope": {**env, "signatures": [1]}}).encode(): "'sig'",
        json.dumps({**good, "dsseEnvelope": {**env, "payload": "!!"}}).encode(): "bad base64",
        json.dumps({**good, "verificationMaterial": {"publicKey": {"hint": "0" * 64}}}).encode(): "not by a trusted key",
        b" " * (2 << 20): "not a signature",
    }
    for raw, message in cases.items():
        sig.write_bytes(raw)
        with pytest.raises(SignatureError, match=message):
            verify(model, keys)
    # statements signed by the trusted key that do not describe exactly this one file
    priv = tmp_path / "a.pem"
    wrong = {
        "two resources": lambda st: st["predicate"]["resources"].append(dict(st["predicate"]["resources"][0], name="x")),
        "other name": lambda st: st["predicate"]["resources"][0].update(name="model.plm"),
        "bad root": lambda st: st["subject"][0]["digest"].update(sha256="0" * 64),
        "two subjects": lambda st: st["subject"].append(st["subject"][0]),
        "shards": lambda st: st["predicate"]["serialization"].update(method="shards"),
        "digest not hex": lambda st: st["predicate"]["resources"][0].update(digest="zz" * 32),
        "other type": lambda st: st.update(predicateType="https://model_signing/Digests/v0.1"),
    }
    for what, change in wrong.items():
        sign(model, tmp_path / "b.pem")
        _resign(sig, priv, change)
        with pytest.raises(SignatureError):
            verify(model, keys)
    # a key the format cannot use, in the trusted folder: refused by name, not a traceback
    k1 = ec.generate_private_key(ec.SECP256K1())
    (keys / "k1.pub").write_bytes(k1.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SignatureError, match="k1.pub: not a P-256"):
        verify(model, keys)
    with pytest.raises(InvalidInputError, match="would overwrite"):
        sign(model, priv, model)
    with pytest.raises(InvalidInputError, match="would overwrite"):
        sign(model, priv, priv)


def test_cli_sign_and_verify(tmp_path, model):
    priv, pub = _keys(tmp_path, "k", ec.SECP256R1())

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                              timeout=120)

    r = cli("sign", model, "--key", priv)
    assert r.returncode == 0, r.stderr
    assert cli("verify", model, "--key", pub).returncode == 0
    r = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(model), "--signature",
                        str(default_signature_path(model)), "--public_key", str(pub)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    keys = tmp_path / "keys"
    keys.mkdir()
    _, other = _keys(keys, "other", ec.SECP256R1())
    (keys / "other.pem").unlink()
    assert cli("verify", model, "--key", other, "--key", pub).returncode == 0  # any of the given keys
    assert cli("verify", model, "--key", keys).returncode == 1                 # not by a key in the folder
    r = cli("run", model, "--trusted-keys", keys, "-p", "x")  # the policy refuses before reading the file
    assert r.returncode == 1 and "not by a trusted key" in r.stderr and "Traceback" not in r.stderr
    model.write_bytes(model.read_bytes()[:-1])
    r = cli("verify", model, "--key", pub)
    assert r.returncode == 1 and "not the signed ones" in r.stderr
    default_signature_path(model).write_bytes(b"[" * 100_000)
    r = cli("verify", model, "--key", pub)  # one line, no traceback
    assert r.returncode == 1 and r.stderr.startswith("pocketlm: error:") and "Traceback" not in r.stderr


def test_load_time_policy(tmp_path, monkeypatch):
    """Engine(trusted_keys=...) and $POCKETLM_TRUSTED_KEYS: a signed bundle loads; an unsigned, a
    tampered or another key's one is refused before anything is read; a file verified once is not
    hashed again until it changes."""
    from pocketlm import signing
    from pocketlm.engine import Engine
    from testutil import make_f32_bundle

    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    model = make_f32_bundle(tmp_path, "llama", seed=3)
    priv, pub = _keys(tmp_path, "k", ec.SECP256R1())
    with pytest.raises(SignatureError, match="unsigned"):
        Engine(model, threads=1, max_context=32, trusted_keys=pub)
    sign(model, priv)
    hashed = []
    real = signing.file_sha256
    monkeypatch.setattr(signing, "file_sha256", lambda p: hashed.append(p) or real(p))
    e = Engine(model, threads=1, max_context=32, trusted_keys=pub)
    assert e.signature.sha256 == real(model) and len(hashed) == 1
    Engine(model, threads=1, max_context=32, trusted_keys=pub)  # remembered: not hashed again
    assert len(hashed) == 1
    monkeypatch.setenv("POCKETLM_TRUSTED_KEYS", str(pub))  # the environment's policy
    assert Engine(model, threads=1, max_context=32).signature is not None
    _, other = _keys(tmp_path, "o", ec.SECP256R1())
    with pytest.raises(SignatureError, match="not by a trusted key"):
        Engine(model, threads=1, max_context=32, trusted_keys=other)
    data = bytearray(model.read_bytes())
    data[-1] ^= 1  # a tampered byte: the identity changes, it is hashed again and refused
    model.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="not the signed ones"):
        Engine(model, threads=1, max_context=32)
    monkeypatch.delenv("POCKETLM_TRUSTED_KEYS")
    from pocketlm.errors import PocketLMError

    with pytest.raises(PocketLMError):  # no policy: the damaged bundle meets the loader's own checks
        Engine(model, threads=1, max_context=32, verify=True)
