// SPDX-License-Identifier: MIT
// Ring attention over MPI (sequence parallelism; Liu, Zaharia, Abbeel 2023, arXiv 2310.01889):
// one sequence of N tokens is cut into P contiguous shards, one per rank. A rank keeps the queries
// of its shard while the key/value shards travel round the ring: at step s rank r holds the K/V
// shard of rank r − s (mod P), computes the attention_partial of its queries against it at the
// absolute positions of both (masks and encoders see positions in the whole sequence, never rows
// of a shard) and merges the piece into what it has with merge_partials. The next shard is already
// on its way (MPI_Isend / MPI_Irecv) while the current one is computed, and a shard the mask
// forbids to every query of the rank (causal: keys after all of them; sliding window: keys before
// all their windows) is passed on without being computed. After P steps the merged partial,
// normalised, is the rank's rows of attention() over the whole sequence.
//
// The program checks exactly that on every rank: for causal, sliding-window, blockwise-causal and
// no masks, in float and double, with every encoder whose stages act on (query, key) pairs at
// their absolute positions (README, "Many processes"), the rank's rows against one single-process
// attention() over the whole sequence, which each rank computes locally for the check.
//
//   mpirun -np 4 posenc_example_ring_attention [--quick]
//
// --quick (what CTest runs, on 2 and 3 processes): a short sequence and small tiles. Only this
// program links MPI; posenc itself does not.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <limits>
#include <numbers>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/compose.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/conv_spe.hpp"
#include "posenc/encoders/dape.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/sine_spe.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/encoders/xpos.hpp"

namespace {

using namespace posenc;

static_assert(sizeof(Index) == sizeof(std::int64_t) && std::is_signed_v<Index>,
              "positions travel as MPI_INT64_T");

template <class T>
MPI_Datatype mpi_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}

/// An MPI element count: the entries of one message must fit an int.
int mpi_count(Index entries) {
  if (entries > std::numeric_limits<int>::max()) {
    throw std::length_error("ring_attention: a shard of " + std::to_string(entries) +
                            " entries does not fit one MPI message; use more ranks");
  }
  return static_cast<int>(entries);
}

// --- the ring -----------------------------------------------------------------------------------

/// One rank's keys and values on their way round the ring: k [H_kv, rows, D], v [H_kv, rows, Dv]
/// and the absolute position of each row.
template <class T>
struct KvShard {
  Heads<T> k;
  Heads<T> v;
  std::vector<Index> positions;
};

/// What one rank did in the ring.
struct RingStats {
  int computed = 0;  // K/V shards attended to
  int skipped = 0;   // shards the mask forbids to every query of the rank
};

/// The mask of a call as the kernel resolves it (options.mask, else the encoder's natural mask,
/// else causal): the ring needs it to skip shards before calling the kernel.
template <class Encoder>
Mask mask_of(const Encoder& encoder, const AttentionOptions& options) {
  if (options.mask) return *options.mask;
  if constexpr (HasNaturalMask<Encoder>) {
    return encoder.natural_mask();
  } else {
    (void)encoder;
    return Mask::causal();
  }
}

/// Whether `mask` allows at least one (query, key) pair: the kernel's own test for skipping a
/// tile, on the extreme positions of the rank's queries and of a shard's keys.
bool any_allowed(const Mask& mask, const std::vector<Index>& queries,
                 const std::vector<Index>& keys) {
  if (queries.empty() || keys.empty()) return false;
  const auto [query_min, query_max] = std::minmax_element(queries.begin(), queries.end());
  const auto [key_min, key_max] = std::minmax_element(keys.begin(), keys.end());
  return mask.classify(*query_min, *query_max, *key_min, *key_max) != TileCoverage::none;
}

