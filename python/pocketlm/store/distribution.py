"""pull and push: moving a model (its manifest, config, layers and attached signatures) between the
local store and a registry (`host[:port]/name[:tag]`) or an OCI image layout folder (`oci:DIR[:TAG]`).

Every blob is verified against its digest as it arrives; nothing is named in the store until all of
a model's blobs are there (a tag is the last thing written), so an interrupted pull leaves no model
behind, only `ingest/` partials the next pull continues from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import InvalidInputError, PocketLMError, StorageError
from pocketlm.store.layout import Layout
from pocketlm.store.local import SUBJECT_ANNOTATION, Store
from pocketlm.store.manifest import (DOCKER_MANIFEST, INDEX, MANIFEST, MAX_MANIFEST_BYTES, MAX_SMALL_LAYER, MODEL_ARTIFACT,
                                     MODEL_CONFIG, REF_NAME, SIGNATURE, WEIGHT, Descriptor, ManifestError,
                                     parse_manifest)
from pocketlm.store.reference import DEFAULT_TAG, Reference, is_digest, parse_reference
from pocketlm.store.registry import Registry, RegistryError

OCI_PREFIX = "oci:"
_LAYOUT_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass
class TransferResult:
    ref: str                       # the local name (pull) or the destination (push)
    digest: str                    # the model manifest's
    size: int                      # bytes of the model's blobs
    sent: int = 0                  # bytes moved (blobs the other side lacked)
    resumed: int = 0               # bytes a pull continued from an interrupted one
    signatures: list[str] = field(default_factory=list)  # digests of the signature manifests moved


# ---- the two kinds of remote ----
class RegistryTarget:
    def __init__(self, ref: Reference, plain_http: bool, insecure: bool):
        if not ref.registry:
            raise InvalidInputError(f"{ref}: no registry in it (push to host[:port]/name[:tag], e.g. "
                                    f"localhost:5000/{ref.name}:{ref.tag or DEFAULT_TAG}; `pocketlm tag` names a model so)")
        self.ref = ref
        self.repo = ref.name
        self.registry = Registry(ref.registry, plain_http=plain_http, insecure=insecure)
        self.where = f"{ref.registry}/{ref.name}"

    def get_manifest(self, reference: str) -> tuple[bytes, str]:
        got = self.registry.get_manifest(self.repo, reference)
        if got is None:
            raise RegistryError(f"{self.where}: no manifest {reference!r} (not found)", 404)
        data, media_type, digest = got
        if media_type == INDEX:
            raise ManifestError(f"{self.where}:{reference} is an image index, not a model manifest")
        return data, digest

    def fetch_blob(self, desc: Descriptor, store: Store, progress) -> int:
        return self.registry.pull_blob(self.repo, desc, store, progress)

    def send_blob(self, desc: Descriptor, path: Path, progress) -> bool:
        return self.registry.push_blob(self.repo, desc, path, progress)

    def put_manifest(self, data: bytes, reference: str):
        return self.registry.put_manifest(self.repo, reference, data, MANIFEST)

    def referrers(self, digest: str) -> list[Descriptor]:
        return self.registry.referrers(self.repo, digest, SIGNATURE)

    def attach(self, subject: str, desc: Descriptor, put_response) -> None:
        self.registry.attach(self.repo, subject, desc, put_response)

    def close(self) -> None:
        self.registry.close()


class LayoutTarget:
    """An OCI image layout folder; tags are its index.json's ref.name annotations (as oras writes)."""

    def __init__(self, folder: str, tag: str | None, create: bool):
        self.layout = Layout(folder, create=create)
        self.tag = tag
        self.where = f"{OCI_PREFIX}{folder}"

    def get_manifest(self, reference: str | None) -> tuple[bytes, str]:
        index = self.layout.index()
        if reference is None:
            models = [d for d in index if d.artifact_type != SIGNATURE and d.media_type in (MANIFEST, DOCKER_MANIFEST)]
            if len(models) != 1:
                names = ", ".join(sorted(d.annotations.get(REF_NAME, d.digest[:19]) for d in models)) or "none"
                raise InvalidInputError(f"{self.where}: name one of its manifests as {self.where}:TAG (it has: {names})")
            desc = models[0]
        else:
            desc = next((d for d in index if d.annotations.get(REF_NAME) == reference or d.digest == reference), None)
            if desc is None:
                raise StorageError(f"{self.where}: no manifest tagged {reference!r}")
        return self.layout.read_blob(desc.digest, MAX_MANIFEST_BYTES), desc.digest

    def fetch_blob(self, desc: Descriptor, store: Store, progress) -> int:
        src = self.layout.blob_path(desc.digest)
        with store.ingest(desc.digest, desc.size) as part:
            if part is None:
                if progress:
                    progress(desc.size)
                return 0
            part.restart()
            try:
                f = open(src, "rb", buffering=0)
            except FileNotFoundError:
                raise StorageError(f"{self.where}: blob {desc.digest} is missing") from None
            with f:
                while part.have <= desc.size and (n := f.readinto(buf := part.next_buffer())):
                    part.write(memoryview(buf)[:n])
                    if progress:
                        progress(n)
        return 0

    def send_blob(self, desc: Descriptor, path: Path, progress) -> bool:
        if self.layout.has_blob(desc.digest, desc.size):
            if progress:
                progress(desc.size)
            return False
        with self.layout.ingest(desc.digest, desc.size) as part:
            if part is None:
                return False
            part.restart()
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf := part.next_buffer()):
                    part.write(memoryview(buf)[:n])
                    if progress:
                        progress(n)
        return True

    def put_manifest(self, data: bytes, reference: str | None):
        digest = self.layout.add_bytes(data)
        m = parse_manifest(data)
        desc = Descriptor(MANIFEST, digest, len(data), {}, m.artifact_type)
        if reference is not None and not reference.startswith("sha256:"):
            self.layout.set_tag(reference, desc)
        return desc

    def referrers(self, digest: str) -> list[Descriptor]:
        out = []
        for d in self.layout.index():
            if d.artifact_type != SIGNATURE or REF_NAME in d.annotations:
                continue
            try:
                m = parse_manifest(self.layout.read_blob(d.digest, MAX_MANIFEST_BYTES))
            except (ManifestError, StorageError):
                continue
            if m.subject is not None and m.subject.digest == digest:
                out.append(d)
        return out

    def attach(self, subject: str, desc: Descriptor, put_response) -> None:
        self.layout.add_untagged(Descriptor(desc.media_type, desc.digest, desc.size, {}, desc.artifact_type))

    def close(self) -> None:
        pass


