// SPDX-License-Identifier: MIT
// Mask semantics on absolute positions and the exactness of whole-tile classification.
#include "posenc/mask.hpp"

#include <gtest/gtest.h>

#include "support/test_support.hpp"

namespace posenc {
namespace {

TEST(MaskTest, Semantics) {
  EXPECT_TRUE(Mask::none().allows(0, 100));
  EXPECT_TRUE(Mask::causal().allows(5, 5));
  EXPECT_FALSE(Mask::causal().allows(5, 6));
  EXPECT_TRUE(Mask::causal().allows(-3, -10));
  const Mask window = Mask::sliding_window(3);  // i-2 .. i
  EXPECT_TRUE(window.allows(10, 8));
  EXPECT_FALSE(window.allows(10, 7));
  EXPECT_FALSE(window.allows(10, 11));
  EXPECT_TRUE(Mask::sliding_window(1).allows(4, 4));
  EXPECT_FALSE(Mask::sliding_window(1).allows(4, 3));
}

// The XPos paper's blockwise causal attention, w = 4, T = 7
// (docs/reference/xpos_bca_resolution_trf.md §2): rows are queries, x = allowed.
TEST(MaskTest, BlockwiseCausalMatchesThePaperPattern) {
  const char* expected[] = {"x......", "xx.....", "xxx....", "xxxx...",
                            "..xxx..", "..xxxx.", "....xxx"};
  const Mask bca = Mask::blockwise_causal(4);
  for (Index i = 0; i < 7; ++i) {
    for (Index j = 0; j < 7; ++j) {
      EXPECT_EQ(bca.allows(i, j), expected[i][j] == 'x') << "query " << i << " key " << j;
    }
  }
  // Sequences no longer than the window are plain causal.
  for (Index i = 0; i < 4; ++i) {
    for (Index j = 0; j < 8; ++j) EXPECT_EQ(bca.allows(i, j), Mask::causal().allows(i, j));
  }
  // Negative positions use floor division.
  EXPECT_EQ(bca.key_range(-1).first, -4);
}

TEST(MaskTest, TileClassificationIsExact) {
  // For every small tile, "all" and "none" must be true of every pair; "partial" is allowed
  // to be conservative only when the tile really is mixed.
  for (const Mask& mask :
       {Mask::none(), Mask::causal(), Mask::sliding_window(1), Mask::sliding_window(4),
        Mask::blockwise_causal(2), Mask::blockwise_causal(6)}) {
    for (Index q0 = -6; q0 < 12; ++q0) {
      for (Index q1 = q0; q1 < q0 + 5; ++q1) {
        for (Index k0 = -6; k0 < 12; ++k0) {
          for (Index k1 = k0; k1 < k0 + 5; ++k1) {
            bool any = false;
            bool every = true;
            for (Index i = q0; i <= q1; ++i) {
              for (Index j = k0; j <= k1; ++j) {
                any = any || mask.allows(i, j);
                every = every && mask.allows(i, j);
              }
            }
            const TileCoverage got = mask.classify(q0, q1, k0, k1);
            const TileCoverage want =
                every ? TileCoverage::all : (any ? TileCoverage::partial : TileCoverage::none);
            ASSERT_EQ(got, want) << "mask kind " << static_cast<int>(mask.kind()) << " queries ["
                                 << q0 << "," << q1 << "] keys [" << k0 << "," << k1 << "]";
          }
        }
      }
    }
  }
}

TEST(MaskTest, BadWindowsThrow) {
  POSENC_EXPECT_INVALID(Mask::sliding_window(0), "posenc::Mask::sliding_window", "got 0");
  POSENC_EXPECT_INVALID(Mask::blockwise_causal(7), "posenc::Mask::blockwise_causal", "even",
                        "got 7");
  POSENC_EXPECT_INVALID(Mask::blockwise_causal(0), "posenc::Mask::blockwise_causal", "got 0");
}

}  // namespace
}  // namespace posenc
