"""The local model store: a content-addressed OCI image layout at $POCKETLM_STORE (default
$POCKETLM_CACHE/store, ~/.cache/pocketlm/store) whose index.json names each model manifest by its full
reference (`org.opencontainers.image.ref.name` = "localhost:5000/ns/model:tag" or "mymodel:latest")
and lists signatures (attached artifacts) by their subject. `pocketlm list / show / rm / tag` read
and change it; `pull`, `push` and `create` fill it and read from it; run, chat and serve resolve a
reference to the bundle's blob, mmapped in place (docs/store.md).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import InvalidInputError, PocketLMError, StorageError
from pocketlm.metadata import generation_problem
from pocketlm.store.layout import Layout
from pocketlm.store.manifest import (CONTEXT_ANNOTATION, CREATED, DOC, EMPTY, FILEPATH, MANIFEST, MAX_MANIFEST_BYTES,
                                     MAX_SMALL_LAYER, MODEL_ARTIFACT, MODEL_CONFIG, PARAMS, REF_NAME, SIGNATURE,
                                     SYSTEM, TEMPLATE, TITLE, WEIGHT, Descriptor, Manifest, ManifestError,
                                     manifest_json, parse_manifest, parse_model_config)
from pocketlm.store.reference import Reference, parse_reference

SUBJECT_ANNOTATION = "dev.pocketlm.subject"  # on a signature's entry in index.json: the model manifest it signs
STORE_ENV = "POCKETLM_STORE"


class NotInStoreError(PocketLMError, LookupError):
    """A reference the local store does not hold."""


def store_dir() -> Path:
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("POCKETLM_CACHE")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "pocketlm") / "store"


@dataclass
class ModelEntry:
    """A store entry resolved for running: the bundle's blob and what the package adds to it."""
    ref: str
    digest: str                      # the manifest's
    manifest: Manifest
    config: dict                     # the ModelPack config
    path: Path                       # the weight blob (a .plm), mmapped in place
    signatures: list[Path] = field(default_factory=list)
    params: dict = field(default_factory=dict)  # sampling defaults (generation.* keys) and "stop"
    system: str | None = None
    template: str | None = None
    license: str | None = None
    context: int | None = None

    @property
    def size(self) -> int:
        return self.manifest.config.size + sum(d.size for d in self.manifest.layers)


