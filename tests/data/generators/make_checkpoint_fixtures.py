#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Writes tests/data/checkpoints/*.safetensors: small checkpoint-shaped files holding the
positional parameters of the golden cases under the tensor names the models' own code gives them,
plus a few unrelated tensors (as a real state dict has), so that tests/io/checkpoint_test.cpp can
load them through posenc/io/checkpoint.hpp and reproduce what the golden files expect.

Made with NumPy only (no torch, no `safetensors` package): the bytes are laid out as the reference
implementation (huggingface/safetensors `serialize`) lays them out - 8-byte little-endian header
length; compact JSON header with "__metadata__" first, then the tensors in data order, padded with
spaces to a multiple of 8; data sorted by dtype descending in the reference's Dtype order, then by
name; row-major little-endian. Metadata {"format": "pt"}, as transformers' save_pretrained writes.

Run from tests/data/ (rewrites every file byte for byte):

    /usr/bin/python3 generators/make_checkpoint_fixtures.py checkpoints

Files, their names and where the values come from:

  t5.safetensors            HF T5 (transformers modeling_t5.py): encoder/decoder
                            block.0.layer.0.SelfAttention.relative_attention_bias.weight
                            [num_buckets, heads]; encoder = t5_buckets.json bias_example table,
                            decoder = a table of distinct values (buckets checked against
                            t5_buckets.json nb8_md20_causal). F32, as released T5 weights.
  gpt2.safetensors          HF GPT-2: wpe.weight [n_positions, d] = learned_abs.json table. F32.
  opt.safetensors           HF OPT: model.decoder.embed_positions.weight [max_pos + 2, d] =
                            learned_abs.json table (offset 2). F32.
  kerple_log.safetensors    chijames/KERPLE (gpt-neox pipeline state dict, layers 2 and 3 share
  kerple_power.safetensors  the module): N.attention.rpe.bias_p / bias_a [heads, 1, 1] =
                            kerple.json log / power_ap_ parameters. F64.
  fire.safetensors          FIRE listing names (mlp.0.*, mlp.2.*, c, init_L, L_multiplier), one
                            gpt-neox layer per fire.json case: N.attention.fire.*. F64.
  dape_alibi.safetensors    chuanyang-Zheng/DAPE AliBi_C / ParallelKerpleLog_C / FIRE_C /
  dape_kerple.safetensors   Kerple_DAPEV2 under 2.attention.{alibi_c_embed, kerple_c, fire_c,
  dape_fire.safetensors     kerple_dapev2}: mlp2.0.*, mlp2.2.* (Linear or Conv2d [out, in, 1, k])
  dapev2_kerple.safetensors and the base bias's own names, values from the dape_*.json goldens.
                            F64.
  spe_sine.safetensors      aliutkus/spe (groove FastTransformerDecoder):
  spe_conv.safetensors      transformer_decoder.spe.0.{freqs, offsets, gains} or
                            .{conv_q.weight, conv_k.weight} [H*D, 1, ks], and
                            transformer_decoder.spe_filters.0.gate [H, D], from spe_*.json. F64.
  shaw.safetensors          tensor2tensor variable names (TF scopes, '/'-separated) of
                            dot_product_attention_relative: relative_positions_keys/embeddings and
                            relative_positions_values/embeddings [2k + 1, depth], from shaw.json.
                            F64.
