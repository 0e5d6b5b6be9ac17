"""Model references, as Docker and OCI tools write them: `[REGISTRY/]NAME[:TAG][@sha256:HEX]`.

REGISTRY is the first path component when it looks like a host (has a "." or a ":" port, or is
"localhost"); without one the reference names an entry of the local store only (`pocketlm create
mymodel`, `pocketlm tag ... mymodel:q4`). NAME is lowercase path components (`[a-z0-9]` separated by
".", "_", "__" or dashes), TAG is up to 128 of `[A-Za-z0-9_.-]` not starting with "." or "-", and the
tag defaults to "latest". `oci:DIR[:TAG]` names an OCI image layout folder (docs/store.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pocketlm.errors import InvalidInputError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
MAX_REFERENCE = 255 + 128 + 72  # name, tag and digest at their longest
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    registry: str | None  # "host[:port]", or None for a local-only name
    name: str             # the repository: "ns/model"
    tag: str | None       # None when only a digest was given
    digest: str | None    # "sha256:<hex>" pinned by the user, or None

    def __str__(self) -> str:
        s = f"{self.registry}/{self.name}" if self.registry else self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def repository(self) -> str:
        """REGISTRY/NAME (or NAME): what tags belong to."""
        return f"{self.registry}/{self.name}" if self.registry else self.name

    @property
    def reference(self) -> str:
        """What the registry API calls the reference: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.name, tag, None)


def is_digest(s: str) -> bool:
    return bool(_DIGEST.match(s))


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component.startswith("[")


def parse_reference(text: str) -> Reference:
    """Parses a reference, raising InvalidInputError with what is wrong. The tag defaults to
    "latest" unless a digest is given."""
    if not isinstance(text, str) or not text:
        raise InvalidInputError("a model reference must be a non-empty string")
    if len(text) > MAX_REFERENCE:
        raise InvalidInputError(f"model reference longer than {MAX_REFERENCE} characters")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise InvalidInputError(f"{text!r}: a digest is sha256: and 64 lowercase hex digits")
    registry = None
    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_host(first):
        if not _HOST.match(first):
            raise InvalidInputError(f"{text!r}: {first!r} is not a registry host[:port]")
        registry, rest = first, remainder
    tag = None
    if ":" in rest.rsplit("/", 1)[-1]:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.match(tag):
            raise InvalidInputError(f"{text!r}: a tag is 1-128 of A-Z a-z 0-9 _ . - and does not start with . or -")
    if not _NAME.match(rest):
        raise InvalidInputError(f"{text!r}: a model name is lowercase letters, digits and . _ - separated "
                                "path components (e.g. myorg/qwen2.5-0.5b:int4)")
    if len(rest) > 255:
        raise InvalidInputError(f"{text!r}: a model name is at most 255 characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, rest, tag, digest)


def looks_like_reference(text: str) -> bool:
    """Whether `text` parses as a reference (a file path such as ./m.plm or /x/y does not)."""
    try:
        parse_reference(text)
    except InvalidInputError:
        return False
    return True
