"""A client of the OCI distribution API (registries: CNCF distribution, Harbor, GHCR, Docker Hub, Zot),
with the standard library's http.client: persistent connections, blobs streamed in 1 MiB pieces and
hashed as they arrive, Basic and Bearer (token service) authentication, redirects to blob storage
(credentials are not forwarded to another host), HTTPS by default, `plain_http` for a registry on
loopback. Credentials come from $POCKETLM_REGISTRY_USERNAME / $POCKETLM_REGISTRY_PASSWORD or from
Docker's config.json (`auths`, as `docker login` and `oras login` write it).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import ssl
import time
import urllib.parse
from pathlib import Path

from pocketlm.errors import PocketLMError, shown
from pocketlm.store.layout import CHUNK, DigestMismatchError, Layout
from pocketlm.store.manifest import (DOCKER_MANIFEST, INDEX, MANIFEST, MAX_MANIFEST_BYTES, Descriptor, ManifestError,
                                     index_json, parse_index)
from pocketlm.store.reference import is_digest

USER_AGENT = "pocketlm"
MANIFEST_ACCEPT = f"{MANIFEST}, {INDEX}, {DOCKER_MANIFEST}"
RETRIES = 4  # attempts per blob when the connection drops (each resumes where the last stopped)


class RegistryError(PocketLMError, OSError):
    """A registry refused a request, could not be reached, or answered out of the protocol."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def credentials_for(host: str) -> tuple[str, str] | None:
    user, password = os.environ.get("POCKETLM_REGISTRY_USERNAME"), os.environ.get("POCKETLM_REGISTRY_PASSWORD")
    if user and password is not None:
        return user, password
    folder = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    try:
        auths = json.loads((Path(folder) / "config.json").read_text()).get("auths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    for key in (host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"):
        entry = auths.get(key) if isinstance(auths, dict) else None
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return user, password
            except ValueError:
                continue
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
    return None


_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


