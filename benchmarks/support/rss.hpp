// SPDX-License-Identifier: MIT
// Resident memory of the running process (Linux): the peak so far and the current figure, for the
// reports' "peak RSS of one call in a fresh process" columns.
#pragma once

#include <sys/resource.h>
#include <unistd.h>

#include <fstream>

namespace posenc::bench {

/// Peak resident set of this process so far, in MiB.
inline double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // KiB on Linux
}

/// Current resident set, in MiB.
inline double current_rss_mib() {
  std::ifstream statm("/proc/self/statm");
  long pages = 0;
  long resident = 0;
  statm >> pages >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1 << 20);
}

}  // namespace posenc::bench
