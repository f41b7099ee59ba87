"""sim.v1.StreamEncodeResponse bytes written straight from the runtime's numpy frames.

Building one protobuf Frame per latent frame through the message API and then serialising it was
the server's largest Python cost per stream and hop (~80 us for the 12 frames of one hop at all
levels). A Frame's wire form is simple: a fixed level prefix, a varint index, the packed `mu` (and
`logvar`) floats and a block of fixed-width scalars. This module writes exactly that; protobuf
parsers accept fields in any order, and tests/test_serve_units.py checks that the bytes parse to
the message the protobuf API builds. Concatenated responses parse as one response holding all
their frames (repeated fields append), which lets a stream's writer merge queued responses.

Field numbers and wire types come from the generated descriptor of protos/sim/v1/sim.proto.
"""
from __future__ import annotations

import struct

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
    """Writes the frames of one level: the parts that never change are built once."""

    def __init__(self, level: str, dim: int, hop_seconds: float, with_logvar: bool, with_kl: bool,
                 with_p_value: bool):
        name = level.encode()
        self.prefix = tag("level") + varint(len(name)) + name
        self.mu_header = tag("mu") + varint(4 * dim)
        self.lv_header = tag("logvar") + varint(4 * dim) if with_logvar else None
        self.row_bytes = 4 * dim
        self.hop_seconds = hop_seconds
        self.with_kl, self.with_p_value = with_kl, with_p_value
        # start_time (double), [kl], maha, ood_score, [p_value] (floats), ood (varint 0/1): one struct
        fmt, self.scalar_tags = "<", []
        for field, code in (("start_time", "d"), ("kl", "f"), ("maha", "f"), ("ood_score", "f"),
                            ("p_value", "f"), ("ood", "B")):
            if (field == "kl" and not with_kl) or (field == "p_value" and not with_p_value):
                continue
            fmt += "B" + code
            self.scalar_tags.append(tag(field)[0])
        self.scalars = struct.Struct(fmt)
        self.fixed_len = (len(self.prefix) + len(_INDEX_TAG) + len(self.mu_header) + self.row_bytes
                          + (len(self.lv_header) + self.row_bytes if with_logvar else 0) + self.scalars.size)

    def write(self, parts: list[bytes], index: np.ndarray, mu: np.ndarray, logvar: np.ndarray | None,
              kl: np.ndarray | None, maha: np.ndarray, score: np.ndarray, p_value: np.ndarray | None,
              ood: np.ndarray) -> None:
        """Append the wire bytes of these frames (as StreamEncodeResponse.frames entries) to parts."""
        rb = self.row_bytes
        mu_b = np.ascontiguousarray(mu, dtype="<f4").tobytes()
        lv_b = np.ascontiguousarray(logvar, dtype="<f4").tobytes() if self.lv_header is not None else None
        columns = [(index * self.hop_seconds).tolist()]
        if self.with_kl:
            columns.append(kl.tolist())
        columns += [maha.tolist(), score.tolist()]
        if self.with_p_value:
            columns.append(p_value.tolist())
        columns.append(ood.astype(np.uint8).tolist())
        tags = self.scalar_tags
        pack = self.scalars.pack
        for j, (idx, *values) in enumerate(zip(index.tolist(), *columns)):
            vidx = varint(idx)
            parts += (_FRAME_TAG, varint(self.fixed_len + len(vidx)), self.prefix, _INDEX_TAG, vidx,
                      self.mu_header, mu_b[j * rb:(j + 1) * rb])
            if lv_b is not None:
                parts += (self.lv_header, lv_b[j * rb:(j + 1) * rb])
            parts.append(pack(*[x for pair in zip(tags, values) for x in pair]))
