# SPDX-License-Identifier: MIT
# CTest check: the README's code block between <!-- snippet:NAME --> and <!-- /snippet:NAME -->
# equals the example SOURCE without its SPDX line, so the two cannot drift (the example itself is
# built and run by CTest as example.NAME). Usage:
#   cmake -DREADME=README.md -DSOURCE=examples/NAME.cpp -DNAME=NAME -P check_readme_copy.cmake
cmake_minimum_required(VERSION 3.23)  # policies of the project (while(TRUE), ...)
file(READ ${README} readme)
string(REGEX MATCH "<!-- snippet:${NAME} -->[^`]*```cpp\n(.*)```[^`]*<!-- /snippet:${NAME} -->" _
       "${readme}")
if(NOT CMAKE_MATCH_1)
  message(FATAL_ERROR "${README} lacks the <!-- snippet:${NAME} --> code block")
endif()
set(block "${CMAKE_MATCH_1}")
file(READ ${SOURCE} source)
string(REGEX REPLACE "^// SPDX-License-Identifier: [^\n]*\n" "" source "${source}")
if(NOT block STREQUAL source)
  # Name the first line that differs (code has semicolons, so no CMake lists: walk the text).
  set(line 1)
  while(TRUE)
    string(FIND "${block}" "\n" a)
    string(FIND "${source}" "\n" b)
    if(a EQUAL -1 OR b EQUAL -1)
      break()
    endif()
    string(SUBSTRING "${block}" 0 ${a} block_line)
    string(SUBSTRING "${source}" 0 ${b} source_line)
    if(NOT block_line STREQUAL source_line)
      break()
    endif()
    math(EXPR a "${a} + 1")
    math(EXPR b "${b} + 1")
    string(SUBSTRING "${block}" ${a} -1 block)
    string(SUBSTRING "${source}" ${b} -1 source)
    math(EXPR line "${line} + 1")
  endwhile()
  message(FATAL_ERROR "the README's ${NAME} snippet differs from ${SOURCE} (without its SPDX "
                      "line) at line ${line} of the code block; copy the file into the README")
endif()
message(STATUS "README snippet ${NAME} equals ${SOURCE}")
