# SPDX-License-Identifier: MIT
# Flags for posenc's own tests, benchmarks and examples (never exported to consumers).
add_library(posenc_warnings INTERFACE)
target_compile_options(posenc_warnings INTERFACE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Werror>)
if(POSENC_NATIVE)
  target_compile_options(posenc_warnings INTERFACE $<$<CXX_COMPILER_ID:GNU,Clang>:-march=native>)
endif()
