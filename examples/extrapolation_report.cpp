// SPDX-License-Identifier: MIT
// Extrapolation report: every encoder of the library at fixed seeded weights on the same random
// q, k, v, as if trained at 128 tokens and run at 128 … 8192. Per encoder and length: attention
// resolution of the empirical score curve, TRF, ERF, entropy, mean distance, mass beyond 128 and
// two drifts; one table per encoder on stdout, CSV files, and PNG plots through gnuplot.
//
//   posenc_example_extrapolation_report [--quick] [--out DIR] [--docs-png PATH]
//                                       [--require-plots] [--no-plots]
//
// --quick: lengths 128, 256, 512 (what CTest runs). --docs-png: also copy the curves figure to
// PATH (docs/extrapolation_curves.png is made this way). --require-plots: fail when gnuplot is
// missing or fails (the demo command uses it). Adding an encoder is one line in `encoders()`.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <posenc/posenc.hpp>

namespace {

using posenc::Index;
using Scalar = double;
constexpr double nan = std::numeric_limits<double>::quiet_NaN();

struct Settings {
  Index heads = 4;
  Index dim = 32;
  Index train = 128;       // the "training length"
  Index probe_rows = 64;   // the last query rows analysed at each length
  Index map_length = 256;  // attention maps are drawn at this length
  Index map_head = 1;      // … for this head (ALiBi: slope 1/16)
  double eps = 0.05;       // TRF / ERF share
  std::vector<Index> lengths;
  std::filesystem::path out = "extrapolation_report";
  std::optional<std::filesystem::path> docs_png;
  bool plots = true;
  bool require_plots = false;
};

// ---------------------------------------------------------------------------------------------
// The encoders, each at fixed weights from its own seed (the library's reference
// initialisations), with the settings of a model trained at 128 tokens where one exists.
// ---------------------------------------------------------------------------------------------

template <class Encoder>
struct Entry {
  std::string name;  // file-name safe
  std::string description;
  Encoder encoder;
  bool absolute = false;  // inputs get sinusoidal p_i added to q and k; the kernel sees NoPE
};
// Spelled out for compilers without aggregate deduction (Clang < 17).
template <class Encoder>
Entry(std::string, std::string, Encoder, bool = false) -> Entry<Encoder>;

std::mt19937_64 seeded(std::uint64_t seed) { return std::mt19937_64(seed); }

auto encoders(const Settings& s) {
  using namespace posenc;
  const Index H = s.heads;
  auto rng = seeded(3);
  const auto kerple = Kerple<Scalar>::random(KerpleKernel::log, H, rng);
  const Alibi<Scalar> alibi(H);
  return std::tuple{
      Entry{"nope", "no positional encoding", NoPositionalEncoding{}},
      Entry{"sinusoidal",
            "sinusoidal absolute p_i (Vaswani et al.) added to q_i and k_i, identity projections",
            NoPositionalEncoding{}, true},
      Entry{"rope", "RoPE, base 10000, interleaved pairs",
            RotaryEncoding<Scalar>(s.dim, {.pairing = RotaryPairing::interleaved})},
      Entry{"xpos", "XPos, gamma 0.4, scale_base 512", XPosEncoding<Scalar>(s.dim)},
      Entry{"alibi", "ALiBi, slopes 2^(-8h/H)", alibi},
      Entry{"kerple_log", "KERPLE-log, reference initialisation (r1 ~ U[0,2), r2 ~ U[0,1))",
            kerple},
      Entry{"t5", "T5 bias, 32 causal buckets, max_distance 128, table ~ N(0, 1)",
            [&] {
              auto r = seeded(5);
              return T5RelativeBias<Scalar>::random(H, 1.0, r, {.bidirectional = false});
            }()},
      Entry{"fire", "FIRE, MLP 1-32-H, threshold L = 128",
            [&] {
              auto r = seeded(7);
              return Fire<Scalar>::random(H, 32, r, {.threshold = static_cast<double>(s.train)});
            }()},
      Entry{"shaw", "Shaw relative keys and values, clip 16, Glorot tables",
            [&] {
              auto r = seeded(11);
              return ShawRelative<Scalar>::random(16, s.dim, s.dim, ShawValues::separate, r);
            }()},
      Entry{"sine_spe", "sineSPE, 5 sines, R = 64, ungated, softmax attention",
            SineSpe<Scalar>(SineSpeParameters<Scalar>::initial(H, s.dim, 5, 13), 64, 17)},
      Entry{"conv_spe", "convSPE, kernel 32, R = 64, ungated, softmax attention",
            ConvSpe<Scalar>(ConvSpeParameters<Scalar>::initial(H, s.dim, 32, 19), 64, 23)},
      Entry{"dape_kerple", "DAPE over the KERPLE-log above, MLP 2H-32-H",
            [&] {
              auto r = seeded(29);
              return Dape<Scalar, Kerple<Scalar>>::random(kerple, 32, r);
            }()},
      Entry{"dape_alibi", "DAPE over the ALiBi above, MLP 2H-32-H",
            [&] {
              auto r = seeded(31);
              return Dape<Scalar, Alibi<Scalar>>::random(alibi, 32, r);
            }()},
      Entry{"dapev2_kerple", "DAPE V2 over the KERPLE-log above, 1x3 convolutions, width 32",
            [&] {
              auto r = seeded(37);
              return DapeV2<Scalar, Kerple<Scalar>>::random(kerple, 32, 3, r);
            }()},
  };
}

// ---------------------------------------------------------------------------------------------

struct Inputs {
  posenc::Heads<Scalar> q, k, v;  // [H, max length, D]
};

Inputs make_inputs(const Settings& s) {
  const Index n = s.lengths.back();
  Inputs in{posenc::Heads<Scalar>(s.heads, n, s.dim), posenc::Heads<Scalar>(s.heads, n, s.dim),
            posenc::Heads<Scalar>(s.heads, n, s.dim)};
  std::mt19937_64 rng(20260128);
  std::normal_distribution<double> normal;
  // Position-major draws: every length sees the same prefix, so --quick reproduces the first
  // rows of the full report.
  for (Index i = 0; i < n; ++i) {
    for (posenc::Heads<Scalar>* x : {&in.q, &in.k, &in.v}) {
      for (Index h = 0; h < s.heads; ++h) {
        for (Index d = 0; d < s.dim; ++d) (*x)(h, i, d) = normal(rng);
      }
    }
  }
  return in;
}

/// The same inputs with the sinusoidal encoding of row i (absolute position i) added to q and k:
/// x_i + p_i through identity projections. v is left alone so that every encoder mixes the same
/// values (an identity value projection would add p_j to v as well).
Inputs with_sinusoidal(const Inputs& plain, const Settings& s) {
  Inputs in = plain;
  const posenc::SinusoidalEncoding<Scalar> encoding(s.dim);
  const posenc::Matrix<Scalar> table = encoding.table(0, in.q.rows());
  for (Index h = 0; h < s.heads; ++h) {
    in.q.head(h) += table;
    in.k.head(h) += table;
  }
  return in;
}

/// Limit TRF (the series of a query far from the start) of an entry's head.
template <class Encoder>
posenc::ReceptiveField trf_limit(const Entry<Encoder>& entry, Index head, double eps) {
  if (entry.absolute) {
    return {false, 0,
            "not defined: an absolute encoding moves q and k, not the logits by a q/k-free bias",
            nan, false};
  }
  return posenc::theoretical_receptive_field(entry.encoder, head, eps);
}

/// TRF of an entry's head for the query at position `query` (keys 0 … query); NaN if undefined.
template <class Encoder>
double trf_at(const Entry<Encoder>& entry, Index head, double eps, Index query) {
  if (entry.absolute) return nan;
  const posenc::ReceptiveField field =
      posenc::theoretical_receptive_field_at(entry.encoder, head, eps, query);
  return field.finite ? static_cast<double>(field.tokens) : nan;
}

std::string trf_text(const posenc::ReceptiveField& f) {
  if (f.finite) return std::to_string(f.tokens);
  return f.additive ? "inf" : "undefined";
}

/// Mean over rows of |a_r − b_r| / |b_r| for one head.
template <class A, class B>
double relative_drift(const A& a, const B& b) {
  double drift = 0.0;
  for (Index r = 0; r < a.rows(); ++r) {
    drift += (a.row(r) - b.row(r)).norm() / std::max(b.row(r).norm(), 1e-300);
  }
  return drift / static_cast<double>(a.rows());
}

struct Measure {
  double resolution, trf_at, erf, entropy, mean_distance, mass_beyond, drift_window, drift_prefix;
};
inline constexpr int measure_count = 8;

/// The means over heads of one encoder, one row per length (what the curves plot).
struct Curves {
  std::string name;
  std::vector<std::array<double, measure_count>> means;
};

double field(const Measure& m, int i) {
  const double values[measure_count] = {m.resolution,   m.trf_at,        m.erf,
                                        m.entropy,      m.mean_distance, m.mass_beyond,
                                        m.drift_window, m.drift_prefix};
  return values[i];
}

/// Everything at one length, per head: the last `probe_rows` queries against all `length` keys,
/// and the first `train` queries against all `length` keys (drift_prefix against `prefix`).
template <class Encoder>
std::vector<Measure> measure(const Entry<Encoder>& entry, const Inputs& in, const Settings& s,
                             Index length, const posenc::Heads<Scalar>& prefix) {
  const Encoder& encoder = entry.encoder;
  const Index rows = std::min(s.probe_rows, length);
  const auto q = in.q.view().middle_rows(length - rows, rows);
  const auto k = in.k.view().middle_rows(0, length);
  const auto v = in.v.view().middle_rows(0, length);
  const posenc::AttentionOptions options{.query_offset = length - rows};
  const posenc::AttentionOptions window{.mask = posenc::Mask::sliding_window(s.train),
                                        .query_offset = length - rows};

  const auto scores = posenc::attention_scores(q, k, encoder, options);
  const auto weights = posenc::attention_weights(q, k, v, encoder, options);
  const posenc::Vector<double> resolution = posenc::empirical_attention_resolution(scores);
  const auto erf = posenc::empirical_receptive_field(weights, s.eps);
  const auto stats = posenc::attention_statistics(weights, s.train);
  const auto full = posenc::attention(q, k, v, encoder, options);
  const auto trained = posenc::attention(q, k, v, encoder, window);
  const auto first = posenc::attention(in.q.view().middle_rows(0, s.train), k, v, encoder);

  std::vector<Measure> result;
  for (Index h = 0; h < s.heads; ++h) {
    result.push_back({resolution[h], trf_at(entry, h, s.eps, length - 1), erf.mean[h],
                      stats.entropy[h], stats.mean_distance[h], stats.mass_beyond[h],
                      relative_drift(full.head(h), trained.head(h)),
                      relative_drift(first.head(h), prefix.head(h))});
  }
  return result;
}

void write_csv_number(std::ofstream& out, double x) {
  if (std::isnan(x)) {
    out << "NaN";
  } else {
    out << x;
  }
}

std::string table_number(double x, const char* format) {
  if (std::isnan(x)) return "-";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, format, x);
  return buffer;
}

