#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Real-shaped HF config.json files (tests/data/hf_configs/) and the RoPE each one means
(tests/data/rope_configs.json), computed by hf_rope_reference.py, a float64 NumPy transcription of
HF transformers' modeling_rope_utils.py (v5 line, 8b-is/transformers@07dc0bab60a71fa935af8891ddda73e
44293e18e). The config files hold only the keys HF's RoPE code reads (plus model_type).

Usage, from tests/data/: /usr/bin/python3 generators/rope_config_golden.py rope_configs.json
"""
import json
import os
import sys

from hf_rope_reference import inv_freq_and_attention, standardize
from longrope_golden import PHI3_LONG, PHI3_SHORT

CONFIGS = {
    # meta-llama/Llama-3.1-8B config.json
    "llama3_1_8b": {
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    # Qwen/Qwen2.5-7B-Instruct with the YaRN block its model card adds (legacy "type" key)
    "qwen2_5_7b_yarn": {
        "model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
        "num_key_value_heads": 4, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768,
                         "type": "yarn"}},
    # microsoft/Phi-3-mini-128k-instruct shape: top-level original_max_position_embeddings
    "phi3_mini_128k": {
        "model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32,
        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"long_factor": PHI3_LONG, "short_factor": PHI3_SHORT,
                         "type": "longrope"}},
    # deepseek-ai/DeepSeek-V2-Lite: RoPE on qk_rope_head_dim = 64 channels, mscale == mscale_all_dim
    "deepseek_v2_lite": {
        "model_type": "deepseek_v2", "hidden_size": 2048, "num_attention_heads": 16,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                         "type": "yarn"}},
    # DeepSeek-V2-style YaRN whose mscale and mscale_all_dim differ: magnitude g(40, 1)/g(40, 0.707)
    "deepseek_style_mscale": {
        "model_type": "deepseek_v2", "hidden_size": 2048, "num_attention_heads": 16,
        "qk_rope_head_dim": 64, "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn"}},
    # partial_rotary_factor 0.5 with dynamic NTK (seq_len 8192 > max_position_embeddings 4096)
    "partial_dynamic": {
        "model_type": "stablelm", "hidden_size": 2048, "num_attention_heads": 32,
        "partial_rotary_factor": 0.5, "max_position_embeddings": 4096, "rope_theta": 10000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    # transformers v5 layout: rope_theta inside rope_parameters; gpt-oss-like truncate false
    "v5_yarn_no_truncate": {
        "model_type": "gpt_oss", "hidden_size": 2880, "num_attention_heads": 64, "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000, "factor": 32.0,
                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                            "original_max_position_embeddings": 4096}},
    # explicit head_dim (Gemma-style), no scaling
    "default_head_dim": {
        "model_type": "gemma", "hidden_size": 2048, "num_attention_heads": 8, "head_dim": 256,
        "max_position_embeddings": 8192, "rope_theta": 10000.0},
    # linear position interpolation, legacy key
    "linear_legacy": {
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
        "max_position_embeddings": 16384, "rope_theta": 10000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0}},
}

# (config name, sequence length the encoder is built for, or None for HF's initial frequencies)
CASES = [("llama3_1_8b", None), ("qwen2_5_7b_yarn", None), ("phi3_mini_128k", None),
         ("phi3_mini_128k", 4096), ("phi3_mini_128k", 4097), ("deepseek_v2_lite", None),
         ("deepseek_style_mscale", None), ("partial_dynamic", None), ("partial_dynamic", 8192),
         ("v5_yarn_no_truncate", None), ("default_head_dim", None), ("linear_legacy", None)]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "rope_configs.json"
    os.makedirs("hf_configs", exist_ok=True)
    for name, config in CONFIGS.items():
        with open(os.path.join("hf_configs", name + ".json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    cases = []
    for name, seq_len in CASES:
        config = CONFIGS[name]
        rope, head_dim, dim, _ = standardize(config)
        inv_freq, attention, _ = inv_freq_and_attention(config, seq_len=seq_len)
        cases.append({"config": name, "sequence_length": seq_len or 0, "rope_type": rope["rope_type"],
                      "head_dim": head_dim, "rotary_dim": dim, "base": float(rope["rope_theta"]),
                      "inv_freq": inv_freq.tolist(), "attention_factor": float(attention)})
    golden = {
        "what": "RoPE inverse frequencies and attention factor (cos/sin magnitude) that HF "
                "transformers derives from each config in tests/data/hf_configs/, float64",
        "reference": "HF transformers src/transformers/modeling_rope_utils.py, v5 line "
                     "(8b-is/transformers@07dc0bab60a71fa935af8891ddda73e44293e18e): "
                     "standardize_rope_params and ROPE_INIT_FUNCTIONS, transcribed to NumPy "
                     "float64 in tests/data/generators/hf_rope_reference.py",
        "notes": "sequence_length 0 = HF's initial inv_freq (seq_len None: dynamic uses "
                 "max_position_embeddings, longrope the short factors). DeepSeek's head_dim is "
                 "qk_rope_head_dim (the rotated q_pe/k_pe part), as HF's DeepseekV2Config sets it.",
        "cases": cases,
    }
    with open(out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
