# SPDX-License-Identifier: MIT
# Flags for posenc's own tests, benchmarks and examples (never exported to consumers): warnings as
# errors, optionally -march=native (POSENC_NATIVE: through posenc::native), and the sanitizers
# named in POSENC_SANITIZE.
add_library(posenc_warnings INTERFACE)
target_compile_options(posenc_warnings INTERFACE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Werror>)
if(POSENC_NATIVE)
  # The same flag users get from posenc::native (empty if the compiler rejects -march=native).
  target_link_libraries(posenc_warnings INTERFACE posenc::native)
  if(NOT POSENC_NATIVE_FLAGS)
    message(STATUS "posenc: the compiler does not accept -march=native; POSENC_NATIVE has no effect")
  endif()
endif()
# GCC 12 reports false -W(maybe-)uninitialized inside its own AVX-512 intrinsics (their
# `__m512d __Y = __Y;` placeholders) whenever Eigen's GEMM, reductions or vectorised log/sqrt
# are inlined with -march=native on an AVX-512 machine (GCC PR 105593, fixed in GCC 13); with
# -Werror that fails any TU that multiplies matrices. Clang and GCC >= 13 keep both warnings.
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  target_compile_options(posenc_warnings INTERFACE -Wno-maybe-uninitialized -Wno-uninitialized)
endif()

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
