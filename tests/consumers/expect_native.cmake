# SPDX-License-Identifier: MIT
# Test only, included by the consumers that link posenc::native: the target links posenc::posenc
# and carries -march=native whenever this project's compiler accepts the flag.
include(CheckCXXCompilerFlag)
check_cxx_compiler_flag(-march=native consumer_accepts_march_native)
get_target_property(native_options posenc::native INTERFACE_COMPILE_OPTIONS)
get_target_property(native_links posenc::native INTERFACE_LINK_LIBRARIES)
message(STATUS "posenc::native: compile options '${native_options}', links '${native_links}'")
if(consumer_accepts_march_native AND NOT CMAKE_CROSSCOMPILING
   AND NOT "${native_options}" MATCHES "-march=native")
  message(FATAL_ERROR "posenc::native lacks -march=native, which the compiler accepts")
endif()
if(NOT "${native_links}" MATCHES "posenc")
  message(FATAL_ERROR "posenc::native does not link posenc::posenc")
endif()