"""
import json
import os
import sys

import numpy as np

# The reference implementation's Dtype enum order (the writer sorts by it, descending).
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
               "U32", "F32", "F64", "I64", "U64"]
NUMPY_DTYPE = {"F64": "<f8", "F32": "<f4"}


def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: (dtype, numpy array)}; writes the reference implementation's layout."""
    order = sorted(tensors, key=lambda n: (-DTYPE_ORDER.index(tensors[n][0]), n))
    header = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    blobs = []
    offset = 0
    for name in order:
        dtype, array = tensors[name]
        # astype(order="C") keeps a 0-d array 0-d (ascontiguousarray would make it [1]).
        data = np.asarray(array, dtype=np.float64).astype(NUMPY_DTYPE[dtype], order="C")
        blob = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(data.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for blob in blobs:
            out.write(blob)


def golden(name):
    with open(name) as f:
        return json.load(f)


def filler(*shape):
    """Deterministic values for the tensors that are not positional (never read by the tests)."""
    count = int(np.prod(shape))
    return (np.arange(count, dtype=np.float64).reshape(shape) % 7 - 3) / 8


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    pt = {"format": "pt"}

    # HF T5.
    t5 = golden("t5_buckets.json")["inputs"]["bias_example"]
    table = np.array(t5["table[bucket][head]"])
    attn = "block.0.layer.0.SelfAttention."
    write_safetensors(os.path.join(out_dir, "t5.safetensors"), {
        "shared.weight": ("F32", filler(6, 4)),
        "encoder." + attn + "q.weight": ("F32", filler(4, 4)),
        "encoder." + attn + "relative_attention_bias.weight": ("F32", table),
        "decoder." + attn + "q.weight": ("F32", filler(4, 4)),
        # Distinct per bucket and head: bucket b, head h holds b + h / 4 - 1.
        "decoder." + attn + "relative_attention_bias.weight":
            ("F32", np.arange(8)[:, None] + np.arange(2)[None, :] / 4.0 - 1.0),
    }, pt)

    # HF GPT-2 and OPT learned positions.
    learned = np.array(golden("learned_abs.json")["inputs"]["table[row][c]"])
    write_safetensors(os.path.join(out_dir, "gpt2.safetensors"), {
        "wte.weight": ("F32", filler(5, 3)),
        "wpe.weight": ("F32", learned),
        "h.0.attn.c_attn.weight": ("F32", filler(3, 9)),
    }, pt)
    write_safetensors(os.path.join(out_dir, "opt.safetensors"), {
        "model.decoder.embed_tokens.weight": ("F32", filler(5, 3)),
        "model.decoder.embed_positions.weight": ("F32", learned),
        "model.decoder.layers.0.self_attn.k_proj.weight": ("F32", filler(3, 3)),
    }, pt)

    # KERPLE (chijames/KERPLE megatron/mpu/layers.py), shared by the layers of a pipeline model.
    kerple = golden("kerple.json")["inputs"]
    for kind, p_key, a_key in (("log", "bias_p (r1, multiplier)", "bias_a (r2, inside log)"),
                               ("power_ap_", "bias_p (r2, exponent)", "bias_a (r1, multiplier)")):
        p = np.array(kerple[kind][p_key])[:, None, None]
        a = np.array(kerple[kind][a_key])[:, None, None]
        tensors = {"2.attention.query_key_value.weight": ("F64", filler(6, 2))}
        for layer in (2, 3):
            tensors["%d.attention.rpe.bias_p" % layer] = ("F64", p)
            tensors["%d.attention.rpe.bias_a" % layer] = ("F64", a)
        name = "kerple_log.safetensors" if kind == "log" else "kerple_power.safetensors"
        write_safetensors(os.path.join(out_dir, name), tensors, pt)

    # FIRE: one layer per golden case.
    fire = golden("fire.json")["inputs"]
    mlp = fire["mlp"]
    tensors = {}
    for layer, case in enumerate(fire["cases"], start=2):
        prefix = "%d.attention.fire." % layer
        tensors[prefix + "mlp.0.weight"] = ("F64", np.array(mlp["layer1.weight[out][in]"]))
        tensors[prefix + "mlp.0.bias"] = ("F64", np.array(mlp["layer1.bias"]))
        tensors[prefix + "mlp.2.weight"] = ("F64", np.array(mlp["layer2.weight[out][in]"]))
        tensors[prefix + "mlp.2.bias"] = ("F64", np.array(mlp["layer2.bias"]))
        tensors[prefix + "c"] = ("F64", np.array(case["c"]))
        tensors[prefix + "init_L"] = ("F64", np.array(case["init_L"]))
        tensors[prefix + "L_multiplier"] = ("F64", np.array(case["L_multiplier"]))
    write_safetensors(os.path.join(out_dir, "fire.safetensors"), tensors, pt)

    # DAPE (chuanyang-Zheng/DAPE megatron/model/positional_embeddings.py).
    def dape_network(prefix, network):
        return {prefix + "mlp2.0.weight": ("F64", np.array(network["w1"])),
                prefix + "mlp2.0.bias": ("F64", np.array(network["b1"])),
                prefix + "mlp2.2.weight": ("F64", np.array(network["w2"])),
                prefix + "mlp2.2.bias": ("F64", np.array(network["b2"]))}

    g = golden("dape_alibi_causal.json")
    prefix = "2.attention.alibi_c_embed."
    tensors = dape_network(prefix, g["inputs"]["mlp"])
    tensors[prefix + "slopes"] = ("F64", np.array(g["config"]["alibi_slopes"]))
    write_safetensors(os.path.join(out_dir, "dape_alibi.safetensors"), tensors, pt)

    for source, module, name in (("dape_kerple_causal.json", "kerple_c", "dape_kerple"),
                                 ("dapev2_kerple_conv3_causal.json", "kerple_dapev2",
                                  "dapev2_kerple")):
        g = golden(source)
        prefix = "2.attention.%s." % module
        network = g["inputs"]["mlp"] if "mlp" in g["inputs"] else g["inputs"]["conv"]
        tensors = dape_network(prefix, network)
        tensors[prefix + "bias_p"] = ("F64", np.array(g["inputs"]["kerple_p"])[:, None, None])
        tensors[prefix + "bias_a"] = ("F64", np.array(g["inputs"]["kerple_a"])[:, None, None])
        write_safetensors(os.path.join(out_dir, name + ".safetensors"), tensors, pt)

    g = golden("dape_fire_causal.json")
    prefix = "2.attention.fire_c."
    fire_mlp = g["inputs"]["fire_mlp"]
    tensors = dape_network(prefix, g["inputs"]["mlp"])
    tensors[prefix + "mlp.0.weight"] = ("F64", np.array(fire_mlp["w1"]))
    tensors[prefix + "mlp.0.bias"] = ("F64", np.array(fire_mlp["b1"]))
    tensors[prefix + "mlp.2.weight"] = ("F64", np.array(fire_mlp["w2"]))
    tensors[prefix + "mlp.2.bias"] = ("F64", np.array(fire_mlp["b2"]))
    tensors[prefix + "c"] = ("F64", np.array(g["config"]["fire_c"]))
    # FIRE_C stores init_L // 2 in its `init_L` parameter: the threshold actually used.
    tensors[prefix + "init_L"] = ("F64", np.array(g["config"]["fire_L_effective"]))
    tensors[prefix + "L_multiplier"] = ("F64", np.array(g["config"]["fire_L_multiplier"]))
    write_safetensors(os.path.join(out_dir, "dape_fire.safetensors"), tensors, pt)

    # SPE (aliutkus/spe src/pytorch/spe/spe.py), as the groove decoder registers it.
    g = golden("spe_sine.json")["inputs"]
    write_safetensors(os.path.join(out_dir, "spe_sine.safetensors"), {
        "transformer_decoder.spe.0.freqs": ("F64", np.array(g["freqs"])),
        "transformer_decoder.spe.0.offsets": ("F64", np.array(g["offsets"])),
        "transformer_decoder.spe.0.gains": ("F64", np.array(g["gains"])),
        "transformer_decoder.spe_filters.0.gate": ("F64", np.array(g["gate"])),
        "transformer_decoder.decoder_layers.0.norm1.weight": ("F64", filler(8)),
    }, pt)
    g = golden("spe_conv.json")["inputs"]
    write_safetensors(os.path.join(out_dir, "spe_conv.safetensors"), {
        "transformer_decoder.spe.0.conv_q.weight": ("F64", np.array(g["conv_q_weight"])),
        "transformer_decoder.spe.0.conv_k.weight": ("F64", np.array(g["conv_k_weight"])),
        "transformer_decoder.spe_filters.0.gate": ("F64", np.array(g["gate"])),
        "transformer_decoder.decoder_layers.0.norm1.weight": ("F64", filler(8)),
    }, pt)

    # Shaw et al. (tensor2tensor common_attention.py dot_product_attention_relative).
    g = golden("shaw.json")["inputs"]
    scope = ("transformer/body/encoder/layer_0/self_attention/multihead_attention/"
             "dot_product_attention_relative/")
    write_safetensors(os.path.join(out_dir, "shaw.safetensors"), {
        scope + "relative_positions_keys/embeddings": ("F64", np.array(g["aK_table[clip(j-i)+k][d]"])),
        scope + "relative_positions_values/embeddings":
            ("F64", np.array(g["aV_table[clip(j-i)+k][d]"])),
        "transformer/body/encoder/layer_0/self_attention/multihead_attention/q/kernel":
            ("F64", filler(8, 8)),
    }, {"format": "tf"})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_checkpoint_fixtures.py OUTPUT_DIR (run from tests/data/)")
    main(sys.argv[1])
