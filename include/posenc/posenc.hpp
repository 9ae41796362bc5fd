// SPDX-License-Identifier: MIT
// posenc: positional encodings for length extrapolation. The umbrella header: the core (shapes,
// masks, stage concepts, attention kernels) and every encoder and analysis tool.
#pragma once

#include "posenc/attention.hpp"
#include "posenc/encoding.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"

// Absolute encodings (added to token embeddings before the projections).
#include "posenc/encoders/learned_absolute.hpp"
#include "posenc/encoders/sinusoidal.hpp"

// Rotary encodings and KV-cache decoding.
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/xpos.hpp"
#include "posenc/kv_cache.hpp"
