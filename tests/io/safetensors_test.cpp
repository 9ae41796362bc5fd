// SPDX-License-Identifier: MIT
#include "posenc/io/safetensors.hpp"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "support/test_support.hpp"

namespace posenc::io::safetensors_test {

namespace fs = std::filesystem;
constexpr double inf = std::numeric_limits<double>::infinity();
constexpr double nan = std::numeric_limits<double>::quiet_NaN();

/// A fresh directory for this test's files, removed afterwards (the process id keeps concurrent
/// runs apart).
struct ScratchDir {
  fs::path path;
  ScratchDir() {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string leaf = std::string(test->test_suite_name()) + "." + test->name();
    std::replace(leaf.begin(), leaf.end(), '/', '_');
    path = fs::path(::testing::TempDir()) / ("posenc_safetensors_" + std::to_string(::getpid())) /
           leaf;
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
    fs::remove(path.parent_path(), ignored);  // only when no other test's directory is left
  }
};

std::vector<unsigned char> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

/// A file: the 8-byte length of `header` (or `length` when given), `header`, `data_bytes` bytes.
std::vector<unsigned char> make_file(const std::string& header, std::size_t data_bytes,
                                     std::optional<std::uint64_t> length = std::nullopt) {
  std::vector<unsigned char> file(8 + header.size() + data_bytes, 0);
  detail::store_le(length.value_or(header.size()), 8, file.data());
  std::copy(header.begin(), header.end(), file.begin() + 8);
  return file;
}

/// Bits of a double as stored by `dtype` and widened back, the value a round trip must give.
double stored(double x, Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
      return x;
    case Dtype::F32:
      return static_cast<float>(x);
    case Dtype::F16:
      return detail::widen(detail::narrow(x, detail::binary16), detail::binary16);
    default:
      return detail::widen(detail::narrow(x, detail::bfloat16), detail::bfloat16);
  }
}

/// Same value, NaN matching NaN; the sign of zeros and NaNs compared too.
void expect_same(double got, double want, const std::string& where) {
  EXPECT_EQ(std::isnan(got), std::isnan(want)) << where << ": " << got << " vs " << want;
  EXPECT_EQ(std::signbit(got), std::signbit(want)) << where << ": " << got << " vs " << want;
  if (!std::isnan(want)) {
    EXPECT_EQ(got, want) << where;
  }
}

// ---------------------------------------------------------------------------------------------
// Float formats

TEST(SafetensorsFloatBits, Binary32NarrowingMatchesTheHardwareRounding) {
  auto rng = test::make_rng(161);
  std::uniform_int_distribution<std::uint64_t> bits;
  std::uniform_int_distribution<int> exponent(-160, 140);
  for (int i = 0; i < 200000; ++i) {
    // Random significands over float's whole range (subnormals, overflow and ties included).
    double x =
        std::ldexp(std::bit_cast<double>((bits(rng) >> 12) | 0x3FF0000000000000ULL), exponent(rng));
    if (i % 7 == 0) x = std::ldexp(std::round(std::ldexp(x, 24)) + 0.5, -24);  // exact ties
    if (i % 2 == 1) x = -x;
    ASSERT_EQ(detail::narrow(x, detail::binary32),
              std::bit_cast<std::uint32_t>(static_cast<float>(x)))
        << std::hexfloat << x;
  }
}

TEST(SafetensorsFloatBits, EveryHalfAndBfloat16PatternSurvivesARoundTrip) {
  for (const auto format : {detail::binary16, detail::bfloat16}) {
    for (std::uint32_t b = 0; b < 0x10000; ++b) {
      const double x = detail::widen(b, format);
      if (std::isnan(x)) {
        EXPECT_TRUE(std::isnan(detail::widen(detail::narrow(x, format), format)));
        continue;
      }
      ASSERT_EQ(detail::narrow(x, format), b) << format.mantissa_bits << " " << b;
    }
  }
  for (std::uint16_t b = 0; b < 0xFFFF; ++b) {  // the fast bfloat16 path agrees with widen
    if (!std::isnan(detail::bfloat16_to_float(b))) {
      ASSERT_EQ(detail::bfloat16_to_float(b), detail::widen(b, detail::bfloat16));
    }
  }
}

