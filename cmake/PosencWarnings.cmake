# SPDX-License-Identifier: MIT
# Flags for posenc's own tests, benchmarks and examples (never exported to consumers): warnings as
# errors, optionally -march=native, and the sanitizers named in POSENC_SANITIZE.
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
# GCC 12 reports a false "may be used uninitialized" inside its own avx512fintrin.h when Eigen's
# AVX-512 packet code is inlined into our functions (the warning is attributed to our TU, so
# -isystem does not silence it). Silenced for GCC only; clang and the other -W flags still apply.
target_compile_options(posenc_warnings INTERFACE
  $<$<CXX_COMPILER_ID:GNU>:-Wno-maybe-uninitialized>)

# POSENC_SANITIZE="address,undefined" builds our targets with ASan + UBSan. Any report is fatal
# (-fno-sanitize-recover=all), so a sanitizer finding fails the test that triggered it.
if(POSENC_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "^(GNU|Clang)$")
    message(FATAL_ERROR "POSENC_SANITIZE needs GCC or Clang, not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  set(posenc_sanitize_flags
      -fsanitize=${POSENC_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(posenc_warnings INTERFACE ${posenc_sanitize_flags})
  target_link_options(posenc_warnings INTERFACE ${posenc_sanitize_flags})
  message(STATUS "posenc: tests, benchmarks and examples built with -fsanitize=${POSENC_SANITIZE}")
endif()