/// "0-3, 5" for the sorted heads {0, 1, 2, 3, 5}.
std::string head_ranges(const std::vector<Index>& heads) {
  std::string text;
  for (std::size_t i = 0; i < heads.size();) {
    std::size_t j = i;
    while (j + 1 < heads.size() && heads[j + 1] == heads[j] + 1) ++j;
    if (!text.empty()) text += ", ";
    text += std::to_string(heads[i]);
    if (j > i) {
      text += '-';
      text += std::to_string(heads[j]);
    }
    i = j + 1;
  }
  return text;
}

/// The reasons of the per-head TRFs, each distinct reason once with the heads that give it.
void print_reasons(const std::vector<posenc::ReceptiveField>& trf) {
  std::vector<bool> printed(trf.size(), false);
  for (std::size_t h = 0; h < trf.size(); ++h) {
    if (printed[h]) continue;
    std::vector<Index> heads;
    for (std::size_t g = h; g < trf.size(); ++g) {
      if (!printed[g] && trf[g].reason == trf[h].reason) {
        printed[g] = true;
        heads.push_back(static_cast<Index>(g));
      }
    }
    const std::string range = head_ranges(heads);
    const std::string label = (heads.size() == 1 ? "head " : "heads ") + range;
    if (trf[h].reason.starts_with(label + ' ')) {  // "head 2 of ALiBi: …" names its head already
      std::printf("  %s\n", trf[h].reason.c_str());
    } else {
      std::printf("  %s: %s\n", label.c_str(), trf[h].reason.c_str());
    }
  }
}