/// Posts one ring step: `outgoing` to rank `next`, `incoming` (already sized for the shard that
/// arrives) from rank `previous`; three messages each way (k, v, positions). The caller waits for
/// the six requests before it touches `incoming` or changes `outgoing`.
template <class T>
std::vector<MPI_Request> exchange(MPI_Comm comm, int next, int previous, const KvShard<T>& outgoing,
                                  KvShard<T>& incoming) {
  std::vector<MPI_Request> requests(6);
  MPI_Irecv(incoming.k.data(), mpi_count(incoming.k.flat().size()), mpi_type<T>(), previous, 0,
            comm, &requests[0]);
  MPI_Irecv(incoming.v.data(), mpi_count(incoming.v.flat().size()), mpi_type<T>(), previous, 1,
            comm, &requests[1]);
  MPI_Irecv(incoming.positions.data(), mpi_count(static_cast<Index>(incoming.positions.size())),
            MPI_INT64_T, previous, 2, comm, &requests[2]);
  MPI_Isend(outgoing.k.data(), mpi_count(outgoing.k.flat().size()), mpi_type<T>(), next, 0, comm,
            &requests[3]);
  MPI_Isend(outgoing.v.data(), mpi_count(outgoing.v.flat().size()), mpi_type<T>(), next, 1, comm,
            &requests[4]);
  MPI_Isend(outgoing.positions.data(), mpi_count(static_cast<Index>(outgoing.positions.size())),
            MPI_INT64_T, next, 2, comm, &requests[5]);
  return requests;
}

/// Ring attention of this rank's queries q [H, n, D] at the absolute positions `positions` over
/// the keys and values of every rank of `comm` (this rank's: k [H_kv, n, D] and v [H_kv, n, Dv]
/// at the same positions). Collective: every rank calls it with the same encoder (the same
/// parameters: the same seed, or weights broadcast beforehand) and options; options must carry no
/// positions or segments (the ring sets the positions). Returns the merged partial over all keys,
/// whose normalized() is this rank's rows of attention() over the whole sequence. Throws
/// std::invalid_argument for an encoder that reads neighbouring keys (a ScoreMixer with a key
/// halo: DAPE V2), whose neighbours another rank holds.
template <class T, class Encoder>
AttentionPartial<T> ring_attention(MPI_Comm comm, const Heads<T>& q, const Heads<T>& k,
                                   const Heads<T>& v, const std::vector<Index>& positions,
                                   const Encoder& encoder, AttentionOptions options,
                                   RingStats& stats) {
  if constexpr (ScoreMixer<Encoder>) {
    if (encoder.key_halo() > 0) {
      throw std::invalid_argument(
          "ring_attention: the encoder mixes the scores of neighbouring keys (key_halo() = " +
          std::to_string(encoder.key_halo()) +
          "), which other ranks hold; it cannot be split over keys");
    }
  }
  if (!options.query_positions.empty() || !options.key_positions.empty() ||
      !options.query_segments.empty() || !options.key_segments.empty()) {
    throw std::invalid_argument("ring_attention: options must carry no positions or segments");
  }
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  const int next = (rank + 1) % ranks;
  const int previous = (rank + ranks - 1) % ranks;

  // Every shard's row count, so that each receive is posted with the size of what arrives.
  const Index mine = k.rows();
  std::vector<Index> rows(static_cast<std::size_t>(ranks));
  MPI_Allgather(&mine, 1, MPI_INT64_T, rows.data(), 1, MPI_INT64_T, comm);

  const Mask mask = mask_of(encoder, options);
  options.mask = mask;
  options.query_positions = positions;
  stats = {};
  KvShard<T> current{k, v, positions};
  std::optional<AttentionPartial<T>> merged;
  for (int step = 0; step < ranks; ++step) {
    // Step s holds the shard of rank − s; the one of rank − s − 1 travels meanwhile.
    KvShard<T> arriving;
    std::vector<MPI_Request> requests;
    if (step + 1 < ranks) {
      const Index count = rows[static_cast<std::size_t>((rank - step - 1 + 2 * ranks) % ranks)];
      arriving = {Heads<T>(k.heads(), count, k.dim()), Heads<T>(v.heads(), count, v.dim()),
                  std::vector<Index>(static_cast<std::size_t>(count))};
      requests = exchange(comm, next, previous, current, arriving);
    }
    if (any_allowed(mask, positions, current.positions)) {
      AttentionOptions piece = options;
      piece.key_positions = current.positions;
      AttentionPartial<T> partial = attention_partial(q, current.k, current.v, encoder, piece);
      merged = merged ? merge_partials(*merged, partial) : std::move(partial);
      ++stats.computed;
    } else {
      ++stats.skipped;
    }
    MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
    if (step + 1 < ranks) current = std::move(arriving);
  }
  if (merged) return std::move(*merged);
  // No key anywhere is allowed to these queries: zero rows (README, "Input policies").
  return {Heads<T>(q.heads(), q.rows(), v.dim()),
          Matrix<T>::Constant(q.heads(), q.rows(), -std::numeric_limits<T>::infinity()),
          Matrix<T>::Zero(q.heads(), q.rows())};
}

