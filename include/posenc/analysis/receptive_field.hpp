// SPDX-License-Identifier: MIT
// Theoretical receptive fields of the library's encoders (TRF, Qin et al.): ALiBi, KERPLE and T5
// in closed form, FIRE and compositions through their bias series (series_convergence.hpp), NoPE
// infinite, and every non-additive encoder with the reason none exists. The empirical receptive
// field is in empirical_receptive_field.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <functional>
#include <limits>
#include <string>
#include <utility>

#include "posenc/analysis/empirical_receptive_field.hpp"
#include "posenc/analysis/series_convergence.hpp"
#include "posenc/compose.hpp"
#include "posenc/detail/check.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

// ---------------------------------------------------------------------------------------------
// Receptive fields of the library's encoders.
//
// An encoder is an additive bias (the AdditiveBias concept) when its only positional effect is a
// term B_h(i, j) added to the logits: ALiBi, KERPLE, T5, FIRE and compositions of them. Its TRF
// is that of the causal series of a query far from the start,
//
//   b_t = lim_{i→∞} B_h(i, i − t),   t = i − j ≥ 0,
//
// which is B_h(i, i − t) itself for a bias of the distance alone. Symmetric forms (δ = |i − j|)
// give the same series: causal attention only sees t ≥ 0, where |i − j| = i − j (a
// bidirectional layer would also attend to the mirror-image keys; the TRF does not count them).
// theoretical_receptive_field_at(encoder, head, ε, i) is the finite variant for one query
// position i: the same rule over the keys 0 … i it sees, without the limit (FIRE needs it; for a
// distance-only bias it approaches the limit as i grows).
//
// Every other encoder (RoPE, XPos, Shaw, stochastic PE, DAPE, compositions including one of
// them) moves the logits by amounts that depend on q and k, so no q/k-free series exists: the
// result has additive = false, finite = false, total_weight NaN and a reason saying so, and
// convergence() reports determined = false. NoPE is additive with b_t = 0: infinite.
// ---------------------------------------------------------------------------------------------

/// An encoder whose only positional effect is an additive logit bias (a ScoreBias modelling no
/// other stage).
template <class E>
concept AdditiveBias = ScoreBias<E> && models_only<E, Stage::score_bias>;

/// An encoder the attention kernel accepts that is neither an additive bias nor NoPE.
template <class E>
concept NonAdditiveEncoder =
    AttentionEncoder<E> && !AdditiveBias<E> && !std::same_as<E, NoPositionalEncoding>;

