# SPDX-License-Identifier: MIT
"""NumPy transcription (float64) of Hugging Face transformers' RoPE parameter code.

Read from src/transformers/modeling_rope_utils.py of transformers' v5 line, as stored at
8b-is/transformers@07dc0bab60a71fa935af8891ddda73e44293e18e (a mirror of huggingface/transformers
main): RotaryEmbeddingConfigMixin.convert_rope_params_to_dict / standardize_rope_params (which
keys win), _compute_{linear_scaling,dynamic_ntk,yarn,longrope,llama3}_parameters and each model's
default. Compared with huggingface/transformers@ef46806472a64b0013ed413781e3afed82bfa047 (v4.4x)
for the older rules noted inline. HF evaluates inv_freq in float32; this transcription keeps every
step in float64, so it is the formula, not HF's rounding.

Shared by longrope_golden.py and rope_config_golden.py; standard library + NumPy only.
"""
import math

import numpy as np


def standardize(config):
    """Returns (params, head_dim, dim, max_position_embeddings) as HF's config class sees them."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope = dict(rope)
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))  # default_theta
    if config.get("partial_rotary_factor") is not None:
        rope["partial_rotary_factor"] = config["partial_rotary_factor"]
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps original_max_position_embeddings at the top level; it wins there.
        if "original_max_position_embeddings" in config:
            rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    if config.get("qk_rope_head_dim") is not None:  # DeepSeek-V2/V3: head_dim = qk_rope_head_dim
        head_dim = config["qk_rope_head_dim"]
    else:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    return rope, head_dim, dim, config.get("max_position_embeddings")


def default_inv_freq(base, dim):
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))


def inv_freq_and_attention(config, seq_len=None):
    """(inv_freq, attention_factor, rope) for a config dict, as ROPE_INIT_FUNCTIONS computes."""
    rope, head_dim, dim, max_pos = standardize(config)
    kind = rope["rope_type"]
    base = float(rope["rope_theta"])
    if kind == "default":
        return default_inv_freq(base, dim), 1.0, rope
    if kind == "linear":
        return default_inv_freq(base, dim) / rope["factor"], 1.0, rope
    if kind == "dynamic":
        factor = rope["factor"]
        seq = max_pos if seq_len is None else max(seq_len, max_pos)
        base = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return default_inv_freq(base, dim), 1.0, rope
    if kind == "yarn":
        factor = rope["factor"]
        l0 = rope["original_max_position_embeddings"]
        if factor is None:  # v5; v4.5x replaced an explicit factor by max_pos / l0 whenever l0 was set
            factor = max_pos / l0
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

        def get_mscale(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = rope.get("attention_factor")
        if attention is None:
            if mscale and mscale_all_dim:
                attention = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention = get_mscale(factor)
        beta_fast = rope.get("beta_fast") or 32
        beta_slow = rope.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(l0 / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float64) / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        keep = 1 - ramp
        return interpolation * (1 - keep) + extrapolation * keep, attention, rope
    if kind == "longrope":
        l0 = rope["original_max_position_embeddings"]
        factor = rope.get("factor")
        if factor is None:
            factor = max_pos / l0
        attention = rope.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(l0))
        ext = rope["long_factor"] if seq_len and seq_len > l0 else rope["short_factor"]
        ext = np.asarray(ext, dtype=np.float64)
        shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
        return 1.0 / (ext * base ** shape), attention, rope
    if kind == "llama3":
        inv = default_inv_freq(base, dim)
        factor, low_f, high_f = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        low_wl, high_wl = old / low_f, old / high_f
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low_f) / (high_f - low_f)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return np.where(medium, smoothed, out), 1.0, rope
    raise ValueError(f"unknown rope_type {kind}")


def rotate_half_rows(x, positions, inv_freq, attention, rotary_dim):
    """HF apply_rotary_pos_emb on rows x [n, head_dim]: the first rotary_dim channels rotate,
    emb = cat(freqs, freqs), cos/sin times the attention factor."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    half = rotary_dim // 2
    for r, p in enumerate(positions):
        angles = np.float64(p) * inv_freq
        cos = np.concatenate([np.cos(angles), np.cos(angles)]) * attention
        sin = np.concatenate([np.sin(angles), np.sin(angles)]) * attention
        xr = x[r, :rotary_dim]
        rotated = np.concatenate([-xr[half:], xr[:half]])
        out[r, :rotary_dim] = xr * cos + rotated * sin
    return out
