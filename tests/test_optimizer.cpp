// Optimizers against steps worked out by hand, clipping, the schedule.
#include <moka/model/Optimizer.hpp>

#include <gtest/gtest.h>

#include "TestHelpers.hpp"

#include <cmath>
#include <functional>
#include <string>
#include <vector>

namespace {

using View1 = Kokkos::View<double*, moka::memory_space>;

struct Pair {
  View1 p, g;
};

Pair make(std::vector<double> p, std::vector<double> g) {
  Pair r{View1("p", p.size()), View1("g", g.size())};
  auto hp = Kokkos::create_mirror_view(r.p);
  auto hg = Kokkos::create_mirror_view(r.g);
  for (std::size_t i = 0; i < p.size(); ++i) {
    hp(i) = p[i];
    hg(i) = g[i];
  }
  Kokkos::deep_copy(r.p, hp);
  Kokkos::deep_copy(r.g, hg);
  return r;
}

std::vector<double> values(const View1& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<double>(h.data(), h.data() + h.size());
}

moka::OptimizerConfig constant_lr(moka::OptimizerType type, double lr) {
  moka::OptimizerConfig c;
  c.type = type;
  c.lr = lr;
  c.min_lr_ratio = 1.0;  // constant learning rate
  c.total_steps = 100;
  return c;
}

}  // namespace

TEST(Optimizer, SgdMomentumWithWeightDecay) {
  auto c = constant_lr(moka::OptimizerType::sgd, 0.1);
  c.momentum = 0.9;
  c.weight_decay = 0.01;
  auto t = make({1.0, -2.0}, {0.5, 1.0});
  moka::Optimizer<double> opt(c);
  opt.add(t.p, t.g);
  moka::execution_space space;
  opt.step(space);
  // g' = g + 0.01 p = (0.51, 0.98); buf = g'; p -= 0.1 buf
  auto p = values(t.p);
  EXPECT_NEAR(p[0], 0.949, 1e-15);
  EXPECT_NEAR(p[1], -2.098, 1e-15);
  opt.step(space);
  // g' = (0.50949, 0.97902); buf = 0.9 (0.51, 0.98) + g' = (0.96849, 1.86102)
  p = values(t.p);
  EXPECT_NEAR(p[0], 0.852151, 1e-15);
  EXPECT_NEAR(p[1], -2.284102, 1e-15);
}

TEST(Optimizer, AdamBiasCorrection) {
  auto c = constant_lr(moka::OptimizerType::adam, 0.1);
  auto t = make({1.0}, {0.5});
  moka::Optimizer<double> opt(c);
  opt.add(t.p, t.g);
  moka::execution_space space;
  opt.step(space);
  // m = 0.05, v = 0.00025, mhat = 0.5, vhat = 0.25: p = 1 - 0.1 * 0.5 / (0.5 + 1e-8)
  EXPECT_NEAR(values(t.p)[0], 1.0 - 0.1 * 0.5 / (0.5 + 1e-8), 1e-15);
  opt.step(space);
  // m = 0.095, v = 0.00049975, corrections 0.19 and 0.001999: again mhat = 0.5, vhat = 0.25
  EXPECT_NEAR(values(t.p)[0], 1.0 - 2 * 0.1 * 0.5 / (0.5 + 1e-8), 1e-14);
}

TEST(Optimizer, AdamL2AndAdamWDecoupledDecay) {
  moka::execution_space space;
  {
    auto c = constant_lr(moka::OptimizerType::adam, 0.1);
    c.weight_decay = 0.1;
    auto t = make({1.0}, {0.5});
    moka::Optimizer<double> opt(c);
    opt.add(t.p, t.g);
    opt.step(space);
    // g' = 0.6: mhat = 0.6, vhat = 0.36
    EXPECT_NEAR(values(t.p)[0], 1.0 - 0.1 * 0.6 / (0.6 + 1e-8), 1e-15);
  }
  {
    auto c = constant_lr(moka::OptimizerType::adamw, 0.1);
    c.weight_decay = 0.1;
    auto t = make({1.0}, {0.5});
    moka::Optimizer<double> opt(c);
    opt.add(t.p, t.g);
    opt.step(space);
    // p = 1 - 0.1 * 0.1 * 1 = 0.99, then the Adam step of g = 0.5
    EXPECT_NEAR(values(t.p)[0], 0.99 - 0.1 * 0.5 / (0.5 + 1e-8), 1e-15);
  }
}