// --- the check ----------------------------------------------------------------------------------

struct Sizes {
  Index tokens;
  Index heads;
  Index dim;
  Index value_dim;
  Index block;  // query and key tiles of the kernel
};

/// q, k, v of the whole sequence, the same on every rank (a fixed seed).
template <class T>
struct Sequence {
  Heads<T> q, k, v;
};

template <class T>
Sequence<T> make_sequence(const Sizes& s, Index kv_heads) {
  std::mt19937_64 rng(17);
  std::normal_distribution<double> normal;
  Sequence<T> x{Heads<T>(s.heads, s.tokens, s.dim), Heads<T>(kv_heads, s.tokens, s.dim),
                Heads<T>(kv_heads, s.tokens, s.value_dim)};
  for (Heads<T>* t : {&x.q, &x.k, &x.v}) {
    for (Index i = 0; i < t->flat().size(); ++i) t->flat()[i] = static_cast<T>(normal(rng));
  }
  return x;
}

/// Rows [first, first + count) of every head.
template <class T>
Heads<T> rows_of(const Heads<T>& x, Index first, Index count) {
  Heads<T> out(x.heads(), count, x.dim());
  for (Index h = 0; h < x.heads(); ++h) out.head(h) = x.head(h).middleRows(first, count);
  return out;
}

/// The width of q·k after the encoder's transform (R for stochastic PE).
template <class E>
Index logit_width(const E& encoder, Index dim) {
  if constexpr (QueryKeyTransform<E>) {
    return static_cast<Index>(encoder.transformed_dim(dim));
  } else {
    (void)encoder;
    return dim;
  }
}

/// max(1, max |v| plus the largest relative value Shaw adds to an output).
template <class T, class E>
double value_scale(const Heads<T>& v, const E& encoder) {
  double scale = std::max(1.0, static_cast<double>(v.flat().cwiseAbs().maxCoeff()));
  if constexpr (RelativeKeyValue<E>) {
    if (encoder.values() != ShawValues::none) {
      scale += static_cast<double>(encoder.value_table().cwiseAbs().maxCoeff());
    }
  }
  return scale;
}

/// sineSPE forms its phases 2π·f·p with an absolute error ε·π·|p|, and its phase recurrence
/// depends on where a tile starts.
template <class E>
double phase_error(const E&, double) {
  return 0.0;
}
template <class T>
double phase_error(const SineSpe<T>&, double max_position) {
  return std::numbers::pi * max_position;
}

