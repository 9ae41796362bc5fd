# SPDX-License-Identifier: MIT
# consumer.pkg_config: moves an installed posenc to another prefix, then builds and runs main.cpp
# the way a Makefile user would, with the README's command:
#   $CXX -std=c++20 -O2 main.cpp $(pkg-config --cflags --libs posenc)
# The .pc file names no -std= flag (the consumer chooses C++20 or newer); the test checks that too.
# Arguments (-D): PKG_CONFIG, CXX, PREFIX (installed tree), PKGCONFIG_DIR (relative to the prefix),
# VERSION (expected), SOURCE (main.cpp), WORK_DIR (scratch).
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT status EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "failed (${status}): ${command}\n${out}\n${err}")
  endif()
  set(out "${out}" PARENT_SCOPE)
endfunction()

# Paths in `text` must lead into the moved tree, never back to the original prefix.
function(expect_moved what text)
  string(FIND "${text}" "${moved}/" into_moved)
  string(FIND "${text}" "${PREFIX}/" into_original)
  if(into_moved EQUAL -1 OR NOT into_original EQUAL -1)
    message(FATAL_ERROR "${what} does not point into the moved prefix ${moved}:\n${text}")
  endif()
endfunction()

# The installed tree, copied somewhere else: the .pc file must locate itself (${pcfiledir}).
set(moved ${WORK_DIR}/moved-prefix)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${moved})
file(COPY ${PREFIX}/ DESTINATION ${moved})
set(ENV{PKG_CONFIG_PATH} ${moved}/${PKGCONFIG_DIR})

run(${PKG_CONFIG} --modversion posenc)
if(NOT out STREQUAL VERSION)
  message(FATAL_ERROR "pkg-config --modversion posenc: '${out}', expected '${VERSION}'")
endif()
run(${PKG_CONFIG} --cflags --libs posenc)
set(flags_text "${out}")
message(STATUS "pkg-config --cflags --libs posenc: ${flags_text}")
expect_moved("pkg-config --cflags" "${flags_text}")
if(flags_text MATCHES "-std=")
  message(FATAL_ERROR "pkg-config --cflags posenc forces a language standard: ${flags_text}")
endif()
separate_arguments(flags UNIX_COMMAND "${flags_text}")

run(${CXX} -std=c++20 -M ${SOURCE} ${flags})
expect_moved("the headers the compiler reads (-M)" "${out}")
run(${CXX} -std=c++20 -O2 [[-DPOSENC_CONSUMER="pkg-config"]] ${SOURCE} -o ${WORK_DIR}/consumer
    ${flags})
run(${WORK_DIR}/consumer)
message(STATUS "${out}")
