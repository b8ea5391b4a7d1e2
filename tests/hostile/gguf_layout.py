"""A GGUF reader that records where each field lives, and a writer, so the suite can damage one
field of a valid file (a count, a length, an offset) or rebuild it with different metadata."""

import struct
from dataclasses import dataclass, field

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class Tensor:
    name: str
    dims: list
    ggml_type: int
    offset: int
    offset_pos: int = 0
    dims_pos: int = 0


@dataclass
class Layout:
    version: int
    kv: dict = field(default_factory=dict)          # key -> (type, value)
    kv_pos: dict = field(default_factory=dict)      # key -> byte position of the value
    tensors: list = field(default_factory=list)
    count_pos: int = 8                              # n_tensors at 8, n_kv at 16
    data_start: int = 0
    data: bytes = b""


def _read(buf, pos, fmt):
    (v,) = struct.unpack_from(fmt, buf, pos)
    return v, pos + struct.calcsize(fmt)


def _string(buf, pos):
    n, pos = _read(buf, pos, "<Q")
    return buf[pos:pos + n].decode(), pos + n


def _value(buf, pos, ty):
    if ty == STRING:
        return _string(buf, pos)
    if ty == ARRAY:
        item, pos = _read(buf, pos, "<I")
        n, pos = _read(buf, pos, "<Q")
        out = []
        for _ in range(n):
            v, pos = _value(buf, pos, item)
            out.append(v)
        return (item, out), pos
    return _read(buf, pos, SCALARS[ty])


def parse(buf: bytes) -> Layout:
    assert buf[:4] == b"GGUF"
    version, pos = _read(buf, 4, "<I")
    n_tensors, pos = _read(buf, pos, "<Q")
    n_kv, pos = _read(buf, pos, "<Q")
    lay = Layout(version)
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        ty, pos = _read(buf, pos, "<I")
        lay.kv_pos[key] = pos
        v, pos = _value(buf, pos, ty)
        lay.kv[key] = (ty, v)
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        nd, pos = _read(buf, pos, "<I")
        dims_pos = pos
        dims = list(struct.unpack_from(f"<{nd}Q", buf, pos))
        pos += 8 * nd
        ty, pos = _read(buf, pos, "<I")
        off, pos2 = _read(buf, pos, "<Q")
        lay.tensors.append(Tensor(name, dims, ty, off, offset_pos=pos, dims_pos=dims_pos))
        pos = pos2
    align = lay.kv.get("general.alignment", (4, 32))[1] or 32
    lay.data_start = (pos + align - 1) // align * align
    lay.data = buf[lay.data_start:]
    return lay


def _enc_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _enc_value(ty, v) -> bytes:
    if ty == STRING:
        return _enc_string(v)
    if ty == ARRAY:
        item, items = v
        return struct.pack("<IQ", item, len(items)) + b"".join(_enc_value(item, x) for x in items)
    return struct.pack(SCALARS[ty], v)


def write(lay: Layout) -> bytes:
    out = bytearray(b"GGUF" + struct.pack("<IQQ", lay.version, len(lay.tensors), len(lay.kv)))
    for key, (ty, v) in lay.kv.items():
        out += _enc_string(key) + struct.pack("<I", ty) + _enc_value(ty, v)
    for t in lay.tensors:
        out += _enc_string(t.name) + struct.pack("<I", len(t.dims))
        out += struct.pack(f"<{len(t.dims)}Q", *t.dims) + struct.pack("<IQ", t.ggml_type, t.offset)
    align = lay.kv.get("general.alignment", (4, 32))[1]
    if not (0 < align <= 1 << 20 and align & (align - 1) == 0):
        align = 32   # a damaged alignment is the reader's problem; lay the data out as usual
    out += b"\0" * (-len(out) % align)
    return bytes(out) + lay.data
