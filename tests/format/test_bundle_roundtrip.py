"""write_bundle -> read_bundle round trips, the writer's guarantees, and describe()."""

from __future__ import annotations

import gc
import hashlib
import os
import struct
import weakref

import numpy as np
import pytest

from bundle_craft import entry, raw_bundle, read_header
from pocketlm.bundle import TensorSpec, describe, read_bundle, write_bundle
from pocketlm.dtypes import DType, tensor_nbytes
from pocketlm.errors import BundleError

SHAPES = {  # one shape per dtype, covering 1-D to 4-D
    DType.F32: (5,),
    DType.F16: (3, 7),
    DType.Q8_0: (2, 3, 64),
    DType.Q4_0: (4, 96),
    DType.Q4_1: (1, 2, 2, 32),
    DType.Q4_0_G64: (3, 128),
    DType.Q4_0_G128: (2, 256),
    DType.Q4_1_G64: (64,),
    DType.Q4_1_G128: (5, 128),
    DType.I8: (2, 3, 5),
}


def random_specs(seed: int = 0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    specs, payloads = [], {}
    for i, (dtype, shape) in enumerate(shapes.items()):
        name = f"blk.{i}.{dtype.label}.weight"
        payloads[name] = rng.integers(0, 256, tensor_nbytes(dtype, shape), dtype=np.uint8)
        specs.append(TensorSpec(name, dtype, shape, lambda p=payloads[name]: p))
    return specs, payloads


def test_every_dtype_round_trips(tmp_path):
    specs, payloads = random_specs()
    path = tmp_path / "m.plm"
    write_bundle(path, {"architecture": "test"}, specs)
    b = read_bundle(path)
    assert b.version == 1 and b.file_bytes == os.path.getsize(path)
    assert [t.name for t in b.tensors] == [s.name for s in specs]
    for spec, info in zip(specs, b.tensors):
        assert info.dtype == spec.dtype and isinstance(info.dtype, DType)
        assert info.shape == spec.shape
        assert info.nbytes == tensor_nbytes(spec.dtype, spec.shape)
        assert info.offset % 64 == 0
        view = b.tensor(spec.name)
        assert view.dtype == np.uint8 and not view.flags.writeable
        assert np.array_equal(view, payloads[spec.name])
    assert b.verify() == []
    assert read_header(path.read_bytes())["data_offset"] % 4096 == 0


def test_metadata_round_trip_non_ascii(tmp_path):
    meta = {
        "architecture": "llama",
        "config": {"dim": 64, "rope_theta": 10000.0, "tie_embeddings": True, "nested": [1, [2, None]]},
        "chat_template": "{{ '你好' }} — ünïcødé 🙂",
        "special_tokens": {"bos_id": 1, "eos_ids": [2, 3], "pad_id": None, "add_bos": True},
        "tokenizer": {"type": "hf-json", "json": '{"model": {"vocab": {"▁a": 0}}}'},
    }
    write_bundle(tmp_path / "m.plm", meta, [])
    b = read_bundle(tmp_path / "m.plm")
    assert b.metadata == {**meta, "format_version": 1}
    assert b.tensors == [] and b.verify() == []
    # sort_keys: the stored JSON is canonical.
    raw = b.core.metadata_json
    assert raw.index('"architecture"') < raw.index('"chat_template"') < raw.index('"config"')


def test_writer_matches_independent_layout(tmp_path):
    """The writer and bundle_craft (a second reading of the spec) produce identical bytes."""
    specs, payloads = random_specs(shapes={DType.F32: (4, 16), DType.Q8_0: (2, 32)})
    write_bundle(tmp_path / "a.plm", {"architecture": "x"}, specs)
    meta = b'{"architecture":"x","format_version":1}'
    blobs = list(payloads.values())
    data = blobs[0].tobytes() + blobs[1].tobytes()  # 256 + 68 bytes: second tensor at 256
    entries = [
        entry(specs[0].name, 0, (4, 16), 0, 256, hashlib.sha256(blobs[0]).digest()),
        entry(specs[1].name, 2, (2, 32), 256, 68, hashlib.sha256(blobs[1]).digest()),
    ]
    assert (tmp_path / "a.plm").read_bytes() == bytes(raw_bundle(entries, data, meta))


def test_load_accepts_buffers_and_arrays(tmp_path):
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    specs = [
        TensorSpec("bytes", DType.F32, (2,), lambda: b"\x00" * 8),
        TensorSpec("bytearray", DType.F16, (2,), lambda: bytearray(b"\x01\x02\x03\x04")),
        TensorSpec("f32_array", DType.F32, (3, 4), lambda: f32),
        TensorSpec("strided", DType.F32, (4, 3), lambda: f32.T),  # non-contiguous: copied in order
        TensorSpec("memoryview", DType.F32, (1,), lambda: memoryview(np.float32([7]).tobytes())),
    ]
    write_bundle(tmp_path / "m.plm", {}, specs)
    b = read_bundle(tmp_path / "m.plm")
    assert np.array_equal(b.tensor("f32_array").view(np.float32).reshape(3, 4), f32)
    assert np.array_equal(b.tensor("strided").view(np.float32).reshape(4, 3), f32.T)
    assert bytes(b.tensor("bytearray")) == b"\x01\x02\x03\x04"


def test_load_must_return_exact_size(tmp_path):
    specs = [TensorSpec("w", DType.Q4_0, (2, 32), lambda: bytes(35))]
    with pytest.raises(ValueError, match=r"'w'.*35 bytes, expected 36"):
        write_bundle(tmp_path / "m.plm", {}, specs)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spec, match", [
    (TensorSpec("", DType.F32, (1,), bytes), "name"),
    (TensorSpec("x" * 1025, DType.F32, (1,), bytes), "name"),
    (TensorSpec("w", DType.F32, (), bytes), "dims"),
    (TensorSpec("w", DType.F32, (1, 1, 1, 1, 1), bytes), "dims"),
    (TensorSpec("w", DType.F32, (0, 4), bytes), "dims"),
    (TensorSpec("w", DType.Q8_0, (2, 33), bytes), "'w'.*multiple of 32"),
    (TensorSpec("w", 42, (2,), bytes), "unknown tensor type"),
])
def test_invalid_specs_are_rejected_before_writing(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        write_bundle(tmp_path / "m.plm", {}, [spec])
    assert os.listdir(tmp_path) == []


def test_duplicate_names_rejected(tmp_path):
    spec = TensorSpec("w", DType.F32, (1,), lambda: bytes(4))
    with pytest.raises(ValueError, match="duplicate"):
        write_bundle(tmp_path / "m.plm", {}, [spec, spec])


def test_progress_reports_data_bytes(tmp_path):
    specs, _ = random_specs()
    calls = []
    write_bundle(tmp_path / "m.plm", {}, specs, progress=lambda done, total: calls.append((done, total)))
    total = read_header((tmp_path / "m.plm").read_bytes())["data_bytes"]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def test_tensors_are_loaded_one_at_a_time(tmp_path):
    """Each tensor's bytes are released before the next tensor is loaded."""
    loaded = []

    def loader(i):
        def load():
            assert all(ref() is None for ref in loaded), "an earlier tensor is still referenced"
            arr = np.full(4096, i, dtype=np.uint8)
            loaded.append(weakref.ref(arr))
            return arr
        return load

    specs = [TensorSpec(f"t{i}", DType.F32, (1024,), loader(i)) for i in range(5)]
    write_bundle(tmp_path / "m.plm", {}, specs)
    assert len(loaded) == 5
    b = read_bundle(tmp_path / "m.plm")
    assert [int(b.tensor(f"t{i}")[0]) for i in range(5)] == list(range(5))


class Boom(Exception):
    pass


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("failure", ["load", "progress", "interrupt"])
def test_failed_write_is_atomic(tmp_path, existing, failure):
    target = tmp_path / "m.plm"
    old = b"previous bundle contents"
    if existing:
        target.write_bytes(old)

    def load_second():
        if failure == "load":
            raise Boom("load failed")
        if failure == "interrupt":
            raise KeyboardInterrupt
        return bytes(4096)

    def progress(done, total):
        if failure == "progress" and done > 0:
            raise Boom("progress failed")

    specs = [TensorSpec("a", DType.F32, (1024,), lambda: bytes(4096)),
             TensorSpec("b", DType.F32, (1024,), load_second)]
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else Boom):
        write_bundle(target, {}, specs, progress=progress)
    assert sorted(os.listdir(tmp_path)) == (["m.plm"] if existing else [])
    if existing:
        assert target.read_bytes() == old


