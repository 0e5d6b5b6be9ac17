"""The model store and OCI distribution (docs/store.md): references, the local content-addressed
store, ModelPack manifests, a registry client, pull/push, and Plmfile packages.

    from pocketlm.store import Store, pull, push
    pull("localhost:5000/models/qwen:int4", plain_http=True)
    Engine("localhost:5000/models/qwen:int4")   # run from the store
"""

from pocketlm.store.distribution import OCI_PREFIX, TransferResult, pull, push
from pocketlm.store.layout import DigestMismatchError, Layout
from pocketlm.store.local import ModelEntry, NotInStoreError, Store, store_dir
from pocketlm.store.manifest import ManifestError
from pocketlm.store.reference import Reference, looks_like_reference, parse_reference
from pocketlm.store.registry import Registry, RegistryError

__all__ = ["Store", "ModelEntry", "NotInStoreError", "store_dir", "pull", "push", "TransferResult", "OCI_PREFIX",
           "Layout", "DigestMismatchError", "ManifestError", "Reference", "parse_reference", "looks_like_reference",
           "Registry", "RegistryError"]
