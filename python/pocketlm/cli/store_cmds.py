"""`pocketlm pull | push | show | tag | create`, and the store's part of `list`, `rm`, `sign` and `verify`
(pocketlm.store, docs/store.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class TransferBar:
    """bytes done / total, MB/s and ETA on one redrawn line of a terminal's stderr; nothing elsewhere."""

    def __init__(self, label: str, quiet: bool = False):
        self.label = label
        self.on = not quiet and sys.stderr.isatty()
        self.done = 0
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, total: int, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.on and (now - self.last > 0.1 or self.done >= total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-6)
            eta = (total - self.done) / rate if rate else 0
            sys.stderr.write(f"\r{self.label}: {self.done / 1e6:.1f}/{total / 1e6:.1f} MB  {rate / 1e6:.0f} MB/s  "
                             f"ETA {int(eta) // 60:02d}:{int(eta) % 60:02d}\x1b[K")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.on and self.done:
            sys.stderr.write("\n")


def _remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="store_true", help="talk to the registry over HTTP (a local one)")
    p.add_argument("--insecure", action="store_true", help="HTTPS without checking the registry's certificate")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")


def cmd_pull(a: argparse.Namespace) -> int:
    from pocketlm.signing import trusted_keys_from_env
    from pocketlm.store import pull

    bar = TransferBar(f"pulling {a.ref}", a.quiet)
    try:
        r = pull(a.ref, name=a.name, plain_http=a.plain_http, insecure=a.insecure,
                 trusted_keys=trusted_keys_from_env(a.trusted_keys), progress=bar)
    finally:
        bar.finish()
    resumed = f", {r.resumed / 1e6:.1f} MB resumed" if r.resumed else ""
    signed = f", {len(r.signatures)} signature(s)" if r.signatures else ""
    print(f"pulled {r.ref} ({r.digest[:19]}): {r.size / 1e6:.1f} MB, {r.sent / 1e6:.1f} MB new{resumed}{signed}")
    return 0


def cmd_push(a: argparse.Namespace) -> int:
    from pocketlm.store import push

    bar = TransferBar(f"pushing {a.dest or a.ref}", a.quiet)
    try:
        r = push(a.ref, a.dest, plain_http=a.plain_http, insecure=a.insecure, progress=bar)
    finally:
        bar.finish()
    signed = f", {len(r.signatures)} signature(s)" if r.signatures else ""
    print(f"pushed {r.ref} ({r.digest[:19]}): {r.size / 1e6:.1f} MB, {r.sent / 1e6:.1f} MB sent{signed}")
    return 0


def cmd_tag(a: argparse.Namespace) -> int:
    from pocketlm.store import Store

    if in_store(a.src):
        print(f"tagged {Store().tag(a.src, a.dst)}")
        return 0
    store = Store()
    from pocketlm.engine import resolve_model_path
    from pocketlm.signing import default_signature_path

    path = resolve_model_path(a.src)  # a file, a GGUF or HF folder (converted once), a known name
    sig = default_signature_path(path)
    from pocketlm.hub import resolve_alias

    source = resolve_alias(a.src)  # the layer is titled by the source's name, not the cache's
    title = (source.stem if source.is_file() else source.resolve().name) + ".plm"
    ref, digest = store.add_model(a.dst, path, signature=sig.read_bytes() if sig.is_file() else None, title=title)
    print(f"tagged {ref} ({digest[:19]}) from {path}")
    return 0


def cmd_create(a: argparse.Namespace) -> int:
    from pocketlm.store.plmfile import create

    ref, digest = create(a.name, a.file, progress=not a.quiet)
    print(f"created {ref} ({digest[:19]})")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from pocketlm.bundle import read_bundle
    from pocketlm.store import Store

    store = Store()
    e = store.entry(a.ref)
    if a.json:
        print(json.dumps({"ref": e.ref, "digest": e.digest, "config": e.config, "params": e.params,
                          "context": e.context, "system": e.system, "template": e.template, "license": e.license,
                          "layers": [d.to_json() for d in e.manifest.layers],
                          "signatures": [str(p) for p in e.signatures]}, indent=2))
        return 0
    from pocketlm.encryption import is_encrypted

    sealed = is_encrypted(e.path)
    meta = {} if sealed else read_bundle(e.path).metadata
    cfg = e.config.get("config") or {}
    print(f"  {e.ref}")
    print(f"    digest         {e.digest}")
    print(f"    architecture   {'encrypted (its metadata is sealed)' if sealed else meta.get('architecture', '?')}")
    for key, label in (("paramSize", "parameters"), ("precision", "precision"), ("quantization", "quantization")):
        if cfg.get(key):
            print(f"    {label:<14} {cfg[key]}")
    trained = (meta.get("config") or {}).get("max_position")
    print(f"    context        {e.context or 4096}" + (f" (trained {trained})" if trained else ""))
    print(f"    size           {e.size / 1e6:.1f} MB")
    print(f"    signatures     {len(e.signatures) or 'none'}")
    if e.params:
        print("  parameters")
        for k, v in sorted(e.params.items()):
            for x in (v if isinstance(v, list) else [v]):
                print(f"    {k:<14} {json.dumps(x) if isinstance(x, str) else x}")
    for label, text in (("system", e.system), ("template", e.template), ("license", e.license)):
        if text:
            lines = text.strip().splitlines()
            print(f"  {label}")
            for line in lines[:6]:
                print(f"    {line[:100]}")
            if len(lines) > 6:
                print(f"    ... ({len(lines) - 6} more lines)")
    print("  layers")
    for d in e.manifest.layers:
        print(f"    {d.title or '-':<16} {d.media_type:<44} {d.size:>12,}  {d.digest[:19]}")
    return 0