namespace detail {

/// Query position at which biases of the distance alone are probed for their series (far enough
/// for detect_asymptote's probes at distances up to 2^33).
inline constexpr Index far_query_position = Index{1} << 40;

inline void require_head(const char* fn, Index head, Index heads) {
  require(head >= 0 && head < heads, fn, "head ", head, " out of range for ", heads, " heads");
}

inline ReceptiveField with_prefix(ReceptiveField field, const std::string& prefix) {
  field.reason = prefix + field.reason;
  return field;
}

inline Convergence with_prefix(Convergence test, const std::string& prefix) {
  test.reason = prefix + test.reason;
  return test;
}

inline std::string head_label(Index head, const char* encoder) {
  return "head " + std::to_string(head) + " of " + encoder + ": ";
}

inline std::string form_note(BiasForm form) {
  return form == BiasForm::symmetric
             ? " (symmetric form: causal attention sees t = i - j >= 0 only, where |i - j| = t)"
             : "";
}

/// Which stages make an encoder non-additive, for the reason of its result.
template <class E>
std::string non_additive_reason() {
  std::string stages;
  const auto add = [&stages](const char* stage) {
    stages += (stages.empty() ? "" : ", ") + std::string(stage);
  };
  if constexpr (QueryKeyTransform<E>) add("transforms q and k by position (RoPE, XPos, SPE)");
  if constexpr (RelativeKeyValue<E>) add("adds the query-dependent term q_i.a(j - i) (Shaw)");
  if constexpr (ScoreMixer<E>) add("mixes logits and biases across heads (DAPE)");
  if constexpr (AbsoluteEncoding<E>) add("adds positions to the embeddings");
  std::string reason = "not an additive bias: the encoder " + stages +
                       ", so its effect on the logits depends on q and k and no bias series "
                       "exists; the TRF is not defined";
  if constexpr (ScoreBias<E>) {
    reason += " (for the bias part alone, call it on that part, e.g. composed.second())";
  }
  return reason;
}

inline ReceptiveField not_additive(std::string reason) {
  return ReceptiveField{false, 0, std::move(reason), std::numeric_limits<double>::quiet_NaN(),
                        false};
}

/// TRF over the finite window t = 0 … last of b(t) (the keys 0 … i of a query at i = last).
template <class Bias>
ReceptiveField trf_of_window(const char* fn, const Bias& b, Index last, double eps,
                             std::string reason) {
  std::vector<long double> values(static_cast<std::size_t>(last) + 1);
  long double shift = -std::numeric_limits<long double>::infinity();
  for (Index t = 0; t <= last; ++t) {
    const auto value = static_cast<double>(b(t));
    require(!std::isnan(value) && value != std::numeric_limits<double>::infinity(), fn, "b(", t,
            ") = ", value);
    values[static_cast<std::size_t>(t)] = value;
    shift = std::max(shift, static_cast<long double>(value));
  }
  require(std::isfinite(shift), fn, "b(t) = -inf for every t <= ", last,
          ": no weight to take a share of");
  for (long double& v : values) v = std::exp(v - shift);
  const SummedHead summed = SummedHead::from_terms(shift, values);
  long double total = 0.0L;
  const auto tokens = trf_search(
      summed, 0.0L, [](Index) { return 0.0L; }, eps, total);
  return finite_field(tokens, std::move(reason), eps, total * std::exp(shift));
}

/// The causal series b_t = lim_{i→∞} B_h(i, i − t) of one part of an additive encoder, as a
/// function. Distance-only biases are read at a far query position; FIRE's normalised distance
/// tends to 0 for every fixed t, so its limit is the constant f_h(0); a part without a bias adds 0.
template <class E>
std::function<double(Index)> limit_bias(const E& encoder, Index head);

template <class T>
std::function<double(Index)> limit_bias(const Fire<T>& fire, Index head) {
  const double value = fire.mlp(head, 0.0);
  return [value](Index) { return value; };
}

template <class A, class B>
std::function<double(Index)> limit_bias(const Composed<A, B>& composed, Index head) {
  return [a = limit_bias(composed.first(), head),
          b = limit_bias(composed.second(), head)](Index t) { return a(t) + b(t); };
}

template <class E>
std::function<double(Index)> limit_bias(const E& encoder, Index head) {
  if constexpr (ScoreBias<E>) {
    return [encoder, head](Index t) {
      return static_cast<double>(encoder.bias(head, far_query_position, far_query_position - t));
    };
  } else {
    return [](Index) { return 0.0; };
  }
}

/// T5: the first causal distance in the last bucket, and that bucket.
template <class T>
std::pair<Index, Index> t5_constant_tail(const T5RelativeBias<T>& t5) {
  const T5BucketOptions& options = t5.options();
  const Index last = options.bidirectional ? options.num_buckets / 2 - 1 : options.num_buckets - 1;
  const std::optional<Index> from =
      first_satisfying(0, [&](Index t) { return t5.bucket(-t) == last; });
  return {from.value_or(trf_max_tokens), last};
}

}  // namespace detail

/// TRF_ε of head `head` of any additive bias of the distance i − j alone: the series
/// b_t = bias(head, q, q − t) at a far query position q (2^40 by default), with its asymptote
/// detected (detect_asymptote). The generic fallback: the library's encoders have exact
/// overloads below (ALiBi → trf_alibi, KERPLE → trf_kerple_*, T5 → its constant tail, FIRE → its
/// limit, compose → the summed series). A bias that also depends on i needs its own overload.
/// Throws for a head out of range or ε outside (0, 1).
template <AdditiveBias Bias>
ReceptiveField theoretical_receptive_field(const Bias& bias, Index head, double eps,
                                           Index query_position = detail::far_query_position) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, static_cast<Index>(bias.heads()));
  detail::require(query_position >= (Index{1} << 34) && query_position < position_limit, fn,
                  "query_position must lie in [2^34, 2^62) (room for the asymptote probes, inside "
                  "the supported position range), got ",
                  query_position);
  detail::require_eps(fn, eps);
  const auto series = BiasSeries::from_function([&bias, head, query_position](Index t) {
    return static_cast<double>(bias.bias(head, query_position, query_position - t));
  });
  return theoretical_receptive_field(series, eps);
}

/// Whether Σ_t exp(b_t) converges for head `head` of a generic additive bias (the series of the
/// overload above), and why.
template <AdditiveBias Bias>
Convergence convergence(const Bias& bias, Index head) {
  detail::require_head("posenc::convergence", head, static_cast<Index>(bias.heads()));
  return convergence(BiasSeries::from_function([&bias, head](Index t) {
    return static_cast<double>(
        bias.bias(head, detail::far_query_position, detail::far_query_position - t));
  }));
}

