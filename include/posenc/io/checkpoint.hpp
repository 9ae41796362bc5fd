// SPDX-License-Identifier: MIT
// Loading and saving every learned encoder by the tensor names real checkpoints use (HF T5,
// GPT-2, BERT, RoBERTa, OPT, BART; the KERPLE, FIRE, DAPE and SPE authors' code; tensor2tensor /
// OpenNMT-py for Shaw), through posenc/io/safetensors.hpp. README "Loading weights" has the table
// of names and the repositories and commits each mapping follows.
//
//   load_t5_bias<T>(file [, T5Stack, max_distance])       <stack>.block.0.layer.0.SelfAttention.
//                                                          relative_attention_bias.weight
//   load_learned_absolute<T>(file, PositionTable::gpt2)   wpe.weight, …; opt/bart: offset 2
//   load_kerple<T>(file, prefix [, kernel, form])         <prefix>bias_p, bias_a  [H, 1, 1]
//   load_fire<T>(file, prefix [, options])                <prefix>mlp.0.*, mlp.2.*, c, init_L,
//                                                          L_multiplier
//   load_alibi<T>, load_shaw<T>                           <prefix>slopes; relative_positions_*
//   load_dape<T>(file, prefix, bias), load_dape_v2        <prefix>mlp2.0.*, mlp2.2.*
//   load_sine_spe_parameters / load_conv_spe_parameters / load_spe_gate, load_sine_spe,
//   load_conv_spe                                          freqs, offsets, gains; conv_q/conv_k;
//                                                          gate
//   save(writer, encoder, prefix [, dtype])               the same names (F32 for float encoders,
//                                                          F64 for double by default)
//
// `prefix` is the module's state-dict prefix, ending in its separator ("2.attention.rpe.").
// Every error is a std::invalid_argument naming the function, the file and the tensor (with its
// shape and dtype, or the tensors whose names end alike when it is missing).
#pragma once

#include "posenc/io/detail/checkpoint_absolute.hpp"  // IWYU pragma: export
#include "posenc/io/detail/checkpoint_biases.hpp"    // IWYU pragma: export
#include "posenc/io/detail/checkpoint_dape.hpp"      // IWYU pragma: export
#include "posenc/io/detail/checkpoint_spe.hpp"       // IWYU pragma: export