/// The bound of the comparison, derived as the differential sweep's split-KV tolerance
/// (tests/differential_sweep_test.cpp): both sides form the same scores tile by tile and differ in
/// the order of the online softmax (where key tiles start, and the merges). A weight exp(s − m)
/// rescaled to another running maximum m carries a relative error of a few ε·(1 + |m|), a score
/// the error of a width-W dot product, and an output row sums M weighted values, so
///   |Δout| <= 2·ε·max(1, max|v|)·(2·(1 + S) + W + Dv + M + phase)
/// with S the largest |row maximum| of the rank's rows (at most max|lse| + log M, lse from the
/// one pass) and the factor 2 for the merges.
template <class T, class E>
double tolerance(const E& encoder, const Sizes& s, const Heads<T>& v, const Matrix<T>& lse) {
  double largest = 0.0;
  for (Index i = 0; i < lse.size(); ++i) {
    const auto x = static_cast<double>(lse.data()[i]);
    if (std::isfinite(x)) largest = std::max(largest, std::abs(x));
  }
  const double tokens = static_cast<double>(s.tokens);
  const double score = largest + std::log(tokens);
  const double sizes = static_cast<double>(logit_width(encoder, s.dim) + s.value_dim) + tokens +
                       phase_error(encoder, tokens);
  return 2.0 * std::numeric_limits<T>::epsilon() * value_scale(v, encoder) *
         (2.0 * (1.0 + score) + sizes);
}

/// The outcome of one (encoder, mask, scalar) case on this rank.
struct Outcome {
  double ratio = 0.0;  // error / tolerance (<= 1 passes; infinite for a non-finite output)
  RingStats stats;
};

/// Runs the ring over this rank's shard and compares its rows with one pass over the sequence.
template <class T, class E>
Outcome run_case(MPI_Comm comm, const Sizes& s, Index kv_heads, const E& encoder, Mask mask) {
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  const Sequence<T> all = make_sequence<T>(s, kv_heads);

  // This rank's contiguous shard: rows [first, first + count), at positions first, first + 1, …
  const Index first = s.tokens * rank / ranks;
  const Index count = s.tokens * (rank + 1) / ranks - first;
  std::vector<Index> positions(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i) positions[static_cast<std::size_t>(i)] = first + i;
  const AttentionOptions options{
      .mask = mask, .threads = 1, .query_block = s.block, .key_block = s.block};

  Outcome outcome;
  const Heads<T> ring =
      ring_attention(comm, rows_of(all.q, first, count), rows_of(all.k, first, count),
                     rows_of(all.v, first, count), positions, encoder, options, outcome.stats)
          .normalized();

  // The check: one pass over the whole sequence (positions 0 … N − 1), this rank's rows of it.
  Heads<T> one_pass(s.heads, s.tokens, s.value_dim);
  Matrix<T> lse(s.heads, s.tokens);
  attention(all.q, all.k, all.v, encoder, one_pass.view(), lse, options);
  const Heads<T> expected = rows_of(one_pass, first, count);
  const double error =
      count == 0 ? 0.0 : static_cast<double>((ring.flat() - expected.flat()).cwiseAbs().maxCoeff());
  const Matrix<T> my_lse = lse.middleCols(first, count);
  outcome.ratio = std::isfinite(error) ? error / tolerance(encoder, s, all.v, my_lse)
                                       : std::numeric_limits<double>::infinity();
  return outcome;
}

std::string mask_name(const Mask& mask) {
  switch (mask.kind()) {
    case Mask::Kind::none:
      return "none";
    case Mask::Kind::causal:
      return "causal";
    case Mask::Kind::sliding_window:
      return "sliding_window(" + std::to_string(mask.window()) + ")";
    case Mask::Kind::blockwise_causal:
      return "blockwise_causal(" + std::to_string(mask.window()) + ")";
  }
  return "?";
}