def open_target(text: str, plain_http: bool = False, insecure: bool = False, create: bool = False):
    """The remote `text` names, and the reference in it (a tag, a digest, or None)."""
    if text.startswith(OCI_PREFIX):
        folder, tag = text[len(OCI_PREFIX):], None
        head, at, digest = folder.rpartition("@")
        if at and is_digest(digest):
            folder, tag = head, digest
        elif not Path(folder).is_dir():  # DIR:TAG, unless the whole of it is an existing folder
            head, sep, tail = folder.rpartition(":")
            if sep and _LAYOUT_TAG.match(tail) and "/" not in tail:
                folder, tag = head, tail
        if not folder:
            raise InvalidInputError(f"{text}: an OCI layout is oci:DIR[:TAG]")
        return LayoutTarget(folder, tag, create), tag
    ref = parse_reference(text)
    return RegistryTarget(ref, plain_http, insecure), ref.reference


def _is_model(m) -> bool:
    return m.artifact_type == MODEL_ARTIFACT or m.config.media_type == MODEL_CONFIG or m.layer(WEIGHT) is not None


# ---- pull ----
def pull(src: str, store: Store | None = None, name: str | None = None, plain_http: bool = False,
         insecure: bool = False, trusted_keys=None, progress=None) -> TransferResult:
    """Copies the model `src` names into the store, under `name` (default: `src` itself, or for a
    layout its folder's name and tag). trusted_keys: refuse (store nothing under a name) unless one
    of its signatures verifies with one of them. progress(total, done_increment) is called as bytes
    arrive."""
    store = store or Store()
    target, reference = open_target(src, plain_http, insecure)
    if name is None:
        if isinstance(target, LayoutTarget):
            base = re.sub(r"[^a-z0-9._-]+", "-", Path(src[len(OCI_PREFIX):].rsplit(":", 1)[0] if reference else
                                                  src[len(OCI_PREFIX):]).resolve().name.lower()).strip("-._") or "model"
            name = f"{base}:{reference or DEFAULT_TAG}"
        else:  # by tag (pinned by a digest too: checked, then named by the tag), or by digest alone
            r = target.ref
            name = str(r.with_tag(r.tag)) if r.tag and r.digest else str(r)
    local = parse_reference(name)
    try:
        with store.transfer_lock():
            data, digest = target.get_manifest(reference)
            m = parse_manifest(data)
            if not _is_model(m):
                raise ManifestError(f"{target.where}: {reference or 'its manifest'} is not a model (artifactType "
                                    f"{m.artifact_type!r}, config {m.config.media_type!r})")
            blobs = [m.config] + list(m.layers)
            total = sum(d.size for d in blobs)
            tick = (lambda n: progress(total, n)) if progress else None
            result = TransferResult(str(local), digest, total)
            for d in blobs:
                had = store.has_blob(d.digest, d.size)
                result.resumed += target.fetch_blob(d, store, tick)
                result.sent += 0 if had else d.size
            stored = store.add_bytes(data)
            if stored != digest:
                raise ManifestError(f"{target.where}: manifest digest mismatch")
            desc = Descriptor(MANIFEST, digest, len(data), {}, m.artifact_type)
            try:
                referrers = target.referrers(digest)
            except PocketLMError:  # no way to list them: no signatures (a trusted-keys policy then refuses)
                referrers = []
            for sd in referrers[:16]:
                try:  # one broken or deleted signature does not stop the pull; the policy decides below
                    sdata, sdigest = target.get_manifest(sd.digest)
                    sm = parse_manifest(sdata)
                    if sm.subject is None or sm.subject.digest != digest:
                        continue
                    blobs = [sm.config] + list(sm.layers)
                    if any(d.size > MAX_SMALL_LAYER for d in blobs):
                        continue
                    for d in blobs:
                        target.fetch_blob(d, store, None)
                except PocketLMError:
                    continue
                store.add_bytes(sdata)
                store.add_untagged(Descriptor(MANIFEST, sdigest, len(sdata), {SUBJECT_ANNOTATION: digest}, SIGNATURE))
                result.signatures.append(sdigest)
            if trusted_keys is not None:
                _check_signed(store, str(local), digest, m, trusted_keys)
            store.set_tag(str(local), desc)
            return result
    finally:
        target.close()


