// SPDX-License-Identifier: MIT
// Heads and HeadsView: layouts, strides, conversions and argument checks.
#include "posenc/tensor.hpp"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "support/test_support.hpp"

namespace posenc {
namespace {

TEST(TensorTest, HeadsMajorAndTokensMajorAddressTheSameElements) {
  const Index H = 3;
  const Index N = 4;
  const Index D = 5;
  std::vector<float> buffer(static_cast<std::size_t>(H * N * D));
  std::iota(buffer.begin(), buffer.end(), 0.0f);
  const auto hnd = HeadsView<float>::heads_major(buffer.data(), H, N, D);
  const auto nhd = HeadsView<float>::tokens_major(buffer.data(), N, H, D);
  for (Index h = 0; h < H; ++h) {
    for (Index t = 0; t < N; ++t) {
      for (Index d = 0; d < D; ++d) {
        EXPECT_EQ(hnd(h, t, d), static_cast<float>((h * N + t) * D + d));
        EXPECT_EQ(nhd(h, t, d), static_cast<float>((t * H + h) * D + d));
        EXPECT_EQ(nhd.head(h)(t, d), nhd(h, t, d));
      }
    }
  }
  const HeadsView<const float> read_only = nhd;
  EXPECT_EQ(read_only.row_stride(), H * D);
  EXPECT_EQ(read_only.middle_rows(1, 2)(2, 1, 3), nhd(2, 2, 3));
}

TEST(TensorTest, HeadsOwnsZeroedStorage) {
  Heads<double> x(2, 3, 4);
  EXPECT_EQ(x.flat().size(), 24);
  EXPECT_EQ(x.flat().cwiseAbs().maxCoeff(), 0.0);
  x.head(1)(2, 3) = 7.0;
  EXPECT_EQ(x(1, 2, 3), 7.0);
  EXPECT_EQ(x.view()(1, 2, 3), 7.0);
}

TEST(TensorTest, BadShapesThrow) {
  std::vector<float> buffer(8);
  POSENC_EXPECT_INVALID(HeadsView<float>(buffer.data(), -1, 2, 2, 4, 2), "posenc::HeadsView",
                        "heads -1");
  POSENC_EXPECT_INVALID(HeadsView<float>(buffer.data(), 1, 2, 4, 8, 3), "row_stride 3",
                        "must be >= dim 4");
  POSENC_EXPECT_INVALID(HeadsView<float>(nullptr, 1, 2, 2, 4, 2), "null data", "[1, 2, 2]");
  POSENC_EXPECT_INVALID(Heads<float>(2, -3, 4), "posenc::Heads", "rows -3");
  const auto view = HeadsView<float>::heads_major(buffer.data(), 1, 4, 2);
  POSENC_EXPECT_INVALID(view.middle_rows(3, 2), "posenc::HeadsView::middle_rows", "[3, 5)",
                        "4 rows");
}

}  // namespace
}  // namespace posenc
