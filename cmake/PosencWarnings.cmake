# SPDX-License-Identifier: MIT
# Flags for posenc's own tests, benchmarks and examples (never exported to consumers).
add_library(posenc_warnings INTERFACE)
target_compile_options(posenc_warnings INTERFACE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Werror>)
if(POSENC_NATIVE)
  target_compile_options(posenc_warnings INTERFACE $<$<CXX_COMPILER_ID:GNU,Clang>:-march=native>)
  # GCC 12.0-12.2 report -W(maybe-)uninitialized inside their own AVX-512 intrinsics (the
  # self-initialised `__Y = __Y` of _mm512_undefined_*, GCC PR 105593, fixed in 12.3) whenever
  # Eigen's double GEMM kernels are inlined under -march=native (-Wuninitialized at -O1, as in
  # sanitizer builds): not a defect of ours.
  target_compile_options(posenc_warnings INTERFACE
    $<$<AND:$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,12.3>>:-Wno-maybe-uninitialized$<SEMICOLON>-Wno-uninitialized>)
endif()
