// SPDX-License-Identifier: MIT
// Differential sweep (issue 14, point 19): seeded random configurations, each checking an entry
// point against an independent computation of the same result — the streaming kernel against
// the oracle, KvCache decoding (token by token and in chunks) against one pass, split-KV partials
// merged against one pass, linear attention and its decoding state against the linear oracle —
// over encoders × masks × shapes (odd sizes 1…130, grouped-query heads) × query offsets and
// explicit positions × segments × tile sizes × threads 1/2, with NaN/Inf inputs in about 10 % of
// the configurations (then both sides must be non-finite in exactly the same entries, README
// "Input policies", and equal within tolerance everywhere else).
//
// Replaying a failure. Configuration i of a test is drawn from (base seed, test, i) alone; a
// failure prints the base seed, the index and the configuration. Environment:
//   POSENC_SWEEP_SEED=<n>   base seed (default: POSENC_TEST_SEED, else test::test_seed()'s default)
//   POSENC_SWEEP_INDEX=<i>  run configuration i only
//   POSENC_SWEEP_COUNT=<n>  configurations per test (default 1 000 each, 4 000 in all; 250 each in
//                           sanitizer builds and builds without NDEBUG)
// e.g. POSENC_SWEEP_SEED=20261123 POSENC_SWEEP_INDEX=417 build/release/tests/posenc_tests
//        --gtest_filter=Sweep.SplitKvMatchesOnePass
//
// Tolerances are k·ε·f(sizes) with ε the scalar's machine epsilon (softmax_tolerance() and
// linear_tolerance() below): a score s carries a rounding error of a few ulps of |s| plus the
// error of a dot product of width W (≈ W·ε·|q|·|k|·scale), a weight exp(s − max) inherits the
// error of s − max, and the output sums M weighted values, so
//   |Δout| <= ε·max(1, max|v|)·(k_s·(1 + S) + k_n·(W + Dv + M))
// with S the largest finite score (attention_scores). Linear attention: every weight is positive,
// so the sums are well conditioned: ε·max(1, max|v|)·k_l·(F + W + Dv + M) with F features
// (Favor's exponentials add their argument range). sineSPE adds its phase error ε·π·max|p|.
//
// Not swept, by design: DAPE V2 under split-KV (its convolution reads neighbouring keys, which a
// partial over a subset of the keys does not have) and against one pass in KvCache decoding (a
// row reads keys after the query; it is compared per append with the rows the cache holds).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <iostream>
#include <limits>
#include <numbers>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/posenc.hpp"
#include "support/test_support.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define POSENC_SWEEP_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define POSENC_SWEEP_SANITIZED 1
#endif
#endif

namespace posenc::differential_sweep {
namespace {

// --- seeds, counts, draws -----------------------------------------------------------------------

#if defined(POSENC_SWEEP_SANITIZED) || !defined(NDEBUG)
constexpr Index default_count = 250;  // sanitizers or no optimisation: several times slower
#else
constexpr Index default_count = 1000;
#endif
#undef POSENC_SWEEP_SANITIZED

/// Work budget of one configuration, H·N·M·(W + Dv) multiply-adds: keeps the large odd sizes
/// without letting every dimension be large at once.
constexpr double work_budget = 6e5;

std::optional<std::uint64_t> environment_number(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return std::nullopt;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0') {
    ADD_FAILURE() << name << "=" << text << " is not a decimal number; ignored";
    return std::nullopt;
  }
  return static_cast<std::uint64_t>(value);
}

std::uint64_t base_seed() {
  static const std::uint64_t seed = [] {
    if (const auto s = environment_number("POSENC_SWEEP_SEED")) return *s;
    return test::test_seed();
  }();
  return seed;
}

/// SplitMix64's finaliser: configuration seeds that differ in one bit of the index share nothing.
constexpr std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

/// The random choices of one configuration.
class Draw {
 public:
  explicit Draw(std::uint64_t seed) : engine_(seed) {}

  /// Uniform in [low, high] (inclusive; high >= low).
  Index between(Index low, Index high) {
    const auto range = static_cast<std::uint64_t>(high - low) + 1;
    return low + static_cast<Index>(engine_() % range);
  }
  bool chance(double p) { return uniform(0.0, 1.0) < p; }
  double uniform(double low, double high) { return detail::uniform(engine_, low, high); }
  template <class X>
  X one_of(std::initializer_list<X> options) {
    return options.begin()[between(0, static_cast<Index>(options.size()) - 1)];
  }
  /// A size in [1, high], weighted toward small ones (odd and even alike).
  Index size(Index high = 130) {
    const double u = uniform(0.0, 1.0);
    if (u < 0.55) return between(1, std::min<Index>(8, high));
    if (u < 0.87) return between(1, std::min<Index>(33, high));
    return between(1, high);
  }
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

// --- configurations -----------------------------------------------------------------------------

enum class Family : std::uint8_t {
  nope,
  alibi,
  kerple_log,
  kerple_power,
  t5,
  fire,
  rope,
  xpos,
  shaw,
  dape,
  dape_v2,
  rope_alibi,
  sine_spe,
  conv_spe
};

const char* family_name(Family f) {
  switch (f) {
    case Family::nope:
      return "NoPositionalEncoding";
    case Family::alibi:
      return "Alibi";
    case Family::kerple_log:
      return "Kerple(log)";
    case Family::kerple_power:
      return "Kerple(power)";
    case Family::t5:
      return "T5RelativeBias";
    case Family::fire:
      return "Fire";
    case Family::rope:
      return "RotaryEncoding";
    case Family::xpos:
      return "XPosEncoding";
    case Family::shaw:
      return "ShawRelative";
    case Family::dape:
      return "Dape<Kerple>";
    case Family::dape_v2:
      return "DapeV2<Alibi>";
    case Family::rope_alibi:
      return "compose(RotaryEncoding, Alibi)";
    case Family::sine_spe:
      return "SineSpe";
    case Family::conv_spe:
      return "ConvSpe";
  }
  return "?";
}

bool is_xpos(Family f) { return f == Family::xpos; }
bool is_spe(Family f) { return f == Family::sine_spe || f == Family::conv_spe; }
bool is_rope(Family f) { return f == Family::rope || f == Family::rope_alibi; }

/// Families each scalar is swept with: double gets every one, float a subset (each family is one
/// more instantiation of the whole kernel).
constexpr Family double_families[] = {
    Family::nope,    Family::alibi,      Family::kerple_log, Family::kerple_power, Family::t5,
    Family::fire,    Family::rope,       Family::xpos,       Family::shaw,         Family::dape,
    Family::dape_v2, Family::rope_alibi, Family::sine_spe};
constexpr Family float_families[] = {Family::nope, Family::xpos, Family::dape, Family::rope_alibi};

template <class T>
constexpr bool double_only = std::is_same_v<T, double>;

enum class Suite : std::uint8_t { streaming, kv_cache, split_kv, linear, backward };

enum class MapKind : std::uint8_t { elu, relu, favor };

/// Linear attention: (feature map, encoder) pairs rather than every combination (each pair is one
/// more instantiation of the linear engine, its oracle and its decoding state).
struct LinearCase {
  MapKind map;
  Family family;
};
constexpr LinearCase double_linear_cases[] = {
    {MapKind::elu, Family::nope},       {MapKind::relu, Family::nope},
    {MapKind::favor, Family::nope},     {MapKind::elu, Family::rope},
    {MapKind::favor, Family::sine_spe}, {MapKind::elu, Family::conv_spe}};
constexpr LinearCase float_linear_cases[] = {{MapKind::elu, Family::nope},
                                             {MapKind::favor, Family::sine_spe}};

/// Where a family's positions may lie: ConvSpe has noise for positions >= 0 only; XPos keeps its
/// scale factors ζ^(±p/scale_base) far from the float range (and from underflow, whose onset
/// depends on the centre, which differs between the paths).
struct PositionLimits {
  Index low;
  Index high;
  bool far_origin;  // may sit near 10^9 or 2^40
};

PositionLimits limits_of(Family f) {
  if (is_xpos(f)) return {0, 3000, false};
  // sineSPE forms its phases 2π·f·p in double (absolute error ε·π·|p|, and the recurrence between
  // anchors makes it depend on the tiling): positions stay where that is below the tolerance.
  if (f == Family::sine_spe) return {-4096, 4096, false};
  if (f == Family::conv_spe) return {0, Index{1} << 50, true};
  return {-(Index{1} << 50), Index{1} << 50, true};
}

struct Injection {
  char tensor;  // 'q', 'k' or 'v'
  Index head, row, col;
  double value;
};

struct Config {
  Suite suite = Suite::streaming;
  Index index = 0;
  bool is_float = false;
  Family family = Family::nope;
  Index heads = 1, kv_heads = 1, queries = 1, keys = 1, dim = 1, value_dim = 1;
  std::optional<Mask> mask;
  Index query_offset = 0;
  std::vector<Index> query_positions, key_positions;  // empty: default positions
  std::vector<Index> query_segments, key_segments;
  std::optional<double> scale;
  Index query_block = 128, key_block = 128;
  int threads = 1;
  double magnitude = 1.0;
  bool tokens_major = false;  // q, k, v stored [rows, heads, dim] and read through strided views
  std::vector<Injection> injections;
  std::vector<Index> pieces;  // KV: rows per append; split-KV: keys per partial
  Index capacity = 0;         // KV
  bool one_pass = false;      // KV: decoding is compared with one attention() call
  // Linear attention.
  MapKind map = MapKind::elu;
  bool causal = true;
  Index first_position = 0;
  Index chunk = 64;
  std::string notes;  // encoder parameters and anything else drawn later

