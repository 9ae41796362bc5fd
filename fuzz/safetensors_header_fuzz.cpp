// SPDX-License-Identifier: MIT
// libFuzzer target for the safetensors validator: arbitrary bytes as a whole file. A well-formed
// outcome is a validated file (whose every tensor then converts) or std::invalid_argument; any
// other exception, crash or sanitizer report is a finding. Build and run for 60 s with Clang
// (from the repository root): fuzz/run_safetensors_fuzz.sh 60
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "posenc/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = posenc::io::SafetensorsFile::from_bytes(
        std::vector<unsigned char>(data, data + size), "fuzz-input");
    for (const auto& name : file.names()) {
      try {
        (void)file.values<double>(name);
        (void)file.values<std::int8_t>(name);
        if (file.info(name).shape.size() <= 2) (void)file.matrix<float>(name);
      } catch (const std::invalid_argument&) {
        // An F8 tensor, a floating tensor read as integers, an out-of-range or non-0/1 value.
      }
    }
  } catch (const std::invalid_argument&) {
    // A malformed file, reported as it should be.
  }
  return 0;
}
