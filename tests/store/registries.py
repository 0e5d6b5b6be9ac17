"""Real registries on 127.0.0.1 for the store tests: Debian's `docker-registry` (the CNCF distribution
registry, 2.8) started from a temporary config, plain HTTP, HTTPS with htpasswd Basic auth, or
HTTPS-less with a token service (Bearer: tokens signed by a key this module makes, as a Docker token
server signs them). Each waits for /v2/ and is stopped by the fixture."""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REGISTRY = shutil.which("docker-registry")


def need_registry():
    import pytest

    if REGISTRY is None:
        pytest.skip("needs Debian's docker-registry (the CNCF distribution registry): apt-get install docker-registry "
                    "(scripts/test.sh installs it as root)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, root: Path, auth: dict | None = None, tls: tuple[Path, Path] | None = None):
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        lines = ["version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true", "storage:",
                 "  filesystem:", f"    rootdirectory: {root / 'data'}", "  delete:", "    enabled: true",
                 "http:", f"  addr: {self.host}"]
        if tls:
            lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
        if auth:
            lines += ["auth:"] + [f"  {k}:" + "".join(f"\n    {a}: {b}" for a, b in v.items()) for k, v in auth.items()]
        (root / "config.yml").write_text("\n".join(lines) + "\n")
        self.log = open(root / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", str(root / "config.yml")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        scheme = "https" if tls else "http"
        deadline = time.time() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {(root / 'registry.log').read_text()}")
                time.sleep(0.05)
        self.url = f"{scheme}://{self.host}"

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":")[1]
        return self.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key); SSL_CERT_FILE pointing at it makes clients trust it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def htpasswd(path: Path, user: str, password: str) -> Path:
    import warnings

    with warnings.catch_warnings():  # the standard library's bcrypt (deprecated, in Python until 3.13)
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    path.write_text(f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n")
    return path


class TokenService:
    """A Docker token service on 127.0.0.1: GET /token?service=&scope= with Basic user:password gives a
    JWT (ES256, its certificate in x5c) granting the scope's actions; wrong credentials get 401.
    `requests` counts the token requests."""

    def __init__(self, folder: Path, user: str, password: str):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pocketlm-test-token-issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
        folder.mkdir(parents=True, exist_ok=True)
        self.cert = folder / "token-cert.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        der = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests = 0
        service = self

        def token(scopes: list[str]) -> str:
            access = []
            for sc in scopes:
                typ, _, rest = sc.partition(":")
                repo, _, actions = rest.rpartition(":")
                access.append({"type": typ, "name": repo, "actions": actions.split(",")})
            t = int(time.time())
            header = {"typ": "JWT", "alg": "ES256", "x5c": [der]}
            claims = {"iss": "pocketlm-test", "sub": user, "aud": "pocketlm-registry", "exp": t + 600, "nbf": t - 10,
                      "iat": t, "jti": os.urandom(8).hex(), "access": access}
            signing_input = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())).encode()
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            return signing_input.decode() + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                service.requests += 1
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                body = json.dumps({"token": token(q.get("scope", [])), "expires_in": 600}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def auth_config(self) -> dict:
        return {"token": {"realm": self.realm, "service": "pocketlm-registry", "issuer": "pocketlm-test",
                          "rootcertbundle": str(self.cert)}}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CuttingProxy:
    """A TCP proxy to `port` that closes the first connection carrying a response body after `cut`
    bytes from the server: a network failure in the middle of a blob."""

    def __init__(self, port: int, cut: int):
        self.target, self.cut = port, cut
        self.cuts = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, downstream):
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if downstream and self.cuts == 0 and sent + len(data) > self.cut and sent + len(data) > 1 << 20:
                    dst.sendall(data[:max(0, self.cut - sent)])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def stop(self):
        self.sock.close()


__all__ = ["REGISTRY", "Registry", "TokenService", "CuttingProxy", "self_signed", "htpasswd", "need_registry", "urllib"]