/// Every encoder the ring splits, each built from the same seeds on every rank (ring_attention
/// needs identical parameters everywhere). `fn(name, encoder, kv_heads)`: grouped-query attention
/// (half as many K/V heads) except for stochastic PE, whose codes are per head.
template <class T, class Fn>
void for_each_encoder(const Sizes& s, Fn&& fn) {
  std::mt19937_64 rng(2024);
  const Index grouped = s.heads / 2;
  fn("NoPE", NoPositionalEncoding{}, grouped);
  fn("ALiBi", Alibi<T>(s.heads), grouped);
  fn("KERPLE (log)", Kerple<T>::random(KerpleKernel::log, s.heads, rng), grouped);
  fn("KERPLE (power)", Kerple<T>::random(KerpleKernel::power, s.heads, rng), grouped);
  fn("T5 (bidirectional)",
     T5RelativeBias<T>::random(s.heads, 1.0, rng, {.num_buckets = 16, .max_distance = 40}),
     grouped);
  fn("FIRE", Fire<T>::random(s.heads, 16, rng, {.threshold = 16.0}), grouped);
  fn("Shaw (keys, values)",
     ShawRelative<T>::random(6, s.dim, s.value_dim, ShawValues::separate, rng), grouped);
  fn("RoPE", RotaryEncoding<T>(s.dim), grouped);
  fn("XPos (tile centre)", XPosEncoding<T>(s.dim), grouped);
  fn("XPos (fixed centre)", XPosEncoding<T>(s.dim, {.centring = XPosCentring::fixed(s.tokens / 2)}),
     grouped);
  fn("RoPE + ALiBi", compose(RotaryEncoding<T>(s.dim), Alibi<T>(s.heads)), grouped);
  fn("DAPE (KERPLE)",
     Dape<T, Kerple<T>>::random(Kerple<T>::random(KerpleKernel::log, s.heads, rng), 8, rng),
     grouped);
  fn("sineSPE", SineSpe<T>(SineSpeParameters<T>::initial(s.heads, s.dim, 4, 11), 16, 12), s.heads);
  fn("convSPE", ConvSpe<T>(ConvSpeParameters<T>::initial(s.heads, s.dim, 5, 13), 16, 14), s.heads);
}

/// Runs every encoder × mask in scalar T; rank 0 prints one line per case. Returns the number of
/// failed cases (the same on every rank).
template <class T>
int check_all(MPI_Comm comm, const Sizes& s, const char* scalar) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  const Index half = s.tokens / 2;
  const std::vector<Mask> masks{Mask::causal(),
                                Mask::sliding_window(1),
                                Mask::sliding_window(7),
                                Mask::sliding_window(half + 3),
                                Mask::blockwise_causal(2 * (half / 3) + 2),
                                Mask::none()};
  int failures = 0;
  for_each_encoder<T>(s, [&](const char* name, const auto& encoder, Index kv_heads) {
    for (const Mask& mask : masks) {
      const Outcome mine = run_case<T>(comm, s, kv_heads, encoder, mask);
      double worst = 0.0;
      int pieces[2] = {mine.stats.computed, mine.stats.skipped};
      MPI_Allreduce(&mine.ratio, &worst, 1, MPI_DOUBLE, MPI_MAX, comm);
      MPI_Allreduce(MPI_IN_PLACE, pieces, 2, MPI_INT, MPI_SUM, comm);
      const bool ok = worst <= 1.0;
      failures += ok ? 0 : 1;
      if (rank == 0) {
        std::printf("%-6s %-20s %-22s %3d shards computed, %3d skipped; error/tolerance %.3f %s\n",
                    scalar, name, mask_name(mask).c_str(), pieces[0], pieces[1], worst,
                    ok ? "ok" : "FAILED");
      }
    }
  });
  return failures;
}

