// SPDX-License-Identifier: MIT
// posenc: positional encodings for length extrapolation. The umbrella header: the core (shapes,
// masks, stage concepts, attention kernels) and every encoder and analysis tool.
#pragma once

#include "posenc/analysis/attention_resolution.hpp"
#include "posenc/analysis/attention_scores.hpp"
#include "posenc/analysis/attention_statistics.hpp"
#include "posenc/analysis/receptive_field.hpp"
#include "posenc/attention.hpp"
#include "posenc/encoding.hpp"
#include "posenc/mask.hpp"
#include "posenc/tensor.hpp"
