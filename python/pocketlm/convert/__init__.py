"""Conversion of Hugging Face checkpoints and GGUF files into .plm bundles.

    convert(src, out, quant=None, group_size=None, symmetric=True, progress=True) -> Path
    convert_to_cache(src) -> Path        # for `pocketlm run model.gguf`

Readers (hf.py, gguf_source.py) produce a SourceModel; recipe.py picks each tensor's type;
converter.py encodes tensors one at a time into bundle.write_bundle.
"""

from pocketlm.convert.cache import cache_dir, convert_to_cache
from pocketlm.convert.converter import CONVERTER_VERSION, convert

__all__ = ["CONVERTER_VERSION", "cache_dir", "convert", "convert_to_cache"]
