# SPDX-License-Identifier: MIT
# Flags for posenc's own tests, benchmarks and examples (never exported to consumers).
add_library(posenc_warnings INTERFACE)
target_compile_options(posenc_warnings INTERFACE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Werror>)
if(POSENC_NATIVE)
  target_compile_options(posenc_warnings INTERFACE $<$<CXX_COMPILER_ID:GNU,Clang>:-march=native>)
endif()
# GCC 12 reports false -W(maybe-)uninitialized inside its own AVX-512 intrinsics (their
# `__m512d __Y = __Y;` placeholders) whenever Eigen's GEMM, reductions or vectorised log/sqrt
# are inlined with -march=native on an AVX-512 machine (GCC PR 105593, fixed in GCC 13); with
# -Werror that fails any TU that multiplies matrices. Clang and GCC >= 13 keep both warnings.
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  target_compile_options(posenc_warnings INTERFACE -Wno-maybe-uninitialized -Wno-uninitialized)
endif()
