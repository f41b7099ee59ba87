"""sim.v1.StreamEncodeResponse bytes written straight from the runtime's numpy frames.

Building one protobuf Frame per latent frame through the message API and then serialising it was
the server's largest Python cost per stream and hop (~80 us for the 12 frames of one hop at all
levels). A Frame's wire form is simple: a fixed level prefix, a varint index, the packed `mu` (and
`logvar`) floats and a block of fixed-width scalars. This module writes exactly that, for the frames
of all streams of a batch at once (numpy rows, no Python loop per frame or per stream); protobuf
parsers accept fields in any order, and tests/test_serve_units.py checks that the bytes parse to
the message the protobuf API builds. Concatenated responses parse as one response holding all
their frames (repeated fields append), which lets a stream's writer merge queued responses.

Field numbers and wire types come from the generated descriptor of protos/sim/v1/sim.proto.
"""
from __future__ import annotations

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from protos.sim.v1 import sim_pb2 as pb

# wire type of each scalar field type used here (repeated fields of these messages are packed or
# messages: wire type 2, length-delimited)
_WIRE_TYPE = {FieldDescriptor.TYPE_STRING: 2, FieldDescriptor.TYPE_INT64: 0, FieldDescriptor.TYPE_DOUBLE: 1,
              FieldDescriptor.TYPE_FLOAT: 5, FieldDescriptor.TYPE_BOOL: 0, FieldDescriptor.TYPE_MESSAGE: 2}


def _number_and_wire_type(field: FieldDescriptor) -> tuple[int, int]:
    return field.number, 2 if field.is_repeated else _WIRE_TYPE[field.type]


# (field number, wire type) of sim.v1.Frame's fields and of StreamEncodeResponse.frames, read from the
# generated descriptor so protos/sim/v1/sim.proto stays their only definition
FIELDS = {f.name: _number_and_wire_type(f) for f in pb.Frame.DESCRIPTOR.fields}
RESPONSE_FRAMES = _number_and_wire_type(pb.StreamEncodeResponse.DESCRIPTOR.fields_by_name["frames"])


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(name: str) -> bytes:
    field, wire_type = FIELDS[name]
    return varint(field << 3 | wire_type)


_FRAME_TAG = varint(RESPONSE_FRAMES[0] << 3 | RESPONSE_FRAMES[1])
_INDEX_TAG = tag("index")


