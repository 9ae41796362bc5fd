#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes fixture.safetensors: a small safetensors file made without posenc and without the
`safetensors` package, from the format as the reference implementation (huggingface/safetensors,
safetensors/src/tensor.rs, `prepare`/`serialize`) lays it out:

  - 8-byte little-endian header length, then the header, then the data buffer;
  - the header compact JSON, "__metadata__" first (keys sorted), then the tensors in data order,
    padded with spaces to a multiple of 8 bytes;
  - data sorted by dtype descending in the reference's Dtype order (so the widest first), then by
    name; each tensor row-major little-endian.

Standard library only (struct rounds F16 to nearest even; BF16 is rounded here from the float32
bits, as torch converts float32 to bfloat16). Run from tests/data/:

    python3 generators/make_safetensors_fixture.py fixture.safetensors

Rerunning rewrites the file byte for byte. Read by tests/io/safetensors_test.cpp, which also
requires posenc's SafetensorsWriter to reproduce the file exactly.
"""
import json
import math
import struct
import sys

# The reference implementation's Dtype enum order (the writer sorts by it, descending).
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
               "U32", "F32", "F64", "I64", "U64"]


def bf16_bits(value):
    """float32(value) rounded to bfloat16, ties to even (NaN kept quiet)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if math.isnan(value):
        return (bits >> 16) | 0x0040
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16) & 0xFFFF


def pack(dtype, values):
    if dtype == "BF16":
        return b"".join(struct.pack("<H", bf16_bits(v)) for v in values)
    code = {"F64": "d", "F32": "f", "F16": "e", "I64": "q", "I32": "i", "I16": "h", "I8": "b",
            "U8": "B", "BOOL": "?"}[dtype]
    return struct.pack("<%d%s" % (len(values), code), *values)


# name: (dtype, shape, row-major values). tests/io/safetensors_test.cpp holds the same table.
TENSORS = {
    "f32_table": ("F32", [3, 2], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
    "f32_scalar": ("F32", [], [2.5]),
    "f32_empty": ("F32", [0, 4], []),
    "f64_values": ("F64", [2, 2], [0.1, -2.5, 1e300, 5e-324]),
    "bf16_slopes": ("BF16", [6], [1.0, -0.5, 3.140625, 2.0 ** -133, math.inf, 1.0 / 3.0]),
    "f16_values": ("F16", [2, 3], [65504.0, 2.0 ** -24, -0.0, 1.0 / 3.0, -2.5, -math.inf]),
    "i64_buckets": ("I64", [2, 3], [-3, 0, 7, 2 ** 40, -2 ** 63, 2 ** 63 - 1]),
    "i32_ids": ("I32", [3], [-2 ** 31, 0, 2 ** 31 - 1]),
    "i16_ids": ("I16", [2], [-32768, 32767]),
    "i8_ids": ("I8", [4], [-128, -1, 0, 127]),
    "u8_ids": ("U8", [2], [0, 255]),
    "bool_mask": ("BOOL", [3], [True, False, True]),
}
METADATA = {"format": "pt", "generator": "tests/data/generators/make_safetensors_fixture.py"}


def main(path):
    order = sorted(TENSORS, key=lambda name: (-DTYPE_ORDER.index(TENSORS[name][0]), name))
    header = {"__metadata__": dict(sorted(METADATA.items()))}
    data = b""
    for name in order:
        dtype, shape, values = TENSORS[name]
        assert math.prod(shape) == len(values), name
        blob = pack(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fixture.safetensors")