TEST(SafetensorsFloatBits, RoundsToNearestEvenInOneStep) {
  const auto f16 = [](double x) { return detail::narrow(x, detail::binary16); };
  const auto bf16 = [](double x) { return detail::narrow(x, detail::bfloat16); };
  EXPECT_EQ(f16(1.0), 0x3C00U);
  EXPECT_EQ(f16(1.0 + 0x1p-11), 0x3C00U);      // tie, even stays
  EXPECT_EQ(f16(1.0 + 3 * 0x1p-11), 0x3C02U);  // tie, odd rounds up to even
  EXPECT_EQ(f16(1.0 + 0x1p-11 + 0x1p-30), 0x3C01U);
  EXPECT_EQ(f16(65504.0), 0x7BFFU);  // largest finite
  EXPECT_EQ(f16(65519.99), 0x7BFFU);
  EXPECT_EQ(f16(65520.0), 0x7C00U);  // tie with 2^16: even is the overflow, +inf
  EXPECT_EQ(f16(-1e10), 0xFC00U);
  EXPECT_EQ(f16(0x1p-24), 0x0001U);  // least subnormal
  EXPECT_EQ(f16(0x1p-25), 0x0000U);  // half of it: tie to even zero
  EXPECT_EQ(f16(0x1.8p-25), 0x0001U);
  EXPECT_EQ(f16(-0x1p-26), 0x8000U);          // underflow keeps the sign
  EXPECT_EQ(f16(1023.5 * 0x1p-24), 0x0400U);  // subnormal carries into the least normal
  EXPECT_EQ(f16(5e-324), 0x0000U);            // double subnormal
  EXPECT_EQ(f16(-0.0), 0x8000U);
  EXPECT_EQ(f16(inf), 0x7C00U);
  EXPECT_EQ(f16(1.0 / 3.0), 0x3555U);
  EXPECT_EQ(f16(nan) & 0x7C00U, 0x7C00U);
  EXPECT_NE(f16(nan) & 0x03FFU, 0U);
  EXPECT_EQ(f16(-nan) & 0x8000U, 0x8000U);
  EXPECT_EQ(bf16(1.0 / 3.0), 0x3EABU);
  EXPECT_EQ(bf16(1.0 + 0x1p-8), 0x3F80U);
  EXPECT_EQ(bf16(1.0 + 3 * 0x1p-8), 0x3F82U);
  // Through float, 1 + 2^-8 + 2^-30 would become the tie 1 + 2^-8 and round down to 1.
  EXPECT_EQ(bf16(1.0 + 0x1p-8 + 0x1p-30), 0x3F81U);
  EXPECT_EQ(bf16(0x1p-133), 0x0001U);
  EXPECT_EQ(bf16(std::numeric_limits<float>::max()), 0x7F80U);  // rounds past the largest
  EXPECT_EQ(bf16(-inf), 0xFF80U);
}

// ---------------------------------------------------------------------------------------------
// Round trips

const std::vector<double>& float_cases() {
  static const std::vector<double> cases{0.0,
                                         -0.0,
                                         1.0,
                                         -2.5,
                                         1.0 / 3.0,
                                         0.1,
                                         65504.0,
                                         65520.0,
                                         1e5,
                                         -1e38,
                                         3.5e38,
                                         1e300,
                                         0x1p-24,
                                         0x1p-25,
                                         0x1.8p-25,
                                         0x1p-133,
                                         0x1p-149,
                                         0x1p-150,
                                         0x1.8p-149,
                                         1e-310,
                                         5e-324,
                                         1.0 + 0x1p-8,
                                         1.0 + 3 * 0x1p-8,
                                         1.0 + 0x1p-11,
                                         1.0 + 0x1p-24,
                                         1.0 + 0x1p-8 + 0x1p-30,
                                         inf,
                                         -inf,
                                         nan,
                                         -nan};
  return cases;
}

TEST(SafetensorsRoundTrip, FloatDtypesRoundOnceToNearestEven) {
  const auto& cases = float_cases();
  Matrix<double> table(3, 10);
  for (Index i = 0; i < table.size(); ++i) table.data()[i] = cases[static_cast<std::size_t>(i)];
  SafetensorsWriter writer;
  for (Dtype dtype : {Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16})
    writer.add(std::string(dtype_name(dtype)), table, dtype);
  const auto file = SafetensorsFile::from_bytes(writer.bytes());
  for (Dtype dtype : {Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16}) {
    const std::string name(dtype_name(dtype));
    EXPECT_EQ(file.info(name).dtype, dtype);
    EXPECT_EQ(file.info(name).shape, (std::vector<Index>{3, 10}));
    const Matrix<double> as_double = file.matrix<double>(name);
    const Matrix<float> as_float = file.matrix<float>(name);
    ASSERT_EQ(as_double.rows(), 3);
    ASSERT_EQ(as_double.cols(), 10);
    for (Index i = 0; i < table.size(); ++i) {
      const double want = stored(table.data()[i], dtype);
      expect_same(as_double.data()[i], want, name + " element " + std::to_string(i));
      expect_same(as_float.data()[i], static_cast<float>(want),
                  name + " float " + std::to_string(i));
    }
  }
}

