// SPDX-License-Identifier: MIT
// The lab's hand-written backward against central finite differences, in double, on a tiny model
// with every encoding of the lab: each parameter of the model and of the encoder (every one
// checked, not a sample). Also: training is deterministic for a given thread count, and the corpus
// split is a pure function of the path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "corpus.hpp"
#include "model.hpp"
#include "optimizer.hpp"

namespace {

/// POSENC_TEST_SEED overrides the seed (printed by each test).
std::uint64_t test_seed() {
  const char* env = std::getenv("POSENC_TEST_SEED");
  return env != nullptr ? std::strtoull(env, nullptr, 10) : 20240917ull;
}

lab::ModelConfig tiny_config() {
  lab::ModelConfig config;
  config.layers = 2;
  config.width = 8;
  config.heads = 2;
  config.mlp_ratio = 2;
  config.train_length = 7;
  return config;
}

/// Random bytes as inputs and targets, (B, T).
void random_tokens(std::vector<int>& inputs, std::vector<int>& targets, lab::Index count,
                   std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  inputs.resize(static_cast<std::size_t>(count));
  targets.resize(static_cast<std::size_t>(count));
  for (auto& x : inputs) x = static_cast<int>(rng() % 256);
  for (auto& x : targets) x = static_cast<int>(rng() % 256);
}

template <class Adapter>
class LabGradient : public ::testing::Test {};

using Adapters = ::testing::Types<lab::Nope<double>, lab::Rope<double>, lab::Alibi<double>,
                                  lab::KerpleLog<double>, lab::T5<double>>;
TYPED_TEST_SUITE(LabGradient, Adapters);

/// ∂L/∂θ of the whole model (embedding, blocks, attention with the encoding, tied head,
/// cross-entropy) equals (L(θ + h) − L(θ − h)) / 2h for every parameter θ. Central differences
/// have truncation error O(h²·L''') ≈ 1e-12 at h = 1e-5 and rounding error ~eps·|L|/h ≈ 1e-10
/// (|L| ≈ 5.5); the tolerance 1e-7·(1 + |g|) leaves a factor ~100 over both.
TYPED_TEST(LabGradient, MatchesCentralFiniteDifferences) {
  const std::uint64_t seed = test_seed();
  std::printf("seed %llu (POSENC_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  const lab::ModelConfig config = tiny_config();
  Eigen::setNbThreads(1);  // as the lab: it splits its products itself
  lab::Model<TypeParam> model(config, seed);
  model.set_threads(1);  // thousands of tiny forwards: threads would only add OpenMP barriers
  auto& theta = model.parameters();
  // Larger weights than GPT-2's 0.02, so that attention and the MLP are far from linear and every
  // path carries a gradient well above the finite-difference noise.
  std::mt19937_64 rng(seed + 1);
  std::normal_distribution<double> normal(0.0, 0.5);
  for (const lab::TensorSpec& spec : model.layout().specs()) {
    if (spec.encoder) continue;
    for (lab::Index i = 0; i < spec.size(); ++i) theta[spec.offset + i] += normal(rng);
  }
  if constexpr (std::is_same_v<TypeParam, lab::KerpleLog<double>>) {
    // Keep r1, r2 away from the clamp at 0.01, where the loss is not differentiable.
    for (const lab::TensorSpec& spec : model.layout().specs()) {
      if (!spec.encoder) continue;
      for (lab::Index i = 0; i < spec.size(); ++i) {
        theta[spec.offset + i] = 0.2 + 0.1 * static_cast<double>(i) + 0.05 * normal(rng);
      }
    }
  }
  model.parameters_changed();

  const lab::Index B = 2, T = config.train_length;
  std::vector<int> inputs, targets;
  random_tokens(inputs, targets, B * T, seed + 2);
  const double loss = model.forward(inputs.data(), targets.data(), B, T);
  ASSERT_TRUE(std::isfinite(loss));
  model.backward();
  const posenc::Vector<double> analytic = model.gradients();
  ASSERT_TRUE(analytic.allFinite());

  const double h = 1e-5;
  double worst = 0.0;
  std::string worst_name;
  lab::Index checked = 0, encoder_checked = 0;
  for (const lab::TensorSpec& spec : model.layout().specs()) {
    for (lab::Index i = 0; i < spec.size(); ++i) {
      const lab::Index at = spec.offset + i;
      const double saved = theta[at];
      theta[at] = saved + h;
      model.parameters_changed();
      const double plus = model.forward(inputs.data(), targets.data(), B, T);
      theta[at] = saved - h;
      model.parameters_changed();
      const double minus = model.forward(inputs.data(), targets.data(), B, T);
      theta[at] = saved;
      const double numeric = (plus - minus) / (2 * h);
      const double error = std::abs(numeric - analytic[at]) / (1.0 + std::abs(numeric));
      if (error > worst) {
        worst = error;
        worst_name = spec.name + "[" + std::to_string(i) + "]";
      }
      EXPECT_LT(error, 1e-7) << spec.name << "[" << i << "]: analytic " << analytic[at]
                             << ", numeric " << numeric;
      ++checked;
      if (spec.encoder) ++encoder_checked;
    }
  }
  model.parameters_changed();
  std::printf("%s: %ld parameters (%ld of the encoder) checked, worst relative error %.2e at %s\n",
              std::string(TypeParam::name).c_str(), static_cast<long>(checked),
              static_cast<long>(encoder_checked), worst, worst_name.c_str());
  EXPECT_EQ(checked, model.layout().total());
  if (!TypeParam::parameters(config).empty()) {
    EXPECT_GT(encoder_checked, 0);
  }
  // The gradient is not trivially zero where it should not be.
  EXPECT_GT(analytic.cwiseAbs().maxCoeff(), 1e-3);
}

/// Two runs with the same seed and thread count give the same parameters, bit for bit.
TYPED_TEST(LabGradient, TrainingIsDeterministic) {
  const std::uint64_t seed = test_seed();
  const lab::ModelConfig config = tiny_config();
  auto run = [&] {
    lab::Model<TypeParam> model(config, seed);
    model.set_threads(2);
    lab::AdamW<double> optimizer(model.layout(),
                                 {.learning_rate = 1e-2, .warmup_steps = 1, .total_steps = 3});
    std::vector<int> inputs, targets;
    for (int step = 0; step < 3; ++step) {
      random_tokens(inputs, targets, 3 * config.train_length, seed + static_cast<unsigned>(step));
      model.forward(inputs.data(), targets.data(), 3, config.train_length);
      model.backward();
      optimizer.step(model.parameters(), model.gradients());
      model.parameters_changed();
    }
    return posenc::Vector<double>(model.parameters());
  };
  const posenc::Vector<double> first = run();
  const posenc::Vector<double> second = run();
  ASSERT_TRUE(first.allFinite());
  EXPECT_TRUE((first.array() == second.array()).all());
}

/// The products split over threads (layers.hpp) compute the same gradients, up to rounding, for
/// one and two threads (B·T = 160 rows: two blocks). In double the sums differ only in order:
/// 1e-12 relative is ~1e4·eps.
TYPED_TEST(LabGradient, ThreadCountChangesOnlyRounding) {
  const lab::ModelConfig config = tiny_config();
  std::vector<int> inputs, targets;
  random_tokens(inputs, targets, 4 * 40, test_seed() + 3);
  auto gradients = [&](int threads) {
    Eigen::setNbThreads(1);
    lab::Model<TypeParam> model(config, test_seed());
    model.set_threads(threads);
    model.forward(inputs.data(), targets.data(), 4, 40);
    model.backward();
    return posenc::Vector<double>(model.gradients());
  };
  const posenc::Vector<double> one = gradients(1);
  const posenc::Vector<double> two = gradients(2);
  ASSERT_TRUE(one.allFinite() && two.allFinite());
  EXPECT_LT((one - two).cwiseAbs().maxCoeff(), 1e-12 * (1.0 + one.cwiseAbs().maxCoeff()));
}

TEST(LabCorpus, SplitIsAPureFunctionOfThePath) {
  EXPECT_EQ(lab::fnv1a(""), 0xcbf29ce484222325ull);   // the FNV-1a offset basis
  EXPECT_EQ(lab::fnv1a("a"), 0xaf63dc4c8601ec8cull);  // published test vector
  int held = 0;
  for (int i = 0; i < 1000; ++i) held += lab::is_held_out("dir/file" + std::to_string(i) + ".py");
  EXPECT_GT(held, 60);  // about 10 %
  EXPECT_LT(held, 140);
}

TEST(LabCorpus, MissingDirectoryIsAClearError) {
  try {
    lab::load_corpus("/nonexistent/posenc-lab-corpus");
    FAIL() << "no exception";
  } catch (const lab::CorpusError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/posenc-lab-corpus"), std::string::npos);
  }
}

}  // namespace
