# SPDX-License-Identifier: MIT
# posenc_native_flags(<var>): sets <var> to -march=native when the C++ compiler of the current
# project accepts it, and to nothing otherwise (no C++ enabled, cross-compiling, or a compiler
# without the flag, such as MSVC). Used for the posenc::native target by the top-level
# CMakeLists.txt (add_subdirectory, FetchContent) and by the installed posencConfig.cmake
# (find_package), so the check runs with the compiler of the project that links posenc::native.
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

function(posenc_native_flags out)
  set(flags "")
  get_property(languages GLOBAL PROPERTY ENABLED_LANGUAGES)
  if("CXX" IN_LIST languages AND NOT CMAKE_CROSSCOMPILING)
    check_cxx_compiler_flag(-march=native POSENC_CXX_ACCEPTS_MARCH_NATIVE)
    if(POSENC_CXX_ACCEPTS_MARCH_NATIVE)
      set(flags -march=native)
    endif()
  endif()
  set(${out} "${flags}" PARENT_SCOPE)
endfunction()