class LevelWriter:
    """Writes the frames of one level for many streams at once, as whole numpy rows.

    A frame's record is [frames tag][record length][level][mu][logvar?][scalars][index]: every part
    has a fixed width except the two varints, whose width depends only on the index's width. So the
    frames are grouped by the index's varint width (nearly always one group: a stream crosses a
    width only at frames 128, 16384, 2**21, ...), and each group is one (frames, bytes) uint8
    array filled column block by column block: no Python work per frame."""

    def __init__(self, level: str, dim: int, hop_samples: int, sample_rate: int, with_logvar: bool, with_kl: bool,
                 with_p_value: bool):
        name = level.encode()
        self.hop_samples, self.sample_rate = hop_samples, sample_rate
        body = bytearray(tag("level") + varint(len(name)) + name)
        self.blocks: list[tuple[str, int, np.dtype]] = []  # (what, offset in the body, element type)

        def block(what: str, header: bytes, dtype: str, count: int = 1) -> None:
            body.extend(header)
            self.blocks.append((what, len(body), np.dtype(dtype)))
            body.extend(bytes(np.dtype(dtype).itemsize * count))

        block("mu", tag("mu") + varint(4 * dim), "<f4", dim)
        if with_logvar:
            block("logvar", tag("logvar") + varint(4 * dim), "<f4", dim)
        for field, dtype in (("start_time", "<f8"), ("kl", "<f4"), ("maha", "<f4"), ("ood_score", "<f4"),
                             ("p_value", "<f4"), ("ood", "u1")):
            if (field == "kl" and not with_kl) or (field == "p_value" and not with_p_value):
                continue
            block(field, tag(field), dtype)
        body.extend(_INDEX_TAG)
        self.body = bytes(body)
        self._templates: dict[int, tuple[np.ndarray, int]] = {}

    def _template(self, width: int) -> tuple[np.ndarray, int]:
        """The record of a frame whose index varint is `width` bytes, with zeros for the values, and
        where its body starts."""
        got = self._templates.get(width)
        if got is None:
            head = _FRAME_TAG + varint(len(self.body) + width)
            got = self._templates[width] = (np.frombuffer(head + self.body + bytes(width), np.uint8), len(head))
        return got

    def encode(self, index: np.ndarray, mu: np.ndarray, logvar: np.ndarray | None, kl: np.ndarray | None,
               maha: np.ndarray, score: np.ndarray, p_value: np.ndarray | None, ood: np.ndarray) -> "Encoded":
        """The wire bytes of these frames (as StreamEncodeResponse.frames entries)."""
        index = np.asarray(index, dtype=np.int64)
        values = {"mu": mu, "logvar": logvar, "start_time": index * self.hop_samples / self.sample_rate,
                  "kl": kl, "maha": maha, "ood_score": score, "p_value": p_value, "ood": ood}
        widths = varint_widths(index)
        lo, hi = int(widths.min()), int(widths.max())
        groups = [lo] if lo == hi else sorted(set(widths.tolist()))
        blobs, row_group, row_offset = [], np.zeros(index.size, np.intp), np.zeros(index.size, np.intp)
        for g, width in enumerate(groups):
            rows = None if len(groups) == 1 else np.flatnonzero(widths == width)
            n = index.size if rows is None else rows.size
            template, start = self._template(width)
            rec = np.empty((n, template.size), np.uint8)
            rec[:] = template
            for what, offset, dtype in self.blocks:
                v = values[what] if rows is None else values[what][rows]
                v = np.ascontiguousarray(v, dtype=dtype).reshape(n, -1)
                at = start + offset
                rec[:, at:at + v.shape[1] * dtype.itemsize] = v.view(np.uint8)
            idx = index if rows is None else index[rows]
            for k in range(width):  # the index varint, least significant 7 bits first
                rec[:, template.size - width + k] = ((idx >> (7 * k)) & 0x7F) | (0x80 if k < width - 1 else 0)
            blobs.append((rec.tobytes(), template.size))
            at_rows = slice(None) if rows is None else rows
            row_group[at_rows] = g
            row_offset[at_rows] = np.arange(n) * template.size
        return Encoded(blobs, row_group, row_offset)


class Encoded:
    """The encoded frames of one LevelWriter.encode call; chunks(a, b) is the bytes of rows a..b-1."""

    def __init__(self, blobs: list[tuple[bytes, int]], row_group: np.ndarray, row_offset: np.ndarray):
        self.blobs = [(memoryview(b), size) for b, size in blobs]
        self.row_group, self.row_offset = row_group, row_offset

    def chunks(self, a: int, b: int) -> list[memoryview]:
        if b <= a:
            return []
        groups = self.row_group
        # one stream's indices increase, so its rows' groups (ordered by width) never decrease
        if groups[a] == groups[b - 1]:
            blob, size = self.blobs[groups[a]]
            return [blob[self.row_offset[a]:self.row_offset[b - 1] + size]]
        out = []
        for r in range(a, b):  # a stream crossing a varint width in this batch: rare, row by row
            blob, size = self.blobs[groups[r]]
            out.append(blob[self.row_offset[r]:self.row_offset[r] + size])
        return out


def varint_widths(n: np.ndarray) -> np.ndarray:
    """Bytes of the varint of each non-negative int."""
    widths = np.ones(n.shape, np.int64)
    if n.size:
        top, k = int(n.max()), 1
        while top >= 1 << (7 * k):
            widths += n >= (1 << (7 * k))
            k += 1
    return widths
