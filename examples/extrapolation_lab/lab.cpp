// SPDX-License-Identifier: MIT
// The extrapolation lab (issue 17): train the same small byte-level LM with each positional
// encoding at 128 tokens on the Python standard library, then measure held-out bits per byte at
// 128, 256, … tokens. Writes a markdown table, a CSV and a safetensors checkpoint per encoding.
//
//   lab [--quick] [--only nope,rope,alibi,kerple,t5] [--steps N] [--layers L] [--width C]
//       [--heads H] [--batch B] [--lr X] [--seed S] [--threads N] [--max-length N]
//       [--eval-bytes N] [--corpus DIR] [--out DIR]
//
// Exit codes: 0 success; 1 a check failed (--quick: the training loss did not fall or an output
// is missing); 2 bad arguments or no corpus.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <Eigen/Core>

#include "corpus.hpp"
#include "encodings.hpp"
#include "evaluation.hpp"
#include "model.hpp"
#include "optimizer.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lab::Index;

struct Options {
  bool quick = false;
  std::vector<std::string> only;
  Index steps = 600;
  Index layers = 2;
  Index width = 128;
  Index heads = 4;
  Index batch = 16;
  double learning_rate = 2e-3;
  std::uint64_t seed = 1234;
  int threads = 0;  // 0: OpenMP's default (--quick: 1)
  Index max_length = 4096;
  Index eval_bytes = 1 << 17;
  std::string corpus = std::string(lab::default_corpus_path);
  std::string out = "extrapolation_lab_results";
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr std::string_view usage =
    "usage: lab [--quick] [--only a,b,...] [--steps N] [--layers L] [--width C] [--heads H]\n"
    "           [--batch B] [--lr X] [--seed S] [--threads N] [--max-length N]\n"
    "           [--eval-bytes N] [--corpus DIR] [--out DIR]\n"
    "encodings: nope, rope, alibi, kerple, t5 (default: all; --quick: rope,kerple)\n";

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

Options parse(int argc, char** argv) {
  Options o;
  bool steps_set = false, layers_set = false, width_set = false, heads_set = false,
       batch_set = false, max_set = false, eval_set = false;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw UsageError(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  auto integer = [&](int& i, Index minimum) -> Index {
    const std::string flag = argv[i];
    const std::string text = value(i);
    char* end = nullptr;
    const long long v = std::strtoll(text.c_str(), &end, 10);
    if (end == text.c_str() || *end != '\0' || v < minimum) {
      throw UsageError(flag + " must be an integer >= " + std::to_string(minimum) + ", got '" +
                       text + "'");
    }
    return static_cast<Index>(v);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      o.quick = true;
    } else if (arg == "--help" || arg == "-h") {
      std::fputs(usage.data(), stdout);
      std::exit(0);
    } else if (arg == "--only") {
      o.only = split_list(value(i));
    } else if (arg == "--steps") {
      o.steps = integer(i, 1), steps_set = true;
    } else if (arg == "--layers") {
      o.layers = integer(i, 1), layers_set = true;
    } else if (arg == "--width") {
      o.width = integer(i, 2), width_set = true;
    } else if (arg == "--heads") {
      o.heads = integer(i, 1), heads_set = true;
    } else if (arg == "--batch") {
      o.batch = integer(i, 1), batch_set = true;
    } else if (arg == "--lr") {
      const std::string text = value(i);
      o.learning_rate = std::strtod(text.c_str(), nullptr);
      if (!(o.learning_rate > 0.0)) throw UsageError("--lr must be positive, got '" + text + "'");
    } else if (arg == "--seed") {
      o.seed = static_cast<std::uint64_t>(integer(i, 0));
    } else if (arg == "--threads") {
      o.threads = static_cast<int>(integer(i, 1));
    } else if (arg == "--max-length") {
      o.max_length = integer(i, 128), max_set = true;
    } else if (arg == "--eval-bytes") {
      o.eval_bytes = integer(i, 1), eval_set = true;
    } else if (arg == "--corpus") {
      o.corpus = value(i);
    } else if (arg == "--out") {
      o.out = value(i);
    } else {
      throw UsageError("unknown argument '" + std::string(arg) + "'");
    }
  }
  if (o.quick) {  // a tiny model and a short run; explicit flags still win
    if (!steps_set) o.steps = 120;
    if (!layers_set) o.layers = 1;
    if (!width_set) o.width = 32;
    if (!heads_set) o.heads = 2;
    if (!batch_set) o.batch = 8;
    if (!max_set) o.max_length = 512;
    if (!eval_set) o.eval_bytes = 1 << 14;
    if (o.only.empty()) o.only = {"rope", "kerple"};
    // One thread unless asked: under a loaded CI machine OpenMP's barriers between two threads
    // made the same quick run take 3 s or 23 s; one thread takes ~3 s every time.
    if (o.threads == 0) o.threads = 1;
  }
  if (o.only.empty()) o.only = lab::encoding_names();
  for (const std::string& name : o.only) {
    if (!lab::with_encoding<float>(name, []<class>() {})) {
      throw UsageError("unknown encoding '" + name + "'");
    }
  }
  return o;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Everything measured for one encoding.
struct EncodingRun {
  std::string name;
  Index parameters = 0;
  double first_loss = 0.0;  // nats, step 0
  double final_loss = 0.0;  // nats, mean of the last tenth of the steps
  double train_seconds = 0.0;
  double tokens_per_second = 0.0;
  double eval_seconds = 0.0;
  std::filesystem::path checkpoint;
  Index checkpoint_model_tensors = 0;  // tensors the model itself writes (the encoder adds its own)
  std::vector<lab::LengthResult> lengths;
};

template <class Adapter>
EncodingRun run_encoding(const Options& o, const lab::ModelConfig& config,
                         const lab::Corpus& corpus, Index eval_tokens,
                         const std::vector<Index>& lengths, int threads) {
  EncodingRun run;
  run.name = std::string(Adapter::name);
  lab::Model<Adapter> model(config, o.seed);
  model.set_threads(threads);
  run.parameters = model.layout().total();
  lab::AdamW<float> optimizer(model.layout(), {.learning_rate = o.learning_rate,
                                               .warmup_steps = std::max<Index>(1, o.steps / 10),
                                               .total_steps = o.steps});
  lab::BatchSampler sampler(corpus.train, o.batch, config.train_length, o.seed + 1);
  const Index tail = std::max<Index>(1, o.steps / 10);
  double tail_sum = 0.0;
  const auto start = std::chrono::steady_clock::now();
  for (Index step = 0; step < o.steps; ++step) {
    sampler.next();
    const double loss = model.forward(sampler.inputs().data(), sampler.targets().data(), o.batch,
                                      config.train_length);
    model.backward();
    const lab::StepStats stats = optimizer.step(model.parameters(), model.gradients());
    model.parameters_changed();
    if (step == 0) run.first_loss = loss;
    if (step >= o.steps - tail) tail_sum += loss;
    if (!std::isfinite(loss))
      throw std::runtime_error(run.name + ": the training loss is not finite");
    if (step % std::max<Index>(1, o.steps / 10) == 0 || step == o.steps - 1) {
      std::printf("  %-7s step %5ld/%ld  loss %.4f  (%.3f bits/byte)  lr %.2e  |g| %.3f  %.1fs\n",
                  run.name.c_str(), static_cast<long>(step + 1), static_cast<long>(o.steps), loss,
                  loss / std::numbers::ln2, stats.learning_rate, stats.gradient_norm,
                  seconds_since(start));
      std::fflush(stdout);
    }
  }
  run.train_seconds = seconds_since(start);
  run.final_loss = tail_sum / static_cast<double>(tail);
  run.tokens_per_second =
      static_cast<double>(o.steps * o.batch * config.train_length) / run.train_seconds;

  const auto eval_start = std::chrono::steady_clock::now();
  run.lengths = lab::evaluate_lengths(model, corpus.held_out, eval_tokens, lengths, 128,
                                      std::max<Index>(4096, o.batch * config.train_length));
  run.eval_seconds = seconds_since(eval_start);

  run.checkpoint = std::filesystem::path(o.out) / (run.name + ".safetensors");
  for (const lab::TensorSpec& spec : model.layout().specs()) {
    if (!spec.encoder) ++run.checkpoint_model_tensors;
  }
  model.save(run.checkpoint, {{"train_length", std::to_string(config.train_length)},
                              {"layers", std::to_string(config.layers)},
                              {"width", std::to_string(config.width)},
                              {"heads", std::to_string(config.heads)},
                              {"steps", std::to_string(o.steps)},
                              {"seed", std::to_string(o.seed)}});
  return run;
}

std::string fixed(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", digits, value);
  return buffer;
}

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

/// The markdown report: setup, bits per byte (all tokens; last 128 tokens), training.
std::string markdown(const Options& o, const lab::ModelConfig& config, const lab::Corpus& corpus,
                     Index eval_tokens, const std::vector<Index>& lengths,
                     const std::vector<EncodingRun>& runs, int threads, double wall_seconds) {
  std::ostringstream md;
  md << "# Extrapolation lab\n\n";
  md << "Trained at " << config.train_length << " tokens, " << o.steps << " steps of " << o.batch
     << " × " << config.train_length << " bytes; model: " << config.layers << " layers, width "
     << config.width << ", " << config.heads << " heads (head dim " << config.head_dim()
     << "), GELU MLP ×" << config.mlp_ratio << ", byte vocabulary; AdamW lr " << o.learning_rate
     << ", seed " << o.seed << ".\n";
  md << "Corpus: " << corpus.root.string() << ", " << corpus.train.size() << " train bytes ("
     << corpus.train_files << " files), " << corpus.held_out.size() << " held-out bytes ("
     << corpus.held_out_files << " files, FNV-1a of the path mod 100 < 10); every length is "
     << "evaluated on the same first " << eval_tokens << " held-out target bytes.\n";
  md << "Machine: " << cpu_name() << ", " << threads << " threads; wall time "
     << fixed(wall_seconds, 1) << " s.\n\n";
  auto table = [&](const char* title, auto value) {
    md << "### " << title << "\n\n| encoding |";
    for (const Index length : lengths) md << ' ' << length << " |";
    md << "\n|---|";
    for (std::size_t i = 0; i < lengths.size(); ++i) md << "---:|";
    md << '\n';
    for (const EncodingRun& run : runs) {
      md << "| " << run.name << " |";
      for (const lab::LengthResult& r : run.lengths) md << ' ' << fixed(value(r), 3) << " |";
      md << '\n';
    }
    md << '\n';
  };
  table("Held-out bits per byte, every token of each window",
        [](const lab::LengthResult& r) { return r.bits_per_byte; });
  table("Held-out bits per byte, last 128 tokens of each window",
        [](const lab::LengthResult& r) { return r.tail_bits_per_byte; });
  md << "### Training\n\n| encoding | parameters | first loss (bits/byte) | final loss (bits/byte) "
        "| train s | tokens/s | eval s |\n|---|---:|---:|---:|---:|---:|---:|\n";
  for (const EncodingRun& run : runs) {
    md << "| " << run.name << " | " << run.parameters << " | "
       << fixed(run.first_loss / std::numbers::ln2, 3) << " | "
       << fixed(run.final_loss / std::numbers::ln2, 3) << " | " << fixed(run.train_seconds, 1)
       << " | " << fixed(run.tokens_per_second, 0) << " | " << fixed(run.eval_seconds, 1) << " |\n";
  }
  return md.str();
}

std::string csv(const std::vector<EncodingRun>& runs, const Options& o) {
  std::ostringstream out;
  out << "encoding,length,bits_per_byte,last128_bits_per_byte,windows,tokens,steps,"
         "final_train_bits_per_byte,train_seconds,train_tokens_per_second,eval_seconds\n";
  for (const EncodingRun& run : runs) {
    for (const lab::LengthResult& r : run.lengths) {
      out << run.name << ',' << r.length << ',' << fixed(r.bits_per_byte, 5) << ','
          << fixed(r.tail_bits_per_byte, 5) << ',' << r.windows << ',' << r.tokens << ',' << o.steps
          << ',' << fixed(run.final_loss / std::numbers::ln2, 5) << ','
          << fixed(run.train_seconds, 3) << ',' << fixed(run.tokens_per_second, 1) << ','
          << fixed(r.seconds, 3) << '\n';
    }
  }
  return out.str();
}

void write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

}  // namespace

int main(int argc, char** argv) {
  const auto wall_start = std::chrono::steady_clock::now();
  Options o;
  lab::ModelConfig config;
  std::vector<Index> lengths;
  try {
    o = parse(argc, argv);
    config.layers = o.layers;
    config.width = o.width;
    config.heads = o.heads;
    config.train_length = 128;
    config.validate();
    lengths = lab::evaluation_lengths(config.train_length, o.max_length);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lab: %s\n%s", e.what(), usage.data());
    return 2;
  }
#ifdef _OPENMP
  const int threads = o.threads > 0 ? o.threads : omp_get_max_threads();
  omp_set_num_threads(threads);
#else
  const int threads = 1;
#endif
  Eigen::setNbThreads(1);  // the lab splits its products over threads itself (layers.hpp)

  lab::Corpus corpus;
  try {
    corpus = lab::load_corpus(o.corpus);
  } catch (const lab::CorpusError& e) {
    std::fprintf(stderr, "lab: %s\n", e.what());
    return 2;
  }
  try {
    const Index eval_tokens = lab::evaluated_tokens(static_cast<Index>(corpus.held_out.size()),
                                                    o.eval_bytes, o.max_length);
    std::filesystem::create_directories(o.out);
    std::printf("corpus %s: %zu train bytes (%ld files), %zu held-out bytes (%ld files)\n",
                corpus.root.string().c_str(), corpus.train.size(),
                static_cast<long>(corpus.train_files), corpus.held_out.size(),
                static_cast<long>(corpus.held_out_files));
    std::printf("model: %ld layers, width %ld, %ld heads; %ld steps of %ld x %ld; %d threads\n",
                static_cast<long>(config.layers), static_cast<long>(config.width),
                static_cast<long>(config.heads), static_cast<long>(o.steps),
                static_cast<long>(o.batch), static_cast<long>(config.train_length), threads);

    std::vector<EncodingRun> runs;
    for (const std::string& name : o.only) {
      lab::with_encoding<float>(name, [&]<class Adapter>() {
        runs.push_back(run_encoding<Adapter>(o, config, corpus, eval_tokens, lengths, threads));
      });
      const EncodingRun& run = runs.back();
      std::printf("  %-7s trained in %.1f s (%.0f tokens/s), evaluated in %.1f s:", name.c_str(),
                  run.train_seconds, run.tokens_per_second, run.eval_seconds);
      for (const lab::LengthResult& r : run.lengths) {
        std::printf(" %ld:%.3f", static_cast<long>(r.length), r.bits_per_byte);
      }
      std::printf(" bits/byte\n");
      std::fflush(stdout);
    }

    const double wall = seconds_since(wall_start);
    const std::filesystem::path table_path = std::filesystem::path(o.out) / "results.md";
    const std::filesystem::path csv_path = std::filesystem::path(o.out) / "results.csv";
    const std::string table =
        markdown(o, config, corpus, eval_tokens, lengths, runs, threads, wall);
    write_file(table_path, table);
    write_file(csv_path, csv(runs, o));
    std::printf("\n%s\nwrote %s, %s and %zu checkpoints; wall time %.1f s\n", table.c_str(),
                table_path.string().c_str(), csv_path.string().c_str(), runs.size(), wall);

    if (o.quick) {
      bool ok = true;
      for (const EncodingRun& run : runs) {
        if (!(run.final_loss < 0.8 * run.first_loss)) {
          std::fprintf(stderr,
                       "lab --quick: %s's training loss did not fall enough: %.3f -> %.3f\n",
                       run.name.c_str(), run.first_loss, run.final_loss);
          ok = false;
        }
        for (const lab::LengthResult& r : run.lengths) {
          if (!std::isfinite(r.bits_per_byte) || !std::isfinite(r.tail_bits_per_byte)) {
            std::fprintf(stderr, "lab --quick: %s at %ld: non-finite bits per byte\n",
                         run.name.c_str(), static_cast<long>(r.length));
            ok = false;
          }
        }
        // The checkpoint opens, validates, and holds every model tensor (plus the encoder's).
        const auto checkpoint = posenc::io::SafetensorsFile::open(run.checkpoint);
        if (static_cast<Index>(checkpoint.names().size()) < run.checkpoint_model_tensors ||
            !checkpoint.contains("wte.weight")) {
          std::fprintf(stderr, "lab --quick: checkpoint %s holds %zu tensors, expected >= %ld\n",
                       run.checkpoint.string().c_str(), checkpoint.names().size(),
                       static_cast<long>(run.checkpoint_model_tensors));
          ok = false;
        }
      }
      for (const auto& path : {table_path, csv_path}) {
        if (!std::filesystem::is_regular_file(path) || std::filesystem::file_size(path) == 0) {
          std::fprintf(stderr, "lab --quick: missing output %s\n", path.string().c_str());
          ok = false;
        }
      }
      if (wall > 60.0) std::fprintf(stderr, "lab --quick: took %.1f s (budget 60 s)\n", wall);
      std::printf("quick checks: %s\n", ok ? "passed" : "FAILED");
      return ok ? 0 : 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lab: %s\n", e.what());
    return 1;
  }
}