def test_write_replaces_existing_bundle(tmp_path):
    target = tmp_path / "m.plm"
    target.write_bytes(b"old")
    write_bundle(target, {"v": 2}, [])
    assert read_bundle(target).metadata["v"] == 2
    assert os.listdir(tmp_path) == ["m.plm"]


def test_tensor_view_keeps_bundle_alive(tmp_path):
    specs, payloads = random_specs()
    write_bundle(tmp_path / "m.plm", {}, specs)
    b = read_bundle(tmp_path / "m.plm")
    name = specs[3].name
    view = b.tensor(name)
    del b
    gc.collect()
    assert np.array_equal(view, payloads[name])


def test_unknown_tensor_name(tmp_path):
    write_bundle(tmp_path / "m.plm", {}, random_specs()[0])
    b = read_bundle(tmp_path / "m.plm")
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        b.tensor("nope")
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        b.core.tensor_bytes("nope")


def test_core_bundle_interface(tmp_path):
    specs, _ = random_specs()
    path = str(tmp_path / "m.plm")
    write_bundle(path, {"a": 1}, specs)
    core = read_bundle(path).core
    assert core.path == path and core.version == 1 and core.file_bytes == os.path.getsize(path)
    t = core.tensors[2]
    assert set(t) == {"name", "dtype", "shape", "offset", "nbytes"}
    assert t["dtype"] == int(DType.Q8_0) and t["shape"] == (2, 3, 64) and isinstance(t["shape"], tuple)
    assert '"a":1' in core.metadata_json


