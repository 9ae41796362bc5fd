// SPDX-License-Identifier: MIT
// posenc: positional encodings for length extrapolation. The umbrella header: the core (shapes,
// masks, stage concepts, attention kernels) and every encoder and analysis tool.
#pragma once

// Core: shapes, masks, stage concepts, the attention kernels, composition, decoding.
#include "posenc/attention.hpp"
#include "posenc/attention_backward.hpp"
#include "posenc/attention_map.hpp"
#include "posenc/attention_options.hpp"
#include "posenc/compose.hpp"
#include "posenc/encoding.hpp"
#include "posenc/feature_maps.hpp"
#include "posenc/kv_cache.hpp"
#include "posenc/linear_attention.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

// Absolute encodings (added to token embeddings before the projections).
#include "posenc/encoders/learned_absolute.hpp"
#include "posenc/encoders/sinusoidal.hpp"

// Rotary encodings.
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/xpos.hpp"

// Relative position biases.
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"

// Data-adaptive positional encoding: a ScoreMixer over any bias.
#include "posenc/encoders/dape.hpp"

// Stochastic positional encoding.
#include "posenc/encoders/conv_spe.hpp"
#include "posenc/encoders/sine_spe.hpp"
#include "posenc/encoders/spe_gate.hpp"

// Analysis.
#include "posenc/analysis/attention_resolution.hpp"
#include "posenc/analysis/attention_statistics.hpp"
#include "posenc/analysis/empirical_receptive_field.hpp"
#include "posenc/analysis/receptive_field.hpp"
#include "posenc/analysis/series_convergence.hpp"