TEST(Optimizer, GlobalNormClipping) {
  auto c = constant_lr(moka::OptimizerType::sgd, 1.0);
  c.momentum = 0;
  c.clip_norm = 1.0;
  auto a = make({0.0}, {3.0});
  auto b = make({0.0}, {4.0});  // the norm spans tensors: sqrt(9 + 16) = 5
  moka::Optimizer<double> opt(c);
  opt.add(a.p, a.g);
  opt.add(b.p, b.g);
  moka::execution_space space;
  EXPECT_DOUBLE_EQ(opt.grad_norm(space), 5.0);
  EXPECT_DOUBLE_EQ(opt.step(space), 5.0);
  EXPECT_NEAR(values(a.p)[0], -0.6, 1e-6);
  EXPECT_NEAR(values(b.p)[0], -0.8, 1e-6);
}

TEST(Optimizer, WarmupCosineSchedule) {
  moka::OptimizerConfig c;
  c.lr = 1.0;
  c.warmup_steps = 10;
  c.total_steps = 110;
  c.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(c.learning_rate(0), 0.1);
  EXPECT_DOUBLE_EQ(c.learning_rate(4), 0.5);
  EXPECT_DOUBLE_EQ(c.learning_rate(9), 1.0);
  EXPECT_DOUBLE_EQ(c.learning_rate(10), 1.0);
  EXPECT_NEAR(c.learning_rate(60), 0.55, 1e-15);
  EXPECT_NEAR(c.learning_rate(110), 0.1, 1e-15);
  EXPECT_NEAR(c.learning_rate(500), 0.1, 1e-15);
}

TEST(Optimizer, BadConfigurations) {
  moka::OptimizerConfig c;
  c.lr = 0;
  EXPECT_THROW(c.validate(), moka::Error);
  c.lr = 1e-3;
  c.beta2 = 1.0;
  EXPECT_THROW(moka::Optimizer<double>{c}, moka::Error);
  c.beta2 = 0.999;
  EXPECT_THROW(moka::optimizer_type_from_string("lamb"), moka::Error);
  moka::Optimizer<double> opt(c);
  View1 p("p", 3), g("g", 4);
  EXPECT_THROW(opt.add(p, g), moka::Error);
  // A warmup longer than the run is valid (the driver warns): the rate
  // climbs all run long.
  c.total_steps = 10;
  c.warmup_steps = 20;
  EXPECT_NO_THROW(c.validate());
  EXPECT_DOUBLE_EQ(c.learning_rate(9), 0.5 * c.lr);
}

TEST(Optimizer, Bf16CopyFollowsEveryUpdate) {
  // A registered bf16 copy equals bf16(param) after each step (SGD and
  // AdamW), the operand MoELayer's bf16 GEMMs read when the optimizer
  // manages the copies.
  for (auto type : {moka::OptimizerType::sgd, moka::OptimizerType::adamw}) {
    auto c = constant_lr(type, 0.05);
    c.weight_decay = 0.1;
    auto t = make({1.0, -2.0, 0.3}, {0.5, 1.0, -0.25});
    Kokkos::View<moka::bf16*, moka::memory_space> copy("copy", 3);
    moka::Optimizer<double> opt(c);
    opt.add(t.p, t.g, copy.data());
    moka::execution_space space;
    for (int s = 0; s < 3; ++s) {
      opt.step(space);
      space.fence();
      const auto p = values(t.p);
      auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), copy);
      for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(float(h(i)), float(moka::bf16(float(p[i])))) << "step " << s << " element " << i;
        EXPECT_NE(float(h(i)), 0.0f);
      }
    }
  }
}

TEST(Optimizer, ClippingLeavesGradientsBelowTheLimitAlone) {
  // The same gradients (norm 5) with a limit above the norm: the update is
  // the plain one, not one scaled up to the limit.
  auto c = constant_lr(moka::OptimizerType::sgd, 1.0);
  c.momentum = 0;
  c.clip_norm = 10.0;
  auto a = make({0.0}, {3.0});
  auto b = make({0.0}, {4.0});
  moka::Optimizer<double> opt(c);
  opt.add(a.p, a.g);
  opt.add(b.p, b.g);
  moka::execution_space space;
  EXPECT_DOUBLE_EQ(opt.step(space), 5.0);
  EXPECT_EQ(values(a.p)[0], -3.0);
  EXPECT_EQ(values(b.p)[0], -4.0);
}

