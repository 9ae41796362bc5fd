# SPDX-License-Identifier: MIT
# consumer.install: the install commands of the README, run on a fresh build directory:
#   cmake -S <source> -B <build> -DCMAKE_BUILD_TYPE=Release -DPOSENC_BUILD_TESTS=OFF
#         -DPOSENC_BUILD_EXAMPLES=OFF -DPOSENC_BUILD_BENCHMARKS=OFF
#   cmake --install <build> --prefix <prefix>
# with GoogleTest, Google Benchmark and nlohmann-json made unfindable (installing needs none of
# them), then checks the installed tree. Arguments (-D): SOURCE_DIR, BINARY_DIR, PREFIX, GENERATOR,
# CXX, BUILD_TYPE, Eigen3_DIR, PKGCONFIG_DIR (relative to the prefix), MAKE_PROGRAM (optional).
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "failed (${status}): ${command}\n${out}\n${err}")
  endif()
endfunction()

set(make_program "")
if(MAKE_PROGRAM)
  set(make_program -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
file(REMOVE_RECURSE ${BINARY_DIR} ${PREFIX})
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${BINARY_DIR} -G ${GENERATOR} ${make_program}
    -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=${BUILD_TYPE} -DEigen3_DIR=${Eigen3_DIR}
    -DPOSENC_BUILD_TESTS=OFF -DPOSENC_BUILD_EXAMPLES=OFF -DPOSENC_BUILD_BENCHMARKS=OFF
    -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=ON
    -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON)
run(${CMAKE_COMMAND} --install ${BINARY_DIR} --prefix ${PREFIX})

set(pc ${PREFIX}/${PKGCONFIG_DIR}/posenc.pc)
foreach(file include/posenc/posenc.hpp ${PKGCONFIG_DIR}/posenc.pc)
  if(NOT EXISTS ${PREFIX}/${file})
    message(FATAL_ERROR "cmake --install did not install ${file} under ${PREFIX}")
  endif()
endforeach()
file(GLOB_RECURSE configs ${PREFIX}/posencConfig.cmake)
if(NOT configs)
  message(FATAL_ERROR "cmake --install did not install posencConfig.cmake under ${PREFIX}")
endif()
# The .pc file leaves the language standard to the consumer (C++20 or newer): a -std= flag in
# Cflags would override the consumer's own -std=c++23.
file(STRINGS ${pc} cflags REGEX "^Cflags:")
if(cflags MATCHES "-std=")
  message(FATAL_ERROR "${pc} forces a language standard: ${cflags}")
endif()
message(STATUS "installed posenc into ${PREFIX} (${cflags})")
