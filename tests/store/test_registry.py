"""Push and pull through a real registry on 127.0.0.1 (Debian's docker-registry, the CNCF distribution
registry), checked against hashlib over the source file, the registry's own storage, the official
`model-signing` package (for the signature that travels attached) and oras-py (which must pull what
pocketlm pushed, as `oras pull` does)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registries import CuttingProxy, Registry, TokenService, htpasswd, need_registry, self_signed


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _keys(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / "priv.pem", folder / "pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory) -> Path:
    """A tiny llama with a wide vocabulary: ~9 MB, so a download can be cut in its middle."""
    from testutil import make_f32_bundle

    return make_f32_bundle(tmp_path_factory.mktemp("big"), "llama", seed=7, vocab_size=8192, hidden_size=128,
                           intermediate_size=256)


def test_push_pull_round_trip_with_signature(store, bundle, registry, tmp_path):
    from pocketlm import Engine
    from pocketlm.signing import sign
    from pocketlm.store import pull, push

    priv, pub = _keys(tmp_path)
    sign(bundle, priv)
    ref = f"{registry.host}/models/tiny:f32"
    store.add_model(ref, bundle, params={"temperature": 0.0}, system="Be brief.",
                    signature=(bundle.parent / (bundle.name + ".sig")).read_bytes())
    pushed = push(ref, plain_http=True)
    assert pushed.sent == pushed.size and len(pushed.signatures) == 1
    # the registry holds the bundle's exact bytes under the file's own SHA-256
    assert registry.blob_file(_sha256(bundle)).read_bytes() == bundle.read_bytes()
    assert push(ref, plain_http=True).sent == 0  # everything there already: nothing sent

    store.remove(ref)
    assert not any((store.root / "blobs" / "sha256").iterdir())  # gc took every blob
    pulled = pull(ref, plain_http=True, trusted_keys=pub)
    assert pulled.digest == pushed.digest and pulled.signatures == pushed.signatures
    entry = store.entry(ref)
    assert _sha256(entry.path) == _sha256(bundle) and entry.system == "Be brief."
    # the attached signature verifies with the reference implementation against the pulled bundle
    import model_signing

    sig = entry.signatures[0]
    model = tmp_path / "pulled" / bundle.name
    model.parent.mkdir()
    model.write_bytes(entry.path.read_bytes())
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(model, sig)
    # and it runs from the store as from the file
    a = Engine(ref, threads=1, max_context=64, trusted_keys=pub)
    b = Engine(bundle, threads=1, max_context=64)
    prompt = [{"role": "user", "content": "hello"}]
    assert a.apply_chat_template(prompt) == b.apply_chat_template([{"role": "system", "content": "Be brief."}] + prompt)
    assert "".join(a.generate("a b c", max_tokens=8, temperature=0)) == \
        "".join(b.generate("a b c", max_tokens=8, temperature=0))


def test_tampered_registry_blob_is_refused_and_nothing_named(store, bundle, registry):
    from pocketlm.store import DigestMismatchError, NotInStoreError, pull, push

    ref = f"{registry.host}/models/tampered:v1"
    store.add_model(ref, bundle)
    push(ref, plain_http=True)
    store.remove(ref)
    blob = registry.blob_file(_sha256(bundle))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    try:
        with pytest.raises(DigestMismatchError, match="corrupt or tampered"):
            pull(ref, plain_http=True)
        with pytest.raises(NotInStoreError):
            store.entry(ref)
        assert not store.has_blob(_sha256(bundle))
        assert not any(p.name.startswith(_sha256(bundle)[7:]) and p.stat().st_size
                       for p in (store.root / "ingest").iterdir())  # the bad bytes were not kept to resume from
    finally:
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))


def test_unsigned_pull_refused_under_policy(store, bundle, registry, tmp_path):
    from pocketlm.signing import SignatureError
    from pocketlm.store import NotInStoreError, pull, push

    _, pub = _keys(tmp_path)
    ref = f"{registry.host}/models/unsigned:v1"
    store.add_model(ref, bundle)
    push(ref, plain_http=True)
    store.remove(ref)
    with pytest.raises(SignatureError, match="unsigned"):
        pull(ref, plain_http=True, trusted_keys=pub)
    with pytest.raises(NotInStoreError):
        store.entry(ref)


def test_interrupted_pull_resumes(store, big_bundle, registry):
    """A connection cut in the middle of the bundle: the pull continues from the bytes it has with a
    Range request (the registry answers 206), and the result is the file's exact bytes."""
    from pocketlm.store import pull, push

    ref = f"{registry.host}/models/big:v1"
    store.add_model(ref, big_bundle)
    push(ref, plain_http=True)
    store.remove(ref)
    size = big_bundle.stat().st_size
    proxy = CuttingProxy(registry.port, cut=size // 2)
    try:
        r = pull(f"127.0.0.1:{proxy.port}/models/big:v1", plain_http=True)
    finally:
        proxy.stop()
    assert proxy.cuts == 1
    assert 1 << 20 < r.resumed < size
    assert _sha256(store.entry(f"127.0.0.1:{proxy.port}/models/big:v1").path) == _sha256(big_bundle)


def test_pull_continues_a_partial_left_by_a_killed_process(store, big_bundle, registry):
    from pocketlm.store import pull, push

    ref = f"{registry.host}/models/partial:v1"
    store.add_model(ref, big_bundle)
    push(ref, plain_http=True)
    store.remove(ref)
    digest = _sha256(big_bundle)
    data = big_bundle.read_bytes()
    (store.root / "ingest" / digest[7:]).write_bytes(data[:3_000_000])  # what a killed pull left
    r = pull(ref, plain_http=True)
    assert r.resumed == 3_000_000
    assert store.entry(ref).path.read_bytes() == data


def test_basic_auth_over_https(store, bundle, tmp_path, monkeypatch):
    need_registry()
    from pocketlm.store import RegistryError, pull, push

    cert, key = self_signed(tmp_path / "tls")
    reg = Registry(tmp_path / "reg", auth={"htpasswd": {"realm": "pocketlm-test",
                                                         "path": htpasswd(tmp_path / "htpasswd", "alice", "s3cret")}},
                   tls=(cert, key))
    try:
        ref = f"{reg.host}/team/tiny:v1"
        store.add_model(ref, bundle)
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nodocker"))
        with pytest.raises(RegistryError, match="certificate|TLS"):  # a private CA is not trusted by default
            push(ref)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with pytest.raises(RegistryError, match="user name and password"):
            push(ref)
        monkeypatch.setenv("POCKETLM_REGISTRY_USERNAME", "alice")
        monkeypatch.setenv("POCKETLM_REGISTRY_PASSWORD", "wrong")
        with pytest.raises(RegistryError, match="401"):
            push(ref)
        monkeypatch.delenv("POCKETLM_REGISTRY_USERNAME")
        monkeypatch.delenv("POCKETLM_REGISTRY_PASSWORD")
        docker = tmp_path / "docker"  # the credentials as `docker login` / `oras login` store them
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps(
            {"auths": {reg.host: {"auth": __import__("base64").b64encode(b"alice:s3cret").decode()}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        assert push(ref).sent > 0
        store.remove(ref)
        assert pull(ref).size > 0
        assert _sha256(store.entry(ref).path) == _sha256(bundle)
    finally:
        reg.stop()


def test_bearer_token_auth(store, bundle, tmp_path, monkeypatch):
    need_registry()
    from pocketlm.store import RegistryError, pull, push

    tokens = TokenService(tmp_path / "tok", "bob", "pw")
    reg = Registry(tmp_path / "reg", auth=tokens.auth_config())
    try:
        ref = f"{reg.host}/team/tiny:v2"
        store.add_model(ref, bundle)
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nodocker"))
        with pytest.raises(RegistryError, match="token service"):
            push(ref, plain_http=True)
        monkeypatch.setenv("POCKETLM_REGISTRY_USERNAME", "bob")
        monkeypatch.setenv("POCKETLM_REGISTRY_PASSWORD", "pw")
        assert push(ref, plain_http=True).sent > 0
        store.remove(ref)
        pull(ref, plain_http=True)
        assert _sha256(store.entry(ref).path) == _sha256(bundle)
        assert tokens.requests >= 2
    finally:
        reg.stop()
        tokens.stop()


def test_oras_pulls_what_pocketlm_pushed(store, bundle, registry, tmp_path):
    """oras-py (the ORAS project's Python client) pulls the model as files named by their titles."""
    oras_client = pytest.importorskip("oras.client", reason="oras is a test dependency (pyproject [test])")
    ref = f"{registry.host}/models/for-oras:v1"
    store.add_model(ref, bundle, system="hi", license_text="Apache-2.0")
    from pocketlm.store import push

    push(ref, plain_http=True)
    client = oras_client.OrasClient(hostname=registry.host, insecure=True)
    files = client.pull(target=ref, outdir=str(tmp_path / "oras"))
    names = sorted(Path(f).name for f in files)
    assert names == sorted([bundle.name, "system.txt", "LICENSE"])
    assert (tmp_path / "oras" / bundle.name).read_bytes() == bundle.read_bytes()
    manifest = client.get_manifest(ref)
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"


def test_oci_layout_round_trip(store, bundle, tmp_path):
    """oci:DIR:TAG: an OCI image layout folder (air-gapped transfer), with the signature attached."""
    from pocketlm.signing import sign
    from pocketlm.store import pull, push

    priv, pub = _keys(tmp_path)
    sign(bundle, priv)
    store.add_model("tiny:v1", bundle, signature=(bundle.parent / (bundle.name + ".sig")).read_bytes())
    out = tmp_path / "usb" / "models"
    push("tiny:v1", f"oci:{out}:v1")
    layout = json.loads((out / "index.json").read_text())
    tagged = [m for m in layout["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "v1"]
    assert len(tagged) == 1 and (out / "oci-layout").is_file()
    assert (out / "blobs" / "sha256" / _sha256(bundle)[7:]).read_bytes() == bundle.read_bytes()
    store.remove("tiny:v1")
    r = pull(f"oci:{out}:v1", name="tiny:copied", trusted_keys=pub)
    assert len(r.signatures) == 1 and _sha256(store.entry("tiny:copied").path) == _sha256(bundle)


def test_cli_pull_push_list_show_rm(store, bundle, registry, tmp_path):
    from testutil import child_env

    env = child_env()

    def cli(*args, ok=True):
        p = subprocess.run([sys.executable, "-m", "pocketlm", *args], capture_output=True, text=True, env=env,
                           timeout=120)
        assert (p.returncode == 0) == ok, p.stderr
        return p

    plmfile = tmp_path / "Plmfile"
    plmfile.write_text(f'FROM {bundle}\nPARAMETER temperature 0.3\nPARAMETER num_ctx 96\nPARAMETER stop "###"\n'
                       'SYSTEM """You are\na test."""\nLICENSE Apache-2.0\n')
    cli("create", "tiny-pkg", "-f", str(plmfile))
    shown = json.loads(cli("show", "tiny-pkg", "--json").stdout)
    assert shown["params"] == {"temperature": 0.3, "stop": ["###"]} and shown["context"] == 96
    assert shown["system"] == "You are\na test." and shown["config"]["descriptor"]["licenses"] == ["Apache-2.0"]
    cli("tag", "tiny-pkg", f"{registry.host}/cli/tiny-pkg:1")
    assert "pushed" in cli("push", f"{registry.host}/cli/tiny-pkg:1", "--plain-http").stdout
    listed = cli("list").stdout
    assert "tiny-pkg:latest" in listed and f"{registry.host}/cli/tiny-pkg:1" in listed
    cli("rm", "tiny-pkg", f"{registry.host}/cli/tiny-pkg:1")
    assert "tiny-pkg" not in cli("list").stdout
    err = cli("run", "tiny-pkg", "-p", "x", ok=False).stderr
    assert err.startswith("pocketlm: error:") and "nor a model in the store" in err
    cli("pull", f"{registry.host}/cli/tiny-pkg:1", "--plain-http")
    out = cli("run", f"{registry.host}/cli/tiny-pkg:1", "-p", "a b", "-n", "4", "--temp", "0").stdout
    from pocketlm import Engine

    assert out == "a b" + "".join(Engine(bundle, threads=1, max_context=96).generate("a b", max_tokens=4,
                                                                                     temperature=0)) + "\n"
    bad = cli("pull", f"{registry.host}/cli/missing:1", "--plain-http", ok=False).stderr
    assert "pocketlm: error:" in bad and "Traceback" not in bad


def test_pull_by_tag_and_digest_is_named_by_the_tag(store, bundle, registry):
    from pocketlm.store import pull, push

    ref = f"{registry.host}/models/pinned:v1"
    _, digest = store.add_model(ref, bundle)
    push(ref, plain_http=True)
    store.remove(ref)
    r = pull(f"{ref}@{digest}", plain_http=True)
    assert r.ref == ref and store.entry(ref).digest == digest
    assert store.entry(f"{registry.host}/models/pinned@{digest}").digest == digest
    from pocketlm.store import NotInStoreError

    with pytest.raises(NotInStoreError):  # a digest names an entry only within its own repository
        store.entry(f"{registry.host}/models/other@{digest}")


def test_a_broken_referrer_does_not_stop_a_pull(store, bundle, registry, tmp_path):
    """The fallback referrers tag lists a signature whose manifest is gone: the model still comes
    (without it), and a trusted-keys policy then refuses it as unsigned."""
    from pocketlm.signing import SignatureError, sign
    from pocketlm.store import Registry as Client, pull, push

    priv, pub = _keys(tmp_path)
    sign(bundle, priv)
    ref = f"{registry.host}/models/broken-sig:v1"
    _, digest = store.add_model(ref, bundle, signature=(bundle.parent / (bundle.name + ".sig")).read_bytes())
    (sig_digest,) = push(ref, plain_http=True).signatures
    store.remove(ref)
    c = Client(registry.host, plain_http=True)
    resp = c.request("DELETE", f"/v2/models/broken-sig/manifests/{sig_digest}", "repository:models/broken-sig:delete",
                     ok=(202,))
    resp.read()
    assert pull(ref, plain_http=True).signatures == []
    store.remove(ref)
    with pytest.raises(SignatureError, match="unsigned"):
        pull(ref, plain_http=True, trusted_keys=pub)