/// NoPE has no positional bias (b_t = 0): the series diverges, the TRF is infinite.
inline ReceptiveField theoretical_receptive_field(const NoPositionalEncoding&, Index, double eps) {
  detail::require_eps("posenc::theoretical_receptive_field", eps);
  return detail::divergent("no positional bias (NoPE): b_t = 0, sum exp(b_t) diverges");
}

inline Convergence convergence(const NoPositionalEncoding&, Index) {
  return {false, true, "no positional bias (NoPE): b_t = 0, sum exp(b_t) diverges"};
}

/// ALiBi: trf_alibi of the head's slope m_h (b_t = −m_h·t for both forms, see above).
/// Throws for a head out of range or ε outside (0, 1).
template <class T>
ReceptiveField theoretical_receptive_field(const Alibi<T>& alibi, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, alibi.heads());
  detail::require_eps(fn, eps);
  ReceptiveField field = detail::with_prefix(trf_alibi(alibi.slopes()[head], eps),
                                             "head " + std::to_string(head) + " of ");
  field.reason += detail::form_note(alibi.form());
  return field;
}

template <class T>
Convergence convergence(const Alibi<T>& alibi, Index head) {
  detail::require_head("posenc::convergence", head, alibi.heads());
  return detail::with_prefix(convergence(BiasSeries::alibi(alibi.slopes()[head])),
                             detail::head_label(head, "ALiBi"));
}

/// KERPLE: trf_kerple_log / trf_kerple_power of the head's parameters after the reference's
/// clamps (r1(), r2()). Throws for a head out of range or ε outside (0, 1).
template <class T>
ReceptiveField theoretical_receptive_field(const Kerple<T>& kerple, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, kerple.heads());
  detail::require_eps(fn, eps);
  const double r1 = kerple.r1()[head];
  const double r2 = kerple.r2()[head];
  ReceptiveField field = kerple.kernel() == KerpleKernel::log ? trf_kerple_log(r1, r2, eps)
                                                              : trf_kerple_power(r1, r2, eps);
  field = detail::with_prefix(std::move(field), "head " + std::to_string(head) + " of ");
  field.reason += detail::form_note(kerple.form());
  return field;
}

template <class T>
Convergence convergence(const Kerple<T>& kerple, Index head) {
  detail::require_head("posenc::convergence", head, kerple.heads());
  const double r1 = kerple.r1()[head];
  const double r2 = kerple.r2()[head];
  return detail::with_prefix(
      convergence(kerple.kernel() == KerpleKernel::log ? BiasSeries::kerple_log(r1, r2)
                                                       : BiasSeries::kerple_power(r1, r2)),
      detail::head_label(head, "KERPLE"));
}

/// T5: every causal distance from the first one in the last bucket on shares that bucket's
/// learned value, so b_t is constant beyond it and the TRF is infinite whatever the table holds.
template <class T>
Convergence convergence(const T5RelativeBias<T>& t5, Index head) {
  detail::require_head("posenc::convergence", head, t5.heads());
  const auto [from, bucket] = detail::t5_constant_tail(t5);
  return {false, true,
          detail::head_label(head, "T5") + "distances t >= " + std::to_string(from) +
              " share the last bucket " + std::to_string(bucket) + " (bias " +
              detail::format_number(static_cast<double>(t5.table()(bucket, head))) +
              "): the bias is constant beyond, sum exp(b_t) diverges"};
}

template <class T>
ReceptiveField theoretical_receptive_field(const T5RelativeBias<T>& t5, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, t5.heads());
  detail::require_eps(fn, eps);
  return detail::divergent(convergence(t5, head).reason);
}

/// FIRE: B_h(i, j) = f_h(ψ(i − j)/(ψ(max(i, L)) + eps)) depends on the query position i. For a
/// fixed distance t the normalised distance tends to 0 as i grows, so the limit series is the
/// constant f_h(0): divergent, the TRF is infinite. At a finite query position the field is
/// finite and grows at least linearly with i (theoretical_receptive_field_at): f_h is bounded on
/// [0, 1], so every weight lies within a factor e^(max f − min f) of every other.
template <class T>
Convergence convergence(const Fire<T>& fire, Index head) {
  detail::require_head("posenc::convergence", head, fire.heads());
  return {false, true,
          detail::head_label(head, "FIRE") +
              "the normalised distance psi(t)/(psi(max(i, L)) + eps) of a fixed distance t tends "
              "to 0 as the query position i grows, so b_t tends to the constant f(0) = " +
              detail::format_number(fire.mlp(head, 0.0)) +
              ": sum exp(b_t) diverges (at a finite query position the field is finite and grows "
              "with i: theoretical_receptive_field_at)"};
}

template <class T>
ReceptiveField theoretical_receptive_field(const Fire<T>& fire, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, fire.heads());
  detail::require_eps(fn, eps);
  return detail::divergent(convergence(fire, head).reason);
}