TEST(SafetensorsRoundTrip, FloatSourcesWriteTheirOwnWidthByDefault) {
  Matrix<float> f(1, 2);
  f << 1.5F, -0.25F;
  Matrix<double> d(1, 1);
  d << 0.1;
  const auto file =
      SafetensorsFile::from_bytes(SafetensorsWriter().add("f", f).add("d", d).bytes());
  EXPECT_EQ(file.info("f").dtype, Dtype::F32);
  EXPECT_EQ(file.info("d").dtype, Dtype::F64);
  EXPECT_EQ(file.matrix<float>("f"), f);
  EXPECT_EQ(file.values<double>("d"), std::vector<double>{0.1});
}

template <class T>
void check_integer_round_trip(Dtype dtype) {
  const std::vector<T> values{std::numeric_limits<T>::min(), T(0), T(1),
                              std::numeric_limits<T>::max()};
  const SafetensorsFile file =
      SafetensorsFile::from_bytes(SafetensorsWriter().add("ids", values, {2, 2}).bytes());
  const std::string name(dtype_name(dtype));
  EXPECT_EQ(file.info("ids").dtype, dtype) << name;
  EXPECT_EQ(file.values<T>("ids"), values) << name;
  const Matrix<T> m = file.matrix<T>("ids");
  EXPECT_EQ(m(0, 0), values[0]) << name;
  EXPECT_EQ(m(1, 1), values[3]) << name;
  const std::vector<double> as_double = file.values<double>("ids");
  for (std::size_t i = 0; i < values.size(); ++i)
    EXPECT_EQ(as_double[i], static_cast<double>(values[i])) << name;
}

TEST(SafetensorsRoundTrip, IntegerDtypesKeepEveryValue) {
  check_integer_round_trip<std::int64_t>(Dtype::I64);
  check_integer_round_trip<std::int32_t>(Dtype::I32);
  check_integer_round_trip<std::int16_t>(Dtype::I16);
  check_integer_round_trip<std::int8_t>(Dtype::I8);
  check_integer_round_trip<std::uint8_t>(Dtype::U8);
  check_integer_round_trip<std::uint16_t>(Dtype::U16);
  check_integer_round_trip<std::uint32_t>(Dtype::U32);
  check_integer_round_trip<std::uint64_t>(Dtype::U64);
  check_integer_round_trip<bool>(Dtype::BOOL);
}

