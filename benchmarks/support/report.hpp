// SPDX-License-Identifier: MIT
// What the report binaries (posenc_bench_performance, posenc_bench_backward) share: their command
// line, number formatting, the load average, and writing the markdown they print.
#pragma once

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

namespace posenc::bench {

/// `--quick` and `--out FILE`; `ok` is false (after a usage line on stderr) for anything else.
struct ReportArguments {
  bool quick = false;
  std::string out_path;
  bool ok = true;
};

inline ReportArguments parse_report_arguments(int argc, char** argv) {
  ReportArguments args;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      args.quick = true;
    } else if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
      args.out_path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--out FILE]\n", argv[0]);
      args.ok = false;
    }
  }
  return args;
}

/// `value` printed with `spec`, or "—" when it is negative or NaN (not measured).
inline std::string format(double value, const char* spec) {
  if (!(value >= 0)) return "—";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, spec, value);
  return buffer;
}

/// The 1-, 5- and 15-minute load averages (/proc/loadavg), e.g. "0.52 0.31 0.20".
inline std::string load_average() {
  std::ifstream file("/proc/loadavg");
  std::string one, five, fifteen;
  file >> one >> five >> fifteen;
  return one + " " + five + " " + fifteen;
}

/// Prints the report and, with a path, writes it there too.
inline void write_report(const std::string& report, const std::string& out_path) {
  std::fputs(report.c_str(), stdout);
  if (!out_path.empty()) {
    std::ofstream out(out_path);
    out << report;
  }
}

}  // namespace posenc::bench