// Adam and AdamW over several steps against the textbook update (PyTorch's
// Adam with L2 decay and AdamW with decoupled decay), with a large eps and
// decay so that a misplaced eps (inside the square root, or before the bias
// correction) or decay (decoupled in Adam, coupled or applied after the
// step in AdamW) moves the result by far more than round-off.
TEST(Optimizer, AdamVariantsAgainstTheTextbookUpdate) {
  const std::vector<double> grads = {0.5, -0.2, 0.3, 0.05};
  for (auto type : {moka::OptimizerType::adam, moka::OptimizerType::adamw}) {
    auto c = constant_lr(type, 0.1);
    c.beta1 = 0.8;
    c.beta2 = 0.9;
    c.eps = 0.1;
    c.weight_decay = 0.3;
    auto t = make({1.0}, {0.0});
    moka::Optimizer<double> opt(c);
    opt.add(t.p, t.g);
    moka::execution_space space;
    double p = 1.0, m = 0, v = 0;
    for (std::size_t s = 0; s < grads.size(); ++s) {
      Kokkos::deep_copy(t.g, grads[s]);
      opt.step(space);
      double g = grads[s];
      if (type == moka::OptimizerType::adam) g += c.weight_decay * p;
      else p -= c.lr * c.weight_decay * p;
      m = c.beta1 * m + (1 - c.beta1) * g;
      v = c.beta2 * v + (1 - c.beta2) * g * g;
      const double mhat = m / (1 - std::pow(c.beta1, double(s + 1))), vhat = v / (1 - std::pow(c.beta2, double(s + 1)));
      p -= c.lr * mhat / (std::sqrt(vhat) + c.eps);
      EXPECT_NEAR(values(t.p)[0], p, 1e-14) << (type == moka::OptimizerType::adam ? "adam" : "adamw") << " step "
                                            << s + 1;
    }
  }
}

TEST(Optimizer, SliceStateRoundTrip) {
  // Two optimizers over different tensors take a few steps; the state of
  // a slice of the first (parameter, moments, step count) written into the
  // second at another offset makes the two take identical next steps there.
  moka::execution_space space;
  for (auto type : {moka::OptimizerType::adamw, moka::OptimizerType::sgd}) {
    auto c = constant_lr(type, 0.05);
    c.weight_decay = 0.01;
    auto a = make({1, 2, 3, 4, 5, 6}, {0.1, -0.2, 0.3, -0.4, 0.5, -0.6});
    auto b = make({9, 8, 7, 6, 5, 4, 3, 2}, {0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1});
    moka::Optimizer<double> oa(c), ob(c);
    oa.add(a.p, a.g);
    ob.add(b.p, b.g);
    for (int s = 0; s < 3; ++s) {
      oa.step(space);
      ob.step(space);
    }
    const auto st = oa.read_slice(0, 2, 3);  // elements 2..4 of a
    EXPECT_EQ(st.steps, 3);
    ASSERT_EQ(st.param.size(), 3u);
    EXPECT_EQ(st.v.size(), type == moka::OptimizerType::sgd ? 0u : 3u);
    EXPECT_TRUE(st.bf16_copy.empty());
    ob.write_slice(0, 4, st);  // into elements 4..6 of b
    // The same gradient on both places: the same update, bitwise.
    auto ga = Kokkos::create_mirror_view(a.g);
    auto gb = Kokkos::create_mirror_view(b.g);
    Kokkos::deep_copy(ga, a.g);
    Kokkos::deep_copy(gb, b.g);
    for (int i = 0; i < 3; ++i) gb(4 + i) = ga(2 + i);
    Kokkos::deep_copy(b.g, gb);
    oa.step(space);
    ob.step(space);
    const auto pa = values(a.p), pb = values(b.p);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(pb[4 + i], pa[2 + i]) << "element " << i;
    // Reading back what was written gives it again; the rest of b is untouched by the write.
    const auto back = ob.read_slice(0, 4, 3), again = oa.read_slice(0, 2, 3);
    EXPECT_EQ(back.param, again.param);
    EXPECT_EQ(back.m, again.m);
    EXPECT_EQ(back.v, again.v);
  }
}

TEST(Optimizer, SliceStateMismatchesAreNamed) {
  auto c = constant_lr(moka::OptimizerType::adamw, 0.05);
  auto a = make({1, 2, 3}, {0.1, 0.2, 0.3});
  moka::Optimizer<double> opt(c);
  opt.add(a.p, a.g);
  const auto msg = moka_test::error_of;
  EXPECT_NE(msg([&] { opt.read_slice(0, 2, 2); }).find("elements [2, 4) outside the tensor's 3"), std::string::npos);
  EXPECT_NE(msg([&] { opt.read_slice(1, 0, 1); }).find("tensor 1 of 1 registered"), std::string::npos);
  auto st = opt.read_slice(0, 0, 2);
  st.steps = 7;
  EXPECT_NE(msg([&] { opt.write_slice(0, 0, st); }).find("from step 7, this optimizer is at step 0"),
            std::string::npos);
  st.steps = 0;
  st.v.clear();
  EXPECT_NE(msg([&] { opt.write_slice(0, 0, st); }).find("2 first and 0 second moments for 2 elements"),
            std::string::npos);
  opt.set_steps_taken(5);
  EXPECT_EQ(opt.steps_taken(), 5);
}
