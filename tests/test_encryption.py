"""Encryption at rest (pocketlm.encryption): a sealed bundle gives the plain bundle's answers with its
key and nothing without it; every changed, moved, dropped or appended byte is refused (AES-GCM's
tags, checked against the `cryptography` package's own AESGCM decrypting the file independently);
the key providers (environment, file, the OS keyring through `keyring`) and the CLI."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

pytest.importorskip("cryptography")

from pocketlm.encryption import (MAGIC, TAG_BYTES, DecryptionError, encrypt, read_header)  # noqa: E402
from pocketlm.errors import PocketLMError  # noqa: E402

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from testutil import make_f32_bundle

    return make_f32_bundle(tmp_path_factory.mktemp("enc"), "llama", seed=11)


def _text(model, **kw) -> str:
    from pocketlm import Engine

    return "".join(Engine(model, threads=1, max_context=64, **kw).generate("a b c", max_tokens=6, temperature=0))


def test_sealed_bundle_decrypts_to_the_plain_bytes_and_runs(bundle, tmp_path, monkeypatch):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    monkeypatch.setenv("MODEL_KEY", KEY.hex())
    sealed = encrypt(bundle, tmp_path / "m.plm.enc", "env:MODEL_KEY", chunk_bytes=4096)
    data = sealed.read_bytes()
    assert data[:8] == MAGIC and bundle.read_bytes()[:64] not in data  # no plaintext in the file
    # independent decryption with the reference AESGCM, by the format's definition
    h, head, offset = read_header(sealed)
    plain, i, pos = b"", 0, offset
    n = -(-h["plain_bytes"] // h["chunk_bytes"])
    while pos < len(data):
        size = min(h["chunk_bytes"], h["plain_bytes"] - i * h["chunk_bytes"]) + TAG_BYTES
        aad = MAGIC + head + struct.pack(">IB", i, 1 if i == n - 1 else 0)
        plain += AESGCM(KEY).decrypt(bytes.fromhex(h["nonce_prefix"]) + struct.pack(">I", i), data[pos:pos + size], aad)
        pos += size
        i += 1
    assert plain == bundle.read_bytes() and i == n > 2
    assert _text(sealed, decryption_key="env:MODEL_KEY") == _text(bundle)
    monkeypatch.setenv("POCKETLM_DECRYPTION_KEY", "env:MODEL_KEY")  # the environment's key
    assert _text(sealed) == _text(bundle)


def test_changes_and_wrong_keys_are_refused(bundle, tmp_path):
    from pocketlm import Engine

    sealed = encrypt(bundle, tmp_path / "m.enc", KEY, chunk_bytes=4096)
    data = sealed.read_bytes()
    _, head, offset = read_header(sealed)
    chunk = 4096 + TAG_BYTES
    with pytest.raises(DecryptionError, match="encrypted: give its key"):
        Engine(sealed, threads=1, max_context=64)
    with pytest.raises(DecryptionError, match="another key"):
        Engine(sealed, threads=1, max_context=64, decryption_key=bytes(32))
    cases = {
        "a flipped byte in a chunk": data[:offset + 100] + bytes([data[offset + 100] ^ 1]) + data[offset + 101:],
        "a flipped tag byte": data[:offset + chunk - 1] + bytes([data[offset + chunk - 1] ^ 1]) + data[offset + chunk:],
        "two chunks swapped": data[:offset] + data[offset + chunk:offset + 2 * chunk] + data[offset:offset + chunk] +
        data[offset + 2 * chunk:],
        "cut after a chunk": data[:offset + chunk],
        "a byte appended": data + b"\0",
        "the header edited": data.replace(b'"chunk_bytes":4096', b'"chunk_bytes":4097'),
    }
    for name, bad in cases.items():
        p = tmp_path / "bad.enc"
        p.write_bytes(bad)
        with pytest.raises(DecryptionError):
            Engine(p, threads=1, max_context=64, decryption_key=KEY)


def test_key_providers(bundle, tmp_path, monkeypatch):
    from pocketlm.encryption import key_from_provider, new_key_file

    path = new_key_file(tmp_path / "k")
    assert oct(path.stat().st_mode)[-3:] == "600" and len(key_from_provider(f"file:{path}")) == 32
    with pytest.raises(PocketLMError, match="never overwritten"):
        new_key_file(path)
    (tmp_path / "raw").write_bytes(KEY)
    assert key_from_provider(f"file:{tmp_path / 'raw'}") == KEY
    import base64

    monkeypatch.setenv("K64", base64.b64encode(KEY).decode())
    assert key_from_provider("env:K64") == KEY
    for bad in ("env:NOPE", "nothing", "ftp:x", "keyring:noslash"):
        with pytest.raises(PocketLMError):
            key_from_provider(bad)
    pytest.importorskip("keyrings.alt")
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyrings.alt.file.PlaintextKeyring")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    import keyring
    import keyring.core

    keyring.core.set_keyring(keyring.core.load_keyring("keyrings.alt.file.PlaintextKeyring"))
    keyring.set_password("pocketlm-test", "model", KEY.hex())
    assert key_from_provider("keyring:pocketlm-test/model") == KEY
    with pytest.raises(DecryptionError, match="no such entry"):
        key_from_provider("keyring:pocketlm-test/other")


def test_cli_encrypt_run_and_sign(bundle, tmp_path):
    from testutil import child_env

    env = child_env()

    def cli(*args, ok=True):
        p = subprocess.run([sys.executable, "-m", "pocketlm", *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert (p.returncode == 0) == ok, p.stderr
        return p

    cli("encrypt", str(bundle), "-o", str(tmp_path / "m.enc"), "--new-key", str(tmp_path / "key"))
    out = cli("run", str(tmp_path / "m.enc"), "-p", "a b c", "-n", "6", "--temp", "0", "-c", "64",
              "--decryption-key", f"file:{tmp_path / 'key'}").stdout
    assert out == "a b c" + _text(bundle) + "\n"
    err = cli("run", str(tmp_path / "m.enc"), "-p", "x", ok=False).stderr
    assert err.startswith("pocketlm: error:") and "encrypted" in err and "Traceback" not in err
    # the sealed file is what gets signed and verified before it is opened
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "priv.pem").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (tmp_path / "pub.pem").write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    cli("sign", str(tmp_path / "m.enc"), "--key", str(tmp_path / "priv.pem"))
    out = cli("run", str(tmp_path / "m.enc"), "-p", "a b c", "-n", "6", "--temp", "0", "-c", "64", "--trusted-keys",
              str(tmp_path / "pub.pem"), "--decryption-key", f"file:{tmp_path / 'key'}").stdout
    assert out == "a b c" + _text(bundle) + "\n"
    assert not os.path.exists(tmp_path / "m.plm")


def test_review_edges(bundle, tmp_path, monkeypatch):
    """A passphrase is not a key, a key put where a provider goes is never echoed, an explicit key
    refuses a plain bundle swapped in, a FIFO does not hang the check, and the calibration cache of a
    sealed bundle is not named by its plaintext."""
    from pocketlm import Engine
    from pocketlm.calibration import bundle_key, cache_dir
    from pocketlm.encryption import is_encrypted, key_from_provider

    monkeypatch.setenv("PASS", "my-company-model-password-2026!!")  # 32 printable characters
    with pytest.raises(PocketLMError, match="not a 256-bit key"):
        key_from_provider("env:PASS")
    with pytest.raises(PocketLMError) as e:
        key_from_provider(KEY.hex())
    assert KEY.hex() not in str(e.value)
    with pytest.raises(DecryptionError, match="not encrypted"):
        Engine(bundle, threads=1, max_context=64, decryption_key=KEY)
    fifo = tmp_path / "fifo.plm"
    os.mkfifo(fifo)
    assert not is_encrypted(fifo)
    monkeypatch.setenv("POCKETLM_CALIBRATION_DIR", str(tmp_path / "calib"))
    sealed = encrypt(bundle, tmp_path / "m.enc", KEY)
    Engine(sealed, threads=1, max_context=64, decryption_key=KEY, activations="auto")
    names = {p.stem for p in cache_dir().glob("*.json")}
    assert bundle_key(bundle) not in names