  AttentionOptions attention_options() const {
    return AttentionOptions{.mask = mask,
                            .query_offset = query_offset,
                            .query_positions = query_positions,
                            .key_positions = key_positions,
                            .query_segments = query_segments,
                            .key_segments = key_segments,
                            .scale = scale,
                            .threads = threads,
                            .query_block = query_block,
                            .key_block = key_block};
  }
};

std::string mask_text(const std::optional<Mask>& mask) {
  if (!mask) return "unset (the encoder's natural mask, else causal)";
  switch (mask->kind()) {
    case Mask::Kind::none:
      return "none";
    case Mask::Kind::causal:
      return "causal";
    case Mask::Kind::sliding_window:
      return "sliding_window(" + std::to_string(mask->window()) + ")";
    case Mask::Kind::blockwise_causal:
      return "blockwise_causal(" + std::to_string(mask->window()) + ")";
  }
  return "?";
}

std::string list_text(const std::vector<Index>& x) {
  if (x.empty()) return "default";
  std::ostringstream s;
  const bool sorted = std::is_sorted(x.begin(), x.end());
  if (x.size() <= 20) {
    s << "[";
    for (std::size_t i = 0; i < x.size(); ++i) s << (i ? ", " : "") << x[i];
    s << "]";
  } else {
    s << x.size() << " entries in [" << *std::min_element(x.begin(), x.end()) << ", "
      << *std::max_element(x.begin(), x.end()) << "], " << (sorted ? "sorted" : "unsorted")
      << ", starting " << x[0] << ", " << x[1] << ", " << x[2] << ", …";
  }
  return s.str();
}

const char* suite_name(Suite s) {
  switch (s) {
    case Suite::streaming:
      return "streaming";
    case Suite::kv_cache:
      return "kv_cache";
    case Suite::split_kv:
      return "split_kv";
    case Suite::linear:
      return "linear";
    case Suite::backward:
      return "backward";
  }
  return "?";
}

std::string describe(const Config& c) {
  std::ostringstream s;
  s << "config " << c.index << " (" << suite_name(c.suite)
    << "): " << (c.is_float ? "float" : "double") << ", " << family_name(c.family);
  if (!c.notes.empty()) s << " [" << c.notes << "]";
  s << "\n  H = " << c.heads << ", H_kv = " << c.kv_heads << ", N = " << c.queries
    << ", M = " << c.keys << ", D = " << c.dim << ", Dv = " << c.value_dim;
  if (c.suite == Suite::linear) {
    s << "\n  map "
      << (c.map == MapKind::elu    ? "EluPlusOne"
          : c.map == MapKind::relu ? "ReluPlusEpsilon"
                                   : "Favor")
      << ", causal " << c.causal << ", first_position " << c.first_position << ", chunk " << c.chunk
      << ", threads " << c.threads;
  } else {
    s << "\n  mask " << mask_text(c.mask) << ", scale "
      << (c.scale ? std::to_string(*c.scale) : std::string("default"));
    s << "\n  query_offset " << c.query_offset << ", query_positions "
      << list_text(c.query_positions) << ", key_positions " << list_text(c.key_positions);
    s << "\n  query_segments " << list_text(c.query_segments) << ", key_segments "
      << list_text(c.key_segments);
    s << "\n  blocks " << c.query_block << " × " << c.key_block << ", threads " << c.threads;
  }
  s << ", input magnitude " << c.magnitude << (c.tokens_major ? ", tokens-major inputs" : "");
  if (!c.pieces.empty()) {
    s << "\n  " << (c.suite == Suite::split_kv ? "key pieces " : "appends of ")
      << list_text(c.pieces);
    if (c.suite == Suite::kv_cache) {
      s << " rows, capacity " << c.capacity
        << (c.one_pass ? ", compared with one pass" : ", compared per append with the oracle");
    }
  }
  if (!c.injections.empty()) {
    s << "\n  non-finite inputs:";
    for (const Injection& j : c.injections) {
      s << " " << j.tensor << "(" << j.head << ", " << j.row << ", " << j.col << ") = " << j.value;
    }
  }
  return s.str();
}

template <class... Parts>
void note(Config& c, const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  if (!c.notes.empty()) c.notes += "; ";
  c.notes += s.str();
}

/// `count` distinct positions in [low, low + span) (span >= count), sorted or in random order.
std::vector<Index> distinct_positions(Draw& d, Index count, Index low, Index span, bool sorted) {
  std::vector<Index> pool(static_cast<std::size_t>(span));
  std::iota(pool.begin(), pool.end(), low);
  for (Index i = 0; i < count; ++i) {
    std::swap(pool[static_cast<std::size_t>(i)],
              pool[static_cast<std::size_t>(d.between(i, span - 1))]);
  }
  pool.resize(static_cast<std::size_t>(count));
  if (sorted) std::sort(pool.begin(), pool.end());
  return pool;
}

/// Increasing positions from `first`, with occasional gaps.
std::vector<Index> increasing_positions(Draw& d, Index count, Index first) {
  std::vector<Index> p(static_cast<std::size_t>(count));
  Index next = first;
  for (Index& x : p) {
    x = next;
    next += 1 + (d.chance(0.3) ? d.between(1, 5) : 0);
  }
  return p;
}

/// The first of positions spread over `span` positions, `origin` plus an offset drawn from
/// [low_offset, high_offset], moved inside the family's limits.
Index place(Draw& d, const PositionLimits& limits, Index origin, Index span, Index low_offset,
            Index high_offset) {
  Index first = origin + d.between(low_offset, high_offset);
  first = std::max(first, limits.low);
  first = std::min(first, limits.high - span);
  return first;
}

std::vector<Index> segments(Draw& d, Index count, Index documents, bool packed) {
  std::vector<Index> s(static_cast<std::size_t>(count));
  for (Index& x : s) x = d.between(0, documents - 1);
  if (packed) std::sort(s.begin(), s.end());
  return s;
}

template <class X, std::size_t Count>
X pick(Draw& d, const X (&options)[Count]) {
  return options[d.between(0, static_cast<Index>(Count) - 1)];
}

Family pick_family(Draw& d, Suite suite, bool is_float) {
  for (;;) {
    const Family f = is_float ? pick(d, float_families) : pick(d, double_families);
    // DAPE V2's convolution reads neighbouring keys: a partial over a subset of the keys sees
    // other neighbours than the whole sequence, so split-KV does not apply to it (README, "V2
    // note").
    if (suite == Suite::split_kv && f == Family::dape_v2) continue;
    return f;
  }
}

/// Shapes: odd and even sizes 1…130 weighted toward small, grouped-query heads, the family's
/// constraints, and the work budget.
void draw_shape(Draw& d, Config& c) {
  c.kv_heads = d.chance(0.5) ? 1 : d.chance(0.7) ? 2 : d.between(3, 4);
  const Index group = is_spe(c.family) ? 1 : d.chance(0.5) ? 1 : d.between(2, 4);
  c.heads = c.kv_heads * std::min(group, 8 / c.kv_heads);  // at most 8 query heads
  const Index cap = is_spe(c.family) ? 40 : 130;
  c.queries = d.size(cap);
  c.keys = c.suite == Suite::kv_cache || (c.suite == Suite::linear && c.causal) ? c.queries
                                                                                : d.size(cap);
  if (c.suite == Suite::streaming || c.suite == Suite::split_kv || c.suite == Suite::backward) {
    if (d.chance(0.02)) c.keys = 0;  // no keys: every row is zero
  }
  c.dim = d.size(is_spe(c.family) ? 16 : 130);
  if (is_xpos(c.family) && c.dim % 2 != 0) c.dim = c.dim == 1 ? 2 : c.dim - 1;
  if (is_rope(c.family) && c.dim < 2) c.dim = 2;
  c.value_dim = d.size();
  if (c.family == Family::shaw && d.chance(0.3)) c.value_dim = c.dim;  // allows tied tables
  const auto work = [&] {
    return static_cast<double>(c.heads) * static_cast<double>(c.queries) *
           static_cast<double>(std::max<Index>(c.keys, 1)) *
           static_cast<double>(c.dim + c.value_dim);
  };
  while (work() > work_budget) {
    const Index largest = std::max({c.queries, c.keys, c.dim, c.value_dim});
    const auto shrink = [](Index x) { return (x + 1) / 2; };
    if (c.value_dim == largest) {
      c.value_dim = std::max<Index>(1, c.value_dim / 2);
    } else if (c.dim == largest && c.dim > 2) {
      c.dim = is_xpos(c.family) ? std::max<Index>(2, c.dim / 4 * 2) : (c.dim + 1) / 2;
      if (c.family == Family::shaw && c.value_dim > c.dim) c.value_dim = c.dim;
    } else if (c.queries == largest) {
      c.queries = shrink(c.queries);
      if (c.suite == Suite::kv_cache || (c.suite == Suite::linear && c.causal)) c.keys = c.queries;
    } else {
      c.keys = shrink(c.keys);
      if (c.suite == Suite::kv_cache || (c.suite == Suite::linear && c.causal)) c.queries = c.keys;
    }
  }
}

std::optional<Mask> draw_mask(Draw& d, Index span) {
  const double u = d.uniform(0.0, 1.0);
  if (u < 0.10) return std::nullopt;
  if (u < 0.30) return Mask::none();
  if (u < 0.62) return Mask::causal();
  if (u < 0.84) return Mask::sliding_window(d.between(1, std::max<Index>(2, span)));
  return Mask::blockwise_causal(2 * d.between(1, std::max<Index>(1, span / 2 + 1)));
}

Index draw_block(Draw& d, Index rows) {
  if (d.chance(0.5)) return d.between(1, std::max<Index>(1, rows));
  return d.one_of<Index>({1, 2, 3, 4, 5, 8, 16, 32, 64, 128});
}

void draw_injections(Draw& d, Config& c) {
  if (!d.chance(0.1)) return;
  const Index count = d.between(1, 3);
  for (Index i = 0; i < count; ++i) {
    const char tensor = d.one_of({'q', 'k', 'v'});
    const Index heads = tensor == 'q' ? c.heads : c.kv_heads;
    const Index rows = tensor == 'q' ? c.queries : c.keys;
    const Index cols = tensor == 'v' ? c.value_dim : c.dim;
    if (rows == 0) continue;
    const double value =
        d.one_of({std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                  -std::numeric_limits<double>::infinity()});
    c.injections.push_back(
        {tensor, d.between(0, heads - 1), d.between(0, rows - 1), d.between(0, cols - 1), value});
  }
}

/// Positions of the softmax suites (streaming, split-KV): default or explicit (distinct, sorted
/// or not), near 0 or near a far origin, for queries and keys independently.
void draw_positions(Draw& d, Config& c) {
  const PositionLimits limits = limits_of(c.family);
  const bool explicit_keys = d.chance(0.4);
  Index origin = 0;
  if (explicit_keys && limits.far_origin && d.chance(0.25)) {
    origin = d.one_of<Index>({1'000'000'000, Index{1} << 40});
  }
  if (explicit_keys) {
    const Index span = c.keys + d.between(0, 2 * c.keys + 8);
    const Index first = place(d, limits, origin, span, -20, 200);
    c.key_positions = distinct_positions(d, c.keys, first, span, d.chance(0.5));
  }
  const double style = d.uniform(0.0, 1.0);
  if (style < 0.55) {
    const Index offset = d.chance(0.3)   ? 0
                         : d.chance(0.5) ? c.keys - c.queries
                                         : d.between(-40, 200);
    c.query_offset = place(d, limits, origin, c.queries, offset, offset);
  } else {
    const Index span = c.queries + d.between(0, 2 * c.queries + 8);
    const Index first = place(d, limits, origin, span, -20, 200);
    c.query_positions = distinct_positions(d, c.queries, first, span, style < 0.75);
  }
}

void draw_common(Draw& d, Config& c) {
  c.scale = d.chance(0.2) ? std::optional<double>(d.uniform(0.05, 1.5)) : std::nullopt;
  // Two threads in a share of the calls: each call with two threads is an OpenMP region, whose
  // barrier costs milliseconds when other tests load the cores (ctest -j2).
  c.threads = d.chance(c.suite == Suite::streaming ? 0.5 : 0.3) ? 2 : 1;
  c.magnitude =
      c.suite == Suite::linear ? d.one_of({1.0, 1.0, 2.0}) : d.one_of({1.0, 1.0, 1.0, 3.0, 8.0});
  c.tokens_major = d.chance(0.3);
  c.query_block = draw_block(d, c.queries);
  c.key_block = draw_block(d, c.keys);
}

Config draw_config(Draw& d, Suite suite, Index index) {
  Config c;
  c.suite = suite;
  c.index = index;
  c.is_float = d.chance(0.3);
  if (suite == Suite::linear) {
    const LinearCase pair = c.is_float ? pick(d, float_linear_cases) : pick(d, double_linear_cases);
    c.map = pair.map;
    c.family = pair.family;
    c.causal = d.chance(0.65);
  } else {
    c.family = pick_family(d, suite, c.is_float);
  }
  draw_shape(d, c);
  draw_common(d, c);
  const PositionLimits limits = limits_of(c.family);
  switch (suite) {
    case Suite::streaming:
    case Suite::split_kv:
    case Suite::backward: {
      draw_positions(d, c);
      c.mask = draw_mask(d, c.queries + c.keys);
      if (d.chance(0.25)) {
        const Index documents = d.between(1, 3);
        const bool packed = d.chance(0.5);
        c.query_segments = segments(d, c.queries, documents, packed);
        c.key_segments = segments(d, c.keys, documents, packed);
      }
      if (suite == Suite::split_kv) {
        const Index count = d.between(1, 4);
        std::vector<Index> cuts{0, c.keys};
        for (Index i = 1; i < count; ++i) cuts.push_back(d.between(0, c.keys));
        std::sort(cuts.begin(), cuts.end());
        for (std::size_t i = 1; i < cuts.size(); ++i) c.pieces.push_back(cuts[i] - cuts[i - 1]);
      }
      break;
    }
    case Suite::kv_cache: {
      const Index tokens = c.queries;
      c.mask = draw_mask(d, tokens);
      const bool sliding = c.mask && c.mask->kind() == Mask::Kind::sliding_window;
      const double style = d.uniform(0.0, 1.0);
      const bool far = limits.far_origin && d.chance(0.2);
      const Index origin = far ? d.one_of<Index>({1'000'000'000, Index{1} << 40}) : 0;
      if (style < 0.45) {
        // default positions 0, 1, 2, … (the cache continues from its last position)
      } else if (style < 0.85 || sliding) {
        c.key_positions =
            increasing_positions(d, tokens, place(d, limits, origin, 6 * tokens, -20, 200));
      } else {
        const Index span = tokens + d.between(0, 2 * tokens + 8);
        c.key_positions =
            distinct_positions(d, tokens, place(d, limits, origin, span, -20, 200), span, false);
      }
      c.query_positions = c.key_positions;  // each token's query sits at its key's position
      if (d.chance(0.2)) {
        c.key_segments = segments(d, tokens, d.between(1, 3), d.chance(0.5));
        c.query_segments = c.key_segments;
      }
      if (d.chance(0.4)) {
        c.pieces.assign(static_cast<std::size_t>(tokens), 1);  // token by token
        c.threads = 1;
      } else {
        Index left = tokens;
        const Index prefill = d.between(0, tokens);
        if (prefill > 0) c.pieces.push_back(prefill);
        left -= prefill;
        while (left > 0) {
          const Index n = std::min(left, d.between(1, 6));
          c.pieces.push_back(n);
          left -= n;
        }
      }
      c.capacity = d.chance(0.5) ? 0 : d.between(1, tokens);
      break;
    }
    case Suite::linear: {
      c.first_position = d.chance(0.5)                           ? 0
                         : (d.chance(0.7) || !limits.far_origin) ? d.between(1, 300)
                                                                 : Index{1'000'000'000};
      c.first_position = std::min(c.first_position, limits.high - std::max(c.queries, c.keys));
      c.chunk = d.one_of<Index>({1, 2, 3, 4, 7, 8, 16, 64, 130});
      if (c.causal) {
        Index left = c.queries;
        while (left > 0) {
          const Index n = std::min(left, d.chance(0.3) ? 1 : d.between(1, 40));
          c.pieces.push_back(n);
          left -= n;
        }
      }
      break;
    }
  }
  // The input policy (non-finite values propagate as NaN in exactly the rows they reach) is the
  // forward's contract; the backward suite compares gradients of finite inputs.
  if (suite != Suite::backward) draw_injections(d, c);
  return c;
}

// --- encoders -----------------------------------------------------------------------------------

RotaryOptions draw_rope(Draw& d, Config& c) {
  RotaryOptions o;
  o.base = d.one_of({10000.0, 500000.0, 100.0});
  const Index widest = c.dim / 2 * 2;
  o.rotary_dim = d.chance(0.6) && c.dim % 2 == 0 ? 0 : 2 * d.between(1, widest / 2);
  const Index rotary = o.rotary_dim == 0 ? c.dim : o.rotary_dim;
  o.pairing = d.chance(0.5) ? RotaryPairing::half : RotaryPairing::interleaved;
  o.cached_positions = d.one_of<Index>({0, 256, Index{1} << 22});
  std::string scaling = "none";
  switch (d.between(0, 6)) {
    case 0:
      o.scaling = RopeScaling::linear(d.uniform(1.0, 4.0));
      scaling = "linear";
      break;
    case 1:
      if (rotary > 2) {
        o.scaling = RopeScaling::ntk(4.0);
        scaling = "ntk(4)";
      }
      break;
    case 2:
      o.scaling = RopeScaling::yarn(4.0, 64);
      scaling = "yarn(4, 64)";
      break;
    case 3:
      o.scaling = RopeScaling::llama3(8.0, 64);
      scaling = "llama3(8, 64)";
      break;
    default:
      break;
  }
  note(c, "rope base ", o.base, ", rotary_dim ", rotary, ", ",
       o.pairing == RotaryPairing::half ? "half" : "interleaved", ", scaling ", scaling,
       ", cached_positions ", o.cached_positions);
  return o;
}

XPosOptions draw_xpos(Draw& d, Config& c) {
  XPosOptions o;
  o.scale_base = d.one_of({512.0, 128.0});
  o.pairing = d.chance(0.5) ? RotaryPairing::half : RotaryPairing::interleaved;
  o.cached_positions = d.one_of<Index>({0, 256, Index{1} << 20});
  if (d.chance(0.5)) o.centring = XPosCentring::fixed(d.between(0, 600));
  note(c, "xpos scale_base ", o.scale_base, ", ",
       o.pairing == RotaryPairing::half ? "half" : "interleaved", ", centre ",
       o.centring.centre ? std::to_string(*o.centring.centre) : std::string("tile"),
       ", cached_positions ", o.cached_positions);
  return o;
}

template <class T>
T5RelativeBias<T> draw_t5(Draw& d, Config& c) {
  const T5BucketOptions options =
      d.one_of<T5BucketOptions>({{.num_buckets = 32, .max_distance = 128},
                                 {.num_buckets = 16, .max_distance = 40},
                                 {.num_buckets = 8, .max_distance = 12}});
  T5BucketOptions o = options;
  o.bidirectional = d.chance(0.5);
  const double stddev = d.uniform(0.1, 2.0);
  note(c, "t5 buckets ", o.num_buckets, ", max_distance ", o.max_distance, ", ",
       o.bidirectional ? "bidirectional" : "causal", ", stddev ", stddev);
  return T5RelativeBias<T>::random(c.heads, stddev, d.engine(), o);
}

template <class T>
Alibi<T> draw_alibi(Draw& d, Config& c) {
  const BiasForm form = d.chance(0.7) ? BiasForm::causal : BiasForm::symmetric;
  const AlibiSlopes slopes =
      d.one_of({AlibiSlopes::reference, AlibiSlopes::float32, AlibiSlopes::bloom});
  note(c, "alibi ", form == BiasForm::causal ? "causal" : "symmetric", ", slopes ",
       static_cast<int>(slopes));
  return Alibi<T>(c.heads, form, slopes);
}

template <class T>
std::optional<Matrix<T>> draw_gate(Draw& d, Config& c) {
  if (!d.chance(0.4)) return std::nullopt;
  Matrix<T> gate(c.heads, c.dim);
  for (Index i = 0; i < gate.size(); ++i) gate.data()[i] = static_cast<T>(d.uniform(-2.0, 2.0));
  note(c, "gated");
  return gate;
}

template <class T>
SineSpe<T> draw_sine_spe(Draw& d, Config& c, Index realizations) {
  const Index sines = d.between(1, 4);
  const auto seed = static_cast<std::uint64_t>(d.between(0, 1 << 30));
  note(c, "sineSPE sines ", sines, ", R ", realizations);
  auto gate = draw_gate<T>(d, c);
  return SineSpe<T>(SineSpeParameters<T>::initial(c.heads, c.dim, sines, seed), realizations,
                    seed + 1, std::move(gate));
}

template <class T>
ConvSpe<T> draw_conv_spe(Draw& d, Config& c, Index realizations) {
  const Index kernel = d.between(1, 6);
  const auto seed = static_cast<std::uint64_t>(d.between(0, 1 << 30));
  note(c, "convSPE kernel ", kernel, ", R ", realizations);
  auto gate = draw_gate<T>(d, c);
  return ConvSpe<T>(ConvSpeParameters<T>::initial(c.heads, c.dim, kernel, seed), realizations,
                    seed + 1, std::move(gate));
}

/// Builds the configuration's softmax encoder (parameters drawn now, after the shapes) and hands
/// it to `fn`. Families outside the scalar's list are never drawn for it.
template <class T, class Fn>
void with_softmax_encoder(Draw& d, Config& c, Fn&& fn) {
  const Index H = c.heads;
  switch (c.family) {
    case Family::nope:
      fn(NoPositionalEncoding{});
      return;
    case Family::xpos:
      fn(XPosEncoding<T>(c.dim, draw_xpos(d, c)));
      return;
    case Family::dape: {
      const Index width = d.between(1, 8);
      note(c, "dape mlp_width ", width);
      fn(Dape<T, Kerple<T>>::random(Kerple<T>::random(KerpleKernel::log, H, d.engine()), width,
                                    d.engine()));
      return;
    }
    case Family::rope_alibi: {
      const RotaryOptions rope = draw_rope(d, c);
      fn(compose(RotaryEncoding<T>(c.dim, rope), draw_alibi<T>(d, c)));
      return;
    }
    default:
      break;
  }
  if constexpr (double_only<T>) {
    switch (c.family) {
      case Family::alibi:
        fn(draw_alibi<T>(d, c));
        return;
      case Family::rope:
        fn(RotaryEncoding<T>(c.dim, draw_rope(d, c)));
        return;
      case Family::kerple_log:
      case Family::kerple_power: {
        const BiasForm form = d.chance(0.7) ? BiasForm::causal : BiasForm::symmetric;
        note(c, form == BiasForm::causal ? "causal" : "symmetric");
        fn(Kerple<T>::random(
            c.family == Family::kerple_log ? KerpleKernel::log : KerpleKernel::power, H, d.engine(),
            form));
        return;
      }
      case Family::t5:
        fn(draw_t5<T>(d, c));
        return;
      case Family::fire: {
        FireOptions options = d.chance(0.5) ? FireOptions{} : FireOptions::dape(128);
        options.threshold = d.one_of({options.threshold, 8.0, 0.0});
        const Index width = d.between(1, 8);
        note(c, "fire mlp_width ", width, ", threshold ", options.threshold, ", ",
             options.form == BiasForm::causal ? "causal" : "symmetric");
        fn(Fire<T>::random(H, width, d.engine(), options));
        return;
      }
      case Family::shaw: {
        const ShawValues values =
            c.value_dim == c.dim
                ? d.one_of({ShawValues::none, ShawValues::separate, ShawValues::tied})
                : d.one_of({ShawValues::none, ShawValues::separate});
        const Index clip = d.between(0, 6);
        note(c, "shaw k ", clip, ", values ", static_cast<int>(values));
        fn(ShawRelative<T>::random(clip, c.dim, c.value_dim, values, d.engine()));
        return;
      }
      case Family::dape_v2: {
        const Index width = d.between(1, 6);
        const Index kernel = d.one_of<Index>({1, 3, 5});
        note(c, "dape v2 mlp_width ", width, ", kernel ", kernel);
        fn(DapeV2<T, Alibi<T>>::random(Alibi<T>(H), width, kernel, d.engine()));
        return;
      }
      case Family::sine_spe:
        fn(draw_sine_spe<T>(d, c, d.between(1, 16)));
        return;
      default:
        break;
    }
  }
  throw std::logic_error(std::string("no ") + (c.is_float ? "float " : "double ") +
                         family_name(c.family) + " in this sweep");
}

template <class T>
Favor<T> draw_favor(Draw& d, Config& c, Index width) {
  const Index features = d.size(48);
  FavorOptions options;
  options.orthogonal = d.chance(0.7);
  options.stabilizer = d.one_of({1e-6, 0.0, 1e-3});
  if (d.chance(0.3)) options.temperature = d.uniform(0.05, 0.5);
  const auto seed = static_cast<std::uint64_t>(d.between(0, 1 << 30));
  note(c, "favor features ", features, ", orthogonal ", options.orthogonal, ", stabilizer ",
       options.stabilizer, ", temperature ",
       options.temperature ? std::to_string(*options.temperature) : "default");
  return Favor<T>(width, features, seed, options);
}

/// The feature map and encoder of a linear-attention configuration (one of the LinearCase pairs).
template <class T, class Fn>
void with_linear_encoder(Draw& d, Config& c, Fn&& fn) {
  const auto is = [&](MapKind map, Family family) { return c.map == map && c.family == family; };
  if (is(MapKind::elu, Family::nope)) return fn(EluPlusOne{}, NoPositionalEncoding{});
  if (is(MapKind::favor, Family::sine_spe)) {
    const Index realizations = d.between(1, 16);
    const SineSpe<T> spe = draw_sine_spe<T>(d, c, realizations);
    return fn(draw_favor<T>(d, c, realizations), spe);
  }
  if constexpr (double_only<T>) {
    if (is(MapKind::relu, Family::nope)) {
      const double epsilon = d.one_of({1e-3, 0.1, 0.0});
      note(c, "relu epsilon ", epsilon);
      return fn(ReluPlusEpsilon{epsilon}, NoPositionalEncoding{});
    }
    if (is(MapKind::favor, Family::nope)) {
      return fn(draw_favor<T>(d, c, c.dim), NoPositionalEncoding{});
    }
    if (is(MapKind::elu, Family::rope)) {
      return fn(EluPlusOne{}, RotaryEncoding<T>(c.dim, draw_rope(d, c)));
    }
    if (is(MapKind::elu, Family::conv_spe)) {
      return fn(EluPlusOne{}, draw_conv_spe<T>(d, c, d.between(1, 16)));
    }
  }
  throw std::logic_error(std::string("no linear ") + family_name(c.family) + " in this sweep");
}

// --- inputs -------------------------------------------------------------------------------------

/// q, k, v as drawn: N(0, magnitude²) entries, the injected non-finite values, stored head-major
/// or tokens-major (then read through strided views).
template <class T>
struct Inputs {
  std::vector<T> q_data, k_data, v_data;
  HeadsView<const T> q, k, v;
};

/// One of q, k, v: N(0, magnitude²) entries and the injected values of `tensor`.
template <class T>
HeadsView<const T> fill(Draw& d, const Config& c, char tensor, std::vector<T>& data) {
  const Index heads = tensor == 'q' ? c.heads : c.kv_heads;
  const Index rows = tensor == 'q' ? c.queries : c.keys;
  const Index dim = tensor == 'v' ? c.value_dim : c.dim;
  data.resize(static_cast<std::size_t>(heads * rows * dim));
  std::normal_distribution<double> normal(0.0, c.magnitude);
  for (T& x : data) x = static_cast<T>(normal(d.engine()));
  const HeadsView<T> view = c.tokens_major
                                ? HeadsView<T>::tokens_major(data.data(), rows, heads, dim)
                                : HeadsView<T>::heads_major(data.data(), heads, rows, dim);
  for (const Injection& j : c.injections) {
    if (j.tensor == tensor) view(j.head, j.row, j.col) = static_cast<T>(j.value);
  }
  return view;
}

template <class T>
Inputs<T> make_inputs(Draw& d, const Config& c) {
  Inputs<T> in;
  in.q = fill(d, c, 'q', in.q_data);
  in.k = fill(d, c, 'k', in.k_data);
  in.v = fill(d, c, 'v', in.v_data);
  return in;
}

// --- comparisons --------------------------------------------------------------------------------

template <class X>
double finite_max_abs(const X& x) {
  double m = 0.0;
  for (Index i = 0; i < x.size(); ++i) {
    const auto value = static_cast<double>(x(i));
    if (std::isfinite(value)) m = std::max(m, std::abs(value));
  }
  return m;
}

template <class T>
double finite_max_abs(const HeadsView<const T>& x) {
  double m = 0.0;
  for (Index h = 0; h < x.heads(); ++h) {
    for (Index r = 0; r < x.rows(); ++r) m = std::max(m, finite_max_abs(x.head(h).row(r)));
  }
  return m;
}

/// What one configuration found: the problems, and the largest error/tolerance ratio seen.
struct Report {
  std::vector<std::string> problems;
  double worst = 0.0;

  /// got and expected must be non-finite in exactly the same entries (so NaN rows match) and
  /// agree within `tolerance` (relative to max(1, max |expected|)) everywhere else.
  template <class T>
  void compare(const Heads<T>& got, const Heads<T>& expected, double tolerance,
               const std::string& what) {
    if (got.heads() != expected.heads() || got.rows() != expected.rows() ||
        got.dim() != expected.dim()) {
      problems.push_back(what + ": shapes differ");
      return;
    }
    std::ostringstream rows;
    Index mismatched = 0;
    for (Index h = 0; h < got.heads(); ++h) {
      for (Index r = 0; r < got.rows(); ++r) {
        const bool a = got.head(h).row(r).allFinite();
        const bool b = expected.head(h).row(r).allFinite();
        if (a != b && ++mismatched <= 6) {
          rows << " (" << h << ", " << r << "): got " << (a ? "finite" : "non-finite")
               << ", expected " << (b ? "finite" : "non-finite") << ";";
        }
      }
    }
    const double error = test::finite_part_error(got.flat(), expected.flat());
    const double ratio = error / tolerance;
    if (std::isfinite(ratio)) worst = std::max(worst, ratio);
    if (mismatched > 0) {
      problems.push_back(what + ": " + std::to_string(mismatched) +
                         " rows differ in finiteness (head, row):" + rows.str());
    } else if (!(error <= tolerance)) {
      std::ostringstream s;
      s << what << ": error " << error << " > tolerance " << tolerance;
      if (std::isinf(error)) s << " (non-finite in different entries of the same rows)";
      // The entry that differs most (or first differs in finiteness).
      double largest = -1.0;
      Index at[3] = {0, 0, 0};
      for (Index h = 0; h < got.heads(); ++h) {
        for (Index i = 0; i < got.rows(); ++i) {
          for (Index j = 0; j < got.dim(); ++j) {
            const auto a = static_cast<double>(got(h, i, j));
            const auto b = static_cast<double>(expected(h, i, j));
            const double gap = std::isfinite(a) != std::isfinite(b)
                                   ? std::numeric_limits<double>::infinity()
                                   : (std::isfinite(a) ? std::abs(a - b) : 0.0);
            if (gap > largest) {
              largest = gap;
              at[0] = h, at[1] = i, at[2] = j;
            }
          }
        }
      }
      s << "; largest at (" << at[0] << ", " << at[1] << ", " << at[2] << "): got "
        << got(at[0], at[1], at[2]) << ", expected " << expected(at[0], at[1], at[2]);
      problems.push_back(s.str());
    }
  }
};

template <class E>
Index logit_width(const E& encoder, Index dim) {
  if constexpr (QueryKeyTransform<E>) {
    return static_cast<Index>(encoder.transformed_dim(dim));
  } else {
    (void)encoder;
    return dim;
  }
}

/// The encoder whose scores attention_scores can form with v = k: Shaw's value table is not
/// part of the scores (and would reject Dv != D).
template <class E>
const E& scores_encoder(const E& encoder) {
  return encoder;
}
template <class T>
ShawRelative<T> scores_encoder(const ShawRelative<T>& encoder) {
  return ShawRelative<T>(encoder.max_relative_position(), encoder.key_table());
}

/// max(1, max |v|), with the relative value table Shaw adds to every output.
template <class T, class E>
double value_scale(const HeadsView<const T>& v, const E& encoder) {
  double scale = std::max(1.0, finite_max_abs(v));
  if constexpr (RelativeKeyValue<E>) {
    if (encoder.values() != ShawValues::none)
      scale += finite_max_abs(encoder.value_table().reshaped());
  }
  return scale;
}

/// k_s, k_n and k_l of the tolerances (header comment). Each test prints the largest ratio
/// error/tolerance it saw: over 160 000 configurations (seeds 11–18, 5 000 per test) it stayed
/// below 0.16, so the factors leave about 6× headroom.
constexpr double softmax_score_factor = 2.0;
constexpr double softmax_size_factor = 1.0;
constexpr double linear_size_factor = 4.0;
constexpr double backward_size_factor = 1.0;

/// sineSPE's phases 2π·f·p (f <= 1/2 cycle per position) carry an absolute error ε·π·|p|, and
/// the phase recurrence between anchors makes its codes depend on where a tile starts.
template <class E>
double phase_error(const E&, double /*max_position*/) {
  return 0.0;
}
template <class T>
double phase_error(const SineSpe<T>&, double max_position) {
  return std::numbers::pi * max_position;
}

double max_abs_position(const AttentionOptions& o, Index queries, Index keys) {
  double m =
      static_cast<double>(std::max(std::abs(o.query_offset), std::abs(o.query_offset + queries)));
  for (const Index p : o.query_positions) m = std::max(m, std::abs(static_cast<double>(p)));
  if (o.key_positions.empty()) m = std::max(m, static_cast<double>(keys));
  for (const Index p : o.key_positions) m = std::max(m, std::abs(static_cast<double>(p)));
  return m;
}

template <class T, class E>
double softmax_tolerance(const HeadsView<const T>& q, const HeadsView<const T>& k,
                         const HeadsView<const T>& v, const E& encoder,
                         const AttentionOptions& options) {
  const auto scores = attention_scores(q, k, scores_encoder(encoder), options);  // [H, N, M]
  const double s = finite_max_abs(scores.flat());
  const double n = static_cast<double>(logit_width(encoder, q.dim()) + v.dim() + k.rows()) +
                   phase_error(encoder, max_abs_position(options, q.rows(), k.rows()));
  return std::numeric_limits<T>::epsilon() * value_scale(v, encoder) *
         (softmax_score_factor * (1.0 + s) + softmax_size_factor * n);
}

// --- the four checks ----------------------------------------------------------------------------

template <class T>
void copy_rows_into(Heads<T>& out, const Heads<T>& rows, Index first) {
  for (Index h = 0; h < rows.heads(); ++h) {
    out.head(h).middleRows(first, rows.rows()) = rows.head(h);
  }
}

template <class T, class E>
void check_streaming(Draw& d, const Config& c, const Inputs<T>& in, const E& encoder, Report& r) {
  const AttentionOptions options = c.attention_options();
  const Heads<T> expected = attention_reference(in.q, in.k, in.v, encoder, options);
  const double tolerance = softmax_tolerance(in.q, in.k, in.v, encoder, options);
  if (d.chance(0.3)) {
    // Into a caller's [N, H, Dv] buffer through a strided view.
    std::vector<T> buffer(static_cast<std::size_t>(c.heads * c.queries * c.value_dim),
                          std::numeric_limits<T>::quiet_NaN());
    attention(in.q, in.k, in.v, encoder,
              HeadsView<T>::tokens_major(buffer.data(), c.queries, c.heads, c.value_dim), options);
    Heads<T> got(c.heads, c.queries, c.value_dim);
    for (Index h = 0; h < c.heads; ++h) {
      for (Index i = 0; i < c.queries; ++i) {
        for (Index j = 0; j < c.value_dim; ++j) {
          got(h, i, j) = buffer[static_cast<std::size_t>((i * c.heads + h) * c.value_dim + j)];
        }
      }
    }
    r.compare(got, expected, tolerance,
              "attention into a tokens-major view vs attention_reference");
  } else {
    r.compare(attention(in.q, in.k, in.v, encoder, options), expected, tolerance,
              "attention vs attention_reference");
  }
}

template <class T, class E>
void check_kv_cache(Config& c, const Inputs<T>& in, const E& encoder, Report& r) {
  KvCache<T, E> cache(
      encoder, c.kv_heads, c.dim,
      {.value_dim = c.value_dim, .mask = c.mask, .capacity = c.capacity, .threads = c.threads});
  // One pass applies when every key a query may see was appended before it: a causal-type mask
  // (the cache's, after the encoder's natural one) and increasing positions. DAPE V2 reads keys
  // after the query (README, "V2 note"), so it is compared per append with the rows held.
  c.one_pass = cache.mask().kind() != Mask::Kind::none &&
               std::is_sorted(c.key_positions.begin(), c.key_positions.end()) &&
               c.family != Family::dape_v2;
  const std::span<const Index> positions = c.key_positions;
  const std::span<const Index> document = c.key_segments;
  Heads<T> decoded(c.heads, c.queries, c.value_dim);
  Index first = 0;
  for (const Index rows : c.pieces) {
    cache.append(
        in.k.middle_rows(first, rows), in.v.middle_rows(first, rows),
        positions.empty()
            ? Positions{}
            : positions.subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(rows)),
        document.empty()
            ? std::span<const Index>{}
            : document.subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(rows)));
    const HeadsView<const T> queries = in.q.middle_rows(first, rows);
    const Heads<T> out = cache.attend(
        queries,
        KvAttendOptions{.scale = c.scale, .query_block = c.query_block, .key_block = c.key_block});
    copy_rows_into(decoded, out, first);
    first += rows;
    if (c.one_pass) continue;
    // Against the oracle over the rows the cache holds (a sliding window drops the oldest).
    const Index held = cache.size();
    const std::vector<Index> all =
        positions.empty() ? test::iota(first)
                          : std::vector<Index>(positions.begin(), positions.begin() + first);
    const std::vector<Index> held_positions(all.end() - held, all.end());
    if (!std::equal(held_positions.begin(), held_positions.end(), cache.positions().begin(),
                    cache.positions().end())) {
      r.problems.push_back("KvCache holds other positions than the last " + std::to_string(held) +
                           " appended");
      return;
    }
    const std::vector<Index> query_positions(all.end() - rows, all.end());
    AttentionOptions options{.mask = cache.mask(),
                             .query_positions = query_positions,
                             .key_positions = held_positions,
                             .scale = c.scale};
    if (!document.empty()) {
      options.query_segments =
          document.subspan(static_cast<std::size_t>(first - rows), static_cast<std::size_t>(rows));
      options.key_segments =
          document.subspan(static_cast<std::size_t>(first - held), static_cast<std::size_t>(held));
    }
    const HeadsView<const T> keys = in.k.middle_rows(first - held, held);
    const HeadsView<const T> values = in.v.middle_rows(first - held, held);
    const Heads<T> expected = attention_reference(queries, keys, values, encoder, options);
    r.compare(out, expected, softmax_tolerance(queries, keys, values, encoder, options),
              "KvCache::attend after " + std::to_string(first) +
                  " rows vs attention_reference over the rows held");
    if (!r.problems.empty()) return;
  }
  if (!c.one_pass) return;
  AttentionOptions options{.mask = cache.mask(),
                           .query_positions = c.query_positions,
                           .key_positions = c.key_positions,
                           .query_segments = c.query_segments,
                           .key_segments = c.key_segments,
                           .scale = c.scale,
                           .threads = c.threads,
                           .query_block = c.query_block,
                           .key_block = c.key_block};
  const Heads<T> one_pass = attention(in.q, in.k, in.v, encoder, options);
  r.compare(decoded, one_pass, 2.0 * softmax_tolerance(in.q, in.k, in.v, encoder, options),
            "KvCache decoding vs one attention() pass");
}

template <class T, class E>
void check_split_kv(Draw& d, const Config& c, const Inputs<T>& in, const E& encoder, Report& r) {
  const AttentionOptions options = c.attention_options();
  const Heads<T> one_pass = attention(in.q, in.k, in.v, encoder, options);
  const std::vector<Index> keys = c.key_positions.empty() ? test::iota(c.keys) : c.key_positions;
  std::vector<AttentionPartial<T>> partials;
  Index first = 0;
  for (const Index rows : c.pieces) {
    AttentionOptions piece = options;
    piece.key_positions =
        Positions(keys).subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(rows));
    if (!c.key_segments.empty()) {
      piece.key_segments =
          std::span<const Index>(c.key_segments)
              .subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(rows));
    }
    partials.push_back(attention_partial(in.q, in.k.middle_rows(first, rows),
                                         in.v.middle_rows(first, rows), encoder, piece));
    first += rows;
  }
  // Merge in a random tree: any two pieces, in either argument order.
  std::ostringstream order;
  while (partials.size() > 1) {
    const auto a = static_cast<std::size_t>(d.between(0, static_cast<Index>(partials.size()) - 1));
    auto b = static_cast<std::size_t>(d.between(0, static_cast<Index>(partials.size()) - 2));
    if (b >= a) ++b;
    order << " (" << a << ", " << b << ")";
    AttentionPartial<T> merged = merge_partials(partials[a], partials[b]);
    partials.erase(partials.begin() + static_cast<std::ptrdiff_t>(std::max(a, b)));
    partials.erase(partials.begin() + static_cast<std::ptrdiff_t>(std::min(a, b)));
    partials.push_back(std::move(merged));
  }
  r.compare(partials.front().normalized(), one_pass,
            2.0 * softmax_tolerance(in.q, in.k, in.v, encoder, options),
            "merged partials (merge order" + order.str() + ") vs one attention() pass");
}

template <class T, class Map, class E>
double linear_tolerance(const Config& c, const Inputs<T>& in, const Map& map, const E& encoder) {
  const Index width = logit_width(encoder, c.dim);
  double n = static_cast<double>(map.feature_dim(width) + width + c.value_dim + c.keys) +
             phase_error(encoder, static_cast<double>(std::abs(c.first_position) +
                                                      std::max(c.queries, c.keys)));
  if constexpr (StabilizedFeatureMap<Map, T>) {
    // exp of arguments up to sqrt(τ)·max|ω|·|x| + τ|x|²/2: their rounding error is relative to
    // them.
    n *= 1.0 + map.temperature() * static_cast<double>(width) * c.magnitude * c.magnitude;
  }
  return std::numeric_limits<T>::epsilon() * value_scale(in.v, encoder) * linear_size_factor * n;
}

template <class T, class Map, class E>
void check_linear(const Config& c, const Inputs<T>& in, const Map& map, const E& encoder,
                  Report& r) {
  const LinearAttentionOptions options{.causal = c.causal,
                                       .first_position = c.first_position,
                                       .threads = c.threads,
                                       .chunk = c.chunk};
  const Heads<T> expected = linear_attention_reference(in.q, in.k, in.v, map, encoder, options);
  const Heads<T> got = linear_attention(in.q, in.k, in.v, map, encoder, options);
  const double tolerance = linear_tolerance(c, in, map, encoder);
  r.compare(got, expected, tolerance, "linear_attention vs linear_attention_reference");
  if (!c.causal) return;
  // The decoding state, appended in pieces (single rows by step()), equals the one pass.
  LinearAttentionState<T, Map, E> state(map, encoder, c.first_position, c.chunk);
  Heads<T> decoded(c.heads, c.queries, c.value_dim);
  Index first = 0;
  for (const Index rows : c.pieces) {
    const auto q = in.q.middle_rows(first, rows);
    const auto k = in.k.middle_rows(first, rows);
    const auto v = in.v.middle_rows(first, rows);
    const int threads = c.pieces.size() <= 3 ? c.threads : 1;
    copy_rows_into(decoded, rows == 1 ? state.step(q, k, v) : state.append(q, k, v, threads),
                   first);
    first += rows;
  }
  r.compare(decoded, got, 2.0 * tolerance,
            "LinearAttentionState appends vs one linear_attention pass");
}

/// Every learnable parameter of a gradient, flattened (in a fixed member order) for comparison.
template <class G>
void append_parameters(const G& g, std::vector<double>& out) {
  const auto add = [&out](const auto& x) {
    for (Index i = 0; i < x.size(); ++i) out.push_back(static_cast<double>(x.data()[i]));
  };
  if constexpr (requires { g.first, g.second; }) {
    append_parameters(g.first, out);
    append_parameters(g.second, out);
  } else if constexpr (requires { g.r1, g.r2; }) {  // KERPLE
    add(g.r1), add(g.r2);
  } else if constexpr (requires { g.table; }) {  // T5, learned absolute
    add(g.table);
  } else if constexpr (requires { g.key_table, g.value_table; }) {  // Shaw
    add(g.key_table), add(g.value_table);
  } else if constexpr (requires { g.w1, g.b1, g.w2, g.b2; }) {  // FIRE, DAPE
    add(g.w1), add(g.b1), add(g.w2), add(g.b2);
    if constexpr (requires { g.c, g.threshold_multiplier; }) {
      out.push_back(g.c);
      out.push_back(g.threshold_multiplier);
    }
    if constexpr (requires { g.bias; }) append_parameters(g.bias, out);
  } else if constexpr (requires { g.frequencies, g.offsets, g.gains, g.gate; }) {  // sineSPE
    add(g.frequencies.flat()), add(g.offsets.flat()), add(g.gains.flat()), add(g.gate);
  } else {
    static_assert(std::is_same_v<G, NoGradient>, "append_parameters: unknown gradient type");
  }
}

template <class T>
Heads<T> as_heads(const HeadsView<const T>& view) {
  Heads<T> out(view.heads(), view.rows(), view.dim());
  for (Index h = 0; h < view.heads(); ++h) out.head(h) = view.head(h);
  return out;
}

/// The streaming backward (from attention_forward's out and lse) against the materialising
/// oracle's backward: dq, dk, dv and the encoder's parameter gradient. A gradient sums the
/// forward's terms weighted by dout (N(0, 1)), so its tolerance is the forward's, per unit of
/// |v|, times the largest term it sums: |dout|·max(|v|, |q|, |k|)·(N + M) (dS = P∘(dP − D) has
/// |dP| <= Dv·|dout|·|v|, and dq, dk sum N or M of its entries times a key or a query row).
template <class T, class E>
void check_backward(Draw& d, const Config& c, const Inputs<T>& in, const E& encoder, Report& r) {
  const AttentionOptions options = c.attention_options();
  Heads<T> dout(c.heads, c.queries, c.value_dim);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (Index i = 0; i < dout.flat().size(); ++i)
    dout.flat()(i) = static_cast<T>(normal(d.engine()));
  const auto expected = attention_backward_reference(in.q, in.k, in.v, encoder, dout, options);
  const AttentionForward<T> forward = attention_forward(in.q, in.k, in.v, encoder, options);
  const auto got =
      attention_backward(in.q, in.k, in.v, encoder, forward.out, forward.lse, dout, options);
  const double magnitude =
      std::max({1.0, finite_max_abs(in.q), finite_max_abs(in.k), finite_max_abs(in.v)});
  const double terms = static_cast<double>(c.queries + c.keys + c.value_dim) *
                       std::max(1.0, finite_max_abs(dout.flat())) * magnitude * magnitude;
  const double tolerance = backward_size_factor * terms *
                           softmax_tolerance(in.q, in.k, in.v, encoder, options) /
                           value_scale(in.v, encoder);
  r.compare(got.dq, expected.dq, tolerance, "attention_backward dq vs the reference's");
  r.compare(got.dk, expected.dk, tolerance, "attention_backward dk vs the reference's");
  r.compare(got.dv, expected.dv, tolerance, "attention_backward dv vs the reference's");
  std::vector<double> got_parameters;
  std::vector<double> expected_parameters;
  append_parameters(got.encoder, got_parameters);
  append_parameters(expected.encoder, expected_parameters);
  if (!got_parameters.empty()) {
    // A parameter gradient sums over every (head, query, key) pair: N·M terms.
    const auto as_heads_of = [](std::vector<double>& x) {
      return as_heads(
          HeadsView<const double>::heads_major(x.data(), 1, 1, static_cast<Index>(x.size())));
    };
    const double pairs =
        static_cast<double>(c.heads * std::max<Index>(1, c.queries) * std::max<Index>(1, c.keys));
    r.compare(as_heads_of(got_parameters), as_heads_of(expected_parameters),
              tolerance * pairs / static_cast<double>(c.queries + c.keys + c.value_dim),
              "the encoder's parameter gradient vs the reference's");
  }
  if (c.threads == 2) {
    // Deterministic: one thread gives the same bits.
    AttentionOptions one = options;
    one.threads = 1;
    const auto serial =
        attention_backward(in.q, in.k, in.v, encoder, forward.out, forward.lse, dout, one);
    if (serial.dq.flat() != got.dq.flat() || serial.dk.flat() != got.dk.flat() ||
        serial.dv.flat() != got.dv.flat()) {
      r.problems.push_back("attention_backward with 2 threads differs from 1 thread");
    }
  }
}

// --- the driver ---------------------------------------------------------------------------------

template <class T>
void run_softmax(Draw& d, Config& c, Report& r) {
  with_softmax_encoder<T>(d, c, [&](const auto& encoder) {
    const Inputs<T> in = make_inputs<T>(d, c);
    switch (c.suite) {
      case Suite::streaming:
        check_streaming(d, c, in, encoder, r);
        return;
      case Suite::kv_cache:
        check_kv_cache(c, in, encoder, r);
        return;
      case Suite::split_kv:
        check_split_kv(d, c, in, encoder, r);
        return;
      case Suite::backward:
        check_backward(d, c, in, encoder, r);
        return;
      case Suite::linear:
        break;
    }
  });
}

template <class T>
void run_linear(Draw& d, Config& c, Report& r) {
  with_linear_encoder<T>(d, c, [&](const auto& map, const auto& encoder) {
    const Inputs<T> in = make_inputs<T>(d, c);
    check_linear(c, in, map, encoder, r);
  });
}

void run_one(Draw& d, Config& c, Report& r) {
  if (c.suite == Suite::linear) {
    c.is_float ? run_linear<float>(d, c, r) : run_linear<double>(d, c, r);
  } else {
    c.is_float ? run_softmax<float>(d, c, r) : run_softmax<double>(d, c, r);
  }
}

void sweep(Suite suite) {
  const std::uint64_t base = base_seed();
  const std::uint64_t salt = static_cast<std::uint64_t>(suite) + 1;
  const auto only = environment_number("POSENC_SWEEP_INDEX");
  const Index count =
      static_cast<Index>(environment_number("POSENC_SWEEP_COUNT").value_or(default_count));
  const Index first = only ? static_cast<Index>(*only) : 0;
  const Index last = only ? first + 1 : count;
  const char* test = ::testing::UnitTest::GetInstance()->current_test_info()->name();
  Index failures = 0;
  double worst = 0.0;
  Index worst_index = -1;
  for (Index i = first; i < last; ++i) {
    Draw d(mix(mix(base) ^ mix(salt * 0x100000001B3ULL + static_cast<std::uint64_t>(i))));
    Config c = draw_config(d, suite, i);
    Report r;
    try {
      run_one(d, c, r);
    } catch (const std::exception& e) {
      r.problems.push_back(std::string("threw: ") + e.what());
    }
    if (r.worst > worst) {
      worst = r.worst;
      worst_index = i;
    }
    if (r.problems.empty()) continue;
    std::ostringstream message;
    message << "replay: POSENC_SWEEP_SEED=" << base << " POSENC_SWEEP_INDEX=" << i
            << " posenc_tests --gtest_filter=Sweep." << test << "\n"
            << describe(c);
    for (const std::string& p : r.problems) message << "\n  " << p;
    ADD_FAILURE() << message.str();
    if (++failures == 10) {
      ADD_FAILURE() << "stopping after 10 failing configurations";
      break;
    }
  }
  std::cout << "[sweep] " << test << ": configurations " << first << "…" << last - 1
            << ", POSENC_SWEEP_SEED=" << base << ", worst error/tolerance " << worst
            << " (configuration " << worst_index << ")\n";
}

TEST(Sweep, StreamingMatchesReference) { sweep(Suite::streaming); }
TEST(Sweep, KvDecodingMatchesOnePass) { sweep(Suite::kv_cache); }
TEST(Sweep, SplitKvMatchesOnePass) { sweep(Suite::split_kv); }
TEST(Sweep, LinearMatchesReference) { sweep(Suite::linear); }
TEST(Sweep, BackwardMatchesReference) { sweep(Suite::backward); }

}  // namespace
}  // namespace posenc::differential_sweep