class Store(Layout):
    def __init__(self, root: str | os.PathLike | None = None):
        super().__init__(root if root is not None else store_dir())

    # ---- names ----
    def entries(self) -> list[tuple[str, Descriptor]]:
        """(reference, manifest descriptor) of every tagged model, sorted by reference."""
        return sorted(((d.annotations[REF_NAME], d) for d in self.index() if REF_NAME in d.annotations),
                      key=lambda x: x[0])

    def lookup(self, ref: str | Reference) -> tuple[Reference, Descriptor]:
        r = parse_reference(ref) if isinstance(ref, str) else ref
        if r.digest and r.tag:  # name:tag@digest: that name, which must hold that digest
            d = self.tagged(str(r.with_tag(r.tag)))
            if d is not None and d.digest == r.digest:
                return r.with_tag(r.tag), d
            raise NotInStoreError(f"{r}: not in the model store {self.root}" +
                                  (f" ({r.with_tag(r.tag)} is {d.digest[:19]})" if d is not None else ""))
        if r.digest:  # a name of this repository that holds this digest
            for d in self.index():
                name = d.annotations.get(REF_NAME)
                if d.digest == r.digest and name is not None and _repository(name) == r.repository:
                    return r, d
        else:
            d = self.tagged(str(r))
            if d is not None:
                return r, d
        raise NotInStoreError(f"{r}: not in the model store {self.root} (pocketlm list shows what is)")

    def manifest(self, digest: str) -> Manifest:
        try:
            return parse_manifest(self.read_blob(digest, MAX_MANIFEST_BYTES))
        except ManifestError as e:
            raise ManifestError(f"{self.root}: manifest {digest}: {e}") from None

    def tag(self, src: str, dst: str) -> str:
        _, d = self.lookup(src)
        target = parse_reference(dst)
        if target.digest:
            raise InvalidInputError(f"{dst}: a tag cannot carry a digest")
        self.set_tag(str(target), Descriptor(d.media_type, d.digest, d.size, {}, d.artifact_type))
        return str(target)

    def remove(self, ref: str) -> str:
        """Removes a name; the blobs only it used are deleted (gc)."""
        r, d = self.lookup(ref)
        with self.locked():
            index = self.index()
            keep = [x for x in index if not (x.annotations.get(REF_NAME) == str(r) or
                                              (r.digest and x.digest == r.digest and REF_NAME in x.annotations
                                               and _repository(x.annotations[REF_NAME]) == r.repository))]
            self.write_index(keep)
        self.gc()
        return str(r)

    # ---- signatures ----
    def signatures(self, subject: str) -> list[tuple[str, Manifest]]:
        out = []
        for d in self.index():
            if d.artifact_type == SIGNATURE and d.annotations.get(SUBJECT_ANNOTATION) == subject:
                try:
                    out.append((d.digest, self.manifest(d.digest)))
                except (ManifestError, StorageError):
                    continue
        return out

    def add_signature(self, subject: Descriptor, signature: bytes, title: str) -> str:
        """Stores a signature file as an artifact attached to the manifest `subject`; returns its
        manifest's digest."""
        with self.transfer_lock():
            return self._add_signature(subject, signature, title)

    def _add_signature(self, subject: Descriptor, signature: bytes, title: str) -> str:
        config = Descriptor(EMPTY, self.add_bytes(b"{}"), 2)
        layer = Descriptor(SIGNATURE, self.add_bytes(signature), len(signature), {TITLE: title})
        data = manifest_json(config, [layer], SIGNATURE, {CREATED: _now()},
                             Descriptor(subject.media_type, subject.digest, subject.size))
        digest = self.add_bytes(data)
        self.add_untagged(Descriptor(MANIFEST, digest, len(data), {SUBJECT_ANNOTATION: subject.digest}, SIGNATURE))
        return digest

    def signature_paths(self, subject: str) -> list[Path]:
        paths = []
        for _, m in self.signatures(subject):
            layer = m.layer(SIGNATURE)
            if layer is not None and self.has_blob(layer.digest, layer.size):
                paths.append(self.blob_path(layer.digest))
        return paths

    # ---- models ----
    def add_model(self, ref: str, bundle: str | os.PathLike, *, params: dict | None = None,
                  system: str | None = None, template: str | None = None, license_text: str | None = None,
                  context: int | None = None, title: str | None = None, progress=None,
                  signature: bytes | None = None, move: bool = False) -> tuple[str, str]:
        """Stores a .plm bundle (copied in; moved if `move`, a temporary file on the store's
        filesystem) with what a package adds, under `ref`; returns (the reference, the manifest's
        digest). `signature`: the bundle's detached signature, attached."""
        with self.transfer_lock():
            return self._add_model(ref, bundle, params=params, system=system, template=template,
                                   license_text=license_text, context=context, title=title, progress=progress,
                                   signature=signature, move=move)

    def _add_model(self, ref, bundle, *, params, system, template, license_text, context, title, progress,
                   signature, move) -> tuple[str, str]:
        from pocketlm.bundle import read_bundle

        r = parse_reference(ref)
        if r.digest:
            raise InvalidInputError(f"{ref}: name a model to create by a tag, not a digest")
        from pocketlm.encryption import is_encrypted, read_header

        if is_encrypted(bundle):  # sealed: its metadata is secret too; the header is checked
            read_header(bundle)
            meta, n_params = {"quantization": {}, "architecture": ""}, 0
        else:
            opened = read_bundle(bundle)  # a bundle that does not open is refused before it is stored
            meta = opened.metadata
            n_params = sum(math.prod(t.shape) for t in opened.tensors)
            del opened
        digest, size = self.add_file(bundle, progress, move=move)
        name = title or Path(bundle).name
        if not name.endswith(".plm"):
            name = "model.plm"
        layers = [Descriptor(WEIGHT, digest, size, {TITLE: name, FILEPATH: name})]
        small = [(DOC, "LICENSE", license_text), (SYSTEM, "system.txt", system), (TEMPLATE, "template.jinja", template),
                 (PARAMS, "params.json", json.dumps(params, sort_keys=True) if params else None)]
        for media_type, file_name, text in small:
            if text is not None:
                data = text.encode()
                layers.append(Descriptor(media_type, self.add_bytes(data), len(data), {TITLE: file_name,
                                                                                      FILEPATH: file_name}))
        config = model_config(meta, [d.digest for d in layers], r.name, license_text, n_params)
        config_desc = Descriptor(MODEL_CONFIG, self.add_bytes(config), len(config))
        annotations = {CREATED: _now()}
        if context:
            annotations[CONTEXT_ANNOTATION] = str(int(context))
        data = manifest_json(config_desc, layers, MODEL_ARTIFACT, annotations)
        mdigest = self.add_bytes(data)
        desc = Descriptor(MANIFEST, mdigest, len(data), {}, MODEL_ARTIFACT)
        if signature is not None:
            self.add_signature(desc, signature, name + ".sig")
        self.set_tag(str(r), desc)
        return str(r), mdigest

    def entry(self, ref: str | Reference) -> ModelEntry:
        r, d = self.lookup(ref)
        m = self.manifest(d.digest)
        return self.entry_of(str(r), d.digest, m)

    def entry_of(self, ref: str, digest: str, m: Manifest) -> ModelEntry:
        weight = m.layer(WEIGHT)
        if weight is None:
            kinds = ", ".join(sorted({x.media_type for x in m.layers})) or "none"
            raise ManifestError(f"{ref}: no pocketlm bundle in it (layers: {kinds}; a model layer is {WEIGHT})")
        path = self.blob_path(weight.digest)
        if not self.has_blob(weight.digest, weight.size):
            raise StorageError(f"{ref}: its bundle {weight.digest} is missing from {self.root} (pull it again)")
        config = parse_model_config(self.read_blob(m.config.digest, MAX_MANIFEST_BYTES))
        e = ModelEntry(ref, digest, m, config, path, self.signature_paths(digest))
        texts = {}
        for media_type in (PARAMS, SYSTEM, TEMPLATE, DOC):
            layer = m.layer(media_type)
            if layer is not None:
                try:
                    texts[media_type] = self.read_blob(layer.digest, MAX_SMALL_LAYER).decode()
                except UnicodeDecodeError:
                    raise ManifestError(f"{ref}: its {layer.title or media_type} is not UTF-8") from None
        e.system, e.template, e.license = texts.get(SYSTEM), texts.get(TEMPLATE), texts.get(DOC)
        if PARAMS in texts:
            e.params = check_params(texts[PARAMS], ref)
        ctx = m.annotations.get(CONTEXT_ANNOTATION)
        if ctx is not None:
            if not (ctx.isascii() and ctx.isdigit()) or not 1 <= int(ctx) <= 1 << 24:
                raise ManifestError(f"{ref}: {CONTEXT_ANNOTATION} must be a positive integer, got {ctx[:40]!r}")
            e.context = int(ctx)
        return e

    # ---- garbage ----
    def gc(self) -> list[str]:
        """Deletes blobs no tagged manifest (nor a signature of one) refers to, and signatures of
        manifests gone. Skipped while a pull or push holds the store (transfer_lock): their blobs
        are not named yet."""
        try:
            fd = os.open(self.root / ".transfer", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
            with self.locked():
                index = self.index()
                tagged = {d.digest for d in index if REF_NAME in d.annotations}
                keep_index = [d for d in index if REF_NAME in d.annotations or
                              d.annotations.get(SUBJECT_ANNOTATION) in tagged]
                if len(keep_index) != len(index):
                    self.write_index(keep_index)
                live = set()
                for d in keep_index:
                    live.add(d.digest)
                    try:
                        m = self.manifest(d.digest)
                    except PocketLMError:  # damaged (changed on disk, missing): its blobs go
                        continue
                    live.add(m.config.digest)
                    live.update(x.digest for x in m.layers)
                removed = []
                for p in (self.root / "blobs" / "sha256").iterdir():
                    if p.name.startswith("."):  # a write in progress (.HEX.tmp-PID)
                        continue
                    if "sha256:" + p.name not in live:
                        try:
                            p.unlink()
                            removed.append("sha256:" + p.name)
                        except OSError:
                            pass
                for p in (self.root / "ingest").iterdir():  # empty partials, and those of blobs now here
                    try:
                        if p.name.startswith("."):
                            continue
                        if p.stat().st_size == 0 or self.has_blob("sha256:" + p.name):
                            p.unlink()
                    except (OSError, PocketLMError):
                        pass
                return removed
        finally:
            os.close(fd)

    def transfer_lock(self):
        """Held (shared) while a transfer adds blobs not yet named, so gc leaves them."""
        return _SharedLock(self.root / ".transfer")


def _repository(name: str) -> str:
    """The repository of a stored name ("host/ns/m:tag" or "m@sha256:..." -> "host/ns/m", "m")."""
    name = name.split("@", 1)[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


class _SharedLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def check_params(text: str, ref: str) -> dict:
    """A package's params.json: sampling defaults by pocketlm's names (generation.*), plus "stop"."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ManifestError(f"{ref}: params.json is not JSON (or nested too deep)") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{ref}: params.json must be an object")
    out = {}
    for k, v in doc.items():
        if k == "stop":
            if not isinstance(v, list) or len(v) > 16 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in v):
                raise ManifestError(f"{ref}: params.json stop must be a list of at most 16 strings")
        elif k in PARAMETER_KEYS:
            problem = generation_problem(k, v, f"params.json {k}")
            if problem:
                raise ManifestError(f"{ref}: {problem}")
        else:
            raise ManifestError(f"{ref}: params.json has an unknown parameter {k[:40]!r}")
        out[k] = v
    return out


PARAMETER_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_tokens", "seed")


def model_config(meta: dict, diff_ids: list[str], name: str, license_text: str | None, n_params: int) -> bytes:
    """The ModelPack config of a bundle (its metadata's architecture, size, quantization)."""
    from pocketlm.store.manifest import canonical

    quant = meta.get("quantization") or {}
    types = quant.get("types") or {}
    main = max(types, key=types.get) if types else None
    precision = {"q4": "int4", "i4": "int4", "q8": "int8", "i8": "int8", "f16": "fp16", "bf16": "bf16",
                 "f32": "fp32"}
    prec = next((v for k, v in precision.items() if main and main.startswith(k)), "mixed" if main else None)
    cfg = {"architecture": "transformer", "format": "plm"}
    if n_params:
        cfg["paramSize"] = _param_size(n_params)
    if prec:
        cfg["precision"] = prec
    if quant.get("mode"):
        cfg["quantization"] = str(quant["mode"]) if quant.get("mode") != "keep" else f"gguf ({main})"
    prov = meta.get("provenance") or {}
    descriptor = {"name": name, "family": str(meta.get("architecture", "")), "createdAt": _now()}
    if prov.get("source"):
        descriptor["description"] = f"converted by {prov.get('converter', 'pocketlm')} from {prov['source']}"
    spdx = _spdx(license_text)
    if spdx:
        descriptor["licenses"] = [spdx]
    doc = {"descriptor": descriptor, "config": cfg, "modelfs": {"type": "layers", "diff_ids": diff_ids}}
    return canonical(doc)


def _param_size(n: int) -> str:
    for scale, letter in ((1e12, "t"), (1e9, "b"), (1e6, "m"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{letter}".replace(".0", "")
    return str(n)


def _spdx(text: str | None) -> str | None:
    """A LICENSE that is only an SPDX identifier (e.g. "Apache-2.0") is recorded as one."""
    if text and len(text.strip()) <= 64 and "\n" not in text.strip() and " " not in text.strip():
        return text.strip()
    return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
