// SPDX-License-Identifier: MIT
// The training report: the streaming backward (attention_backward) of every trainable encoder
// family against the machine's FMA peak and against its own forward, all measured in one run on
// one clock (wall time), written as a markdown table (benchmarks/report runs it).
//
//   posenc_bench_backward [--quick] [--out FILE]
//
// Rows: encoder × N × threads (float, H = 8, D = Dv = 64, causal). Useful backward FLOPs are
// 2.5 × the forward's (five matrix products instead of two; the forward counts 4·H·D per allowed
// (i, j), attention FLOPs only: DAPE's network is not counted). Columns: forward and backward
// milliseconds, backward GFLOP/s and fraction of the same-run FMA peak of that many threads,
// backward ÷ forward, 2 threads ÷ 1. The load average is printed before and after each block.
// A last table gives the peak RSS of one forward + backward at N = 32768 in a fresh process,
// beyond what the inputs, outputs and gradients themselves take (the budget is 64 MiB).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
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

/// q, k, v and dout [H, N, D] (standard normal), and the forward's out and lse.
struct TrainingInputs {
  Heads<float> q, k, v, dout, out;
  Matrix<float> lse;

  explicit TrainingInputs(Index n)
      : q(random_heads<float>(bench_heads, n, head_dim, 1)),
        k(random_heads<float>(bench_heads, n, head_dim, 2)),
        v(random_heads<float>(bench_heads, n, head_dim, 3)),
        dout(random_heads<float>(bench_heads, n, head_dim, 4)),
        out(bench_heads, n, head_dim),
        lse(bench_heads, n) {}
};

/// One encoder of the report, type-erased: a forward (out and lse into the inputs) and a
/// backward (gradients into buffers the entry keeps, as a training loop does).
struct Entry {
  std::string name;
  Index max_length;  // longer N are skipped (DAPE's network makes N = 8192 take minutes)
  std::function<void(TrainingInputs&, const AttentionOptions&)> forward;
  std::function<void(TrainingInputs&, const AttentionOptions&)> backward;
};

template <class Encoder>
Entry entry(std::string name, Encoder encoder, Index max_length = Index{1} << 20) {
  auto grads = std::make_shared<AttentionGradients<float, Encoder>>();
  return {std::move(name), max_length,
          [encoder](TrainingInputs& in, const AttentionOptions& o) {
            attention(in.q, in.k, in.v, encoder, in.out.view(), in.lse, o);
          },
          [encoder, grads](TrainingInputs& in, const AttentionOptions& o) {
            if (grads->dq.rows() != in.q.rows()) {
              *grads = attention_backward(in.q, in.k, in.v, encoder, in.out, in.lse, in.dout, o);
              return;
            }
            if constexpr (HasLearnableParameters<Encoder>) grads->encoder.set_zero();
            attention_backward(in.q, in.k, in.v, encoder, in.out, in.lse, in.dout, *grads, o);
          }};
}

std::vector<Entry> entries() {
  std::mt19937_64 rng(2026);
  std::vector<Entry> list;
  list.push_back(entry("NoPE", NoPositionalEncoding{}));
  list.push_back(entry("ALiBi", Alibi<float>(bench_heads)));
  list.push_back(
      entry("RoPE", RotaryEncoding<float>(head_dim, {.pairing = RotaryPairing::interleaved})));
  list.push_back(
      entry("T5", T5RelativeBias<float>::random(bench_heads, 0.1, rng, {.bidirectional = false})));
  list.push_back(entry("KERPLE-log", Kerple<float>::random(KerpleKernel::log, bench_heads, rng)));
  list.push_back(entry("DAPE-KERPLE",
                       Dape<float, Kerple<float>>::random(
                           Kerple<float>::random(KerpleKernel::log, bench_heads, rng), 32, rng),
                       2048));
  return list;
}

/// Child mode: one forward + backward of NoPE at N tokens and `threads` threads in this fresh
/// process; prints "<peak RSS MiB> <RSS before the inputs MiB> <inputs+outputs+gradients MiB>".
int rss_probe(Index n, int threads) {
  const double before = current_rss_mib();
  TrainingInputs in(n);
  const AttentionOptions options{.threads = threads};
  attention(in.q, in.k, in.v, NoPositionalEncoding{}, in.out.view(), in.lse, options);
  const auto grads = attention_backward(in.q, in.k, in.v, NoPositionalEncoding{}, in.out, in.lse,
                                        in.dout, options);
  benchmark::DoNotOptimize(grads.dq.flat()[0]);
  // q, k, v, dout, out, dq, dk, dv ([H, N, D] each) and lse [H, N].
  const double tensors = (8.0 * static_cast<double>(bench_heads * n * head_dim) +
                          static_cast<double>(bench_heads * n)) *
                         sizeof(float) / (1 << 20);
  std::printf("%.1f %.1f %.1f\n", peak_rss_mib(), before, tensors);
  return 0;
}