/// DAPE V2 cannot be split over keys: its convolutions read the scores of up to k − 1
/// neighbouring keys on each side, and a partial over a shard sees zero padding where another
/// rank's keys are. Checks both halves of that claim: ring_attention refuses the encoder, and a
/// split computed anyway (the two halves of the keys, merged) differs from one pass by far more
/// than rounding. Returns whether both hold; rank 0 prints the comparison.
bool dape_v2_is_refused(MPI_Comm comm, const Sizes& s) {
  using T = double;
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  std::mt19937_64 rng(7);
  const auto v2 = DapeV2<T, Alibi<T>>::random(Alibi<T>(s.heads), 8, 3, rng);
  const Sequence<T> all = make_sequence<T>(s, s.heads / 2);
  const AttentionOptions options{
      .mask = Mask::causal(), .threads = 1, .query_block = s.block, .key_block = s.block};

  bool refused = false;
  try {
    RingStats stats;
    std::vector<Index> positions(static_cast<std::size_t>(s.tokens));
    for (Index i = 0; i < s.tokens; ++i) positions[static_cast<std::size_t>(i)] = i;
    (void)ring_attention(comm, all.q, all.k, all.v, positions, v2, options, stats);
  } catch (const std::invalid_argument&) {
    refused = true;  // on every rank, before any message
  }

  const Index half = s.tokens / 2;
  std::vector<Index> first_keys(static_cast<std::size_t>(half));
  std::vector<Index> last_keys(static_cast<std::size_t>(s.tokens - half));
  for (Index i = 0; i < s.tokens; ++i) {
    (i < half ? first_keys[static_cast<std::size_t>(i)]
              : last_keys[static_cast<std::size_t>(i - half)]) = i;
  }
  AttentionOptions first = options;
  first.key_positions = first_keys;
  AttentionOptions last = options;
  last.key_positions = last_keys;
  const Heads<T> split =
      merge_partials(
          attention_partial(all.q, rows_of(all.k, 0, half), rows_of(all.v, 0, half), v2, first),
          attention_partial(all.q, rows_of(all.k, half, s.tokens - half),
                            rows_of(all.v, half, s.tokens - half), v2, last))
          .normalized();
  Heads<T> one_pass(s.heads, s.tokens, s.value_dim);
  Matrix<T> lse(s.heads, s.tokens);
  attention(all.q, all.k, all.v, v2, one_pass.view(), lse, options);
  const double ratio =
      (split.flat() - one_pass.flat()).cwiseAbs().maxCoeff() / tolerance(v2, s, all.v, lse);
  const bool ok = refused && ratio > 1.0;
  if (rank == 0) {
    std::printf(
        "double DAPE V2 (k = 3)      causal: %s by ring_attention; two key halves merged anyway: "
        "error/tolerance %.3g %s\n",
        refused ? "refused" : "NOT refused", ratio, ok ? "(not splittable) ok" : "FAILED");
  }
  return ok;
}

int run(int argc, char** argv) {
  const bool quick = argc > 1 && std::string_view(argv[1]) == "--quick";
  // Quick: an odd length (unequal shards) and tiles smaller than a shard.
  const Sizes sizes =
      quick ? Sizes{.tokens = 75, .heads = 4, .dim = 16, .value_dim = 12, .block = 8}
            : Sizes{.tokens = 600, .heads = 4, .dim = 64, .value_dim = 64, .block = 128};
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  if (rank == 0) {
    std::printf("ring attention on %d ranks: N = %lld tokens, H = %lld, D = %lld, Dv = %lld\n",
                ranks, static_cast<long long>(sizes.tokens), static_cast<long long>(sizes.heads),
                static_cast<long long>(sizes.dim), static_cast<long long>(sizes.value_dim));
  }
  int failures = check_all<float>(MPI_COMM_WORLD, sizes, "float");
  failures += check_all<double>(MPI_COMM_WORLD, sizes, "double");
  failures += dape_v2_is_refused(MPI_COMM_WORLD, sizes) ? 0 : 1;
  if (rank == 0) {
    if (failures == 0) {
      std::printf("every rank's rows equal one attention() pass over the whole sequence\n");
    } else {
      std::printf("%d cases FAILED\n", failures);
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 1;
  try {
    status = run(argc, argv);
  } catch (const std::exception& e) {
    // One rank's error would leave the others waiting in the ring: end them all.
    std::fprintf(stderr, "ring_attention: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
