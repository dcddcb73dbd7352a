"""A GGUF file's key-value metadata and tensor table, read from its header only.

gguf-py's GGUFReader builds a numpy view of every element of every array on open (the tokenizer's 49k-150k
tokens, scores and types), which took 6 s per file on the demo's 135M model; the checks need a dozen scalar keys
and the tensor types. This walks the same layout (gguf-py's constants name the types) and skips arrays by their
length: one pass over the header, a few milliseconds, independent of the model's size.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError

MAGIC = b"GGUF"


@dataclass
class GGUFHeader:
    version: int
    fields: dict = field(default_factory=dict)         # scalars and strings; arrays as ArrayInfo
    tensor_types: dict[str, int] = field(default_factory=dict)   # ggml type name -> tensor count
    tensor_count: int = 0


@dataclass(frozen=True)
class ArrayInfo:
    """An array value, not materialised: its element type and length (tokenizer.ggml.tokens and the like)."""
    item_type: str
    length: int


class _Cursor:
    def __init__(self, buf, endian: str):
        self.buf, self.pos, self.e = buf, 0, endian

    def unpack(self, fmt: str):
        s = struct.Struct(self.e + fmt)
        vals = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return vals[0] if len(vals) == 1 else vals

    def string(self) -> str:
        n = self.unpack("Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", "replace")


def _value_formats():
    from gguf.constants import GGUFValueType as T

    return T, {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
               T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}


def read_gguf_header(path: Path) -> GGUFHeader:
    """The header of the GGUF at `path` (either byte order); TutorWrapError when it is not a GGUF or is cut short."""
    from gguf.constants import GGMLQuantizationType

    T, fmts = _value_formats()
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:   # an empty file cannot be mapped
            raise TutorWrapError(f"{path} is empty, not a GGUF file") from None
    try:
        if buf[:4] != MAGIC:
            raise TutorWrapError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
        # The version is a small number: read little-endian and too large, the file was written big-endian.
        endian = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
        c = _Cursor(buf, endian)
        c.pos = 4
        version = c.unpack("I")
        n_tensors, n_kv = c.unpack("QQ")
        head = GGUFHeader(version, tensor_count=n_tensors)
        for _ in range(n_kv):
            key = c.string()
            vtype = T(c.unpack("I"))
            if vtype == T.ARRAY:
                itype, length = T(c.unpack("I")), c.unpack("Q")
                if itype == T.STRING:
                    for _ in range(length):
                        n = c.unpack("Q")        # each string: its length, then that many bytes
                        c.pos += n
                elif itype == T.ARRAY:
                    raise TutorWrapError(f"{path}: nested arrays in {key} are not read")
                else:
                    c.pos += length * struct.calcsize(fmts[itype])
                head.fields[key] = ArrayInfo(itype.name, length)
            elif vtype == T.STRING:
                head.fields[key] = c.string()
            else:
                head.fields[key] = c.unpack(fmts[vtype])
        for _ in range(n_tensors):
            c.string()                          # name
            n_dims = c.unpack("I")
            c.pos += 8 * n_dims                 # dimensions
            ttype = GGMLQuantizationType(c.unpack("I")).name
            c.pos += 8                          # offset into the data section
            head.tensor_types[ttype] = head.tensor_types.get(ttype, 0) + 1
        if c.pos > len(buf):
            raise struct.error("header runs past the end of the file")
        return head
    except (struct.error, ValueError) as exc:
        raise TutorWrapError(f"{path}: unreadable GGUF header ({exc}); the file may be truncated",
                             hint="delete it and re-run the stage that wrote it") from None
    finally:
        buf.close()
