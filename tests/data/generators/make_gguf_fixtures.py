#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Small GGUF files for the GGUF reader and the GGUF -> RoPE mapping tests (tests/data/gguf/).

Written with struct alone (no gguf-py, no posenc), in the layout of the GGUF specification
(ggml docs/gguf.md) version 3: magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata
count, key-value pairs (uint64-length string key, uint32 type, value), tensor infos (name, uint32
n_dims, uint64 ne[n_dims], uint32 ggml type, uint64 offset in the data section), padding to
general.alignment (32 by default), data. The RoPE keys and tensors are the ones llama.cpp's
convert_hf_to_gguf.py writes for each model (llama-arch.cpp names, ggml-org/llama.cpp@00395eb2):
Llama 3.1 (rope_freqs.weight = per-pair divisors of the llama3 scaling), Qwen2.5 YaRN,
Phi-3-128k (rope_factors_long/short.weight, rope.scaling.attn_factor), DeepSeek-V2-Lite (YaRN with
yarn_log_multiplier = 0.1 * mscale_all_dim). Model weights are left out: only metadata and the RoPE
tensors (plus a few small tensors in all_types.gguf).

Usage, from tests/data/: /usr/bin/python3 generators/make_gguf_fixtures.py gguf
"""
import math
import os
import struct
import sys

from longrope_golden import PHI3_LONG, PHI3_SHORT

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
           BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q8_0, GGML_F64, GGML_BF16 = 0, 1, 8, 28, 30


def string(text):
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def value(kind, v):
    if kind == STR:
        return string(v)
    if kind == ARR:
        element_kind, items = v
        return struct.pack("<IQ", element_kind, len(items)) + b"".join(value(element_kind, x)
                                                                      for x in items)
    return struct.pack(FORMATS[kind], v)


def write_gguf(path, kvs, tensors=(), alignment=32):
    """kvs: [(key, kind, value)]; tensors: [(name, ggml_type, ne, data_bytes)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, kind, v in kvs:
        out += string(key) + struct.pack("<I", kind) + value(kind, v)
    data, offset = b"", 0
    for name, ggml_type, ne, payload in tensors:
        out += string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ggml_type, offset)
        pad = (-len(payload)) % alignment
        data += payload + b"\0" * pad
        offset += len(payload) + pad
    if tensors:
        out += b"\0" * ((-len(out)) % alignment) + data
    with open(path, "wb") as f:
        f.write(out)


def f32s(values):
    return struct.pack("<%df" % len(values), *values)


def llama3_rope_factors(base, dim, factor, low, high, old):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs for rope_type llama3)."""
    freqs = [1.0 / base ** (k / dim) for k in range(0, dim, 2)]
    low_wl, high_wl = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "gguf"
    os.makedirs(folder, exist_ok=True)
    common = lambda arch, name: [("general.architecture", STR, arch), ("general.name", STR, name)]

    write_gguf(os.path.join(folder, "llama3_1_8b.gguf"), common("llama", "Llama-3.1-8B") + [
        ("llama.context_length", U32, 131072), ("llama.embedding_length", U32, 4096),
        ("llama.attention.head_count", U32, 32), ("llama.attention.head_count_kv", U32, 8),
        ("llama.rope.freq_base", F32, 500000.0), ("llama.rope.dimension_count", U32, 128),
    ], [("rope_freqs.weight", GGML_F32, [64],
         f32s(llama3_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)))])

    write_gguf(os.path.join(folder, "qwen2_5_7b_yarn.gguf"), common("qwen2", "Qwen2.5-7B") + [
        ("qwen2.context_length", U32, 131072), ("qwen2.embedding_length", U32, 3584),
        ("qwen2.attention.head_count", U32, 28), ("qwen2.rope.freq_base", F32, 1000000.0),
        ("qwen2.rope.scaling.type", STR, "yarn"), ("qwen2.rope.scaling.factor", F32, 4.0),
        ("qwen2.rope.scaling.original_context_length", U32, 32768),
    ])

    scale = 131072 / 4096
    attn = math.sqrt(1 + math.log(scale) / math.log(4096))
    write_gguf(os.path.join(folder, "phi3_mini_128k.gguf"), common("phi3", "Phi-3-mini-128k") + [
        ("phi3.context_length", U32, 131072), ("phi3.embedding_length", U32, 3072),
        ("phi3.attention.head_count", U32, 32), ("phi3.rope.freq_base", F32, 10000.0),
        ("phi3.rope.dimension_count", U32, 96),
        ("phi3.rope.scaling.original_context_length", U32, 4096),
        ("phi3.rope.scaling.attn_factor", F32, attn),
    ], [("rope_factors_long.weight", GGML_F32, [48], f32s(PHI3_LONG)),
        ("rope_factors_short.weight", GGML_F32, [48], f32s(PHI3_SHORT))])

    write_gguf(os.path.join(folder, "deepseek_v2_lite.gguf"), common("deepseek2", "DeepSeek-V2-Lite") + [
        ("deepseek2.context_length", U32, 163840), ("deepseek2.embedding_length", U32, 2048),
        ("deepseek2.attention.head_count", U32, 16), ("deepseek2.attention.key_length", U32, 192),
        ("deepseek2.rope.dimension_count", U32, 64), ("deepseek2.rope.freq_base", F32, 10000.0),
        ("deepseek2.rope.scaling.type", STR, "yarn"), ("deepseek2.rope.scaling.factor", F32, 40.0),
        ("deepseek2.rope.scaling.original_context_length", U32, 4096),
        ("deepseek2.rope.scaling.yarn_log_multiplier", F32, 0.1 * 0.707),
    ])

    # Every value type, nested arrays, alignment 64, and tensors of four float types and Q8_0.
    half = struct.pack("<4e", 1.0, -2.5, 0.099975586, 65504.0)
    bf16 = b"".join(struct.pack("<f", x)[2:] for x in (1.0, -3.0, 0.5, 256.0))
    q8_0 = struct.pack("<e", 0.5) + bytes(range(32))
    write_gguf(os.path.join(folder, "all_types.gguf"), common("llama", "all value types") + [
        ("general.alignment", U32, 64),
        ("t.u8", U8, 200), ("t.i8", I8, -100), ("t.u16", U16, 60000), ("t.i16", I16, -30000),
        ("t.u32", U32, 4000000000), ("t.i32", I32, -2000000000), ("t.f32", F32, 0.25),
        ("t.bool", BOOL, True), ("t.str", STR, "héllo"), ("t.u64", U64, 2 ** 63 + 5),
        ("t.i64", I64, -(2 ** 62)), ("t.f64", F64, 1e-300),
        ("t.arr_i32", ARR, (I32, [1, -2, 3])), ("t.arr_str", ARR, (STR, ["a", "", "ccc"])),
        ("t.arr_f32", ARR, (F32, [0.5, 1.5])), ("t.arr_empty", ARR, (U8, [])),
        ("t.nested", ARR, (ARR, [(U16, [1, 2]), (U16, [3])])),
        ("llama.embedding_length", U32, 64), ("llama.attention.head_count", U32, 4),
    ], [("f32.weight", GGML_F32, [3, 2], f32s([1, 2, 3, 4, 5, 6])),
        ("f16.weight", GGML_F16, [4], half),
        ("bf16.weight", GGML_BF16, [2, 2], bf16),
        ("f64.weight", GGML_F64, [1], struct.pack("<d", math.pi)),
        ("q8.weight", GGML_Q8_0, [32], q8_0)], alignment=64)


if __name__ == "__main__":
    main()
