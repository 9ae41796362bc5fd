// SPDX-License-Identifier: MIT
// Extrapolation report: every encoder at fixed seeded weights on the same random q, k, v, as if
// trained at 128 tokens and run at 128 … 8192. Per encoder and length: attention resolution of
// the empirical score curve, TRF, ERF, entropy, mean distance, mass beyond 128 and drift; one
// table per encoder on stdout, CSV files, and PNG plots through gnuplot.
//
//   posenc_example_extrapolation_report [--quick] [--out DIR] [--require-plots] [--no-plots]
//
// --quick: lengths 128, 256, 512 only (what CTest runs). --require-plots: fail when gnuplot is
// missing or fails (the demo command uses it). Adding an encoder is one line in `encoders()`.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <posenc/posenc.hpp>

namespace {

using posenc::Index;
using Scalar = double;

// ---------------------------------------------------------------------------------------------
// The encoders. Until the encoder headers land, the list holds NoPE and a local ALiBi-shaped
// bias; each encoder becomes one `Entry{...}` line here.
// ---------------------------------------------------------------------------------------------

/// A local stand-in for ALiBi (not a library encoder): b_h(i, j) = −m_h·(i − j), m_h = 2^(−8h/H).
struct LinearBias {
  using Scalar = double;
  std::vector<double> slopes;
  explicit LinearBias(Index heads) {
    for (Index h = 1; h <= heads; ++h) {
      slopes.push_back(std::exp2(-8.0 * static_cast<double>(h) / static_cast<double>(heads)));
    }
  }
  Index heads() const { return static_cast<Index>(slopes.size()); }
  double bias(Index h, Index i, Index j) const {
    return -slopes[static_cast<std::size_t>(h)] * static_cast<double>(i - j);
  }
  void add_bias(Index h, posenc::Positions qpos, posenc::Positions kpos,
                posenc::TileRef<double> tile) const {
    for (Index r = 0; r < tile.rows(); ++r) {
      for (Index c = 0; c < tile.cols(); ++c) tile(r, c) += bias(h, qpos[r], kpos[c]);
    }
  }
};
static_assert(posenc::ScoreBias<LinearBias>);

template <class Encoder>
struct Entry {
  std::string name;  // file-name safe
  std::string description;
  Encoder encoder;
};

auto encoders(Index heads) {
  return std::tuple{
      Entry{"nope", "no positional encoding", posenc::NoPositionalEncoding{}},
      Entry{"linear_bias", "local ALiBi-shaped bias -m_h (i - j), m_h = 2^(-8h/H)",
            LinearBias(heads)},
  };
}

// ---------------------------------------------------------------------------------------------

struct Settings {
  Index heads = 4;
  Index dim = 32;
  Index train = 128;       // the "training length"
  Index probe_rows = 64;   // the last query rows analysed at each length
  Index map_length = 256;  // attention maps are drawn at this length
  double eps = 0.05;       // TRF / ERF share
  std::vector<Index> lengths;
  std::filesystem::path out = "extrapolation_report";
  bool plots = true;
  bool require_plots = false;
};

struct Inputs {
  posenc::Heads<Scalar> q, k, v;  // [H, max length, D]
};

Inputs make_inputs(const Settings& s) {
  const Index n = s.lengths.back();
  Inputs in{posenc::Heads<Scalar>(s.heads, n, s.dim), posenc::Heads<Scalar>(s.heads, n, s.dim),
            posenc::Heads<Scalar>(s.heads, n, s.dim)};
  std::mt19937_64 rng(20260128);
  std::normal_distribution<double> normal;
  for (posenc::Heads<Scalar>* x : {&in.q, &in.k, &in.v}) {
    for (Index i = 0; i < x->flat().size(); ++i) x->flat()[i] = normal(rng);
  }
  return in;
}

/// The TRF of an encoder's head when the library defines one for it (ScoreBias encoders, NoPE).
template <class Encoder>
posenc::ReceptiveField trf_of(const Encoder& encoder, Index head, double eps) {
  if constexpr (requires { posenc::theoretical_receptive_field(encoder, head, eps); }) {
    return posenc::theoretical_receptive_field(encoder, head, eps);
  } else {
    return {false, 0, "not defined: the encoding is not an additive bias",
            std::numeric_limits<double>::quiet_NaN()};
  }
}

struct Measure {
  double resolution, erf, entropy, mean_distance, mass_beyond, drift;
};

/// Everything at one length, per head: the last `rows` queries against all `length` keys.
template <class Encoder>
std::vector<Measure> measure(const Encoder& encoder, const Inputs& in, const Settings& s,
                             Index length) {
  const Index rows = std::min(s.probe_rows, length);
  const auto q = in.q.view().middle_rows(length - rows, rows);
  const auto k = in.k.view().middle_rows(0, length);
  const auto v = in.v.view().middle_rows(0, length);
  const posenc::AttentionOptions options{.query_offset = length - rows};
  const posenc::AttentionOptions window{.mask = posenc::Mask::sliding_window(s.train),
                                        .query_offset = length - rows};

  const auto scores = posenc::attention_scores(q, k, encoder, options);
  const auto weights = posenc::attention_weights(q, k, v, encoder, options);
  const posenc::Vector<double> resolution = posenc::empirical_attention_resolution(scores, options);
  const auto erf = posenc::empirical_receptive_field(weights, s.eps, options);
  const auto stats = posenc::attention_statistics(weights, s.train, options);
  const auto full = posenc::attention(q, k, v, encoder, options);
  const auto trained = posenc::attention(q, k, v, encoder, window);

  std::vector<Measure> result;
  for (Index h = 0; h < s.heads; ++h) {
    double drift = 0.0;
    for (Index r = 0; r < rows; ++r) {
      const double change = (full.head(h).row(r) - trained.head(h).row(r)).norm();
      drift += change / std::max(trained.head(h).row(r).norm(), 1e-300) / static_cast<double>(rows);
    }
    result.push_back({resolution[h], erf.mean[h], stats.entropy[h], stats.mean_distance[h],
                      stats.mass_beyond[h], drift});
  }
  return result;
}

std::string trf_text(const posenc::ReceptiveField& f) {
  if (!f.finite) return std::isnan(f.total_weight) ? "n/a" : "inf";
  return std::to_string(f.tokens);
}

/// Runs one encoder: table on stdout, CSV and attention-map data on disk.
template <class Encoder>
void report(const Entry<Encoder>& entry, const Inputs& in, const Settings& s,
            std::vector<std::string>& names) {
  std::printf("\n== %s: %s ==\n", entry.name.c_str(), entry.description.c_str());
  std::vector<posenc::ReceptiveField> trf;
  std::printf("TRF (eps = %g) per head:", s.eps);
  for (Index h = 0; h < s.heads; ++h) {
    trf.push_back(trf_of(entry.encoder, h, s.eps));
    std::printf(" %s", trf_text(trf.back()).c_str());
  }
  std::printf("\n  (%s)\n", trf.front().reason.c_str());
  std::printf("%8s %10s %9s %9s %10s %10s %9s\n", "length", "R(s_hat)", "ERF", "entropy",
              "mean dist", "mass>=L", "drift");

  // <name>.csv: one row per (length, head); <name>_mean.csv: the means over heads (plotted).
  std::ofstream csv(s.out / (entry.name + ".csv"));
  std::ofstream means(s.out / (entry.name + "_mean.csv"));
  csv << "length,head,resolution,trf,erf,entropy,mean_distance,mass_beyond_train,drift\n";
  means << "length,resolution,erf,entropy,mean_distance,mass_beyond_train,drift\n";
  csv.precision(10);
  means.precision(10);
  for (const Index length : s.lengths) {
    const std::vector<Measure> m = measure(entry.encoder, in, s, length);
    Measure mean{0, 0, 0, 0, 0, 0};
    for (Index h = 0; h < s.heads; ++h) {
      const Measure& x = m[static_cast<std::size_t>(h)];
      csv << length << ',' << h << ',' << x.resolution << ',' << trf_text(trf[h]) << ',' << x.erf
          << ',' << x.entropy << ',' << x.mean_distance << ',' << x.mass_beyond << ',' << x.drift
          << '\n';
      const double w = 1.0 / static_cast<double>(s.heads);
      mean = {mean.resolution + w * x.resolution,   mean.erf + w * x.erf,
              mean.entropy + w * x.entropy,         mean.mean_distance + w * x.mean_distance,
              mean.mass_beyond + w * x.mass_beyond, mean.drift + w * x.drift};
    }
    means << length << ',' << mean.resolution << ',' << mean.erf << ',' << mean.entropy << ','
          << mean.mean_distance << ',' << mean.mass_beyond << ',' << mean.drift << '\n';
    std::printf("%8ld %10.3g %9.1f %9.3f %10.1f %10.4f %9.4f\n", static_cast<long>(length),
                mean.resolution, mean.erf, mean.entropy, mean.mean_distance, mean.mass_beyond,
                mean.drift);
  }
  std::printf("  (means over %ld heads and the last %ld query rows)\n", static_cast<long>(s.heads),
              static_cast<long>(s.probe_rows));

  // The full causal attention map of head 0 at map_length, for the heat map.
  const Index n = std::min(s.map_length, s.lengths.back());
  const auto weights =
      posenc::attention_weights(in.q.view().middle_rows(0, n), in.k.view().middle_rows(0, n),
                                in.v.view().middle_rows(0, n), entry.encoder);
  std::ofstream map(s.out / (entry.name + "_map.dat"));
  for (Index r = 0; r < n; ++r) {
    for (Index c = 0; c < n; ++c) map << weights(0, r, c) << (c + 1 < n ? ' ' : '\n');
  }
  names.push_back(entry.name);
}

bool have_gnuplot() { return std::system("command -v gnuplot > /dev/null 2>&1") == 0; }

/// Writes plots.gp and runs gnuplot. Returns the PNG paths, empty on failure.
std::vector<std::filesystem::path> plot(const Settings& s, const std::vector<std::string>& names) {
  const bool cairo = std::system("gnuplot -e 'set terminal pngcairo' > /dev/null 2>&1") == 0;
  const std::string terminal =
      cairo ? "pngcairo noenhanced font ',10' size " : "png noenhanced size ";
  const std::filesystem::path curves = s.out / "curves_vs_length.png";
  const std::filesystem::path script_path = s.out / "plots.gp";
  std::vector<std::filesystem::path> pngs{curves};
  std::ofstream gp(script_path);
  gp << "# Generated by posenc_example_extrapolation_report.\n"
     << "set terminal " << terminal << "1200,800\nset output '" << curves.string() << "'\n"
     << "set datafile separator ','\nset multiplot layout 2,3 title 'posenc extrapolation "
     << "report: trained at " << s.train << ", means over heads and the last " << s.probe_rows
     << " queries'\nset logscale x 2\nset grid\nset key top left\nset xlabel 'context length'\n"
     << "encoders = '";
  for (const auto& name : names) gp << name << ' ';
  gp << "'\n";
  const std::vector<std::pair<int, std::string>> panels{
      {2, "attention resolution R(s_hat)"},
      {3, "ERF (tokens, eps = " + std::to_string(s.eps).substr(0, 4) + ")"},
      {4, "entropy (nats)"},
      {5, "mean attention distance (tokens)"},
      {6, "attention mass at distance >= " + std::to_string(s.train)},
      {7, "drift against the training window"}};
  for (const auto& [column, title] : panels) {
    gp << "set title '" << title << "'\n"
       << "plot for [e in encoders] '" << s.out.string() << "/'.e.'_mean.csv' using 1:" << column
       << " skip 1 with linespoints title e\n";
  }
  gp << "unset multiplot\nunset logscale x\nset datafile separator whitespace\nunset grid\n"
     << "set palette defined (0 '#440154', 1 '#3b528b', 2 '#21908d', 3 '#5dc963', 4 '#fde725')\n";
  for (const auto& name : names) {
    const std::filesystem::path png = s.out / (name + "_map.png");
    pngs.push_back(png);
    const Index n = std::min(s.map_length, s.lengths.back());
    gp << "set terminal " << terminal << "700,640\nset output '" << png.string() << "'\n"
       << "set title '" << name << ": attention weights of head 0 at " << n
       << " tokens (log10; white: weight 0)'\n"
       << "set xlabel 'key position'\nset ylabel 'query position'\nset size ratio -1\n"
       << "set xrange [-0.5:" << n << "-0.5]\nset yrange [" << n << "-0.5:-0.5]\n"
       << "set cbrange [-6:0]\nset cblabel 'log10 weight'\n"
       << "plot '" << (s.out / (name + "_map.dat")).string()
       << "' matrix using 1:2:($3 > 0 ? log10($3) : NaN) with image notitle\n";
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
    } else if (arg == "--require-plots") {
      s.require_plots = true;
    } else if (arg == "--no-plots") {
      s.plots = false;
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--out DIR] [--require-plots] [--no-plots]\n",
                   argv[0]);
      return 2;
    }
  }
  for (Index n = s.train; n <= (quick ? 512 : 8192); n *= 2) s.lengths.push_back(n);
  std::filesystem::create_directories(s.out);
  s.out = std::filesystem::absolute(s.out).lexically_normal();  // printed paths are absolute

  std::printf(
      "posenc extrapolation report: %ld heads, head dim %ld, random N(0,1) q/k/v (seeded),\n"
      "trained at %ld, lengths %ld ... %ld, eps = %g\n",
      static_cast<long>(s.heads), static_cast<long>(s.dim), static_cast<long>(s.train),
      static_cast<long>(s.lengths.front()), static_cast<long>(s.lengths.back()), s.eps);
  std::printf(
      "R(s_hat): attention resolution (XPos Eq. 3) of the sub-diagonal means of the last %ld\n"
      "  query rows; ERF: tokens holding 1 - eps of each row's attention; entropy in nats; mean\n"
      "  dist: sum_j p_ij |i - j|; mass>=%ld: attention beyond the training length; drift: mean\n"
      "  |o_full - o_window| / |o_window| with o_window seeing only the last %ld keys (causal\n"
      "  outputs on the first %ld positions never change, so this is what growth can move).\n",
      static_cast<long>(s.probe_rows), static_cast<long>(s.train), static_cast<long>(s.train),
      static_cast<long>(s.train));

  const Inputs inputs = make_inputs(s);
  std::vector<std::string> names;
  std::apply([&](const auto&... entry) { (report(entry, inputs, s, names), ...); },
             encoders(s.heads));

  std::printf("\nCSV (per head; means over heads in *_mean.csv):\n");
  for (const auto& name : names) std::printf("  %s\n", (s.out / (name + ".csv")).string().c_str());
  if (!s.plots) return 0;
  if (!have_gnuplot()) {
    std::printf("\ngnuplot not found: no PNG written (install it: apt-get install gnuplot-nox).\n");
    return s.require_plots ? 1 : 0;
  }
  const auto pngs = plot(s, names);
  if (pngs.empty()) {
    std::printf("\ngnuplot failed on %s: no PNG written.\n", (s.out / "plots.gp").string().c_str());
    return s.require_plots ? 1 : 0;
  }
  std::printf("\nPNG:\n");
  for (const auto& png : pngs) std::printf("  %s\n", png.string().c_str());
  return 0;
}
