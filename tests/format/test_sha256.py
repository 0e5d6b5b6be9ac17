"""The C++ SHA-256 (csrc/format/sha256.cpp) against hashlib."""

import hashlib

import numpy as np
import pytest

from pocketlm import _core

LENGTHS = [0, 1, 2, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4096, 1_000_000]


@pytest.fixture(scope="module")
def random_bytes():
    return np.random.default_rng(1234).integers(0, 256, 1_000_000, dtype=np.uint8).tobytes()


# The SHA-extension path (when this CPU has it) and the scalar path are both checked.
IMPLS = ["auto", "scalar"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", LENGTHS)
def test_one_shot(random_bytes, n, impl):
    data = random_bytes[:n]
    assert _core._sha256(data, scalar=impl == "scalar") == hashlib.sha256(data).digest()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunks", [[1], [3, 5, 7], [63], [64], [65], [1000, 1, 17], [0, 13], [129, 4096]])
@pytest.mark.parametrize("n", [0, 1, 55, 56, 64, 65, 1000, 1_000_000])
def test_streaming(random_bytes, n, chunks, impl):
    data = random_bytes[:n]
    assert _core._sha256(data, chunks, scalar=impl == "scalar") == hashlib.sha256(data).digest()


def test_known_vectors():
    # FIPS 180-4 examples.
    assert _core._sha256(b"abc").hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    two_blocks = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
    assert _core._sha256(two_blocks).hex() == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    assert _core._sha256(b"a" * 1_000_000, [997]).hex() == (
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
    )