def list_store() -> list[str]:
    """`pocketlm list`'s store section: NAME, ID (manifest digest), SIZE, MODIFIED."""
    from pocketlm.store import Store, store_dir

    if not (store_dir() / "index.json").is_file():
        return [f"no models in the store {store_dir()}"]
    store = Store()
    rows = []
    for ref, d in store.entries():
        try:
            m = store.manifest(d.digest)
            size = f"{(m.config.size + sum(x.size for x in m.layers)) / 1e6:.1f} MB"
            created = m.annotations.get("org.opencontainers.image.created", "")[:19].replace("T", " ")
            signed = "yes" if store.signatures(d.digest) else ""
        except (OSError, ValueError):
            size, created, signed = "(damaged: pocketlm rm removes it)", "", ""
        rows.append((ref, d.digest[7:19], size, created, signed))
    if not rows:
        return [f"no models in the store {store.root}"]
    head = ("NAME", "ID", "SIZE", "CREATED", "SIGNED")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    return [f"models in the store {store.root}:"] + [
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]


def in_store(ref: str) -> bool:
    """Whether the store names `ref` (damaged or not: rm must remove a damaged entry too)."""
    from pocketlm.store import NotInStoreError, Store, looks_like_reference, store_dir

    if Path(ref).expanduser().exists() or not looks_like_reference(ref) or not (store_dir() / "index.json").is_file():
        return False
    try:
        Store().lookup(ref)
    except NotInStoreError:
        return False
    return True


def rm_from_store(ref: str) -> bool:
    from pocketlm.store import Store

    if not in_store(ref):
        return False
    print(f"removed {Store().remove(ref)}")
    return True


def sign_store_entry(model: str, key: str, password=None) -> bool:
    """`pocketlm sign REF`: signs a store entry's bundle and attaches the signature to its manifest."""
    from pocketlm.signing import file_sha256, sign_bytes
    from pocketlm.store import DigestMismatchError, Store
    from pocketlm.store.manifest import MANIFEST, Descriptor

    if not in_store(model):
        return False
    store = Store()
    entry = store.entry(model)
    _, d = store.lookup(model)
    weight = entry.manifest.layer("application/vnd.cncf.model.weight.v1.raw")
    if "sha256:" + file_sha256(entry.path) != weight.digest:  # sign only the bytes the manifest names
        raise DigestMismatchError(f"{entry.ref}: its bundle {entry.path} changed on disk; pull or create it again")
    data = sign_bytes(entry.path, key, name=weight.title or "model.plm")
    store.add_signature(Descriptor(MANIFEST, d.digest, d.size), data, (weight.title or "model.plm") + ".sig")
    print(f"signed {entry.ref}: the signature is attached to it in the store (pushed with it)")
    return True


def add_parsers(sub, add_trusted_keys) -> None:
    pl = sub.add_parser("pull", help="download a model from an OCI registry or an oci: layout folder into the store")
    pl.add_argument("ref", help="host[:port]/name[:tag][@sha256:...] or oci:DIR[:TAG]")
    pl.add_argument("--name", default=None, help="store it under this name (default: REF; for a layout, its "
                                                 "folder's name and tag)")
    _remote_args(pl)
    add_trusted_keys(pl)
    pl.set_defaults(func=cmd_pull)

    ps = sub.add_parser("push", help="upload a store model (with its signatures) to an OCI registry or a layout")
    ps.add_argument("ref", help="the store model; names the registry too unless DEST is given")
    ps.add_argument("dest", nargs="?", default=None, help="host[:port]/name[:tag] or oci:DIR[:TAG]")
    _remote_args(ps)
    ps.set_defaults(func=cmd_push)

    sh = sub.add_parser("show", help="a store model's metadata, parameters, system prompt, template and layers")
    sh.add_argument("ref")
    sh.add_argument("--json", action="store_true", help="as JSON")
    sh.set_defaults(func=cmd_show)

    tg = sub.add_parser("tag", aliases=["cp"], help="name a store model again, or add a model file to the store")
    tg.add_argument("src", help="a store model, or a .plm / .gguf / Hugging Face folder / known name to add")
    tg.add_argument("dst", help="the new name: name[:tag] or host[:port]/name[:tag] (for push)")
    tg.set_defaults(func=cmd_tag)

    cr = sub.add_parser("create", help="build a store model from a Plmfile (as ollama create with a Modelfile)")
    cr.add_argument("name")
    cr.add_argument("-f", "--file", default="Plmfile", help="the Plmfile (default ./Plmfile)")
    cr.add_argument("-q", "--quiet", action="store_true", help="no conversion progress")
    cr.set_defaults(func=cmd_create)
