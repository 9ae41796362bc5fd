// SPDX-License-Identifier: MIT
// The SPE gate: the mixture of code and shared noise, the PyTorch/JAX conventions, bad input.
#include "posenc/encoders/spe_gate.hpp"

#include <gtest/gtest.h>

#include <cmath>

#include "posenc/encoders/sine_spe.hpp"
#include "support/test_support.hpp"

namespace posenc::test {
namespace {

TEST(SpeGate, MixesCodeAndSharedNoise) {
  const Index H = 2, D = 3, R = 5;
  const auto parameters = SineSpeParameters<double>::initial(H, D, 2, 4);
  const auto draw = SineSpeDraw<double>::sample(H, D, 2, R, 5);
  Matrix<double> gate(H, D);
  gate << -1.0, 0.0, 2.0, 0.5, -3.0, 1.0;
  const SpeGate<double> spe_gate = SpeGate<double>::sample(gate, R, 6);
  const SineSpe<double> plain(parameters, draw);
  const SineSpe<double> gated(parameters, draw, spe_gate);
  const double noise_scale = std::pow(static_cast<double>(D * R), -0.25);
  for (Index h = 0; h < H; ++h) {
    for (const Index m : {Index{0}, Index{9}}) {
      const Matrix<double> code = plain.query_code(h, m);
      const Matrix<double> key = plain.key_code(h, m);
      for (Index d = 0; d < D; ++d) {
        const double sigma = 1.0 / (1.0 + std::exp(-gate(h, d)));
        const Matrix<double> noise = spe_gate.noise().head(h).row(d) * noise_scale;
        const Matrix<double> expected_q =
            std::sqrt(1.0 - sigma) * code.row(d) + std::sqrt(sigma) * noise;
        const Matrix<double> expected_k =
            std::sqrt(1.0 - sigma) * key.row(d) + std::sqrt(sigma) * noise;
        EXPECT_LE(relative_error(Matrix<double>(gated.query_code(h, m).row(d)), expected_q), 1e-14);
        EXPECT_LE(relative_error(Matrix<double>(gated.key_code(h, m).row(d)), expected_k), 1e-14);
      }
    }
  }
}

TEST(SpeGate, JaxConventionIsPytorchWithNegatedGate) {
  const Index H = 1, D = 4, R = 3;
  Matrix<double> gate(H, D);
  gate << 0.3, -1.2, 2.0, 0.0;
  const Heads<double> noise = [] {
    auto rng = make_rng(31);
    return random_heads<double>(1, 4, 3, rng);
  }();
  const SpeGate<double> jax(gate, noise, SpeGateConvention::jax);
  const SpeGate<double> torch(-gate, noise);
  for (Index d = 0; d < D; ++d) {
    EXPECT_NEAR(jax.code_weight(0, d), torch.code_weight(0, d), 1e-15);
    EXPECT_NEAR(jax.noise_weight(0, d), torch.noise_weight(0, d), 1e-15);
    EXPECT_NEAR(jax.code_weight(0, d) * jax.code_weight(0, d) +
                    jax.noise_weight(0, d) * jax.noise_weight(0, d),
                1.0, 1e-15);
  }
  EXPECT_LE(relative_error(jax.noise_code(0), torch.noise_code(0)), 1e-15);
  (void)R;
}

TEST(SpeGate, BadInputIsRejected) {
  POSENC_EXPECT_INVALID(SpeGate<double>::sample(Matrix<double>::Zero(2, 3), 0, 1),
                        "posenc::SpeGate::sample", "R must be >= 1, got 0");
  POSENC_EXPECT_INVALID(SpeGate<double>(Matrix<double>::Zero(2, 3), Heads<double>(2, 4, 5)),
                        "posenc::SpeGate", "noise must be [heads, dim, R] = [2, 3, R]",
                        "got [2, 4, 5]");
  POSENC_EXPECT_INVALID(SpeGate<double>(Matrix<double>::Zero(0, 3), Heads<double>(0, 3, 5)),
                        "gate must be [heads >= 1, dim >= 1]");
}

}  // namespace
}  // namespace posenc::test