/// Runs one encoder: table on stdout, CSV and attention-map data on disk.
template <class Encoder>
void report(const Entry<Encoder>& entry, const Inputs& plain, const Inputs& absolute,
            const Settings& s, std::vector<Curves>& curves) {
  const Inputs& in = entry.absolute ? absolute : plain;
  std::printf("\n== %s: %s ==\n", entry.name.c_str(), entry.description.c_str());
  std::vector<posenc::ReceptiveField> trf;
  std::printf("TRF_%g (limit, query far from the start) per head:", s.eps);
  for (Index h = 0; h < s.heads; ++h) {
    trf.push_back(trf_limit(entry, h, s.eps));
    std::printf(" %s", trf_text(trf.back()).c_str());
  }
  std::printf("\n");
  print_reasons(trf);
  if constexpr (requires { entry.encoder.base_bias(); }) {
    std::printf("TRF_%g of the base bias alone per head:", s.eps);
    for (Index h = 0; h < s.heads; ++h) {
      std::printf(" %s",
                  trf_text(posenc::theoretical_receptive_field(entry.encoder.base_bias(), h, s.eps))
                      .c_str());
    }
    std::printf("\n");
  }
  if constexpr (requires { posenc::rotary_score_curve(entry.encoder, Index{1}); }) {
    std::printf("design-time R(g) of the encoder (rotary_score_curve, sum form), N = length:");
    for (const Index length : s.lengths) {
      std::printf(" %.2e",
                  posenc::attention_resolution(posenc::rotary_score_curve(entry.encoder, length)));
    }
    std::printf("\n");
  }
  std::printf("%7s %9s %8s %8s %8s %9s %8s %9s %9s\n", "length", "R(s_hat)", "TRF@L", "ERF",
              "entropy", "mean dist", "mass>=T", "drift win", "drift 0:T");

  // <name>.csv: one row per (length, head); <name>_mean.csv: the means over heads (plotted).
  std::ofstream csv(s.out / (entry.name + ".csv"));
  std::ofstream means(s.out / (entry.name + "_mean.csv"));
  const char* columns =
      "resolution,trf_at_length,erf,entropy,mean_distance,mass_beyond_train,drift_window,"
      "drift_first_train";
  csv << "length,head,trf_limit," << columns << '\n';
  means << "length," << columns << '\n';
  csv.precision(10);
  means.precision(10);
  const posenc::Heads<Scalar> prefix =
      posenc::attention(in.q.view().middle_rows(0, s.train), in.k.view().middle_rows(0, s.train),
                        in.v.view().middle_rows(0, s.train), entry.encoder);
  Curves result{entry.name, {}};
  for (const Index length : s.lengths) {
    const std::vector<Measure> m = measure(entry, in, s, length, prefix);
    std::array<double, measure_count> mean{};
    for (Index h = 0; h < s.heads; ++h) {
      const Measure& x = m[static_cast<std::size_t>(h)];
      csv << length << ',' << h << ',' << trf_text(trf[static_cast<std::size_t>(h)]);
      for (int i = 0; i < measure_count; ++i) {
        csv << ',';
        write_csv_number(csv, field(x, i));
        mean[i] += field(x, i) / static_cast<double>(s.heads);  // NaN stays NaN
      }
      csv << '\n';
    }
    means << length;
    for (const double x : mean) {
      means << ',';
      write_csv_number(means, x);
    }
    means << '\n';
    result.means.push_back(mean);
    // One format per column: scientific where a column spans decades (R, drift 0:T), fixed
    // decimals elsewhere.
    std::printf("%7ld %9s %8s %8s %8s %9s %8s %9s %9s\n", static_cast<long>(length),
                table_number(mean[0], "%.2e").c_str(), table_number(mean[1], "%.1f").c_str(),
                table_number(mean[2], "%.1f").c_str(), table_number(mean[3], "%.3f").c_str(),
                table_number(mean[4], "%.1f").c_str(), table_number(mean[5], "%.4f").c_str(),
                table_number(mean[6], "%.4f").c_str(), table_number(mean[7], "%.2e").c_str());
  }

  // The full causal attention map of head map_head at map_length, for the heat map.
  const Index n = std::min(s.map_length, s.lengths.back());
  const auto weights =
      posenc::attention_weights(in.q.view().middle_rows(0, n), in.k.view().middle_rows(0, n),
                                in.v.view().middle_rows(0, n), entry.encoder);
  // <name>_map.f32: log10 of the weights, row-major float32 (NaN where the weight is 0).
  std::ofstream map(s.out / (entry.name + "_map.f32"), std::ios::binary);
  for (Index r = 0; r < n; ++r) {
    for (Index c = 0; c < n; ++c) {
      const double w = weights(s.map_head, r, c);
      const auto value = static_cast<float>(w > 0.0 ? std::log10(w) : nan);
      map.write(reinterpret_cast<const char*>(&value), sizeof value);
    }
  }
  curves.push_back(std::move(result));
}

