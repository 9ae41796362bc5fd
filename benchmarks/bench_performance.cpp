// SPDX-License-Identifier: MIT
// The performance report: streaming attention with every encoder family against the machine's
// FMA peak, NoPE, and the materialising reference, all measured in one run, written as a
// markdown table (benchmarks/report runs it and keeps the table).
//
//   posenc_bench_performance [--quick] [--out FILE]
//
// Rows: encoder × N × threads (float, H = 8, D = 64, causal). Columns: useful GFLOP/s
// (4·H·D per allowed (i, j), attention FLOPs only — DAPE's network is not counted), fraction of
// the same-run FMA peak of that many threads, ratio of time to NoPE, to the reference (where the
// reference fits in memory), and peak RSS of one call in a fresh process (total, and beyond the
// inputs and output). A peak probe (independent FMA chains on Eigen's widest packet) measures the
// machine in the same run.
#include <sys/wait.h>
#include <unistd.h>

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "posenc/posenc.hpp"
#include "support/flops.hpp"
#include "support/inputs.hpp"
#include "support/main.hpp"
#include "support/peak.hpp"
#include "support/report.hpp"
#include "support/rss.hpp"
#include "support/timing.hpp"

namespace posenc::bench {
namespace {

constexpr Index bench_heads = 8;
constexpr Index head_dim = 64;
constexpr Index dape_width = 32;

/// One encoder of the report, type-erased: runs streaming or reference attention on the inputs.
struct Entry {
  std::string name;
  std::function<void(const AttentionInputs<float>&, Heads<float>&, const AttentionOptions&)> stream;
  std::function<Heads<float>(const AttentionInputs<float>&, const AttentionOptions&)> reference;
};

template <class Encoder>
Entry entry(std::string name, Encoder encoder) {
  return {
      std::move(name),
      [encoder](const AttentionInputs<float>& in, Heads<float>& out, const AttentionOptions& o) {
        attention(in.q, in.k, in.v, encoder, out.view(), o);
      },
      [encoder](const AttentionInputs<float>& in, const AttentionOptions& o) {
        return attention_reference(in.q, in.k, in.v, encoder, o);
      }};
}

std::vector<Entry> entries() {
  std::mt19937_64 rng(2026);
  std::vector<Entry> list;
  list.push_back(entry("NoPE", NoPositionalEncoding{}));
  list.push_back(entry("ALiBi", Alibi<float>(bench_heads)));
  // Interleaved, as the README's performance tables measured it (the default pairing is half).
  list.push_back(
      entry("RoPE", RotaryEncoding<float>(head_dim, {.pairing = RotaryPairing::interleaved})));
  list.push_back(entry("XPos", XPosEncoding<float>(head_dim)));
  list.push_back(
      entry("T5", T5RelativeBias<float>::random(bench_heads, 0.1, rng, {.bidirectional = false})));
  list.push_back(entry("KERPLE-log", Kerple<float>::random(KerpleKernel::log, bench_heads, rng)));
  list.push_back(entry("FIRE", Fire<float>::random(bench_heads, 32, rng)));
  list.push_back(
      entry("DAPE-KERPLE",
            Dape<float, Kerple<float>>::random(
                Kerple<float>::random(KerpleKernel::log, bench_heads, rng), dape_width, rng)));
  return list;
}

/// Child mode: one call of entry `name` at N tokens and `threads` threads in this fresh process;
/// prints "<peak RSS MiB> <RSS after inputs MiB>".
int rss_probe(const std::string& name, Index n, int threads) {
  AttentionInputs<float> in(bench_heads, n, head_dim);
  in.out.flat().setZero();  // touched: inputs and output are resident before the call
  const double before = current_rss_mib();
  for (const Entry& e : entries()) {
    if (e.name != name) continue;
    e.stream(in, in.out, {.threads = threads});
    std::printf("%.1f %.1f\n", peak_rss_mib(), before);
    return 0;
  }
  return 2;
}

struct RssFigures {
  double total = -1;
  double extra = -1;
};

/// Runs rss_probe in a fresh process (OpenMP is not fork-safe, so the binary re-executes itself).
RssFigures measure_rss(const char* self, const std::string& name, Index n, int threads) {
  std::ostringstream command;
  command << "'" << self << "' --rss-probe '" << name << "' " << n << " " << threads;
  FILE* pipe = popen(command.str().c_str(), "r");
  if (pipe == nullptr) return {};
  RssFigures figures;
  double before = 0;
  if (std::fscanf(pipe, "%lf %lf", &figures.total, &before) != 2) figures.total = -1;
  pclose(pipe);
  if (figures.total >= 0) figures.extra = figures.total - before;
  return figures;
}

int run_report(const char* self, bool quick, const std::string& out_path) {
  const std::vector<Index> lengths =
      quick ? std::vector<Index>{1024, 2048} : std::vector<Index>{2048, 8192, 32768};
  const std::vector<int> thread_counts = {1, std::max(2, max_threads())};
  const std::vector<Entry> list = entries();

  std::map<int, double> peak;
  for (int t : thread_counts) peak[t] = fma_peak_gflops<float>(t);
  std::fprintf(stderr, "FMA peak (float): 1 thread %.1f GFLOP/s, %d threads %.1f GFLOP/s\n",
               peak[1], thread_counts.back(), peak[thread_counts.back()]);

  std::ostringstream table;
  table << "| encoder | N | threads | GFLOP/s | of peak | × NoPE | reference ÷ streaming | "
           "2 threads ÷ 1 | peak RSS (MiB) | beyond inputs+output (MiB) |\n"
        << "|---|---|---|---|---|---|---|---|---|---|\n";
  for (const Index n : lengths) {
    AttentionInputs<float> in(bench_heads, n, head_dim);
    const double flops =
        attention_flops(bench_heads, head_dim, head_dim, allowed_pairs(Mask::causal(), n, n));
    const double min_seconds = quick ? 0.05 : 0.3;
    const int reps = n >= 32768 ? 1 : 3;
    std::map<std::pair<std::string, int>, double> seconds;
    for (const Entry& e : list) {
      for (const int t : thread_counts) {
        const AttentionOptions options{.threads = t};
        seconds[{e.name, t}] =
            best_seconds([&] { e.stream(in, in.out, options); }, reps, min_seconds).wall;
      }
      // The reference materialises H·N² logits and weights: only where that fits comfortably.
      double reference = -1;
      if (n <= 2048)
        reference = best_seconds([&] { benchmark::DoNotOptimize(e.reference(in, {})); }, 1, 0).wall;
      for (const int t : thread_counts) {
        const double s = seconds[{e.name, t}];
        const double gflops = flops / s * 1e-9;
        const RssFigures rss = t == 1 ? RssFigures{} : measure_rss(self, e.name, n, t);
        table << "| " << e.name << " | " << n << " | " << t << " | " << format(gflops, "%.1f")
              << " | " << format(100.0 * gflops / peak[t], "%.0f %%") << " | "
              << format(s / seconds[{"NoPE", t}], "%.2f") << " | "
              << (t == 1 && reference > 0 ? format(reference / s, "%.0f") : "—") << " | "
              << (t == 1 ? "—" : format(seconds[{e.name, 1}] / s, "%.2f")) << " | "
              << format(rss.total, "%.0f") << " | " << format(rss.extra, "%.1f") << " |\n";
      }
      std::fprintf(stderr, "  N=%ld %-12s done\n", static_cast<long>(n), e.name.c_str());
    }
  }

  std::ostringstream report;
  report << "FMA peak measured in the same run (float, " << Eigen::SimdInstructionSetsInUse()
         << "): " << format(peak[1], "%.1f") << " GFLOP/s on 1 thread, "
         << format(peak[thread_counts.back()], "%.1f") << " GFLOP/s on " << thread_counts.back()
         << " threads.\n\n"
         << table.str();
  write_report(report.str(), out_path);
  return 0;
}

}  // namespace
}  // namespace posenc::bench

int main(int argc, char** argv) {
  using namespace posenc::bench;
  if (argc == 5 && std::strcmp(argv[1], "--rss-probe") == 0) {
    return rss_probe(argv[2], std::atol(argv[3]), std::atoi(argv[4]));
  }
  const ReportArguments args = parse_report_arguments(argc, argv);
  if (!args.ok) return 2;
  Eigen::setNbThreads(1);
  return run_report(argv[0], args.quick, args.out_path);
}
