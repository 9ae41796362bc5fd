# SPDX-License-Identifier: MIT
# The include rules of the layout (README, "Architecture"), checked on every header under
# ROOT/posenc:   cmake -DROOT=<include dir> -P include_rules.cmake
#
#   core (tensor, mask, encoding, attention_options, attention_map)  includes only detail/ and the core
#   encoders/*   never includes the faces that run attention, kernel/ or analysis/
#   kernel/*     never includes encoders/, analysis/ or a public face
#   analysis/*   never includes kernel/
#   detail/*     includes no public header except tensor.hpp
#   every header is at most 700 lines
# Prints every violation and fails when there is one.
cmake_minimum_required(VERSION 3.23)
if(NOT ROOT)
  message(FATAL_ERROR "usage: cmake -DROOT=<include dir> -P include_rules.cmake")
endif()

set(core tensor.hpp mask.hpp encoding.hpp attention_options.hpp attention_map.hpp)
set(faces attention.hpp attention_backward.hpp linear_attention.hpp feature_maps.hpp kv_cache.hpp compose.hpp posenc.hpp)
set(max_lines 700)

file(GLOB_RECURSE headers RELATIVE ${ROOT}/posenc ${ROOT}/posenc/*.hpp)
list(LENGTH headers count)
if(count EQUAL 0)
  message(FATAL_ERROR "include_rules: no headers under ${ROOT}/posenc")
endif()
set(violations 0)
foreach(header IN LISTS headers)
  file(READ ${ROOT}/posenc/${header} text)
  string(REGEX MATCHALL "\n" newlines "${text}")
  list(LENGTH newlines length)
  if(length GREATER max_lines)
    message("include_rules: posenc/${header} has ${length} lines (at most ${max_lines})")
    math(EXPR violations "${violations} + 1")
  endif()
  file(STRINGS ${ROOT}/posenc/${header} includes REGEX "^#include \"posenc/")
  foreach(line IN LISTS includes)
    string(REGEX REPLACE "^#include \"posenc/([^\"]+)\".*" "\\1" target "${line}")
    set(broken "")
    if(header IN_LIST core)
      if(NOT target MATCHES "^detail/" AND NOT target IN_LIST core)
        set(broken "a core header includes only the standard library, Eigen, detail/ and the core")
      endif()
    elseif(header MATCHES "^encoders/")
      if(target MATCHES "^(kernel|analysis)/" OR target MATCHES "^(attention|linear_attention|kv_cache)\\.hpp$")
        set(broken "encoders/ never include the attention faces, kernel/ or analysis/")
      endif()
    elseif(header MATCHES "^kernel/")
      if(target MATCHES "^(encoders|analysis)/" OR target IN_LIST faces)
        set(broken "kernel/ never includes encoders/, analysis/ or a public face")
      endif()
    elseif(header MATCHES "^analysis/")
      if(target MATCHES "^kernel/")
        set(broken "analysis/ never includes kernel/")
      endif()
    elseif(header MATCHES "^detail/")
      if(NOT target MATCHES "^detail/" AND NOT target STREQUAL "tensor.hpp")
        set(broken "detail/ includes no public header except tensor.hpp")
      endif()
    endif()
    if(broken)
      message("include_rules: posenc/${header} includes posenc/${target}: ${broken}")
      math(EXPR violations "${violations} + 1")
    endif()
  endforeach()
endforeach()
if(violations GREATER 0)
  message(FATAL_ERROR "include_rules: ${violations} violation(s) in ${count} headers")
endif()
message(STATUS "include_rules: ${count} headers follow the layout rules")
