#include "posenc/attention.hpp"
#include "support/test_support.hpp"
TEST(Smoke, Runs) { EXPECT_TRUE(true); }