int run_report(const char* self, bool quick, const std::string& out_path) {
  const std::vector<Index> lengths =
      quick ? std::vector<Index>{1024} : std::vector<Index>{2048, 8192};
  const std::vector<int> thread_counts = {1, std::max(2, max_threads())};
  std::vector<Entry> list = entries();

  std::ostringstream report;
  report << "Load average before the peak probe: " << load_average() << ".\n\n";
  std::map<int, double> peak;
  for (int t : thread_counts) peak[t] = fma_peak_gflops<float>(t);
  report << "FMA peak measured in the same run (float, " << Eigen::SimdInstructionSetsInUse()
         << ", wall clock): " << format(peak[1], "%.1f") << " GFLOP/s on 1 thread, "
         << format(peak[thread_counts.back()], "%.1f") << " GFLOP/s on " << thread_counts.back()
         << " threads.\n\n";

  report << "| encoder | N | threads | forward (ms) | backward (ms) | backward GFLOP/s | of peak | "
            "backward ÷ forward | 2 threads ÷ 1 |\n"
         << "|---|---|---|---|---|---|---|---|---|\n";
  std::vector<std::string> loads;
  for (const Index n : lengths) {
    const std::string load_before = load_average();
    TrainingInputs in(n);
    const double flops =
        2.5 * attention_flops(bench_heads, head_dim, head_dim, allowed_pairs(Mask::causal(), n, n));
    const int reps = n >= 8192 ? 2 : 3;
    for (Entry& e : list) {
      if (n > e.max_length) continue;
      std::map<int, double> backward_seconds;
      for (const int t : thread_counts) {
        const AttentionOptions options{.threads = t};
        const double forward =
            best_seconds([&] { e.forward(in, options); }, reps, quick ? 0.05 : 0.3).wall;
        e.forward(in, options);  // the backward reads this forward's out and lse
        const double backward =
            best_seconds([&] { e.backward(in, options); }, reps, quick ? 0.05 : 0.3).wall;
        backward_seconds[t] = backward;
        const double gflops = flops / backward * 1e-9;
        report << "| " << e.name << " | " << n << " | " << t << " | "
               << format(1e3 * forward, "%.1f") << " | " << format(1e3 * backward, "%.1f") << " | "
               << format(gflops, "%.1f") << " | " << format(100.0 * gflops / peak[t], "%.0f %%")
               << " | " << format(backward / forward, "%.2f") << " | "
               << (t == 1 ? "—" : format(backward_seconds[1] / backward, "%.2f")) << " |\n";
      }
      std::fprintf(stderr, "  N=%ld %-12s done\n", static_cast<long>(n), e.name.c_str());
    }
    loads.push_back("N = " + std::to_string(n) + ": load average " + load_before + " before, " +
                    load_average() + " after");
  }
  report << "\n";
  for (const std::string& line : loads) report << line << ".\n";

  // Memory: one forward + backward at N = 32768 in a fresh process (OpenMP is not fork-safe, so
  // the binary re-executes itself).
  const Index rss_n = quick ? 4096 : 32768;
  report << "\n| N | threads | peak RSS (MiB) | inputs + outputs + gradients (MiB) | beyond them "
            "(MiB, budget 64) |\n|---|---|---|---|---|\n";
  std::ostringstream command;
  command << "'" << self << "' --rss-probe " << rss_n << " " << thread_counts.back();
  if (FILE* pipe = popen(command.str().c_str(), "r")) {
    double peak_rss = -1, before = 0, tensors = 0;
    if (std::fscanf(pipe, "%lf %lf %lf", &peak_rss, &before, &tensors) != 3) peak_rss = -1;
    pclose(pipe);
    report << "| " << rss_n << " | " << thread_counts.back() << " | " << format(peak_rss, "%.0f")
           << " | " << format(tensors, "%.0f") << " | "
           << format(peak_rss - before - tensors, "%.1f") << " |\n";
  }

  write_report(report.str(), out_path);
  return 0;
}

}  // namespace
}  // namespace posenc::bench

int main(int argc, char** argv) {
  using namespace posenc::bench;
  if (argc == 4 && std::strcmp(argv[1], "--rss-probe") == 0) {
    return rss_probe(std::atol(argv[2]), std::atoi(argv[3]));
  }
  const ReportArguments args = parse_report_arguments(argc, argv);
  if (!args.ok) return 2;
  Eigen::setNbThreads(1);
  return run_report(argv[0], args.quick, args.out_path);
}
