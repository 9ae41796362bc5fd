// SPDX-License-Identifier: MIT
// Reads the golden JSON files in tests/data (produced by the papers' reference code; see
// tests/data/README.md) into Eigen matrices.
#pragma once

#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "posenc/tensor.hpp"

#ifndef POSENC_TEST_DATA_DIR
#error "POSENC_TEST_DATA_DIR must point at tests/data"
#endif

namespace posenc::test {

using Json = nlohmann::json;

/// Parses tests/data/<name>.
inline Json load_golden(const std::string& name) {
  const std::string path = std::string(POSENC_TEST_DATA_DIR) + "/" + name;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open golden file " + path);
  return Json::parse(in);
}

/// A JSON number, with null and the strings "-inf" / "-Infinity" read as -infinity (the goldens'
/// encodings of masked scores), "inf" / "Infinity" as +infinity and "nan" / "NaN" as NaN.
inline double number(const Json& x) {
  constexpr double infinity = std::numeric_limits<double>::infinity();
  if (x.is_null()) return -infinity;
  if (x.is_string()) {
    const std::string text = x.get<std::string>();
    if (text == "-inf" || text == "-Infinity") return -infinity;
    if (text == "inf" || text == "Infinity") return infinity;
    if (text == "nan" || text == "NaN") return std::numeric_limits<double>::quiet_NaN();
    throw std::runtime_error("golden value \"" + text + "\" is not a number");
  }
  return x.get<double>();
}

/// A [rows][cols] JSON array as a matrix.
template <class Scalar = double>
Matrix<Scalar> to_matrix(const Json& rows) {
  const auto n = static_cast<Index>(rows.size());
  const auto m = n == 0 ? Index{0} : static_cast<Index>(rows.at(0).size());
  Matrix<Scalar> out(n, m);
  for (Index r = 0; r < n; ++r) {
    for (Index c = 0; c < m; ++c) out(r, c) = static_cast<Scalar>(number(rows.at(r).at(c)));
  }
  return out;
}

/// A flat JSON array as a vector.
template <class Scalar = double>
Vector<Scalar> to_vector(const Json& values) {
  Vector<Scalar> out(static_cast<Index>(values.size()));
  for (Index i = 0; i < out.size(); ++i) out[i] = static_cast<Scalar>(number(values.at(i)));
  return out;
}

/// A [heads][rows][dim] JSON array as Heads.
template <class Scalar = double>
Heads<Scalar> to_heads(const Json& x) {
  const auto h = static_cast<Index>(x.size());
  const auto n = static_cast<Index>(x.at(0).size());
  const auto d = static_cast<Index>(x.at(0).at(0).size());
  Heads<Scalar> out(h, n, d);
  for (Index a = 0; a < h; ++a) out.head(a) = to_matrix<Scalar>(x.at(a));
  return out;
}

/// A [pos][head][dim] JSON array (tokens-major) as Heads [head, pos, dim].
inline Heads<double> tokens_to_heads(const Json& x) {
  const auto length = static_cast<Index>(x.size());
  const auto heads = static_cast<Index>(x.at(0).size());
  const auto dim = static_cast<Index>(x.at(0).at(0).size());
  Heads<double> out(heads, length, dim);
  for (Index t = 0; t < length; ++t) {
    for (Index h = 0; h < heads; ++h) {
      for (Index d = 0; d < dim; ++d) out(h, t, d) = number(x.at(t).at(h).at(d));
    }
  }
  return out;
}

/// A JSON array of any depth, flattened row-major into one vector.
inline Vector<double> flatten(const Json& x) {
  std::vector<double> values;
  auto walk = [&](auto&& self, const Json& node) -> void {
    if (node.is_array()) {
      for (const Json& child : node) self(self, child);
    } else {
      values.push_back(number(node));
    }
  };
  walk(walk, x);
  return Eigen::Map<const Vector<double>>(values.data(), static_cast<Index>(values.size()));
}

/// A JSON array of any depth flattened row-major into a [size, rest] matrix: a Linear weight
/// [out][in] as it is, a Conv2d weight [out][in][1][k] as [out, in·k].
inline Matrix<double> flat_rows(const Json& x) {
  const Vector<double> values = flatten(x);
  const auto rows = static_cast<Index>(x.size());
  return Eigen::Map<const Matrix<double>>(values.data(), rows, values.size() / rows);
}

/// A [heads][rows][cols] JSON array as one matrix per head.
inline std::vector<Matrix<double>> to_matrices(const Json& x) {
  std::vector<Matrix<double>> out;
  for (const Json& head : x) out.push_back(to_matrix(head));
  return out;
}

}  // namespace posenc::test
