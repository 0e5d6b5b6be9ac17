"""`.plm` bundles (the format is specified in docs/format.md), in the order data moves:

    layout.py   the header, the sections and the index entries: packed and parsed once, in Python
    atomic.py   a file written through a temporary next to it, renamed into place when complete
    writer.py   write_bundle: streams the tensors, hashing them, then the header, metadata and index
    reader.py   read_bundle: the C++ reader (_core.Bundle) wrapped, metadata parsed and checked
    summary.py  describe: `pocketlm inspect`'s text
"""

from pocketlm.bundle.atomic import remove_stale_temporaries
from pocketlm.bundle.layout import (DATA_ALIGN, FORMAT_VERSION, HEADER_BYTES, MAGIC, MAX_DIMS, MAX_NAME_BYTES,
                                    TENSOR_ALIGN)
from pocketlm.bundle.reader import Bundle, PyLayout, TensorInfo, open_for_checks, read_bundle
from pocketlm.bundle.summary import describe
from pocketlm.bundle.writer import TensorSpec, write_bundle

__all__ = [
    "DATA_ALIGN", "FORMAT_VERSION", "HEADER_BYTES", "MAGIC", "MAX_DIMS", "MAX_NAME_BYTES", "TENSOR_ALIGN",
    "Bundle", "PyLayout", "TensorInfo", "TensorSpec", "describe", "open_for_checks", "read_bundle",
    "remove_stale_temporaries", "write_bundle",
]
