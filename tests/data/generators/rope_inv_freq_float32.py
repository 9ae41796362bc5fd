#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Golden HF-style float32 RoPE frequencies for head dims that are not powers of two.

Writes tests/data/rope_inv_freq_float32.json: for each (head_dim d, base) the float32 inv_freq of
HF transformers' default RoPE initialisation (`_compute_default_rope_parameters`):

    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))

step by step as torch does it in float32:
  1. e_k = fl32(2k / d)            float32 division: inexact unless d is a power of two;
  2. pf_k = fl32(base ** e_k)      the power evaluated in double and rounded once to float32;
  3. inv_k = fl32(1 / pf_k)        float32 reciprocal (`1.0 / tensor` is reciprocal(tensor) * 1.0).

Every float32 rounding is done exactly here (rational arithmetic, round to nearest even), so the
script needs only the Python standard library. When torch is importable it also runs the HF
expression itself and checks that both agree bit for bit (--require-torch makes torch
mandatory). Usage: python3 rope_inv_freq_float32.py [output.json] [--require-torch]
"""
import json
import math
import struct
import sys
from fractions import Fraction

CASES = [(96, 10000.0), (80, 10000.0), (96, 500000.0)]


def round_f32(x):
    """x (a float or a Fraction) rounded to the nearest float32 (ties to even), as a Python float."""
    x = Fraction(x)
    if x == 0:
        return 0.0
    sign = -1 if x < 0 else 1
    x = abs(x)
    exponent = math.floor(math.log2(x.numerator) - math.log2(x.denominator))
    while Fraction(2) ** exponent > x:
        exponent -= 1
    while Fraction(2) ** (exponent + 1) <= x:
        exponent += 1
    assert -126 <= exponent <= 127, "normal float32 range only"
    scaled = x / Fraction(2) ** (exponent - 23)  # in [2^23, 2^24)
    mantissa = math.floor(scaled)
    rest = scaled - mantissa
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and mantissa % 2 == 1):
        mantissa += 1
    value = sign * float(Fraction(mantissa) * Fraction(2) ** (exponent - 23))
    assert struct.unpack("f", struct.pack("f", value))[0] == value
    return value


def hf_inv_freq(d, base):
    """Returns (exponents, inv_freq), both float32 values widened to float."""
    exponents, inv = [], []
    for k in range(d // 2):
        e = round_f32(Fraction(2 * k, d))
        pf = round_f32(base ** e)  # double pow, one rounding
        exponents.append(e)
        inv.append(round_f32(Fraction(1) / Fraction(pf)))
    return exponents, inv


def torch_inv_freq(torch, d, base):
    t = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    return [float(x) for x in (1.0 / (base ** t)).tolist()], [float(x) for x in t.tolist()]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else "rope_inv_freq_float32.json"
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
        if "--require-torch" in sys.argv:
            sys.exit("torch is required (--require-torch) but not importable")
    entries = []
    for d, base in CASES:
        exponents, inv = hf_inv_freq(d, base)
        inexact = [k for k, e in enumerate(exponents) if Fraction(e) != Fraction(2 * k, d)]
        entry = {
            "head_dim": d,
            "base": base,
            "exponent(float32)": exponents,
            "inv_freq(float32)": inv,
            "pairs_with_inexact_exponent": inexact,
        }
        if torch is not None:
            t_inv, t_exp = torch_inv_freq(torch, d, base)
            assert t_exp == exponents, f"d={d}: torch exponents differ"
            assert t_inv == inv, f"d={d} base={base}: torch inv_freq differs"
            entry["checked_against_torch"] = torch.__version__
        entries.append(entry)
    doc = {
        "what": "HF transformers default RoPE inv_freq in float32 for head dims that are not powers "
        "of two (the exponent 2k/d is rounded to float32 before the power).",
        "reference": {
            "repo": "huggingface/transformers",
            "path": "src/transformers/modeling_rope_utils.py",
            "function": "_compute_default_rope_parameters",
            "expression": "1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))",
            "how": "replayed with exact float32 rounding by tests/data/generators/"
            "rope_inv_freq_float32.py (standard library only; cross-checked against torch "
            "when it is installed: see checked_against_torch)",
        },
        "notes": [
            "e_k = fl32(2k/d); pf_k = fl32(base ** e_k) with the power in double; "
            "inv_k = fl32(1/pf_k).",
            "pairs_with_inexact_exponent lists the k whose float32 exponent differs from 2k/d.",
        ],
        "outputs": entries,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {out}" + ("" if torch is None else f" (checked against torch {torch.__version__})"))


if __name__ == "__main__":
    main()