TEST(SafetensorsRoundTrip, IntegersConvertBetweenWidthsWhenTheyFit) {
  const std::vector<std::int64_t> small{-3, 0, 7, 100};
  SafetensorsWriter writer;
  writer.add("i8", small, {4}, Dtype::I8).add("bool", std::vector<int>{1, 0}, {2}, Dtype::BOOL);
  const auto file = SafetensorsFile::from_bytes(writer.bytes(), "ints");
  EXPECT_EQ(file.info("i8").dtype, Dtype::I8);
  EXPECT_EQ(file.values<int>("i8"), (std::vector<int>{-3, 0, 7, 100}));
  EXPECT_EQ(file.matrix<std::int64_t>("i8"),
            (Matrix<std::int64_t>(4, 1) << -3, 0, 7, 100).finished());
  EXPECT_EQ(file.values<bool>("bool"), (std::vector<bool>{true, false}));
  EXPECT_EQ(file.values<float>("bool"), (std::vector<float>{1.0F, 0.0F}));
  // Out of the requested type's range: an error naming the element and value.
  try {
    (void)file.values<std::uint8_t>("i8");
    FAIL() << "negative I8 loaded as uint8";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("tensor \"i8\": I8 element 0 is -3"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW((void)file.values<bool>("i8"), std::invalid_argument);
}

TEST(SafetensorsRoundTrip, ShapesAreRowMajorWithVectorsOneDimensional) {
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> col_major(2, 3);
  col_major << 1, 2, 3, 4, 5, 6;
  Vector<float> column(3);
  column << 7, 8, 9;
  Eigen::RowVectorXf row(2);
  row << 10, 11;
  SafetensorsWriter writer;
  writer.add("table", col_major).add("column", column).add("row", row);
  writer.add("cube", std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7}, {2, 2, 2});
  writer.add("scalar", std::vector<double>{42.0}, {});
  writer.add("empty", std::vector<float>{}, {0, 5});
  const auto file = SafetensorsFile::from_bytes(writer.bytes());
  EXPECT_EQ(file.info("table").shape, (std::vector<Index>{2, 3}));
  EXPECT_EQ(file.values<double>("table"), (std::vector<double>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(file.matrix<double>("table"), col_major);
  EXPECT_EQ(file.info("column").shape, (std::vector<Index>{3}));
  EXPECT_EQ(file.matrix<float>("column"), column);  // 1-D loads as a column
  EXPECT_EQ(file.info("row").shape, (std::vector<Index>{2}));
  EXPECT_EQ(file.matrix<float>("row"), row.transpose());
  EXPECT_EQ(file.values<float>("cube"), (std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(file.info("scalar").shape, std::vector<Index>{});
  EXPECT_EQ(file.matrix<double>("scalar"), (Matrix<double>::Constant(1, 1, 42.0)));
  EXPECT_EQ(file.matrix<float>("empty").rows(), 0);
  EXPECT_EQ(file.matrix<float>("empty").cols(), 5);
  EXPECT_EQ(file.raw("empty").size(), 0U);
  try {
    (void)file.matrix<float>("cube");
    FAIL() << "rank 3 loaded as a matrix";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("SafetensorsFile::matrix: '<memory>': tensor \"cube\": "
                                         "shape [2, 2, 2] has rank 3"),
              std::string::npos)
        << e.what();
  }
}

TEST(SafetensorsRoundTrip, MetadataAndFilesOnDisk) {
  const ScratchDir dir;
  const fs::path path = dir.path / "weights.safetensors";
  Matrix<float> table = Matrix<float>::Random(5, 4);
  SafetensorsWriter writer;
  writer.add("wpe.weight", table, Dtype::BF16)
      .add_metadata("format", "pt")
      .add_metadata("note", "unicode \u00e9\u4e2d \"quoted\"")
      .add_metadata("format", "np");  // replaces
  writer.write(path);
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
  const auto file = SafetensorsFile::open(path);
  EXPECT_TRUE(file.memory_mapped());
  EXPECT_EQ(file.source(), path.string());
  EXPECT_EQ(file.metadata(), (std::map<std::string, std::string>{
                                 {"format", "np"}, {"note", "unicode \u00e9\u4e2d \"quoted\""}}));
  const Matrix<float> loaded = file.matrix<float>("wpe.weight");
  for (Index i = 0; i < table.size(); ++i)
    EXPECT_EQ(loaded.data()[i], static_cast<float>(stored(table.data()[i], Dtype::BF16)));
  EXPECT_EQ(read_bytes(path), writer.bytes());
}

// ---------------------------------------------------------------------------------------------
// Compatibility: the reference implementation's layout and a file written by Python

TEST(SafetensorsCompatibility, WriterLaysOutFilesAsTheReferenceImplementation) {
  // The reference's own serialization cases (huggingface/safetensors, tensor.rs tests): header
  // length, compact JSON, space padding to 8 bytes.
  const auto text = [](const std::vector<unsigned char>& file) {
    return std::string(
        file.begin() + 8,
        file.begin() + 8 + static_cast<std::ptrdiff_t>(detail::load_le(file.data(), 8)));
  };
  const auto one =
      SafetensorsWriter().add("attn.0", std::vector<float>{0, 1, 2, 3, 4, 5}, {1, 2, 3}).bytes();
  EXPECT_EQ(text(one), R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})");
  EXPECT_EQ(one.size(), 8U + 64U + 24U);
  EXPECT_EQ(text(SafetensorsWriter().bytes()), "{}      ");
  EXPECT_EQ(text(SafetensorsWriter().add_metadata("framework", "pt").bytes()),
            R"({"__metadata__":{"framework":"pt"}})"
            "     ");
  // Widest dtype first, then by name: every tensor aligned to its element size.
  const auto file =
      SafetensorsFile::from_bytes(SafetensorsWriter()
                                      .add("b", std::vector<std::int8_t>{1}, {1})
                                      .add("a", std::vector<float>{1}, {1}, Dtype::F16)
                                      .add("c", std::vector<double>{1}, {1})
                                      .add("d", std::vector<std::int64_t>{1}, {1})
                                      .bytes());
  EXPECT_EQ(file.names(), (std::vector<std::string>{"d", "c", "a", "b"}));
}

struct FixtureTensor {
  const char* name;
  Dtype dtype;
  std::vector<Index> shape;
  std::vector<double> values;
};

/// The table of generators/make_safetensors_fixture.py, and the values its stored bits mean.
const std::vector<FixtureTensor>& fixture_tensors() {
  static const std::vector<FixtureTensor> tensors{
      {"i64_buckets", Dtype::I64, {2, 3}, {-3, 0, 7, 0x1p40, -0x1p63, 0x1p63}},
      {"f64_values", Dtype::F64, {2, 2}, {0.1, -2.5, 1e300, 5e-324}},
      {"f32_empty", Dtype::F32, {0, 4}, {}},
      {"f32_scalar", Dtype::F32, {}, {2.5}},
      {"f32_table", Dtype::F32, {3, 2}, {0, 1, 2, 3, 4, 5}},
      {"i32_ids", Dtype::I32, {3}, {-0x1p31, 0, 0x1p31 - 1}},
      {"bf16_slopes", Dtype::BF16, {6}, {1.0, -0.5, 3.140625, 0x1p-133, inf, 0.333984375}},
      {"f16_values", Dtype::F16, {2, 3}, {65504, 0x1p-24, -0.0, 0.333251953125, -2.5, -inf}},
      {"i16_ids", Dtype::I16, {2}, {-32768, 32767}},
      {"i8_ids", Dtype::I8, {4}, {-128, -1, 0, 127}},
      {"u8_ids", Dtype::U8, {2}, {0, 255}},
      {"bool_mask", Dtype::BOOL, {3}, {1, 0, 1}},
  };
  return tensors;
}

const fs::path fixture_path = fs::path(POSENC_TEST_DATA_DIR) / "fixture.safetensors";

TEST(SafetensorsCompatibility, ReadsTheFileWrittenByPython) {
  const auto file = SafetensorsFile::open(fixture_path);
  std::vector<std::string> names;
  for (const auto& tensor : fixture_tensors()) names.emplace_back(tensor.name);
  EXPECT_EQ(file.names(), names);  // data order
  EXPECT_EQ(
      file.metadata(),
      (std::map<std::string, std::string>{
          {"format", "pt"}, {"generator", "tests/data/generators/make_safetensors_fixture.py"}}));
  for (const auto& tensor : fixture_tensors()) {
    const TensorInfo& info = file.info(tensor.name);
    EXPECT_EQ(info.dtype, tensor.dtype) << tensor.name;
    EXPECT_EQ(info.shape, tensor.shape) << tensor.name;
    const std::vector<double> values = file.values<double>(tensor.name);
    ASSERT_EQ(values.size(), tensor.values.size()) << tensor.name;
    for (std::size_t i = 0; i < values.size(); ++i)
      expect_same(values[i], tensor.values[i],
                  std::string(tensor.name) + "[" + std::to_string(i) + "]");
  }
  EXPECT_EQ(file.values<std::int64_t>("i64_buckets"),
            (std::vector<std::int64_t>{-3, 0, 7, std::int64_t{1} << 40,
                                       std::numeric_limits<std::int64_t>::min(),
                                       std::numeric_limits<std::int64_t>::max()}));
  EXPECT_EQ(file.matrix<float>("f32_table"), (Matrix<float>(3, 2) << 0, 1, 2, 3, 4, 5).finished());
}

TEST(SafetensorsCompatibility, WriterReproducesThePythonFileByteForByte) {
  SafetensorsWriter writer;
  for (const auto& tensor : fixture_tensors()) {
    const bool floating = tensor.dtype == Dtype::F64 || tensor.dtype == Dtype::F32 ||
                          tensor.dtype == Dtype::F16 || tensor.dtype == Dtype::BF16;
    if (floating) {
      writer.add(tensor.name, tensor.values, tensor.shape, tensor.dtype);
    } else {
      std::vector<std::int64_t> ints;
      for (double v : tensor.values)
        ints.push_back(v >= 0x1p63 ? std::numeric_limits<std::int64_t>::max()
                                   : static_cast<std::int64_t>(v));
      writer.add(tensor.name, ints, tensor.shape, tensor.dtype);
    }
  }
  writer.add_metadata("generator", "tests/data/generators/make_safetensors_fixture.py")
      .add_metadata("format", "pt");
  EXPECT_EQ(writer.bytes(), read_bytes(fixture_path));
}

TEST(SafetensorsCompatibility, HeaderKeyOrderDoesNotMatter) {
  // Tensors listed out of data order, metadata last, whitespace around: still read by offset.
  const auto file = SafetensorsFile::from_bytes(make_file(
      R"( { "b" : {"data_offsets":[4,8],"shape":[1],"dtype":"F32"},
            "a" : {"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "__metadata__": {} } )",
      8));
  EXPECT_EQ(file.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(file.metadata().empty());
  // A null __metadata__ reads as none, as the reference implementation reads it.
  EXPECT_TRUE(
      SafetensorsFile::from_bytes(make_file(R"({"__metadata__":null})", 0)).metadata().empty());
  EXPECT_TRUE(file.contains("a"));
  EXPECT_FALSE(file.contains("c"));
}

// ---------------------------------------------------------------------------------------------
// Misuse: names that are not there, conversions that would lose information, bad writer input

TEST(SafetensorsMisuse, ReaderNamesTheTensorItCannotGive) {
  std::vector<unsigned char> bool_bytes =
      make_file(R"({"flag":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]},)"
                R"("f8":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[2,3]},)"
                R"("x":{"dtype":"F32","shape":[1],"data_offsets":[3,7]}})",
                7);
  bool_bytes[bool_bytes.size() - 6] = 2;  // flag[1] = 2: not a bool
  const auto file = SafetensorsFile::from_bytes(bool_bytes, "odd.safetensors");
  const auto message = [&](auto&& call) -> std::string {
    try {
      call();
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "(no exception)";
  };
  EXPECT_EQ(message([&] { (void)file.info("y"); }),
            "posenc::io::SafetensorsFile::info: 'odd.safetensors': no tensor \"y\" (the file holds "
            "3: [flag, f8, x])");
  EXPECT_NE(message([&] {
              (void)file.values<int>("x");
            }).find("tensor \"x\": a F32 tensor loads as float or double"),
            std::string::npos);
  EXPECT_NE(message([&] {
              (void)file.values<float>("f8");
            }).find("tensor \"f8\": dtype F8_E4M3 is validated but not converted"),
            std::string::npos);
  EXPECT_NE(message([&] {
              (void)file.values<float>("flag");
            }).find("tensor \"flag\": BOOL element 1 is byte 2, not 0 or 1"),
            std::string::npos);
  EXPECT_EQ(file.raw("f8").size(), 1U);
}

TEST(SafetensorsMisuse, WriterRejectsWhatItCannotWriteFaithfully) {
  const auto expect_rejected = [](auto&& call, const std::string& part) {
    try {
      call();
      ADD_FAILURE() << "no exception, expected " << part;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).rfind("posenc::io::SafetensorsWriter::add: ", 0), 0U);
    }
  };
  SafetensorsWriter writer;
  writer.add("w", std::vector<float>{1, 2}, {2});
  expect_rejected([&] { writer.add("w", std::vector<float>{1}, {1}); },
                  "tensor \"w\": added twice");
  expect_rejected(
      [&] {
        writer.add("v", std::vector<float>{1, 2, 3}, {2, 2});
      },
      "shape [2, 2] does not hold the 3 values given");
  expect_rejected([&] { writer.add("v", std::vector<float>{1}, {-1}); }, "negative extent");
  expect_rejected([&] { writer.add("v", std::vector<float>{1}, {1}, Dtype::I32); },
                  "I32 needs an integer or bool source");
  expect_rejected([&] { writer.add("v", std::vector<int>{1}, {1}, Dtype::F32); },
                  "F32 needs a floating-point source");
  expect_rejected(
      [&] {
        writer.add("v", std::vector<int>{1, 200}, {2}, Dtype::I8);
      },
      "element 1 = 200 does not fit I8");
  expect_rejected([&] { writer.add("v", std::vector<int>{2}, {1}, Dtype::BOOL); },
                  "element 0 = 2 does not fit BOOL");
  expect_rejected([&] { writer.add("v", std::vector<float>{1}, {1}, Dtype::F8_E5M2); },
                  "writing F8_E5M2 is not supported");
  expect_rejected([&] { writer.add("__metadata__", std::vector<float>{1}, {1}); }, "reserved");
  expect_rejected([&] { writer.add("bad\xff", std::vector<float>{1}, {1}); }, "not valid UTF-8");
}

TEST(SafetensorsMisuse, FileErrorsAreRuntimeErrorsNamingThePath) {
  const ScratchDir scratch;
  const fs::path& dir = scratch.path;
  const auto expect_runtime_error = [](auto&& call, const std::string& part) {
    try {
      call();
      ADD_FAILURE() << "no exception, expected " << part;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  expect_runtime_error([&] { (void)SafetensorsFile::open(dir / "missing.safetensors"); },
                       "posenc::io::SafetensorsFile::open: '" +
                           (dir / "missing.safetensors").string() +
                           "': cannot open: No such file or directory");
  expect_runtime_error([&] { (void)SafetensorsFile::open(dir); }, "is a directory");
  expect_runtime_error([&] { SafetensorsWriter().write(dir / "no" / "such" / "dir.safetensors"); },
                       "posenc::io::SafetensorsWriter::write: '" +
                           (dir / "no" / "such" / "dir.safetensors.tmp").string() +
                           "': cannot create");
}

// ---------------------------------------------------------------------------------------------
// Malformed files: each case breaks one rule; opening it throws std::invalid_argument naming the
// function, the file, the tensor where there is one, and what is wrong.

struct Malformed {
  std::string name;
  std::vector<unsigned char> bytes;
  std::string tensor;   // "" when the violation is not about one tensor
  std::string message;  // a part of the expected message
};

void PrintTo(const Malformed& malformed, std::ostream* out) { *out << malformed.name; }

std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

std::vector<Malformed> malformed_cases() {
  return {
      {"EmptyFile", {}, "", "the file is 0 bytes, shorter than the 8-byte header length"},
      {"TruncatedLengthPrefix", {16, 0, 0, 0, 0}, "", "the file is 5 bytes"},
      {"HeaderLengthBeyondFile", make_file("{}", 0, 100), "",
       "header length 100 runs past the end of the file: 2 bytes follow"},
      {"HeaderOverCap", make_file("{}", 0, 100'000'001), "",
       "header length 100000001 exceeds the limit of 100000000 bytes"},
      {"HeaderLengthNearTwoTo64", make_file("{}", 0, ~std::uint64_t{0} - 3), "",
       "header length 18446744073709551612 exceeds the limit"},
      {"EmptyHeader", make_file("", 0), "", "the 0-byte header is not valid JSON"},
      {"NotJson", make_file("{\"w\": nope}", 0), "", "the 11-byte header is not valid JSON"},
      {"NulPadding", make_file(std::string("{}\0\0\0\0\0\0", 8), 0), "",
       "the 8-byte header is not valid JSON: a NUL byte at header offset 2"},
      {"InvalidUtf8", make_file("{\"w\xff\":1}", 0), "", "not valid JSON"},
      {"JsonNotAnObject", make_file("[1,2]", 0), "",
       "the header is a JSON array [1,2], not a JSON object"},
      {"EntryNotAnObject", make_file(R"({"w":3})", 0), "w", "the entry is a JSON number 3"},
      {"MissingDtype", make_file(R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4), "w",
       "the entry lacks \"dtype\""},
      {"MissingShape", make_file(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 4), "w",
       "the entry lacks \"shape\""},
      {"MissingDataOffsets", make_file(R"({"w":{"dtype":"F32","shape":[1]}})", 4), "w",
       "the entry lacks \"data_offsets\""},
      {"UnknownEntryKey",
       make_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"offset":0}})", 4), "w",
       "unknown key \"offset\""},
      {"UnknownDtype", make_file("{\"w\":" + entry("F128", "[1]", "[0,16]") + "}", 16), "w",
       "unknown dtype \"F128\""},
      {"DtypeNotAString", make_file(R"({"w":{"dtype":32,"shape":[1],"data_offsets":[0,4]}})", 4),
       "w", "dtype is a JSON number 32, not a string"},
      {"NegativeShape", make_file("{\"w\":" + entry("F32", "[-1,2]", "[0,8]") + "}", 8), "w",
       "shape[0] is -1, not a non-negative integer"},
      {"FractionalShape", make_file("{\"w\":" + entry("F32", "[2.0]", "[0,8]") + "}", 8), "w",
       "shape[0] is 2.0, not a non-negative integer"},
      {"ShapeNotAnArray", make_file("{\"w\":" + entry("F32", "2", "[0,8]") + "}", 8), "w",
       "shape is a JSON number 2, not an array"},
      {"ShapeOverflow",
       make_file("{\"w\":" + entry("F32", "[4294967296,4294967296]", "[0,4]") + "}", 4), "w",
       "shape [4294967296,4294967296] of F32 overflows a signed 64-bit byte count"},
      {"ShapeOverflowBeforeAZero",
       make_file("{\"w\":" + entry("U8", "[4611686018427387904,2,0]", "[0,0]") + "}", 0), "w",
       "shape [4611686018427387904,2,0] of U8 overflows a signed 64-bit byte count"},
      {"ShapeDimensionBeyondIndex",
       make_file("{\"w\":" + entry("F32", "[0,18446744073709551615]", "[0,0]") + "}", 0), "w",
       "overflows a signed 64-bit byte count"},
      {"ShapeNestedTooDeeply", make_file("{\"w\":" + entry("F32", "[[2]]", "[0,8]") + "}", 8), "w",
       "the entry nests deeper than a safetensors header can"},
      {"OffsetsReversed", make_file("{\"w\":" + entry("F32", "[2]", "[8,0]") + "}", 8), "w",
       "data_offsets [8, 0] are reversed"},
      {"OffsetsOutOfBounds", make_file("{\"w\":" + entry("F32", "[2,3]", "[0,48]") + "}", 24), "w",
       "data_offsets [0, 48] run past the end of the 24-byte data buffer"},
      {"OffsetsNotTwoIntegers", make_file("{\"w\":" + entry("F32", "[2]", "[0]") + "}", 8), "w",
       "data_offsets is [0], not [begin, end]"},
      {"NegativeOffset", make_file("{\"w\":" + entry("F32", "[2]", "[-8,0]") + "}", 8), "w",
       "data_offsets is [-8,0]"},
      {"ExtentNotShapeTimesSize", make_file("{\"w\":" + entry("F32", "[2,3]", "[0,12]") + "}", 12),
       "w", "data_offsets [0, 12] span 12 bytes but shape [2,3] of F32 needs 24"},
      {"Overlap",
       make_file("{\"a\":" + entry("F32", "[4]", "[0,16]") +
                     ",\"b\":" + entry("F32", "[4]", "[8,24]") + "}",
                 24),
       "b", "data_offsets [8, 24] overlap tensor \"a\" at [0, 16)"},
      {"ZeroSizedTensorInsideAnother",
       make_file("{\"a\":" + entry("F32", "[4]", "[0,16]") +
                     ",\"z\":" + entry("F32", "[0]", "[8,8]") + "}",
                 16),
       "z", "overlap tensor \"a\""},
      {"Gap",
       make_file("{\"a\":" + entry("F32", "[2]", "[0,8]") +
                     ",\"b\":" + entry("F32", "[2]", "[16,24]") + "}",
                 24),
       "b", "data_offsets [16, 24] leave bytes [8, 16) unused after tensor \"a\""},
      {"GapAtStart", make_file("{\"a\":" + entry("F32", "[2]", "[8,16]") + "}", 16), "a",
       "leave bytes [0, 8) of the data buffer unused"},
      {"TrailingBytes", make_file("{\"a\":" + entry("F32", "[2]", "[0,8]") + "}", 12), "",
       "the data buffer has 12 bytes but the tensors cover only the first 8 (4 trailing bytes)"},
      {"DataWithoutTensors", make_file("{}", 8), "", "(8 trailing bytes)"},
      {"DuplicateTensorName",
       make_file("{\"w\":" + entry("F32", "[1]", "[0,4]") +
                     ",\"w\":" + entry("F32", "[1]", "[4,8]") + "}",
                 8),
       "w", "named twice in the header"},
      {"DuplicateKeyInEntry",
       make_file(R"({"w":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 4), "w",
       "key \"dtype\" appears twice"},
      {"MetadataNotAnObject", make_file(R"({"__metadata__":["a"]})", 0), "",
       "__metadata__ is a JSON array [\"a\"], not an object"},
      {"MetadataValueNotAString", make_file(R"({"__metadata__":{"epoch":3}})", 0), "",
       "__metadata__ key \"epoch\" holds a JSON number 3, not a string"},
      {"DuplicateMetadataKey", make_file(R"({"__metadata__":{"k":"a","k":"b"}})", 0), "",
       "__metadata__: key \"k\" appears twice"},
      {"LongValueCutInMessage", make_file("{\"w\":\"" + std::string(2000, 'x') + "\"}", 0), "w",
       "the entry is a JSON string \"" + std::string(56, 'x') + "..., not an object"},
  };
}

class SafetensorsMalformed : public ::testing::TestWithParam<Malformed> {};

TEST_P(SafetensorsMalformed, OpenThrowsNamingFileTensorAndProblem) {
  const Malformed& c = GetParam();
  const ScratchDir dir;
  const fs::path path = dir.path / (c.name + ".safetensors");
  write_bytes(path, c.bytes);
  try {
    (void)SafetensorsFile::open(path);
    FAIL() << c.name << ": opened without an error";
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind("posenc::io::SafetensorsFile::open: '" + path.string() + "': ", 0), 0U)
        << what;
    if (!c.tensor.empty()) {
      EXPECT_NE(what.find("tensor \"" + c.tensor + "\": "), std::string::npos) << what;
    }
    EXPECT_NE(what.find(c.message), std::string::npos) << what;
  }
  // The same bytes from memory: the validator's own name and the source.
  try {
    (void)parse_safetensors(c.bytes, "mem.safetensors");
    FAIL() << c.name << ": parsed without an error";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("posenc::io::parse_safetensors: 'mem.safetensors': ", 0),
              0U)
        << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SafetensorsMalformed, ::testing::ValuesIn(malformed_cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace posenc::io::safetensors_test
