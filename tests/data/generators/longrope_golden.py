#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Golden LongRoPE (Phi-3 style) vectors: tests/data/longrope.json.

HF's formula (transformers' _compute_longrope_parameters, v5 line as stored at
8b-is/transformers@07dc0bab60a71fa935af8891ddda73e44293e18e, src/transformers/modeling_rope_utils.py;
the same formula as huggingface/transformers@ef46806472a64b0013ed413781e3afed82bfa047):

    inv_freq_k = 1 / (ext_k * base ** (2k / dim)),  ext = long_factor if seq_len > L0 else short_factor
    attention_factor = sqrt(1 + ln(s) / ln(L0)) if s > 1 else 1,  s = max_position_embeddings / L0
                       (unless rope_scaling sets factor or attention_factor)
    q' = q * cos(p * inv_freq) * attention_factor + rotate_half(q) * sin(p * inv_freq) * attention_factor

with seq_len = max(position_ids) + 1 of the forward call (dynamic_rope_update) and L0 =
original_max_position_embeddings. Everything here is float64 NumPy (HF runs the same steps in
float32). Usage, from tests/data/: /usr/bin/python3 generators/longrope_golden.py longrope.json
"""
import json
import sys

import numpy as np

from hf_rope_reference import inv_freq_and_attention, rotate_half_rows, standardize

# Per-pair factors of Phi-3-vision-128k-instruct's config.json (rope_scaling, 48 pairs for
# head_dim 96), as quoted by diffusers' tests/pipelines/omnigen test; Phi-3-mini-128k has the
# same shape (48 short and 48 long factors, L0 = 4096, max_position_embeddings = 131072).
PHI3_LONG = [1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547,
             1.2299998998641968, 1.2299998998641968, 1.2999999523162842, 1.4499999284744263,
             1.5999999046325684, 1.6499998569488525, 1.8999998569488525, 2.859999895095825,
             3.68999981880188, 5.419999599456787, 5.489999771118164, 5.489999771118164,
             9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
             15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055,
             30.009998321533203, 32.35000228881836, 32.590003967285156, 35.56000518798828,
             39.95000457763672, 53.840003967285156, 56.20000457763672, 57.95000457763672,
             59.29000473022461, 59.77000427246094, 59.920005798339844, 61.190006256103516,
             61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
             63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922,
             64.760009765625, 64.80001068115234, 64.81001281738281, 64.81001281738281]
PHI3_SHORT = [1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002,
              1.4000000000000004, 1.4500000000000004, 1.5500000000000005, 1.8500000000000008,
              1.9000000000000008] + [2.000000000000001] * 19 + [
              2.1000000000000005, 2.1000000000000005, 2.2, 2.3499999999999996, 2.3499999999999996,
              2.3499999999999996, 2.3499999999999996, 2.3999999999999995, 2.3999999999999995,
              2.6499999999999986, 2.6999999999999984, 2.8999999999999977, 2.9499999999999975,
              3.049999999999997, 3.049999999999997, 3.049999999999997]
assert len(PHI3_LONG) == 48 and len(PHI3_SHORT) == 48


def case(name, config, positions, seed, note):
    rng = np.random.default_rng(seed)
    rope, head_dim, rotary_dim, _ = standardize(config)
    l0 = rope["original_max_position_embeddings"]
    x = rng.standard_normal((len(positions), head_dim))
    short, attention, rope = inv_freq_and_attention(config, seq_len=l0)  # seq_len == L0: short
    long, attention_long, _ = inv_freq_and_attention(config, seq_len=l0 + 1)
    assert attention == attention_long
    return {
        "name": name,
        "note": note,
        "config": config,
        "head_dim": head_dim,
        "rotary_dim": rotary_dim,
        "original_max_position_embeddings": l0,
        "factor": rope.get("factor") or config["max_position_embeddings"] / l0,
        "inv_freq_short": short.tolist(),
        "inv_freq_long": long.tolist(),
        "attention_factor": attention,
        "positions": positions,
        "x": x.tolist(),
        # A call covering sequence length L0 (positions < L0 only) uses the short factors; one of
        # length L0 + 1 or more the long ones, for every row, including rows below L0.
        "rotated_short": rotate_half_rows(x[[i for i, p in enumerate(positions) if p < l0]],
                                          [p for p in positions if p < l0], short, attention,
                                          rotary_dim).tolist(),
        "rotated_long": rotate_half_rows(x, positions, long, attention, rotary_dim).tolist(),
    }


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "longrope.json"
    phi3 = {"hidden_size": 3072, "num_attention_heads": 32, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
            "rope_scaling": {"type": "longrope", "long_factor": PHI3_LONG,
                             "short_factor": PHI3_SHORT}}
    rng = np.random.default_rng(7)
    partial = {"hidden_size": 1024, "num_attention_heads": 8, "head_dim": 128,
               "partial_rotary_factor": 0.5, "max_position_embeddings": 65536,
               "rope_theta": 500000.0,
               "rope_parameters": {"rope_type": "longrope", "factor": 16.0,
                                   "attention_factor": 1.25,
                                   "original_max_position_embeddings": 4096,
                                   "short_factor": (1.0 + rng.random(32)).tolist(),
                                   "long_factor": (1.0 + 40.0 * rng.random(32)).tolist()}}
    unit = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 2048,
                             "short_factor": [1.0] * 32, "long_factor": [4.0] * 32}}
    cases = [
        case("phi3_128k", phi3, [0, 1, 17, 4095, 4096, 4097, 100000, 131071], 11,
             "Phi-3-128k: factor = 131072 / 4096 = 32 from the top-level "
             "original_max_position_embeddings, default attention factor"),
        case("partial_explicit", partial, [0, 3, 4095, 4096, 60000], 12,
             "partial_rotary_factor 0.5 (rotary_dim 64 of head_dim 128), explicit factor and "
             "attention_factor in v5 rope_parameters"),
        case("factor_one", unit, [0, 5, 2047, 2048, 9000], 13,
             "max_position_embeddings == L0: s = 1, attention factor 1"),
    ]
    golden = {
        "what": "LongRoPE (Phi-3) inverse frequencies, attention factor and rotated rows, float64",
        "reference": "HF transformers src/transformers/modeling_rope_utils.py "
                     "_compute_longrope_parameters and dynamic_rope_update (v5 line, "
                     "8b-is/transformers@07dc0bab60a71fa935af8891ddda73e44293e18e; same formula "
                     "at huggingface/transformers@ef46806472a64b0013ed413781e3afed82bfa047), "
                     "transcribed to NumPy float64 by tests/data/generators/hf_rope_reference.py; "
                     "rows by HF apply_rotary_pos_emb (rotate_half)",
        "notes": "rotated_short: rows with position < L0 under a call of sequence length <= L0; "
                 "rotated_long: all rows under a call of sequence length > L0 (HF switches every "
                 "row of the call, including positions below L0). x is [rows, head_dim]; "
                 "channels >= rotary_dim pass through.",
        "cases": cases,
    }
    with open(out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
