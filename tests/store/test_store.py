"""The local store, references, manifests and Plmfiles, against what the specs say (Docker's reference
grammar, the OCI image layout and manifest, ModelPack's config) and against the same model run from
its file."""

from __future__ import annotations

import hashlib
import json

import pytest

from pocketlm.errors import InvalidInputError, PocketLMError


@pytest.mark.parametrize("text, parts", [
    ("mymodel", (None, "mymodel", "latest", None)),
    ("myorg/qwen2.5-0.5b:int4", (None, "myorg/qwen2.5-0.5b", "int4", None)),
    ("localhost:5000/ns/m", ("localhost:5000", "ns/m", "latest", None)),
    ("ghcr.io/a/b/c:v1.2_x", ("ghcr.io", "a/b/c", "v1.2_x", None)),
    ("localhost/m@sha256:" + "a" * 64, ("localhost", "m", None, "sha256:" + "a" * 64)),
    ("reg.example.com:443/m:t@sha256:" + "0" * 64, ("reg.example.com:443", "m", "t", "sha256:" + "0" * 64)),
    ("[::1]:5000/m:t", ("[::1]:5000", "m", "t", None)),
])
def test_references(text, parts):
    from pocketlm.store import parse_reference

    r = parse_reference(text)
    assert (r.registry, r.name, r.tag, r.digest) == parts
    assert parse_reference(str(r)) == r


@pytest.mark.parametrize("text", ["", "UPPER", "a//b", "a:", "a:-x", "a@sha256:abc", "-a", "a/", "a:" + "t" * 129,
                                  "host:99x/m", "a b", "../m", "m:t:u"])
def test_bad_references(text):
    from pocketlm.store import parse_reference

    with pytest.raises(InvalidInputError):
        parse_reference(text)


def test_store_is_an_oci_layout_and_gc_keeps_shared_blobs(store, bundle):
    ref1, d1 = store.add_model("a:v1", bundle, system="one")
    ref2, d2 = store.add_model("b:v1", bundle, system="two")
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((store.root / "index.json").read_text())
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]} == {"a:v1", "b:v1"}
    for m in index["manifests"]:  # every blob is named by the SHA-256 of its bytes
        blob = store.root / "blobs" / "sha256" / m["digest"][7:]
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == m["digest"][7:] == \
            (d1 if m["annotations"]["org.opencontainers.image.ref.name"] == "a:v1" else d2)[7:]
    weight = "sha256:" + hashlib.sha256(bundle.read_bytes()).hexdigest()
    store.tag("a:v1", "c")
    store.remove("a:v1")
    assert store.entry("c:latest").system == "one" and store.has_blob(weight)
    store.remove("c")
    assert store.has_blob(weight)  # b still uses the bundle
    store.remove("b:v1")
    assert not any((store.root / "blobs" / "sha256").iterdir())


def test_model_config_is_modelpack(store, bundle):
    from pocketlm.bundle import read_bundle

    _, digest = store.add_model("m", bundle, license_text="MIT", context=128)
    m = json.loads(store.read_blob(digest, 1 << 20))
    assert m["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert [layer["mediaType"] for layer in m["layers"]] == ["application/vnd.cncf.model.weight.v1.raw",
                                                             "application/vnd.cncf.model.doc.v1.raw"]
    assert m["layers"][0]["annotations"]["org.opencontainers.image.title"] == bundle.name
    cfg = json.loads(store.read_blob(m["config"]["digest"], 1 << 20))
    assert set(cfg) == {"descriptor", "config", "modelfs"}  # ModelPack's schema allows no other keys
    assert cfg["modelfs"] == {"type": "layers", "diff_ids": [x["digest"] for x in m["layers"]]}
    n = sum(int(__import__("math").prod(t.shape)) for t in read_bundle(bundle).tensors)
    assert cfg["config"]["paramSize"] in (f"{n / 1e3:.1f}k".replace(".0", ""), f"{n / 1e6:.1f}m".replace(".0", ""))
    assert cfg["descriptor"]["licenses"] == ["MIT"]


def test_blob_changed_on_disk_is_refused(store, bundle):
    from pocketlm.store import DigestMismatchError

    _, digest = store.add_model("m", bundle)
    m = json.loads(store.read_blob(digest, 1 << 20))
    path = store.blob_path(m["config"]["digest"])
    path.chmod(0o644)
    path.write_bytes(path.read_bytes().replace(b"layers", b"Layers"))
    with pytest.raises(DigestMismatchError):
        store.entry("m")