class Registry:
    """One registry host. Methods take the repository ("ns/model") and raise RegistryError."""

    def __init__(self, host: str, plain_http: bool = False, insecure: bool = False,
                 credentials: tuple[str, str] | None = None, timeout: float = 60.0):
        self.host = host
        self.scheme = "http" if plain_http else "https"
        self.timeout = timeout
        self.credentials = credentials if credentials is not None else credentials_for(host)
        self._ssl = ssl.create_default_context()
        if insecure:
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE
        self._conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._auth: dict[str, str] = {}  # scope -> Authorization header value
        self._scheme_hint: str | None = None  # "basic" once the registry asked for it

    # ---- connections ----
    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        conn = self._conns.get((scheme, netloc))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._ssl, blocksize=CHUNK)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=CHUNK)
            self._conns[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._conns.pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for key in list(self._conns):
            self._drop(*key)

    def _send(self, method: str, url: str, headers: dict, body) -> http.client.HTTPResponse:
        u = urllib.parse.urlsplit(url)
        target = u.path + (f"?{u.query}" if u.query else "")
        for attempt in range(2):  # a kept-alive connection the server closed meanwhile: once more
            conn = self._connection(u.scheme, u.netloc)
            try:
                if hasattr(body, "seek"):
                    body.seek(0)
                conn.request(method, target, body=body, headers={"User-Agent": USER_AGENT, **headers})
                resp = conn.getresponse()
                resp._pocketlm_conn = conn  # _drain closes it when it cuts a response off
                return resp
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop(u.scheme, u.netloc)
                if attempt:
                    raise RegistryError(f"{u.netloc}: connection lost ({e})") from None
            except ssl.SSLError as e:
                self._drop(u.scheme, u.netloc)
                raise RegistryError(f"{u.netloc}: TLS failed ({e.reason or e}); a registry on plain HTTP needs "
                                    "--plain-http, one with a private CA needs SSL_CERT_FILE") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop(u.scheme, u.netloc)
                raise RegistryError(f"{u.netloc}: cannot reach the registry ({e})") from None
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, scope: str, headers: dict | None = None, body=None,
                ok: tuple[int, ...] = (200,)) -> http.client.HTTPResponse:
        """Sends a request to `path` (on this registry, or an absolute URL), authenticating for `scope`
        and following redirects; returns the response with status in `ok` (the caller reads it to
        its end before the next request), or raises RegistryError with the registry's own error message."""
        url = path if "://" in path else f"{self.scheme}://{self.host}{path}"
        headers = dict(headers or {})
        authed = False
        for _ in range(8):
            u = urllib.parse.urlsplit(url)
            if self.scheme == "https" and u.scheme != "https":
                raise RegistryError(f"{self.host}: refused a redirect from HTTPS to {u.scheme}://{u.netloc}")
            own = u.netloc == self.host and u.scheme == self.scheme
            h = dict(headers)
            if own and scope in self._auth:
                h["Authorization"] = self._auth[scope]
            resp = self._send(method, url, h, body)
            if resp.status == 401 and own and not authed:
                challenge = resp.getheader("WWW-Authenticate") or ""
                _drain(resp)
                self._authenticate(challenge, scope)
                authed = True
                continue
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                location = urllib.parse.urljoin(url, resp.getheader("Location"))
                _drain(resp)
                if resp.status == 303:
                    method, body = "GET", None
                url = location
                continue
            if resp.status in ok:
                return resp
            raise self._error(method, url, resp)
        raise RegistryError(f"{self.host}: too many redirects or authentication rounds for {path}")

    def _error(self, method: str, url: str, resp: http.client.HTTPResponse) -> RegistryError:
        data = b"" if method == "HEAD" else resp.read(1 << 16)
        _drain(resp)
        detail = ""
        try:
            errors = json.loads(data).get("errors") or []
            if not isinstance(errors, list):
                raise ValueError("errors is not a list")
            detail = "; ".join(f"{str(e.get('code', ''))[:100]}: {str(e.get('message', ''))[:300]}"
                               for e in errors[:3] if isinstance(e, dict))
        except (ValueError, AttributeError, TypeError, RecursionError):
            detail = data[:200].decode(errors="replace").strip()
        path = urllib.parse.urlsplit(url).path
        hint = {401: " (credentials: $POCKETLM_REGISTRY_USERNAME/PASSWORD or ~/.docker/config.json)",
                403: " (the credentials lack this access)"}.get(resp.status, "")
        return RegistryError(f"{self.host}: {method} {path} failed: HTTP {resp.status}"
                             f"{': ' + detail if detail else ''}{hint}", resp.status)

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.credentials:
                raise RegistryError(f"{self.host} asks for a user name and password: set $POCKETLM_REGISTRY_USERNAME "
                                    "and $POCKETLM_REGISTRY_PASSWORD, or log in with docker/oras", 401)
            token = base64.b64encode(f"{self.credentials[0]}:{self.credentials[1]}".encode()).decode()
            value = f"Basic {token}"
            self._auth = {k: value for k in self._auth}  # one password for every scope
            self._auth[scope] = value
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(f"{self.host}: unsupported authentication challenge {shown(challenge)}", 401)
        realm = params["realm"]
        query = {"service": params.get("service", "")} if params.get("service") else {}
        query["scope"] = params.get("scope") or scope
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or (self.scheme == "https" and u.scheme != "https"):
            raise RegistryError(f"{self.host}: token realm {shown(realm)} is not an https URL (credentials are "
                                "sent to it; plain http only with --plain-http)", 401)
        h = {"Accept": "application/json"}
        if self.credentials:
            h["Authorization"] = "Basic " + base64.b64encode(
                f"{self.credentials[0]}:{self.credentials[1]}".encode()).decode()
        resp = self._send("GET", url, h, None)
        data = resp.read(1 << 20)
        if resp.status != 200:
            raise RegistryError(f"{self.host}: the token service {u.netloc} refused ({resp.status}): "
                                f"{data[:200].decode(errors='replace')}", resp.status)
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or not token or len(token) > 1 << 16:
            raise RegistryError(f"{self.host}: the token service {u.netloc} answered without a token", 401)
        self._auth[scope] = f"Bearer {token}"

    # ---- the API ----
    def ping(self) -> None:
        _drain(self.request("GET", "/v2/", "", ok=(200,)))

    def blob_size(self, repo: str, digest: str) -> int | None:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", _scope(repo, "pull"), ok=(200, 404))
        _drain(resp)
        if resp.status == 404:
            return None
        length = resp.getheader("Content-Length")
        return int(length) if length and length.isdigit() else None

    def get_manifest(self, repo: str, reference: str, accept: str = MANIFEST_ACCEPT) -> tuple[bytes, str, str] | None:
        """(bytes, media type, digest) of a manifest or index, or None if the registry has none by that
        name. The digest is of the bytes received; a reference that is a digest must match it, and so
        must the registry's Docker-Content-Digest."""
        resp = self.request("GET", f"/v2/{repo}/manifests/{reference}", _scope(repo, "pull"),
                            {"Accept": accept}, ok=(200, 404))
        if resp.status == 404:
            _drain(resp)
            return None
        data = resp.read(MAX_MANIFEST_BYTES + 1)
        _drain(resp)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{self.host}/{repo}:{reference}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if is_digest(reference) and digest != reference:
            raise DigestMismatchError(f"{self.host}/{repo}@{reference}: the registry sent a manifest hashing to {digest}")
        claimed = resp.getheader("Docker-Content-Digest")
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            raise DigestMismatchError(f"{self.host}/{repo}:{reference}: manifest bytes hash to {digest}, the registry "
                                      f"says {claimed}")
        media_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        return data, media_type, digest

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> http.client.HTTPResponse:
        resp = self.request("PUT", f"/v2/{repo}/manifests/{reference}", _scope(repo, "pull,push"),
                            {"Content-Type": media_type, "Content-Length": str(len(data))}, data, ok=(201,))
        _drain(resp)
        return resp

    def push_blob(self, repo: str, desc: Descriptor, source, progress=None) -> bool:
        """Uploads a blob (a file path or bytes) unless the repository has it; returns whether it sent it.
        One POST, then one PUT of the whole blob (the monolithic upload: fastest on every registry)."""
        if self.blob_size(repo, desc.digest) == desc.size:
            if progress:
                progress(desc.size)
            return False
        scope = _scope(repo, "pull,push")
        resp = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope, {"Content-Length": "0"}, b"", ok=(202, 201))
        _drain(resp)
        if resp.status == 201:  # the registry took it by mount
            return False
        location = resp.getheader("Location")
        if not location:
            raise RegistryError(f"{self.host}: POST /v2/{repo}/blobs/uploads/ answered without a Location")
        url = urllib.parse.urljoin(f"{self.scheme}://{self.host}/v2/{repo}/blobs/uploads/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": desc.digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)}
        if isinstance(source, (bytes, bytearray)):
            resp = self.request("PUT", url, scope, headers, bytes(source), ok=(201,))
            if progress:
                progress(desc.size)
        else:
            with open(source, "rb", buffering=0) as f:
                body = _Reading(f, progress)
                resp = self.request("PUT", url, scope, headers, body, ok=(201,))
        _drain(resp)
        return True

    def pull_blob(self, repo: str, desc: Descriptor, layout: Layout, progress=None) -> int:
        """Downloads a blob into `layout`, verifying it against its digest as it arrives; a dropped
        connection resumes with a Range request (up to RETRIES attempts), and so does a pull after
        an interrupted one. Returns the bytes resumed from a partial download."""
        resumed = 0
        for attempt in range(RETRIES):
            try:
                with layout.ingest(desc.digest, desc.size) as part:
                    if part is None:
                        if progress:
                            progress(desc.size)
                        return resumed
                    resumed = max(resumed, part.have)  # bytes this attempt continues from
                    if part.have < desc.size:
                        self._download(repo, desc, part, progress)
                    elif progress:
                        progress(part.have)
                return resumed
            except RegistryError as e:
                if e.status is not None or attempt == RETRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
            except DigestMismatchError:
                if attempt == RETRIES - 1:
                    raise
        return resumed

    def _download(self, repo: str, desc: Descriptor, part, progress) -> None:
        headers = {"Range": f"bytes={part.have}-"} if part.have else {}
        resp = self.request("GET", f"/v2/{repo}/blobs/{desc.digest}", _scope(repo, "pull"), headers,
                            ok=(200, 206))
        if resp.status == 200 and part.have:
            part.restart()  # the registry sent the whole blob: start over
        if progress and part.have:
            progress(part.have)
        try:
            while part.have < desc.size:
                buf = part.next_buffer()
                n = resp.readinto(buf)
                if not n:
                    break
                if part.have + n > desc.size:
                    raise DigestMismatchError(f"blob {desc.digest}: the registry sent more than its {desc.size} bytes")
                part.write(memoryview(buf)[:n])
                if progress:
                    progress(n)
        except BaseException as e:
            self.close()  # the response was not read to its end: no connection is reused after it
            if isinstance(e, PocketLMError) or not isinstance(e, (OSError, http.client.HTTPException)):
                raise
            raise RegistryError(f"{self.host}: connection lost after {part.have} of {desc.size} bytes of "
                                f"{desc.digest} ({e})") from None
        if part.have < desc.size:
            self.close()
            raise RegistryError(f"{self.host}: connection lost after {part.have} of {desc.size} bytes of {desc.digest}")
        _drain(resp)

    def referrers(self, repo: str, digest: str, artifact_type: str) -> list[Descriptor]:
        """The artifacts attached to a manifest: the referrers API (OCI distribution 1.1), else the
        referrers tag schema its registries without the API use (`sha256-<hex>`, an image index)."""
        q = urllib.parse.urlencode({"artifactType": artifact_type})
        resp = self.request("GET", f"/v2/{repo}/referrers/{digest}?{q}", _scope(repo, "pull"),
                            {"Accept": INDEX}, ok=(200, 404, 400, 405))
        if resp.status == 200 and (resp.getheader("Content-Type") or "").startswith(INDEX):
            data = resp.read(MAX_MANIFEST_BYTES + 1)
            _drain(resp)
            found = parse_index(data)
        else:
            _drain(resp)
            got = self.get_manifest(repo, _fallback_tag(digest), INDEX)
            found = parse_index(got[0]) if got else []
        return [d for d in found if d.artifact_type == artifact_type]

    def attach(self, repo: str, subject: str, desc: Descriptor, put_response) -> None:
        """After PUTting the manifest `desc` (with a subject) by digest: a registry with the referrers
        API answered OCI-Subject and lists it itself; for one without, add it to the fallback tag's
        index (read, extend, write: as oras and notation do)."""
        if put_response.getheader("OCI-Subject"):
            return
        got = self.get_manifest(repo, _fallback_tag(subject), INDEX)
        have = parse_index(got[0]) if got else []
        if any(d.digest == desc.digest for d in have):
            return
        self.put_manifest(repo, _fallback_tag(subject), index_json(have + [desc]), INDEX)


class _Reading:
    """A file http.client sends in blocksize pieces, reporting progress."""

    def __init__(self, f, progress):
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.progress and data:
            self.progress(len(data))
        return data

    def seek(self, pos: int) -> None:
        self.f.seek(pos)


def _fallback_tag(digest: str) -> str:
    return digest.replace(":", "-", 1)


def _scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


DRAIN_LIMIT = 1 << 16


def _drain(resp: http.client.HTTPResponse) -> None:
    """Reads what is left of a response, at most DRAIN_LIMIT bytes: a longer one is cut off by
    closing its connection (a hostile registry cannot make the client buffer it)."""
    try:
        rest = resp.read(DRAIN_LIMIT + 1)
        if len(rest) > DRAIN_LIMIT or not resp.isclosed():
            resp.close()
            conn = getattr(resp, "_pocketlm_conn", None)
            if conn is not None:
                conn.close()  # reopened by the next request
    except (OSError, http.client.HTTPException):
        resp.close()
        conn = getattr(resp, "_pocketlm_conn", None)
        if conn is not None:
            conn.close()

