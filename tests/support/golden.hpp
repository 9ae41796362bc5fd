// SPDX-License-Identifier: MIT
// Reads the golden JSON files in tests/data (produced by the papers' reference code; see
// tests/data/README.md) into Eigen matrices.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

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

/// A JSON number, with null read as -infinity (the goldens' encoding of masked scores).
inline double number(const Json& x) {
  return x.is_null() ? -std::numeric_limits<double>::infinity() : x.get<double>();
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

}  // namespace posenc::test