@pytest.mark.parametrize("doc, match", [
    (b"[]", "object"), (b"{", "not JSON"), (b'{"schemaVersion": 1}', "schemaVersion"),
    (b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:00", "size": 1}, "layers": []}', "digest"),
    (b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:' + b"0" * 64 + b'", "size": -1}, '
     b'"layers": []}', "size"),
    (b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:' + b"0" * 64 + b'", "size": 1}, '
     b'"layers": [{"mediaType": "x", "digest": "sha256:' + b"0" * 64 + b'", "size": 1, '
     b'"annotations": {"org.opencontainers.image.title": "../../etc/passwd"}}]}', "plain file name"),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}', "not an image manifest"),
    (b"[" * 100000 + b"]" * 100000, "JSON|object"),
])
def test_hostile_manifests(doc, match):
    from pocketlm.store.manifest import ManifestError, parse_manifest

    with pytest.raises(ManifestError, match=match):
        parse_manifest(doc)


def test_plmfile_parsing():
    from pocketlm.store.plmfile import PlmfileError, parse_plmfile

    p = parse_plmfile('# a comment\nfrom ./m.gguf\nQUANT int4\nPARAMETER temperature 0.5\nPARAMETER repeat_penalty 1.1\n'
                      'PARAMETER num_predict 64\nPARAMETER stop "<|end|>"\nPARAMETER stop \\n\nPARAMETER num_ctx 2048\n'
                      'SYSTEM """\nline one\n  line two\n"""\nTEMPLATE """{{ messages[0].content }}"""\n')
    assert p.source == "./m.gguf" and p.quant == "int4" and p.context == 2048
    assert p.params == {"temperature": 0.5, "repetition_penalty": 1.1, "max_tokens": 64, "stop": ["<|end|>", "\\n"]}
    assert p.system == "line one\n  line two" and p.template == "{{ messages[0].content }}"
    for bad, match in [("PARAMETER temperature 1", "FROM"), ("FROM a\nFROM b", "second FROM"),
                       ("FROM a\nADAPTER x", "unknown instruction"), ("FROM a\nPARAMETER top_p 2", "top_p"),
                       ("FROM a\nPARAMETER nope 1", "unknown parameter"), ("FROM a\nSYSTEM \"\"\"x", "never closes"),
                       ("FROM a\nQUANT q3", "QUANT"), ("FROM a\nPARAMETER top_k x", "integer")]:
        with pytest.raises(PlmfileError, match=match):
            parse_plmfile(bad)


def test_create_from_a_store_entry_inherits_and_overrides(store, bundle, tmp_path):
    from pocketlm.store.plmfile import create

    (tmp_path / "base.Plmfile").write_text(f"FROM {bundle}\nPARAMETER temperature 0.1\nSYSTEM base prompt\nLICENSE MIT\n")
    create("base", tmp_path / "base.Plmfile", store)
    (tmp_path / "child.Plmfile").write_text("FROM base\nPARAMETER top_k 5\nSYSTEM child prompt\n")
    create("child:v2", tmp_path / "child.Plmfile", store)
    e = store.entry("child:v2")
    assert e.params == {"temperature": 0.1, "top_k": 5} and e.system == "child prompt" and e.license == "MIT"
    assert e.path == store.entry("base").path  # the same bundle blob, stored once
    (tmp_path / "bad.Plmfile").write_text("FROM base\nTEMPLATE \"\"\"{% for %}\"\"\"\n")
    with pytest.raises(PocketLMError):
        create("bad", tmp_path / "bad.Plmfile", store)
    (tmp_path / "q.Plmfile").write_text("FROM base\nQUANT int8\n")
    with pytest.raises(InvalidInputError, match="QUANT"):
        create("q", tmp_path / "q.Plmfile", store)


def test_create_converts_a_source_with_quant(store, tmp_path):
    """QUANT converts an HF folder as `pocketlm convert --quant` does: the stored bundle's tensors are
    the ones convert writes from the same source."""
    from pocketlm.bundle import read_bundle
    from pocketlm.convert import convert
    from pocketlm.store.plmfile import create
    from testutil import make_hf_model

    make_hf_model(tmp_path / "hf", "llama", seed=9)
    (tmp_path / "Plmfile").write_text("FROM hf\nQUANT int8\n")
    create("conv", tmp_path / "Plmfile", store, progress=False)
    ours = read_bundle(store.entry("conv").path)
    ref = read_bundle(convert(tmp_path / "hf", tmp_path / "ref.plm", quant="int8", progress=False))
    assert [(t.name, t.dtype) for t in ours.tensors] == [(t.name, t.dtype) for t in ref.tensors]
    for t in ref.tensors:
        assert bytes(ours.tensor(t.name)) == bytes(ref.tensor(t.name))
    assert not [p for p in (store.root / "ingest").iterdir() if not p.name.startswith(".")]