bool have_gnuplot() { return std::system("command -v gnuplot > /dev/null 2>&1") == 0; }

/// 14 distinguishable line styles: a colour, a marker and a dash pattern each (a curve hidden
/// under another still shows its markers and dashes between the other's).
void write_line_styles(std::ofstream& gp, std::size_t count) {
  const char* colours[] = {"#000000", "#e41a1c", "#377eb8", "#4daf4a", "#984ea3",
                           "#ff7f00", "#a65628", "#f781bf", "#666666", "#1b9e77",
                           "#d95f02", "#7570b3", "#e7298a", "#66a61e"};
  constexpr std::size_t palette = sizeof colours / sizeof colours[0];
  for (std::size_t i = 0; i < count; ++i) {
    gp << "set linetype " << i + 1 << " lc rgb '" << colours[i % palette] << "' lw 1.6 dt "
       << i % 5 + 1 << " pt " << i % 14 + 1 << " ps 0.9\n";
  }
}

/// How one encoder's curve in a panel relates to the encoders before it.
struct CurveRole {
  bool drawn = false;       // false: no finite value (no curve), or identical to `same_as`
  std::size_t same_as = 0;  // index of the first encoder with an identical curve (if !drawn)
  bool identical = false;
  std::optional<std::size_t> overlaps;  // an earlier drawn curve it lies on (within 1% of the axis)
};

