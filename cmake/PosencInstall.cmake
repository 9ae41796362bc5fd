# SPDX-License-Identifier: MIT
# Installs the headers, the exported posenc::posenc and posenc::native targets, a relocatable
# config package with an ARCH_INDEPENDENT version file, and a pkg-config file. Nothing here needs
# GoogleTest, Google Benchmark or nlohmann-json (only tests/ and benchmarks/ look for them).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(POSENC_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/posenc" CACHE STRING
    "Where posencConfig.cmake is installed (relative to the prefix)")

install(DIRECTORY include/posenc DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} FILES_MATCHING PATTERN "*.hpp")
install(TARGETS posenc posenc_native EXPORT posencTargets)
install(EXPORT posencTargets NAMESPACE posenc:: DESTINATION ${POSENC_INSTALL_CMAKEDIR})

configure_package_config_file(cmake/posencConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/posencConfig.cmake
  INSTALL_DESTINATION ${POSENC_INSTALL_CMAKEDIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/posencConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/posencConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/posencConfigVersion.cmake
              cmake/PosencNative.cmake
        DESTINATION ${POSENC_INSTALL_CMAKEDIR})

# pkg-config: paths relative to the .pc file so the installed tree can be moved. No -std= flag:
# the consumer picks C++20 or newer.
set(POSENC_PC_OPENMP_CFLAGS "")
if(POSENC_OPENMP_FOUND)
  set(POSENC_PC_OPENMP_CFLAGS "-fopenmp")
endif()
configure_file(cmake/posenc.pc.in ${CMAKE_CURRENT_BINARY_DIR}/posenc.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/posenc.pc DESTINATION ${CMAKE_INSTALL_DATADIR}/pkgconfig)