def test_push_into_a_layout_does_not_follow_planted_links(store, bundle, tmp_path):
    """A hostile oci: folder with a symbolic link where the bundle's partial file goes: refused, and
    the link's target is untouched."""
    from pocketlm.store import push

    store.add_model("m:v1", bundle)
    out = tmp_path / "hostile"
    (out / "blobs" / "sha256").mkdir(parents=True)
    (out / "ingest").mkdir()
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text('{"schemaVersion":2,"manifests":[]}')
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "ingest" / hashlib.sha256(bundle.read_bytes()).hexdigest()).symlink_to(victim)
    with pytest.raises(PocketLMError, match="not a plain file|Too many levels|symbolic"):
        push("m:v1", f"oci:{out}:v1")
    assert victim.read_text() == "precious" and oct(victim.stat().st_mode)[-3:] != "444"


def test_rm_removes_a_damaged_entry_and_frees_its_blobs(store, bundle):
    _, digest = store.add_model("m:v1", bundle)
    store.add_model("n:v1", bundle, system="other")
    m = json.loads(store.read_blob(digest, 1 << 20))
    store.blob_path(m["layers"][0]["digest"]).unlink()  # its bundle is gone: it cannot run
    with pytest.raises(PocketLMError, match="missing"):
        store.entry("m:v1")
    store.remove("m:v1")
    with pytest.raises(PocketLMError):
        store.lookup("m:v1")
    path = store.blob_path(digest)
    assert not path.exists()


def test_package_stop_and_system_apply_when_the_request_has_none(store, bundle):
    from pocketlm import Engine

    store.add_model("p:v1", bundle, params={"stop": ["zzz-never"]}, system="S")
    e = Engine("p:v1", threads=1, max_context=64)
    from pocketlm.generation import Generation

    assert Generation(e.create_session(), "a b", max_tokens=1).stops == ["zzz-never"]
    assert Generation(e.create_session(), "a b", max_tokens=1, stop=["q"]).stops == ["q"]
    assert e.apply_chat_template([{"role": "system", "content": "mine"}, {"role": "user", "content": "x"}]) == \
        Engine(bundle, threads=1, max_context=64).apply_chat_template(
            [{"role": "system", "content": "mine"}, {"role": "user", "content": "x"}])


def test_plmfile_tabs_crlf_and_unicode_line_separators():
    from pocketlm.store.plmfile import parse_plmfile

    p = parse_plmfile("FROM\tm.plm\r\nPARAMETER\ttemperature\t0.5\r\nSYSTEM a\u2028b\n")
    assert p.source == "m.plm" and p.params == {"temperature": 0.5} and p.system == "a\u2028b"


def test_oci_folder_whose_name_has_a_colon(store, bundle, tmp_path):
    from pocketlm.store import pull, push

    store.add_model("m:v1", bundle)
    folder = tmp_path / "models:2024"
    folder.mkdir()
    push("m:v1", f"oci:{folder}:v1")
    r = pull(f"oci:{folder}:v1", name="copy:v1")
    assert store.entry("copy:v1").digest == r.digest
    push("m:v1", f"oci:{tmp_path / 'new'}:x")  # a folder that does not exist yet: DIR:TAG
    assert json.loads((tmp_path / "new" / "index.json").read_text())["manifests"][0]["annotations"] == \
        {"org.opencontainers.image.ref.name": "x"}
    assert pull(f"oci:{folder}", name="again:v1").digest == r.digest  # the existing folder, its one manifest


def test_layout_writes_never_follow_planted_links(tmp_path):
    """index.json and small blobs are written through temporary files; a link planted where one goes
    is replaced, its target untouched."""
    import os

    from pocketlm.store import Layout
    from pocketlm.store.manifest import MANIFEST, Descriptor

    layout = Layout(tmp_path / "oci")
    victim = tmp_path / "victim"
    os.symlink(victim, tmp_path / "oci" / f".index.json.tmp-{os.getpid()}")
    layout.set_tag("x", Descriptor(MANIFEST, "sha256:" + "0" * 64, 2, {}, None))
    assert not victim.exists() and not (tmp_path / "oci" / "index.json").is_symlink()


def test_name_tag_and_digest_must_agree(store, bundle):
    _, a = store.add_model("m:latest", bundle, system="a")
    _, b = store.add_model("m:v1", bundle, system="b")
    with pytest.raises(PocketLMError):
        store.remove(f"m:v1@{a}")  # m:v1 is b: nothing is removed
    assert [r for r, _ in store.entries()] == ["m:latest", "m:v1"]
    assert store.entry(f"m:v1@{b}").system == "b"