/// compose(a, b, …) of additive biases: the biases add, so the series is the sum of the parts'
/// limit series (FIRE contributes its constant f_h(0)), handled by the generic engine
/// (BiasSeries::from_function, asymptote detected). E.g. T5 + ALiBi converges like ALiBi.
template <class A, class B>
requires AdditiveBias<Composed<A, B>> Convergence convergence(const Composed<A, B>& composed,
                                                              Index head) {
  detail::require_head("posenc::convergence", head, composed.heads());
  return detail::with_prefix(
      convergence(BiasSeries::from_function(detail::limit_bias(composed, head))),
      detail::head_label(head, "a composition of biases (b_t summed over the parts)"));
}

template <class A, class B>
requires AdditiveBias<Composed<A, B>> ReceptiveField
theoretical_receptive_field(const Composed<A, B>& composed, Index head, double eps) {
  constexpr const char* fn = "posenc::theoretical_receptive_field";
  detail::require_head(fn, head, composed.heads());
  detail::require_eps(fn, eps);
  return detail::with_prefix(
      theoretical_receptive_field(BiasSeries::from_function(detail::limit_bias(composed, head)),
                                  eps),
      detail::head_label(head, "a composition of biases (b_t summed over the parts)"));
}

/// Encoders that are not additive biases: no TRF (additive = false, see above). Checks ε only.
template <NonAdditiveEncoder E>
ReceptiveField theoretical_receptive_field(const E&, Index, double eps) {
  detail::require_eps("posenc::theoretical_receptive_field", eps);
  return detail::not_additive(detail::non_additive_reason<E>());
}

template <NonAdditiveEncoder E>
Convergence convergence(const E&, Index) {
  return {false, false, detail::non_additive_reason<E>()};
}

/// TRF_ε of head `head` for one query at absolute position i = query_position attending causally
/// to the keys 0 … i (the kernel's default key positions):
///
///   w_t = exp(B_h(i, i − t)),   TRF_ε(i) = min { K ≥ 1 : Σ_{t<K} w_t ≥ (1 − ε)·Σ_{t≤i} w_t },
///
/// a finite sum, so always finite (≤ i + 1). This is the meaningful field of FIRE, whose bias
/// depends on i (its limit is infinite; TRF_ε(i) ≥ (1 − ε)(i + 1)·e^(min f − max f) over
/// [0, 1]); for a bias of the distance alone it equals the limit TRF once the window holds it.
/// Summed directly in long double (i + 1 bias evaluations). NoPE: uniform weights. Encoders that
/// are not additive biases get additive = false as above.
/// Throws for a head out of range, ε outside (0, 1) or query_position outside [0, 2^26].
template <AdditiveBias Bias>
ReceptiveField theoretical_receptive_field_at(const Bias& bias, Index head, double eps,
                                              Index query_position) {
  constexpr const char* fn = "posenc::theoretical_receptive_field_at";
  detail::require_head(fn, head, static_cast<Index>(bias.heads()));
  detail::require_eps(fn, eps);
  detail::require(query_position >= 0 && query_position <= (Index{1} << 26), fn,
                  "query_position must lie in [0, 2^26] (the keys are summed directly), got ",
                  query_position);
  const Index i = query_position;
  return detail::trf_of_window(
      fn, [&bias, head, i](Index t) { return bias.bias(head, i, i - t); }, i, eps,
      "head " + std::to_string(head) + ": query at position " + std::to_string(i) +
          ", keys 0 ... " + std::to_string(i) + ": sum of exp(B(i, i - t)) over the " +
          std::to_string(i + 1) + " distances, the nearest K carrying 1 - eps of it");
}

inline ReceptiveField theoretical_receptive_field_at(const NoPositionalEncoding&, Index, double eps,
                                                     Index query_position) {
  constexpr const char* fn = "posenc::theoretical_receptive_field_at";
  detail::require_eps(fn, eps);
  detail::require(query_position >= 0 && query_position <= (Index{1} << 26), fn,
                  "query_position must lie in [0, 2^26] (the keys are summed directly), got ",
                  query_position);
  return detail::trf_of_window(
      fn, [](Index) { return 0.0; }, query_position, eps,
      "no positional bias (NoPE): uniform weights over the " + std::to_string(query_position + 1) +
          " keys 0 ... " + std::to_string(query_position));
}

template <NonAdditiveEncoder E>
ReceptiveField theoretical_receptive_field_at(const E&, Index, double eps, Index) {
  detail::require_eps("posenc::theoretical_receptive_field_at", eps);
  return detail::not_additive(detail::non_additive_reason<E>());
}

}  // namespace posenc