def _check_signed(store: Store, ref: str, digest: str, m, trusted_keys) -> None:
    from pocketlm.signing import SignatureError, check_trusted_any

    entry = store.entry_of(ref, digest, m)
    try:
        check_trusted_any(entry.path, trusted_keys, entry.signatures)
    except SignatureError as e:
        raise SignatureError(f"{ref}: {e}") from None


# ---- push ----
def push(ref: str, dest: str | None = None, store: Store | None = None, plain_http: bool = False,
         insecure: bool = False, progress=None) -> TransferResult:
    """Sends the store's model `ref` (with its signatures) to `dest` (default: `ref` itself, which then
    names a registry): a registry reference or oci:DIR[:TAG]."""
    store = store or Store()
    r, d = store.lookup(ref)
    target, reference = open_target(dest or str(r), plain_http, insecure, create=True)
    if isinstance(target, LayoutTarget) and reference is None:
        reference = r.tag or DEFAULT_TAG
    try:
        data = store.read_blob(d.digest, MAX_MANIFEST_BYTES)
        m = parse_manifest(data)
        blobs = [m.config] + list(m.layers)
        total = sum(x.size for x in blobs)
        tick = (lambda n: progress(total, n)) if progress else None
        result = TransferResult(dest or str(r), d.digest, total)
        for x in blobs:
            if target.send_blob(x, store.blob_path(x.digest), tick):
                result.sent += x.size
        target.put_manifest(data, reference or d.digest)
        for sdigest, sm in store.signatures(d.digest):
            sdata = store.read_blob(sdigest, MAX_MANIFEST_BYTES)
            for x in [sm.config] + list(sm.layers):
                target.send_blob(x, store.blob_path(x.digest), None)
            response = target.put_manifest(sdata, sdigest)
            target.attach(d.digest, Descriptor(MANIFEST, sdigest, len(sdata), {}, SIGNATURE), response)
            result.signatures.append(sdigest)
        return result
    finally:
        target.close()