def test_missing_file_directory_and_foreign_files(tmp_path):
    with pytest.raises(BundleError, match="no such file"):
        read_bundle(tmp_path / "missing.plm")
    with pytest.raises(BundleError, match="directory"):
        read_bundle(tmp_path)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(1000))
    with pytest.raises(BundleError, match="GGUF.*pocketlm convert"):
        read_bundle(gguf)
    other = tmp_path / "model.safetensors"
    other.write_bytes(struct.pack("<Q", 2) + b"{}" + bytes(300))
    with pytest.raises(BundleError, match="not a .plm bundle"):
        read_bundle(other)
    empty = tmp_path / "empty.plm"
    empty.write_bytes(b"")
    with pytest.raises(BundleError, match="empty"):
        read_bundle(empty)


def test_error_messages_name_the_file(tmp_path):
    path = tmp_path / "named.plm"
    path.write_bytes(b"nonsense" * 100)
    with pytest.raises(BundleError, match=str(path)):
        read_bundle(path)


def test_describe(tmp_path):
    specs, _ = random_specs()
    tok_json = '{"model": {"vocab": {"a": 0, "b": 1, "c": 2}}, "added_tokens": [{"id": 3}]}'
    meta = {
        "architecture": "llama",
        "config": {"dim": 64, "n_layers": 2, "n_heads": 4},
        "quantization": {"mode": "int4", "group_size": 32, "symmetric": True},
        "tokenizer": {"type": "hf-json", "json": tok_json},
        "chat_template": "{{ messages }}",
        "special_tokens": {"bos_id": 1, "eos_ids": [2], "pad_id": None, "add_bos": True},
        "generation": {"temperature": 0.7, "top_p": 0.9},
        "provenance": {"source": "org/model", "source_format": "hf", "converter": "pocketlm 0.1.0"},
    }
    write_bundle(tmp_path / "m.plm", meta, specs)
    text = describe(read_bundle(tmp_path / "m.plm"))
    for needle in ["llama", "n_layers", "group_size=32", "hf-json, vocab 4", "present", "eos_ids=[2]",
                   "temperature=0.7", "org/model", "q4_0_g128", "2 x 3 x 64", "bits/weight", "i8"]:
        assert needle in text, needle
    assert sum(t.n_elements for t in read_bundle(tmp_path / "m.plm").tensors) > 0
    short = describe(tmp_path / "m.plm", show_tensors=False)
    assert "blk.0.f32.weight" not in short and "bits/weight" in short
    # Bare metadata still describes.
    write_bundle(tmp_path / "bare.plm", {}, [])
    assert "architecture" in describe(tmp_path / "bare.plm")
