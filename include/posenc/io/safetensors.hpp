// SPDX-License-Identifier: MIT
// Loading and saving weights in the safetensors format (Hugging Face): an 8-byte little-endian
// header length, a JSON header naming each tensor's dtype, shape and byte range, then row-major
// little-endian data. Needs nlohmann/json (Debian: nlohmann-json3-dev); only code including io/.
//
//   SafetensorsFile     open(path) maps and validates a file; matrix<T>(name), values<T>(name)
//   SafetensorsWriter   add(name, matrix [, dtype]), add_metadata(key, value), write(path)
//   parse_safetensors   the validator alone, on bytes in memory (what the fuzz target drives)
#pragma once

#include "posenc/io/detail/safetensors_header.hpp"  // IWYU pragma: export
#include "posenc/io/detail/safetensors_reader.hpp"  // IWYU pragma: export
#include "posenc/io/detail/safetensors_writer.hpp"  // IWYU pragma: export