/// Per encoder, its role in the panel of measure `column`. Identical: every length agrees to
/// 1e-9 relative (1e-12 absolute near zero), NaN where the other is NaN. Overlapping: every
/// length within 1% of the panel's y span in plotted coordinates (log10 on a log axis).
std::vector<CurveRole> curve_roles(const std::vector<Curves>& curves, int column, bool log_y) {
  const auto value = [&](std::size_t e, std::size_t l) { return curves[e].means[l][column]; };
  const std::size_t lengths = curves.front().means.size();
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  const auto plotted = [&](double y) { return log_y ? std::log10(y) : y; };
  for (std::size_t e = 0; e < curves.size(); ++e) {
    for (std::size_t l = 0; l < lengths; ++l) {
      const double y = value(e, l);
      if (std::isnan(y) || (log_y && !(y > 0.0))) continue;
      lo = std::min(lo, plotted(y));
      hi = std::max(hi, plotted(y));
    }
  }
  const double span = hi > lo ? hi - lo : 1.0;
  std::vector<CurveRole> roles(curves.size());
  for (std::size_t e = 0; e < curves.size(); ++e) {
    bool finite = false;
    for (std::size_t l = 0; l < lengths; ++l) finite = finite || !std::isnan(value(e, l));
    if (!finite) continue;
    roles[e].drawn = true;
    for (std::size_t f = 0; f < e && roles[e].drawn; ++f) {
      if (!roles[f].drawn) continue;  // compare with the drawn representatives only
      bool identical = true, overlaps = true;
      for (std::size_t l = 0; l < lengths; ++l) {
        const double a = value(e, l), b = value(f, l);
        if (std::isnan(a) || std::isnan(b)) {
          identical = overlaps = identical && std::isnan(a) && std::isnan(b);
          continue;
        }
        identical =
            identical && std::abs(a - b) <= 1e-9 * std::max(std::abs(a), std::abs(b)) + 1e-12;
        overlaps = overlaps && (!log_y || (a > 0.0 && b > 0.0)) &&
                   std::abs(plotted(a) - plotted(b)) <= 0.01 * span;
      }
      if (identical) {
        roles[e] = {false, f, true, std::nullopt};
      } else if (overlaps && !roles[e].overlaps) {
        roles[e].overlaps = f;
      }
    }
  }
  return roles;
}

