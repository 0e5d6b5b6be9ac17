"""OCI manifests of models, ModelPack style (github.com/modelpack/model-spec), and their parser.

A model is an OCI image manifest (`application/vnd.oci.image.manifest.v1+json`) whose artifactType
is ModelPack's `application/vnd.cncf.model.manifest.v1+json`; its config is a ModelPack model config
(`application/vnd.cncf.model.config.v1+json`: descriptor, config, modelfs); its layers are files,
uncompressed ("raw"), each with `org.opencontainers.image.title` (so `oras pull` writes it under its
file name) and ModelPack's `org.cncf.model.filepath`:

    the bundle      application/vnd.cncf.model.weight.v1.raw      model.plm
    LICENSE         application/vnd.cncf.model.doc.v1.raw         LICENSE
    sampling        application/vnd.pocketlm.params.v1+json       params.json   (PARAMETER lines)
    system prompt   application/vnd.pocketlm.system.v1+text       system.txt    (SYSTEM)
    chat template   application/vnd.pocketlm.template.v1+jinja    template.jinja (TEMPLATE)

A signature travels as an attached artifact (OCI 1.1 referrers): an image manifest of artifactType
`application/vnd.dev.sigstore.bundle.v0.3+json` whose one layer is the signature file
(pocketlm.signing) and whose `subject` is the model's manifest.

Everything read from a registry or a layout is hostile until parse_manifest has checked it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pocketlm.errors import PocketLMError, shown
from pocketlm.store.reference import is_digest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MODEL_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
WEIGHT = "application/vnd.cncf.model.weight.v1.raw"
DOC = "application/vnd.cncf.model.doc.v1.raw"
PARAMS = "application/vnd.pocketlm.params.v1+json"
SYSTEM = "application/vnd.pocketlm.system.v1+text"
TEMPLATE = "application/vnd.pocketlm.template.v1+jinja"
SIGNATURE = "application/vnd.dev.sigstore.bundle.v0.3+json"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # of b"{}"
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"
CREATED = "org.opencontainers.image.created"
REF_NAME = "org.opencontainers.image.ref.name"
CONTEXT_ANNOTATION = "dev.pocketlm.context-length"  # ModelPack's config has no field for it

MAX_MANIFEST_BYTES = 4 << 20  # what distribution accepts by default
MAX_SMALL_LAYER = 1 << 20     # params, system prompt, template, license, signature: read into memory
MAX_LAYERS = 64


class ManifestError(PocketLMError, ValueError):
    """A manifest, index or model config that is not valid JSON of the expected shape."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict)
    artifact_type: str | None = None

    @property
    def title(self) -> str | None:
        return self.annotations.get(TITLE)

    def to_json(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


@dataclass(frozen=True)
class Manifest:
    media_type: str
    artifact_type: str | None
    config: Descriptor
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None
    annotations: dict

    def layer(self, media_type: str) -> Descriptor | None:
        return next((d for d in self.layers if d.media_type == media_type), None)

    @property
    def is_signature(self) -> bool:
        return self.artifact_type == SIGNATURE or (self.artifact_type is None and self.config.media_type == SIGNATURE)


def _str(v, what: str, limit: int = 4096) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ManifestError(f"{what} must be a string of at most {limit} characters, got {shown(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape: not text, cannot be stored
        raise ManifestError(f"{what} is not valid Unicode (a lone surrogate)") from None
    return v


def _annotations(v, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > 256:
        raise ManifestError(f"{what} must be an object of at most 256 strings, got {shown(v)}")
    for k, x in v.items():
        _str(k, f"{what} key")
        _str(x, f"{what}[{k!r}]", 1 << 16)
    return dict(v)


def parse_descriptor(v, what: str) -> Descriptor:
    if not isinstance(v, dict):
        raise ManifestError(f"{what} must be an object, got {shown(v)}")
    media_type = _str(v.get("mediaType"), f"{what}.mediaType", 255)
    digest = v.get("digest")
    if not isinstance(digest, str) or not is_digest(digest):
        raise ManifestError(f"{what}.digest must be sha256: and 64 lowercase hex digits, got {shown(digest)}")
    size = v.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 50:
        raise ManifestError(f"{what}.size must be an integer in [0, 2^50), got {shown(size)}")
    artifact_type = v.get("artifactType")
    if artifact_type is not None:
        _str(artifact_type, f"{what}.artifactType", 255)
    return Descriptor(media_type, digest, size, _annotations(v.get("annotations"), f"{what}.annotations"),
                      artifact_type)


def _json_object(data: bytes, what: str) -> dict:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{what} is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ManifestError(f"{what} is not JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{what} must be a JSON object, got {shown(doc)}")
    return doc


def parse_manifest(data: bytes) -> Manifest:
    """An OCI image manifest (or Docker's v2 schema 2), checked: raises ManifestError."""
    doc = _json_object(data, "manifest")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"manifest schemaVersion must be 2, got {shown(doc.get('schemaVersion'))}")
    media_type = doc.get("mediaType", MANIFEST)
    if media_type not in (MANIFEST, DOCKER_MANIFEST):
        raise ManifestError(f"not an image manifest: mediaType {shown(media_type)} (an index? name a platform's "
                            "manifest by digest)")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None:
        _str(artifact_type, "manifest.artifactType", 255)
    config = parse_descriptor(doc.get("config"), "manifest.config")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise ManifestError(f"manifest.layers must be an array of at most {MAX_LAYERS}, got {shown(layers)}")
    parsed = tuple(parse_descriptor(x, f"manifest.layers[{i}]") for i, x in enumerate(layers))
    titles = [d.title for d in parsed if d.title is not None]
    for t in titles:
        if not safe_file_name(t):
            raise ManifestError(f"layer title {shown(t)} is not a plain file name")
    if len(set(titles)) != len(titles):
        raise ManifestError("two layers have the same title")
    subject = doc.get("subject")
    return Manifest(media_type, artifact_type, config, parsed,
                    parse_descriptor(subject, "manifest.subject") if subject is not None else None,
                    _annotations(doc.get("annotations"), "manifest.annotations"))


def parse_index(data: bytes) -> list[Descriptor]:
    """The manifests an OCI image index lists (index.json of a layout, a referrers response)."""
    doc = _json_object(data, "index")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"index schemaVersion must be 2, got {shown(doc.get('schemaVersion'))}")
    if doc.get("mediaType", INDEX) != INDEX:
        raise ManifestError(f"not an image index: mediaType {shown(doc.get('mediaType'))}")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list) or len(manifests) > 1 << 16:
        raise ManifestError(f"index.manifests must be an array, got {shown(manifests)}")
    return [parse_descriptor(x, f"index.manifests[{i}]") for i, x in enumerate(manifests)]


def index_json(descriptors: list[Descriptor]) -> bytes:
    return canonical({"schemaVersion": 2, "mediaType": INDEX, "manifests": [d.to_json() for d in descriptors]})


def safe_file_name(name: str) -> bool:
    """A layer title that is one plain file name: written under a folder, it stays there."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and not name.startswith("."))


def canonical(doc: dict) -> bytes:
    """The bytes pocketlm writes a JSON document as (stable: its digest names it)."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def manifest_json(config: Descriptor, layers: list[Descriptor], artifact_type: str,
                  annotations: dict | None = None, subject: Descriptor | None = None) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": MANIFEST, "artifactType": artifact_type, "config": config.to_json(),
           "layers": [d.to_json() for d in layers]}
    if subject is not None:
        doc["subject"] = subject.to_json()
    if annotations:
        doc["annotations"] = dict(annotations)
    return canonical(doc)


def parse_model_config(data: bytes) -> dict:
    """A ModelPack model config, its sections checked for shape (unknown keys are kept)."""
    doc = _json_object(data, "model config")
    for key in ("descriptor", "config", "modelfs"):
        if not isinstance(doc.get(key, {}), dict):
            raise ManifestError(f"model config.{key} must be an object, got {shown(doc.get(key))}")
    return doc