/// "a, b, c" wrapped into lines of at most `width` characters, as a gnuplot string ("\n").
std::string wrapped(const std::string& head, const std::vector<std::string>& words,
                    std::size_t width) {
  std::string text = head, line = head;
  for (std::size_t i = 0; i < words.size(); ++i) {
    const std::string word = words[i] + (i + 1 < words.size() ? ", " : "");
    if (line.size() + word.size() > width) {
      text += "\\n  ";
      line = "  ";
    }
    text += word;
    line += word;
  }
  return text;
}

/// Writes plots.gp and runs gnuplot. Returns the PNG paths, empty on failure.
std::vector<std::filesystem::path> plot(const Settings& s, const std::vector<Curves>& curves) {
  const bool cairo = std::system("gnuplot -e 'set terminal pngcairo' > /dev/null 2>&1") == 0;
  const std::string terminal =
      cairo ? "pngcairo noenhanced font 'sans,10' size " : "png noenhanced size ";
  const std::filesystem::path curves_png = s.out / "curves_vs_length.png";
  const std::filesystem::path maps = s.out / "attention_maps.png";
  const std::filesystem::path script_path = s.out / "plots.gp";
  std::vector<std::filesystem::path> pngs{curves_png, maps};
  const Index n = std::min(s.map_length, s.lengths.back());
  std::ofstream gp(script_path);
  gp << "# Generated by posenc_example_extrapolation_report.\n";
  write_line_styles(gp, curves.size());
  gp << "dir = '" << s.out.string() << "/'\n";

  // 1. Curves against the context length: 8 panels, each with its own key (only the encoders
  // with a curve in it; identical curves drawn once and named so), and a panel of notes.
  gp << "set terminal " << terminal << "2000,1250\nset output '" << curves_png.string() << "'\n"
     << "set datafile separator ','\nset multiplot layout 3,3 margins 0.035,0.885,0.05,0.93 "
     << "spacing 0.145,0.085 title 'posenc extrapolation report: trained at " << s.train << ", "
     << s.heads << " heads, head dim " << s.dim << ", means over heads and the last "
     << s.probe_rows << " queries (drift 0:T: the first " << s.train << " queries)'\n"
     << "set logscale x 2\nset grid\nset xlabel 'context length L'\n"
     << "set key at graph 1.03, graph 1.02 top left vertical Left reverse samplen 2.5 "
     << "spacing 0.95 font ',8'\n";
  struct Panel {
    int column;  // in <name>_mean.csv (1: length)
    std::string title;
    bool log_y;
  };
  char eps[16];
  std::snprintf(eps, sizeof eps, "%g", s.eps);
  const std::vector<Panel> panels{
      {2, "attention resolution R(s_hat)", false},
      {3, std::string("TRF_") + eps + " of the query at L - 1 (tokens)", true},
      {4, std::string("ERF_") + eps + " (tokens)", true},
      {5, "entropy (nats)", false},
      {6, "mean attention distance (tokens)", true},
      {7, "attention mass at distance >= " + std::to_string(s.train), false},
      {8, "drift vs a " + std::to_string(s.train) + "-key sliding window", false},
      {9,
       "drift of the first " + std::to_string(s.train) +
           " outputs vs L = " + std::to_string(s.train),
       false}};
  std::vector<std::string> without_trf;
  for (const Panel& p : panels) {
    const std::vector<CurveRole> roles = curve_roles(curves, p.column - 2, p.log_y);
    gp << (p.log_y ? "set logscale y 10\n" : "unset logscale y\n") << "set title '" << p.title
       << "'\nplot ";
    bool first = true;
    for (std::size_t e = 0; e < curves.size(); ++e) {
      const CurveRole& role = roles[e];
      const std::string& name = curves[e].name;
      if (!role.drawn && !role.identical) {  // no finite value: no curve, no key entry
        if (p.column == 3) without_trf.push_back(name);
        continue;
      }
      gp << (first ? "" : ", \\\n     ");
      first = false;
      if (role.identical) {  // a key entry in the style of the curve it is identical to
        gp << "keyentry with linespoints lt " << role.same_as + 1 << " title '" << name
           << ": identical to " << curves[role.same_as].name << "'";
      } else {
        gp << "dir.'" << name << "_mean.csv' using 1:" << p.column << " skip 1 with linespoints lt "
           << e + 1 << " title '" << name;
        if (role.overlaps) gp << ": on " << curves[*role.overlaps].name;
        gp << "'";
      }
    }
    gp << '\n';
  }
  // The ninth cell: what the keys mean.
  std::vector<std::string> notes{
      "Each panel's key lists only the encoders with a curve in it.",
      "'a: identical to b': a's curve equals b's at every length (to 1e-9",
      "  relative, checked numerically); it is drawn once, in b's style.",
      "'a: on b': a's curve lies within 1% of the axis of b's at every",
      "  length (both drawn; tell them apart by marker and dash).",
  };
  if (!without_trf.empty()) {
    notes.push_back("No TRF curve (not an additive bias; the reason is printed");
    notes.push_back(wrapped("  above each table): ", without_trf, 66));
  }
  notes.push_back("Attention maps: attention_maps.png, <name>_map.png.");
  gp << "unset logscale\nunset grid\nunset title\nunset xlabel\nunset border\nunset tics\n"
     << "unset key\nset xrange [0:1]\nset yrange [0:1]\nset label 1 \"";
  for (std::size_t i = 0; i < notes.size(); ++i) gp << (i ? "\\n" : "") << notes[i];
  gp << "\" at graph -0.05, graph 0.95 left front font ',10'\n"
     << "plot 2 notitle\nunset label 1\n"
     << "unset multiplot\nset border\nset tics\nset autoscale\n";

  // 2. Attention maps of head map_head at n tokens: one grid with a shared colour bar, and one
  // file per encoder.
  const Index tic = std::max<Index>(n / 4, 1);
  gp << "set datafile separator whitespace\n"
     << "set palette defined (0 '#440154', 1 '#3b528b', 2 '#21908d', 3 '#5dc963', 4 '#fde725')\n"
     << "set size ratio -1\nset xrange [-0.5:" << n << "-0.5]\nset yrange [" << n
     << "-0.5:-0.5]\nset cbrange [-6:0]\n"
     << "set cbtics ('<= -6' -6, '-5' -5, '-4' -4, '-3' -3, '-2' -2, '-1' -1, '0' 0)\n"
     << "set xtics 0," << tic << ',' << n - 1 << " out nomirror\nset ytics 0," << tic << ','
     << n - 1 << " out nomirror\n"
     << "set xlabel 'key position'\nset ylabel 'query position'\n"
     << "set cblabel 'log10 attention weight (white: weight 0, masked)'\n";
  const auto map_plot = [&](const std::string& name) {
    gp << "plot dir.'" << name << "_map.f32' binary array=(" << n << ',' << n
       << ") format='%float' with image notitle\n";
  };
  const std::size_t grid_columns = 5;
  const std::size_t grid_rows = (curves.size() + grid_columns - 1) / grid_columns;
  gp << "set terminal " << terminal << "1700," << 360 * grid_rows + 60 << "\nset output '"
     << maps.string() << "'\nset multiplot layout " << grid_rows << ',' << grid_columns
     << " margins 0.04,0.89,0.06,0.93 spacing 0.04,0.09"
     << " title 'attention weights of head " << s.map_head << " at " << n << " tokens (trained at "
     << s.train << ")'\n"
     << "set xlabel offset 0,0.5 font ',9'\nset ylabel offset 1.5,0 font ',9'\n"
     << "set tics font ',8'\n";
  for (std::size_t e = 0; e < curves.size(); ++e) {
    // The one colour bar of the grid, drawn with the first map in the right margin.
    gp << (e == 0 ? "set colorbox user origin 0.925,0.15 size 0.015,0.7\n" : "unset colorbox\n")
       << "set title '" << curves[e].name << "'\n";
    map_plot(curves[e].name);
  }
  gp << "unset multiplot\nset colorbox default\nset tics font ',10'\n"
     << "set xlabel offset 0,0 font ',10'\nset ylabel offset 0,0 font ',10'\n";
  for (const auto& c : curves) {
    const std::filesystem::path png = s.out / (c.name + "_map.png");
    pngs.push_back(png);
    gp << "set terminal " << terminal << "700,640\nset output '" << png.string() << "'\n"
       << "set title '" << c.name << ": attention weights of head " << s.map_head << " at " << n
       << " tokens'\n";
    map_plot(c.name);
  }
  gp.close();
  const std::string command = "gnuplot '" + script_path.string() + "'";
  if (std::system(command.c_str()) != 0) return {};
  return pngs;
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--out" && i + 1 < argc) {
      s.out = argv[++i];
    } else if (arg == "--docs-png" && i + 1 < argc) {
      s.docs_png = argv[++i];
    } else if (arg == "--require-plots") {
      s.require_plots = true;
    } else if (arg == "--no-plots") {
      s.plots = false;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--out DIR] [--docs-png PATH] [--require-plots] "
                   "[--no-plots]\n",
                   argv[0]);
      return 2;
    }
  }
  for (Index n = s.train; n <= (quick ? 512 : 8192); n *= 2) s.lengths.push_back(n);
  // The calls here are small (64 query rows): Eigen's own GEMM threads would only spin. The
  // attention kernel keeps its threads.
  Eigen::setNbThreads(1);
  std::filesystem::create_directories(s.out);
  s.out = std::filesystem::absolute(s.out).lexically_normal();  // printed paths are absolute

  std::printf(
      "posenc extrapolation report: %ld heads, head dim %ld, random N(0,1) q/k/v (seeded), the\n"
      "same inputs and the default logit scale 1/sqrt(width) for every encoder, fixed seeded\n"
      "weights; trained at T = %ld, lengths %ld ... %ld, eps = %g.\n",
      static_cast<long>(s.heads), static_cast<long>(s.dim), static_cast<long>(s.train),
      static_cast<long>(s.lengths.front()), static_cast<long>(s.lengths.back()), s.eps);
  std::printf(
      "Columns (means over heads; the last %ld query rows unless said otherwise):\n"
      "  R(s_hat)  attention resolution (XPos Eq. 3) of the sub-diagonal score means\n"
      "  TRF@L     theoretical receptive field of the query at L - 1 (keys 0 ... L - 1): the\n"
      "            nearest K keys carrying 1 - eps of sum_t exp(b_t); '-' where the encoder is "
      "not\n"
      "            an additive bias (the limit TRF above each table says why)\n"
      "  ERF       keys holding 1 - eps of each row's attention (nearest first)\n"
      "  entropy   -sum_j p_ij ln p_ij (nats); mean dist: sum_j p_ij |i - j|\n"
      "  mass>=T   attention at distance >= T = %ld, never seen in training\n"
      "  drift win mean |o_full - o_win| / |o_win|, o_win seeing only the last T keys\n"
      "  drift 0:T the same for the first T queries at length L vs at length T: zero for a\n"
      "            causal model unless the encoding looks at keys after the query\n"
      "Learned absolute positions (LearnedAbsoluteEncoding) are not run: a table trained at T\n"
      "has no rows for positions >= T, so it cannot be evaluated beyond the training length.\n",
      static_cast<long>(s.probe_rows), static_cast<long>(s.train));

  const Inputs plain = make_inputs(s);
  const Inputs absolute = with_sinusoidal(plain, s);
  std::vector<Curves> curves;
  std::apply([&](const auto&... entry) { (report(entry, plain, absolute, s, curves), ...); },
             encoders(s));

  std::printf("\nCSV (per head in <name>.csv, means over heads in <name>_mean.csv):\n");
  for (const auto& c : curves) {
    std::printf("  %s\n", (s.out / (c.name + ".csv")).string().c_str());
  }
  if (!s.plots) return 0;
  if (!have_gnuplot()) {
    std::printf("\ngnuplot not found: no PNG written (install it: apt-get install gnuplot-nox).\n");
    return s.require_plots ? 1 : 0;
  }
  const auto pngs = plot(s, curves);
  if (pngs.empty()) {
    std::printf("\ngnuplot failed on %s: no PNG written.\n", (s.out / "plots.gp").string().c_str());
    return s.require_plots ? 1 : 0;
  }
  std::printf("\nPNG (gnuplot script: %s):\n", (s.out / "plots.gp").string().c_str());
  for (const auto& png : pngs) std::printf("  %s\n", png.string().c_str());
  if (s.docs_png) {
    std::filesystem::create_directories(std::filesystem::absolute(*s.docs_png).parent_path());
    std::filesystem::copy_file(pngs.front(), *s.docs_png,
                               std::filesystem::copy_options::overwrite_existing);
    std::printf("  %s (copy of curves_vs_length.png)\n",
                std::filesystem::absolute(*s.docs_png).lexically_normal().string().c_str());
  }
  return 0;
}
