// The MoE layer against the double-precision reference (tests/MoEReference.hpp)
// for every gate x activation x capacity mode: outputs, routing, drops, and
// every gradient against central finite differences of the reference.

#include <moka/moe/MoELayer.hpp>
#include <moka/model/MoEModel.hpp>
#include <moka/io/RoutingTrace.hpp>

#include <gtest/gtest.h>

#include "MoETestUtils.hpp"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <array>
#include <cstdlib>
#include <numeric>
#include <random>
#include <sstream>

using namespace moka_test;

namespace {

template <class S>
using HostLayer = moka::MoELayer<S, Kokkos::HostSpace>;
template <class S>
using DevLayer = moka::MoELayer<S, moka::memory_space>;

struct Case {
  moka::GateType gate;
  bool renorm;
  moka::Activation act;
  bool dropless;
  moka::DropPolicy policy;
  bool bias;
  std::string name() const {
    std::ostringstream os;
    os << moka::to_string(gate) << (renorm ? "+renorm" : "") << "/" << moka::to_string(act) << "/"
       << (dropless ? "dropless" : std::string("cap:") + moka::to_string(policy)) << (bias ? "" : "/nobias");
    return os.str();
  }
};

// gtest prints parameters with this (instead of their bytes).
void PrintTo(const Case& c, std::ostream* os) { *os << c.name(); }

moka::MoEConfig make_config(const Case& c) {
  moka::MoEConfig cfg;
  cfg.d_model = 6;
  cfg.d_ff = 5;
  cfg.num_experts = 4;
  cfg.top_k = 2;
  cfg.gate = c.gate;
  cfg.renormalize = c.renorm;
  cfg.activation = c.act;
  cfg.dropless = c.dropless;
  cfg.capacity_factor = 0.75;  // ceil(0.75 * 12 * 2 / 4) = 5: drops happen
  cfg.drop_policy = c.policy;
  cfg.expert_bias = c.bias;
  return cfg;
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  const std::pair<moka::GateType, bool> gates[] = {{moka::GateType::topk, false},
                                                   {moka::GateType::softmax, false},
                                                   {moka::GateType::softmax, true},
                                                   {moka::GateType::zero, false}};
  const moka::Activation acts[] = {moka::Activation::gelu_erf, moka::Activation::gelu_tanh, moka::Activation::relu,
                                   moka::Activation::silu, moka::Activation::swiglu};
  for (auto g : gates)
    for (auto a : acts) {
      cases.push_back({g.first, g.second, a, true, moka::DropPolicy::position, true});
      cases.push_back({g.first, g.second, a, false, moka::DropPolicy::position, true});
      cases.push_back({g.first, g.second, a, false, moka::DropPolicy::score, true});
    }
  cases.push_back({moka::GateType::topk, false, moka::Activation::gelu_erf, false, moka::DropPolicy::score, false});
  return cases;
}

}  // namespace

class MoELayerCases : public ::testing::TestWithParam<Case> {};

TEST_P(MoELayerCases, Fp64MatchesReferenceAndFiniteDifferences) {
  const Case c = GetParam();
  const moka::MoEConfig cfg = make_config(c);
  const int T = 12;
  std::mt19937_64 rng(42);
  HostLayer<double> L(cfg);
  L.init_parameters(7);
  RefParams p = params_of(L);
  if (c.bias) {  // non-zero biases, so their use is checked too
    p.b1 = random_vec(p.b1.size(), rng, 0.3);
    p.b2 = random_vec(p.b2.size(), rng, 0.3);
    set_params(L, p);
  }
  const auto x = random_vec(T * cfg.d_model, rng, 1.5);
  const auto G = random_vec(T * cfg.d_model, rng);
  RefRouting ref_routing;
  const auto y_ref = moka_test::ref_forward(cfg, T, x, p, &ref_routing);
  const auto r = run_layer(L, T, x, G);
  SCOPED_TRACE(c.name());

  // Forward and routing.
  EXPECT_LT(max_rel_err(r.y, y_ref), 1e-13);
  EXPECT_EQ(r.routing.idx, ref_routing.idx);
  EXPECT_EQ(r.routing.kept, ref_routing.kept);
  expect_close(r.routing.score, ref_routing.score, 1e-15, 1e-13, "scores");
  const long cap = cfg.capacity(T);
  long kept_total = 0;
  for (int e = 0; e < cfg.num_experts; ++e) {
    EXPECT_LE(r.counts[e], cap) << "expert " << e;
    kept_total += r.counts[e];
  }
  EXPECT_EQ(kept_total, std::count(ref_routing.kept.begin(), ref_routing.kept.end(), 1));
  if (!c.dropless && c.gate != moka::GateType::zero) EXPECT_LT(kept_total, T * cfg.top_k) << "no drops";

  // Gradients against central differences of the reference.
  const double atol = 2e-8, rtol = 1e-6;
  expect_close(r.dx, fd_grad(cfg, T, x, p, G, Wrt::x), atol, rtol, "dx");
  expect_close(r.dwg, fd_grad(cfg, T, x, p, G, Wrt::wg), atol, rtol, "dWg");
  expect_close(r.dw1, fd_grad(cfg, T, x, p, G, Wrt::w1), atol, rtol, "dW1");
  expect_close(r.dw2, fd_grad(cfg, T, x, p, G, Wrt::w2), atol, rtol, "dW2");
  if (c.bias) {
    expect_close(r.db1, fd_grad(cfg, T, x, p, G, Wrt::b1), atol, rtol, "db1");
    expect_close(r.db2, fd_grad(cfg, T, x, p, G, Wrt::b2), atol, rtol, "db2");
  } else {
    EXPECT_TRUE(r.db1.empty() && r.db2.empty());
  }
}

TEST_P(MoELayerCases, DefaultSpaceMatchesReference) {
  // The same case on the default execution space (the GPU on CUDA builds),
  // in fp64 and fp32.
  const Case c = GetParam();
  const moka::MoEConfig cfg = make_config(c);
  const int T = 12;
  std::mt19937_64 rng(43);
  DevLayer<double> L64(cfg);
  DevLayer<float> L32(cfg);
  L64.init_parameters(9);
  L32.init_parameters(9);
  RefParams p = params_of(L64);
  const auto x = random_vec(T * cfg.d_model, rng, 1.5);
  const auto G = random_vec(T * cfg.d_model, rng);
  RefRouting ref_routing;
  const auto y_ref = moka_test::ref_forward(cfg, T, x, p, &ref_routing);
  SCOPED_TRACE(c.name());
  const auto r64 = run_layer(L64, T, x, G);
  EXPECT_LT(max_rel_err(r64.y, y_ref), 1e-13);
  EXPECT_EQ(r64.routing.kept, ref_routing.kept);
  // fp32: same routing on this data; outputs to float round-off.
  const auto r32 = run_layer(L32, T, x, G);
  EXPECT_EQ(r32.routing.idx, ref_routing.idx);
  EXPECT_LT(max_rel_err(r32.y, y_ref), 2e-6);
  EXPECT_LT(max_rel_err(r32.dx, r64.dx), 2e-5);
  EXPECT_LT(max_rel_err(r32.dw1, r64.dw1), 2e-5);
  EXPECT_LT(max_rel_err(r32.dwg, r64.dwg), 2e-5);
}

// expert.gemm_batched = true: every expert's rows padded to the largest
// count (the padding rows zeroed where they enter a gradient) give what the
// packed rows give, for every gate, activation and capacity mode (drops,
// experts with no rows, biases); on the host in fp64 and on the default
// space in fp32 (the GPU on CUDA builds, where the fp32 GEMMs still loop
// over the experts; the bf16 strided-batched GEMMs: test_moe_bf16).
TEST_P(MoELayerCases, PaddedRowsMatchPackedRows) {
  const Case c = GetParam();
  moka::MoEConfig cfg = make_config(c);
  cfg.gemm_batched    = moka::GemmChoice::off;
  moka::MoEConfig cfg_p = cfg;
  cfg_p.gemm_batched    = moka::GemmChoice::on;
  SCOPED_TRACE(c.name());
  std::mt19937_64 rng(44);
  auto check = [&](auto& L, auto& Lp, double tol) {
    L.init_parameters(11);
    Lp.init_parameters(11);
    if (c.bias) {  // non-zero biases: the padding rows' forward values are not zero then
      RefParams p = params_of(L);
      p.b1 = random_vec(p.b1.size(), rng, 0.3);
      p.b2 = random_vec(p.b2.size(), rng, 0.3);
      set_params(L, p);
      set_params(Lp, p);
    }
    // A larger step first: rows that held data then are padding in the
    // second step, over the same buffers.
    for (const int T : {20, 12}) {
      const auto x = random_vec(T * cfg.d_model, rng, 1.5);
      const auto G = random_vec(T * cfg.d_model, rng);
      const auto a = run_layer(L, T, x, G);
      const auto b = run_layer(Lp, T, x, G);
      EXPECT_EQ(L.padded_rows(), 0);
      long most = 0;
      for (int n : b.counts) most = std::max<long>(most, n);
      EXPECT_EQ(Lp.padded_rows(), (most + 7) / 8 * 8);
      EXPECT_EQ(Lp.expert_rows(), cfg.num_experts * Lp.padded_rows());
      EXPECT_EQ(a.counts, b.counts);
      EXPECT_EQ(a.routing.idx, b.routing.idx);
      EXPECT_EQ(a.routing.kept, b.routing.kept);
      EXPECT_LE(max_rel_err(b.y, a.y), tol);
      EXPECT_LE(max_rel_err(b.dx, a.dx), tol);
      EXPECT_LE(max_rel_err(b.dwg, a.dwg), tol);
      EXPECT_LE(max_rel_err(b.dw1, a.dw1), tol);
      EXPECT_LE(max_rel_err(b.dw2, a.dw2), tol);
      EXPECT_LE(max_rel_err(b.db1, a.db1), tol);
      EXPECT_LE(max_rel_err(b.db2, a.db2), tol);
    }
  };
  {
    HostLayer<double> L(cfg), Lp(cfg_p);
    check(L, Lp, 1e-14);
  }
  {
    DevLayer<float> L(cfg), Lp(cfg_p);
    check(L, Lp, 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(AllGatesActivationsCapacities, MoELayerCases, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           std::string n = info.param.name();
                           for (auto& ch : n)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });

// The float erf and exp of the host's activations (impl::erf_fast,
// impl::exp_fast) against the double library functions, and GeLU and its
// derivative in float against double, over the whole range they see.
TEST(Activations, FastFloatErfAndExpAgainstDouble) {
  double erf_err = 0, exp_err = 0, gelu_err = 0, grad_err = 0;
  for (double x = -12; x <= 12; x += 1.0 / 4096) {
    const float xf = float(x);
    erf_err = std::max(erf_err, std::abs(double(moka::impl::erf_fast(xf)) - std::erf(double(xf))));
    const double g  = 0.5 * double(xf) * (1 + std::erf(double(xf) / std::sqrt(2.0)));
    const double dg = 0.5 * (1 + std::erf(double(xf) / std::sqrt(2.0))) +
                      double(xf) * std::exp(-0.5 * double(xf) * double(xf)) / std::sqrt(2 * M_PI);
    gelu_err = std::max(gelu_err, std::abs(double(moka::impl::activate(moka::Activation::gelu_erf, xf)) - g));
    grad_err = std::max(grad_err, std::abs(double(moka::impl::activate_grad(moka::Activation::gelu_erf, xf)) - dg));
  }
  for (double y = -87; y <= 88; y += 1.0 / 1024) {
    const float yf = float(y);
    exp_err = std::max(exp_err, std::abs(double(moka::impl::exp_fast(yf)) / std::exp(double(yf)) - 1));
  }
  EXPECT_LT(erf_err, 5e-7);
  EXPECT_LT(exp_err, 3e-7);
  EXPECT_LT(gelu_err, 3e-6);  // |x| up to 12: 0.5 |x| times erf's error, plus float rounding
  EXPECT_LT(grad_err, 1e-6);
  std::cout << "float erf within " << erf_err << ", exp within " << exp_err << " (relative), GeLU within " << gelu_err
            << ", its derivative within " << grad_err << "\n";
  // Double stays the library's.
  EXPECT_EQ(moka::impl::act_cdf(0.3), 0.5 * (1 + std::erf(0.3 * 0.70710678118654752440)));
}

TEST(MoELayer, DeterministicAcrossRuns) {
  moka::MoEConfig cfg;
  cfg.d_model = 16;
  cfg.d_ff = 24;
  cfg.num_experts = 8;
  cfg.top_k = 2;
  cfg.dropless = false;
  cfg.capacity_factor = 1.0;
  DevLayer<float> L(cfg);
  L.init_parameters(1);
  std::mt19937_64 rng(5);
  const int T = 300;
  const auto x = random_vec(T * cfg.d_model, rng);
  const auto G = random_vec(T * cfg.d_model, rng);
  const auto a = run_layer(L, T, x, G);
  const auto b = run_layer(L, T, x, G);
  EXPECT_EQ(a.y, b.y);  // bitwise
  EXPECT_EQ(a.dx, b.dx);
  EXPECT_EQ(a.dw1, b.dw1);
  EXPECT_EQ(a.dwg, b.dwg);
}

TEST(MoELayer, ExpertWithNoTokens) {
  // The zero gate sends everything to expert 0: the other experts get no
  // rows, and their gradients stay zero.
  moka::MoEConfig cfg;
  cfg.d_model = 4;
  cfg.d_ff = 3;
  cfg.num_experts = 3;
  cfg.top_k = 1;
  cfg.gate = moka::GateType::zero;
  HostLayer<double> L(cfg);
  L.init_parameters(3);
  std::mt19937_64 rng(1);
  const auto r = run_layer(L, 5, random_vec(20, rng), random_vec(20, rng));
  EXPECT_EQ(r.counts, (std::vector<int>{5, 0, 0}));
  for (std::size_t i = cfg.d_model * cfg.d_ff; i < r.dw1.size(); ++i) EXPECT_EQ(r.dw1[i], 0.0);
}

TEST(MoELayer, ZeroGradOverwritesInsteadOfAccumulating) {
  // zero_grad leaves W1 and W2's gradients to the next backward (beta 0):
  // after a step where every expert had rows, a step where most have none
  // must give exactly a fresh layer's gradients (zeros, not stale values);
  // a second backward without zero_grad accumulates; grads() right after
  // zero_grad reads zeros.
  moka::MoEConfig cfg;
  cfg.d_model = 6;
  cfg.d_ff = 5;
  cfg.num_experts = 4;
  cfg.top_k = 1;
  HostLayer<double> L(cfg), fresh(cfg);
  L.init_parameters(3);
  fresh.init_parameters(3);
  std::mt19937_64 rng(2);
  const auto big = run_layer(L, 40, random_vec(40 * cfg.d_model, rng), random_vec(40 * cfg.d_model, rng));
  for (int c : big.counts) ASSERT_GT(c, 0);
  const auto x = random_vec(cfg.d_model, rng), G = random_vec(cfg.d_model, rng);
  const auto a = run_layer(L, 1, x, G);
  const auto f = run_layer(fresh, 1, x, G);
  EXPECT_EQ(a.dw1, f.dw1);
  EXPECT_EQ(a.dw2, f.dw2);
  EXPECT_EQ(a.db1, f.db1);
  // Accumulation: the same step again without zero_grad doubles them.
  {
    using matrix = HostLayer<double>::matrix;
    HostLayer<double>::execution_space space;
    matrix X("x", 1, cfg.d_model), Y("y", 1, cfg.d_model), DY("dy", 1, cfg.d_model), DX("dx", 1, cfg.d_model);
    from_vec(X, x);
    from_vec(DY, G);
    L.forward(space, X, Y);
    L.backward(space, DY, DX);
    space.fence();
    const auto w1 = to_vec(L.grads().w1), w2 = to_vec(L.grads().w2);
    for (std::size_t i = 0; i < w1.size(); ++i) EXPECT_EQ(w1[i], 2 * a.dw1[i]) << i;
    for (std::size_t i = 0; i < w2.size(); ++i) EXPECT_EQ(w2[i], 2 * a.dw2[i]) << i;
    L.zero_grad(space);
  }
  for (double v : to_vec(L.grads().w1)) EXPECT_EQ(v, 0.0);
  for (double v : to_vec(L.grads().w2)) EXPECT_EQ(v, 0.0);
}

TEST(MoEKernels, SplitBlocksCutsNearlyEqualPieces) {
  // 66 elements under a cap of 64 go as 33 + 33 (not 64 + 2), in order,
  // covering the block; small and empty blocks stay whole.
  std::vector<moka::Communicator::Block> b = {{1, 100, 66}, {2, 0, 64}, {3, 7, 0}, {0, 200, 129}};
  moka::impl::split_blocks(b, 64);
  const std::vector<std::array<long, 3>> want = {{1, 100, 33}, {1, 133, 33}, {2, 0, 64}, {3, 7, 0},
                                                 {0, 200, 43},  {0, 243, 43}, {0, 286, 43}};
  ASSERT_EQ(b.size(), want.size());
  for (std::size_t i = 0; i < b.size(); ++i) {
    EXPECT_EQ(b[i].peer, want[i][0]) << i;
    EXPECT_EQ(b[i].offset, want[i][1]) << i;
    EXPECT_EQ(b[i].count, want[i][2]) << i;
  }
}

TEST(MoELayer, BadInputIsAClearError) {
  moka::MoEConfig cfg;
  cfg.num_experts = 4;
  cfg.top_k = 5;
  try {
    HostLayer<double> L(cfg);
    FAIL() << "no throw";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("moe.top_k = 5 exceeds moe.num_experts = 4"), std::string::npos) << e.what();
  }
  cfg.top_k = 2;
  cfg.capacity_factor = 0;
  EXPECT_THROW(HostLayer<double>{cfg}, moka::Error);
  cfg.capacity_factor = -1;
  EXPECT_THROW(cfg.validate(), moka::Error);
  cfg.capacity_factor = 1;
  EXPECT_THROW(moka::gate_type_from_string("expert_choice"), moka::Error);
  EXPECT_THROW(moka::activation_from_string("tanh"), moka::Error);
  try {
    moka::activation_from_string("tanh");
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown activation 'tanh'"), std::string::npos) << e.what();
  }
  // Wrong shapes.
  HostLayer<double> L(cfg);
  Kokkos::DefaultHostExecutionSpace space;
  HostLayer<double>::matrix x("x", 10, cfg.d_model + 1), y("y", 10, cfg.d_model);
  try {
    L.forward(space, x, y);
    FAIL() << "no throw";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("moka::MoELayer::forward: 'x' has 65 columns, expected 64 (x)"),
              std::string::npos)
        << e.what();
  }
  HostLayer<double>::matrix x2("x", 10, cfg.d_model), y2("y", 9, cfg.d_model);
  EXPECT_THROW(L.forward(space, x2, y2), moka::Error);
  HostLayer<double>::matrix dy("dy", 10, cfg.d_model), dx("dx", 10, cfg.d_model);
  EXPECT_THROW(L.backward(space, dy, dx), moka::Error);  // no forward yet
}

TEST(MoEConfig, FromDeck) {
  auto deck = moka::InputDeck::parse_string(
      "moe.num_experts = 16\nmoe.top_k = 1\ngate.type = softmax\ngate.renormalize = true\n"
      "expert.activation = swiglu\ngate.dropless = false\ngate.capacity_factor = 1.5\ngate.drop_policy = score\n",
      "moe.deck");
  deck.validate(moka::MoEConfig::schema());
  const auto c = moka::MoEConfig::from_deck(deck);
  EXPECT_EQ(c.num_experts, 16);
  EXPECT_EQ(c.top_k, 1);
  EXPECT_EQ(c.gate, moka::GateType::softmax);
  EXPECT_TRUE(c.renormalize);
  EXPECT_EQ(c.activation, moka::Activation::swiglu);
  EXPECT_EQ(c.d_ff_in(), 2 * c.d_ff);
  EXPECT_EQ(c.capacity(100), 10);  // ceil(1.5 * 100 * 1 / 16)
  EXPECT_EQ(c.drop_policy, moka::DropPolicy::score);
  // The expert GEMMs' automatic choices are the defaults; the deck can fix them.
  EXPECT_EQ(c.gemm_streams, 0);
  EXPECT_EQ(c.gemm_grouped, moka::GemmChoice::automatic);
  auto fixed = moka::InputDeck::parse_string("expert.gemm_streams = 1\nexpert.gemm_grouped = true\n", "g.deck");
  fixed.validate(moka::MoEConfig::schema());
  EXPECT_EQ(moka::MoEConfig::from_deck(fixed).gemm_streams, 1);
  EXPECT_EQ(moka::MoEConfig::from_deck(fixed).gemm_grouped, moka::GemmChoice::on);
  auto typo = moka::InputDeck::parse_string("expert.gemm_grouped = yes\n", "typo.deck");
  try {
    typo.validate(moka::MoEConfig::schema());
    FAIL() << "expert.gemm_grouped = yes accepted";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expert.gemm_grouped"), std::string::npos) << e.what();
  }
  auto bad = moka::InputDeck::parse_string("moe.num_experts = 2\nmoe.top_k = 3\n", "bad.deck");
  bad.validate(moka::MoEConfig::schema());
  EXPECT_THROW(moka::MoEConfig::from_deck(bad), moka::Error);
}

// ------------------------------------------------------------------------
// The gates with random parts and auxiliary losses. The reference takes the
// layer's random draws (noise, jitter, routing uniforms) and reproduces the
// outputs, the routing and the auxiliary loss; gradients of
// sum(y G) + aux are checked by central differences of the reference.
struct GateCase {
  std::string name;
  moka::MoEConfig cfg;
  bool training;
};

void PrintTo(const GateCase& c, std::ostream* os) { *os << c.name; }

std::vector<GateCase> gate_cases() {
  auto base = [] {
    moka::MoEConfig c;
    c.d_model = 6;
    c.d_ff = 5;
    c.num_experts = 4;
    c.top_k = 2;
    c.activation = moka::Activation::silu;
    return c;
  };
  std::vector<GateCase> v;
  for (bool training : {true, false}) {
    const std::string mode = training ? "train" : "eval";
    auto c = base();
    c.gate = moka::GateType::noisy;
    c.balance_weight = 0.3;
    v.push_back({"noisy_" + mode, c, training});
    c = base();
    c.gate = moka::GateType::gshard;
    c.balance_weight = 0.2;
    c.dropless = false;
    c.capacity_factor = 1.0;
    c.capacity_factor_eval = 1.5;
    v.push_back({"gshard_capacity_" + mode, c, training});
    c = base();
    c.gate = moka::GateType::switch_top1;
    c.top_k = 1;
    c.balance_weight = 0.2;
    c.jitter_eps = 0.1;
    c.dropless = false;
    c.capacity_factor = 1.25;
    v.push_back({"switch_jitter_" + mode, c, training});
  }
  auto c = base();
  c.gate = moka::GateType::topk;
  c.z_loss_weight = 0.05;
  v.push_back({"topk_zloss", c, true});
  c = base();
  c.gate = moka::GateType::softmax;
  c.renormalize = true;
  c.z_loss_weight = 0.05;
  c.bias_balance = true;
  c.bias_update_rate = 0.01;
  v.push_back({"softmax_zloss_biasbalance", c, true});
  c = base();
  c.gate = moka::GateType::gshard;
  c.random_routing = false;
  c.z_loss_weight = 0.02;
  v.push_back({"gshard_norandom_zloss", c, true});
  // Bias balancing counts the routed choices: the second experts that
  // random routing drops are not load (and the test below checks some are dropped).
  c = base();
  c.gate = moka::GateType::gshard;
  c.bias_balance = true;
  c.bias_update_rate = 0.02;
  v.push_back({"gshard_random_biasbalance", c, true});
  return v;
}

class MoEGateCases : public ::testing::TestWithParam<GateCase> {};

TEST_P(MoEGateCases, MatchReferenceAndFiniteDifferences) {
  const GateCase gc = GetParam();
  const moka::MoEConfig& cfg = gc.cfg;
  const int T = 16;
  std::mt19937_64 rng(77);
  HostLayer<double> L(cfg);
  L.init_parameters(5);
  L.set_training(gc.training);
  std::vector<double> bias_before;
  if (cfg.bias_balance) {
    bias_before = random_vec(cfg.num_experts, rng, 0.5);
    from_vec(L.selection_bias(), bias_before);
  }
  const RefParams p = params_of(L);
  const auto x = random_vec(T * cfg.d_model, rng, 1.5);
  const auto G = random_vec(T * cfg.d_model, rng);
  const auto r = run_layer(L, T, x, G);
  moka_test::RefRandom rnd = r.random;
  if (cfg.gate != moka::GateType::switch_top1 || !gc.training) rnd.jitter.clear();
  rnd.sel_bias = bias_before;
  RefRouting ref;
  const auto y_ref = moka_test::ref_forward(cfg, T, x, p, &ref, &rnd);
  SCOPED_TRACE(gc.name);

  EXPECT_LT(max_rel_err(r.y, y_ref), 1e-13);
  EXPECT_EQ(r.routing.idx, ref.idx);
  EXPECT_EQ(r.routing.route, ref.route);
  EXPECT_EQ(r.routing.kept, ref.kept);
  EXPECT_NEAR(r.routing.aux, ref.aux, 1e-13 * (1 + std::fabs(ref.aux)));
  if (cfg.balance_weight > 0 && cfg.gate != moka::GateType::topk && cfg.gate != moka::GateType::softmax)
    EXPECT_GT(ref.aux, 0.0);
  for (int e = 0; e < cfg.num_experts; ++e) EXPECT_LE(r.counts[e], cfg.capacity(T, gc.training));
  if (cfg.gate == moka::GateType::gshard && gc.training && cfg.random_routing)
    EXPECT_GT(std::count(ref.route.begin(), ref.route.end(), -1), 0) << "random routing dropped nothing";
  if (cfg.gate == moka::GateType::noisy && gc.training) {
    double nrm = 0;
    for (double v : r.random.noise) nrm += v * v;
    EXPECT_GT(nrm, 0.0) << "no noise in training";
  }

  const double atol = 2e-8, rtol = 1e-6;
  expect_close(r.dx, fd_grad(cfg, T, x, p, G, Wrt::x, &rnd), atol, rtol, "dx");
  expect_close(r.dwg, fd_grad(cfg, T, x, p, G, Wrt::wg, &rnd), atol, rtol, "dWg");
  if (cfg.gate == moka::GateType::noisy) expect_close(r.dwn, fd_grad(cfg, T, x, p, G, Wrt::wn, &rnd), atol, rtol, "dWn");
  expect_close(r.dw1, fd_grad(cfg, T, x, p, G, Wrt::w1, &rnd), atol, rtol, "dW1");
  expect_close(r.dw2, fd_grad(cfg, T, x, p, G, Wrt::w2, &rnd), atol, rtol, "dW2");
  expect_close(r.db1, fd_grad(cfg, T, x, p, G, Wrt::b1, &rnd), atol, rtol, "db1");

  if (cfg.bias_balance) {
    // bias_e += rate * sign(mean load - load_e), loads counted over the routed choices.
    const auto after = to_vec(L.selection_bias());
    std::vector<double> load(cfg.num_experts, 0.0);
    for (int v : ref.route)
      if (v >= 0) load[v] += 1;
    const double mean = double(T * cfg.top_k) / cfg.num_experts;
    for (int e = 0; e < cfg.num_experts; ++e) {
      const double sgn = mean > load[e] ? 1.0 : (mean < load[e] ? -1.0 : 0.0);
      EXPECT_NEAR(after[e], bias_before[e] + cfg.bias_update_rate * sgn, 1e-15) << "expert " << e;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(RandomAndAuxiliary, MoEGateCases, ::testing::ValuesIn(gate_cases()),
                         [](const ::testing::TestParamInfo<GateCase>& info) { return info.param.name; });

TEST(MoELayer, RandomDrawsAreReproducibleAndChangeEveryStep) {
  moka::MoEConfig cfg;
  cfg.d_model = 8;
  cfg.d_ff = 8;
  cfg.num_experts = 4;
  cfg.gate = moka::GateType::noisy;
  HostLayer<double> A(cfg), B(cfg);
  A.init_parameters(3);
  B.init_parameters(3);
  std::mt19937_64 rng(2);
  const auto x = random_vec(10 * 8, rng), G = random_vec(10 * 8, rng);
  const auto a1 = run_layer(A, 10, x, G), b1 = run_layer(B, 10, x, G);
  EXPECT_EQ(a1.random.noise, b1.random.noise);  // same seed, same step
  EXPECT_EQ(a1.y, b1.y);
  const auto a2 = run_layer(A, 10, x, G);
  EXPECT_NE(a1.random.noise, a2.random.noise);  // next step, new noise
}

// The routing-trace fixture in the repository: 10 iteration rows (the last
// one the trace's last) and layers 0 and 3 of the shared GPT-MoE trace, the
// numbers unchanged (tests/data/cut_trace.cpp made it).
std::string fixture() { return moka_test::data_file("gpt_moe_32e_cut.h5"); }

/// A small layer with the trace gate on \p path's layer \p layer (32 experts, top-2).
moka::MoEConfig trace_config(const std::string& path, int layer) {
  moka::MoEConfig cfg;
  cfg.d_model     = 8;
  cfg.d_ff        = 8;
  cfg.num_experts = 32;
  cfg.top_k       = 2;
  cfg.gate        = moka::GateType::trace;
  cfg.trace_file  = path;
  cfg.trace_layer = layer;
  return cfg;
}

TEST(MoELayer, TraceGateReplaysRecordedCounts) {
  const std::string path = fixture();
  const moka::RoutingTrace trace = moka::read_routing_trace(path);
  ASSERT_EQ(trace.n_experts, 32);
  ASSERT_EQ(trace.top_k, 2);
  ASSERT_EQ(trace.n_layers, 2);
  // Every (rank, micro-batch) row of 32 sums to 4096 assignments.
  const auto last = trace.expert_counts(-1, 1);
  EXPECT_EQ(std::accumulate(last.begin(), last.end(), 0L), 16L * 4 * 4096);
  moka::MoEConfig cfg = trace_config(path, 1);
  cfg.trace_iteration = -1;
  HostLayer<double> L(cfg);
  L.init_parameters(1);
  const int T = 1000;
  std::mt19937_64 rng(4);
  const auto r = run_layer(L, T, random_vec(T * 8, rng), random_vec(T * 8, rng));
  const auto want = moka::scale_counts(last, long(T) * 2);
  EXPECT_EQ(std::vector<long>(r.counts.begin(), r.counts.end()), want);
  EXPECT_EQ(std::accumulate(want.begin(), want.end(), 0L), 2000L);
  // The recorded skew survives: the busiest expert gets several times the mean.
  EXPECT_GT(*std::max_element(want.begin(), want.end()), 3 * 2000 / 32);
  // Another row of the trace routes differently (the trace is replayed, not a constant).
  cfg.trace_iteration = 0;
  HostLayer<double> first(cfg);
  first.init_parameters(1);
  const auto r0 = run_layer(first, T, random_vec(T * 8, rng), random_vec(T * 8, rng));
  EXPECT_EQ(std::vector<long>(r0.counts.begin(), r0.counts.end()),
            moka::scale_counts(trace.expert_counts(0, 1), long(T) * 2));
  EXPECT_NE(r0.counts, r.counts);
  // gate.trace_balanced: the same assignments spread evenly (the baseline
  // of perfectly balanced routing at the same token count).
  cfg.trace_iteration = -1;
  cfg.trace_balanced  = true;
  HostLayer<double> even(cfg);
  even.init_parameters(1);
  const auto rb = run_layer(even, T, random_vec(T * 8, rng), random_vec(T * 8, rng));
  EXPECT_EQ(std::accumulate(rb.counts.begin(), rb.counts.end(), 0L), 2000L);
  const auto [lo, hi] = std::minmax_element(rb.counts.begin(), rb.counts.end());
  EXPECT_LE(*hi - *lo, 1) << "busiest " << *hi << ", least " << *lo;
  auto deck = moka::InputDeck::parse_string("gate.trace_balanced = true\n", "b.deck");
  deck.validate(moka::MoEConfig::schema());
  EXPECT_TRUE(moka::MoEConfig::from_deck(deck).trace_balanced);
}

TEST(MoELayer, TraceGateWalksTheTrace) {
  // Training forward i uses row (first + i stride) mod rows; evaluation
  // forwards do not advance; stride 0 stays; a model's block b replays
  // trace layer gate.trace_layer + b.
  const std::string path = fixture();
  const moka::RoutingTrace trace = moka::read_routing_trace(path);
  const long rows = trace.n_iter;
  ASSERT_GE(rows, 3);
  moka::MoEConfig cfg = trace_config(path, 0);
  const int T = 500;
  std::mt19937_64 rng(9);
  const auto x = random_vec(T * 8, rng), g = random_vec(T * 8, rng);
  auto counts_of = [&](HostLayer<double>& L) {
    const auto r = run_layer(L, T, x, g);
    return std::vector<long>(r.counts.begin(), r.counts.end());
  };
  auto want = [&](long row, long layer) { return moka::scale_counts(trace.expert_counts(row, layer), long(T) * 2); };
  for (int stride : {1, 2, 0}) {
    cfg.trace_iteration = 1;
    cfg.trace_stride    = stride;
    HostLayer<double> L(cfg);
    L.init_parameters(1);
    for (long i = 0; i < rows + 2; ++i) {  // past the end: wraps
      const long row = (1 + i * stride) % rows;
      EXPECT_EQ(counts_of(L), want(row, 0)) << "stride " << stride << ", forward " << i;
      if (i == 1) {  // an evaluation forward in between: the same row again, no advance
        L.set_training(false);
        EXPECT_EQ(counts_of(L), want((1 + 2 * stride) % rows, 0)) << "stride " << stride << ", evaluation";
        L.set_training(true);
      }
    }
  }
  // A model's blocks replay consecutive trace layers.
  moka::ModelConfig mc;
  mc.blocks = 2;
  mc.moe    = cfg;
  mc.moe.trace_stride = 0;
  mc.moe.trace_iteration = -1;
  mc.d_in  = 4;
  mc.d_out = 1;
  moka::MoEModel<double, Kokkos::HostSpace> model(mc);
  model.init_parameters(3);
  Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace> X("x", T, 4), Y("y", T, 1);
  model.forward(Kokkos::DefaultHostExecutionSpace(), X, Y);
  for (int b = 0; b < 2; ++b) {
    auto c = moka_test::to_vec(model.moe(b).expert_counts());
    EXPECT_EQ(std::vector<long>(c.begin(), c.end()), want(rows - 1, b)) << "block " << b;
  }
  // A block past the file's layers is named.
  mc.blocks = 3;
  EXPECT_NE(moka_test::error_of([&] { moka::MoEModel<double, Kokkos::HostSpace> m(mc); })
                .find("gate.trace_layer (plus the block index) = 2 is past them"),
            std::string::npos);
}

TEST(MoELayer, TraceGateBadInput) {
  moka::MoEConfig cfg;
  cfg.gate = moka::GateType::trace;
  EXPECT_THROW(cfg.validate(), moka::Error);  // no file
  cfg.trace_file = "/nonexistent/trace.h5";
  try {
    HostLayer<double> L(cfg);
    FAIL() << "no throw";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot open '/nonexistent/trace.h5'"), std::string::npos) << e.what();
  }
  cfg.trace_file = fixture();
  cfg.num_experts = 8;  // the trace has 32
  EXPECT_THROW(HostLayer<double>{cfg}, moka::Error);
  // Not an HDF5 file.
  cfg.trace_file = moka_test::data_file("cut_trace.cpp");
  cfg.num_experts = 32;
  EXPECT_THROW(HostLayer<double>{cfg}, moka::Error);
}

TEST(MoELayer, BiasBalancingCountsRoutedChoices) {
  // GShard's random routing drops some second choices; bias balancing
  // counts the routed ones (a dropped choice is no load). Seeds are tried
  // until counting the top-k selections instead would move some bias the
  // other way, so the check below tells the two apart.
  moka::MoEConfig cfg;
  cfg.d_model = 6;
  cfg.d_ff = 5;
  cfg.num_experts = 4;
  cfg.top_k = 2;
  cfg.gate = moka::GateType::gshard;
  cfg.bias_balance = true;
  cfg.bias_update_rate = 0.25;
  const int T = 16, E = cfg.num_experts;
  auto update = [&](const std::vector<double>& choices) {
    std::vector<double> load(E, 0.0), out(E);
    double mean = 0;
    for (double v : choices)
      if (v >= 0) load[int(v)] += 1, mean += 1.0 / E;
    for (int e = 0; e < E; ++e)
      out[e] = cfg.bias_update_rate * (mean > load[e] ? 1.0 : (mean < load[e] ? -1.0 : 0.0));
    return out;
  };
  bool told_apart = false;
  for (std::uint64_t seed = 1; seed < 200 && !told_apart; ++seed) {
    HostLayer<double> L(cfg);
    L.init_parameters(seed);
    std::mt19937_64 rng(seed);
    run_layer(L, T, random_vec(T * cfg.d_model, rng, 1.5), random_vec(T * cfg.d_model, rng));
    const auto routed = update(to_vec(L.routed_index())), selected = update(to_vec(L.expert_index()));
    if (routed == selected) continue;
    told_apart = true;
    EXPECT_EQ(to_vec(L.selection_bias()), routed) << "seed " << seed;
  }
  ASSERT_TRUE(told_apart) << "no seed where random routing changes the balancing signal";
}

TEST(MoEConfig, CapacityRuleAgainstIntegerArithmetic) {
  // ceil(f T k / E) worked out in integers (f = num / den): the smallest c
  // with c E den >= num T k; a floor would give one less wherever it does
  // not divide. Clamped to T k.
  struct Case {
    long num, den, T;
    int k, E;
  };
  for (const Case& c : {Case{5, 4, 10, 2, 8}, Case{1, 1, 16, 2, 8}, Case{3, 2, 7, 1, 4}, Case{1, 2, 3, 2, 8},
                        Case{2, 1, 100, 2, 3}, Case{1000, 1, 5, 2, 4}, Case{1, 4, 1, 1, 7}}) {
    moka::MoEConfig cfg;
    cfg.dropless = false;
    cfg.top_k = c.k;
    cfg.num_experts = c.E;
    cfg.capacity_factor = double(c.num) / double(c.den);
    long want = (c.num * c.T * c.k + c.E * c.den - 1) / (c.E * c.den);
    want = std::min(want, c.T * c.k);
    EXPECT_EQ(cfg.capacity(c.T), want) << c.num << "/" << c.den << " x " << c.T << " x " << c.k << " / " << c.E;
    cfg.capacity_factor_eval = cfg.capacity_factor;
    cfg.capacity_factor = 0.01;
    EXPECT_EQ(cfg.capacity(c.T, false), want);  // the evaluation factor in evaluation
  }
  moka::MoEConfig d;
  d.dropless = true;
  EXPECT_EQ(d.capacity(13), 13L * d.top_k);
  // The layer keeps exactly that many: everything to expert 0, capacity
  // ceil(1.25 x 10 x 2 / 8) = 4 (a floor would keep 3).
  moka::MoEConfig z;
  z.d_model = 4;
  z.d_ff = 4;
  z.gate = moka::GateType::zero;
  z.dropless = false;
  z.capacity_factor = 1.25;
  HostLayer<double> L(z);
  L.init_parameters(2);
  std::mt19937_64 rng(1);
  const auto r = run_layer(L, 10, random_vec(40, rng), random_vec(40, rng));
  EXPECT_EQ(L.capacity(), 4);
  EXPECT_EQ(r.counts[0], 4);
}

TEST(MoEConfig, OutOfRangeValuesAreNamed) {
  auto msg = [](const moka::MoEConfig& c) {
    try {
      c.validate();
    } catch (const moka::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  moka::MoEConfig c;
  c.capacity_factor = 1e18;
  EXPECT_NE(msg(c).find("gate.capacity_factor = 1e+18 is outside (0, 1e+06]"), std::string::npos) << msg(c);
  c.capacity_factor = 1.0;
  c.capacity_factor_eval = 0;
  EXPECT_NE(msg(c).find("gate.capacity_factor_eval = 0 is outside"), std::string::npos) << msg(c);
  c.capacity_factor_eval = 2.0;
  for (auto g : {moka::GateType::topk, moka::GateType::gshard, moka::GateType::noisy}) {
    c.gate = g;
    c.top_k = 2;
    c.renormalize = true;
    EXPECT_NE(msg(c).find("gate.renormalize applies to gate.type = softmax only"), std::string::npos) << msg(c);
  }
  c.gate = moka::GateType::softmax;
  EXPECT_EQ(msg(c), "no error");
}

TEST(MoEConfig, GateSpecificChecks) {
  moka::MoEConfig c;
  c.gate = moka::GateType::gshard;
  c.top_k = 1;
  EXPECT_THROW(c.validate(), moka::Error);
  c.gate = moka::GateType::switch_top1;
  c.top_k = 2;
  EXPECT_THROW(c.validate(), moka::Error);
  c.gate = moka::GateType::noisy;
  c.num_experts = 2;
  EXPECT_THROW(c.validate(), moka::Error);  // needs k < E
  c.num_experts = 8;
  c.bias_balance = true;
  EXPECT_THROW(c.validate(), moka::Error);  // not for the noisy gate
}

// ------------------------------------------------------------ kernels
// The slot assignment (chunk histograms + scans) and the packed row kernels
// against plain sequential loops, on the host space, sizes chosen to hit the
// edge cases: unrouted assignments, N not a multiple of the chunk, no
// assignments at all, chunks that double for large N x E, and rows whose
// width does (16) or does not (13) allow 16-byte packs.
namespace {

using HostExec = Kokkos::HostSpace::execution_space;
using imat     = Kokkos::View<int**, Kokkos::LayoutRight, Kokkos::HostSpace>;
using ivec     = Kokkos::View<int*, Kokkos::HostSpace>;

struct SlotsRef {
  std::vector<int> counts, offsets, slot;
};

SlotsRef sequential_slots(const std::vector<int>& idx, const std::vector<double>& score, int E, long cap,
                          bool by_score) {
  const int N = static_cast<int>(idx.size());
  std::vector<std::vector<int>> group(E);
  for (int i = 0; i < N; ++i)
    if (idx[i] >= 0) group[idx[i]].push_back(i);
  std::vector<char> keep(N, 0);
  for (int e = 0; e < E; ++e) {
    std::vector<int> order = group[e];
    if (by_score)
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
    for (std::size_t r = 0; r < order.size() && long(r) < cap; ++r) keep[order[r]] = 1;
  }
  SlotsRef ref;
  ref.counts.assign(E, 0);
  ref.offsets.assign(E + 1, 0);
  ref.slot.assign(N, -1);
  for (int e = 0; e < E; ++e) {
    for (int i : group[e]) ref.counts[e] += keep[i];
    ref.offsets[e + 1] = ref.offsets[e] + ref.counts[e];
    int r = 0;
    for (int i : group[e])
      if (keep[i]) ref.slot[i] = ref.offsets[e] + r++;
  }
  return ref;
}

}  // namespace

TEST(MoEKernels, SlotAssignmentMatchesSequentialCounting) {
  struct SlotCase {
    int T, k, E;
    long cap;
    moka::DropPolicy policy;
  };
  const long big = 1L << 40;
  const SlotCase cases[] = {{1000, 2, 8, 130, moka::DropPolicy::position},
                            {1000, 2, 8, 130, moka::DropPolicy::score},
                            {37, 3, 5, 4, moka::DropPolicy::position},
                            {37, 3, 5, 4, moka::DropPolicy::score},
                            {0, 2, 4, 1, moka::DropPolicy::position},
                            {65536, 2, 1024, big, moka::DropPolicy::position}};
  std::mt19937_64 rng(5);
  for (const auto& c : cases) {
    const int N = c.T * c.k;
    std::vector<int> idx(N);
    std::vector<double> sc(N);
    std::uniform_int_distribution<int> pick(-1, c.E - 1);  // -1: not routed
    for (int i = 0; i < N; ++i) {
      idx[i] = pick(rng);
      sc[i]  = std::uniform_real_distribution<double>(0, 1)(rng);
      if (i % 7 == 3) sc[i] = 0.5;  // ties, broken by position
    }
    imat I("idx", c.T, c.k), slot("slot", c.T, c.k);
    Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace> S("score", c.T, c.k);
    for (int i = 0; i < N; ++i) {
      I(i / c.k, i % c.k) = idx[i];
      S(i / c.k, i % c.k) = sc[i];
    }
    ivec counts("counts", c.E), offsets("offsets", c.E + 1);
    moka::impl::SlotWork<Kokkos::HostSpace> work;
    std::vector<int> h_off;
    const long kept = moka::impl::assign_slots(HostExec(), c.policy, c.cap, Kokkos::View<long*, Kokkos::HostSpace>(),
                                               I, S, counts, offsets, slot, work, h_off);
    const auto ref = sequential_slots(idx, sc, c.E, c.cap, c.policy == moka::DropPolicy::score);
    const std::string at = "T=" + std::to_string(c.T) + " E=" + std::to_string(c.E);
    ASSERT_EQ(kept, ref.offsets[c.E]) << at;
    EXPECT_EQ(h_off, ref.offsets) << at;
    for (int e = 0; e < c.E; ++e) ASSERT_EQ(counts(e), ref.counts[e]) << at << " expert " << e;
    // Each kept row held by exactly one assignment (what the dispatch by
    // token and the in-place combine backward rely on).
    std::vector<int> holders(std::size_t(kept), 0);
    for (int i = 0; i < N; ++i) {
      ASSERT_EQ(slot(i / c.k, i % c.k), ref.slot[i]) << at << " assignment " << i;
      if (ref.slot[i] >= 0) ++holders.at(std::size_t(ref.slot[i]));
    }
    for (long r = 0; r < kept; ++r) EXPECT_EQ(holders[std::size_t(r)], 1) << at << " row " << r;
    if (c.E == 1024) EXPECT_GT(work.chunk, 16) << "the large case must use wider chunks";
  }
}

template <class S>
void check_row_kernels(int d, int k) {
  using mat = Kokkos::View<S**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  constexpr int W = 16 / sizeof(S);
  const int T = 9, E = 3;
  std::mt19937_64 rng(17 + d + 100 * k);
  // Slots: every (t, j) gets a distinct row except a few dropped ones.
  imat slot("slot", T, k);
  std::vector<int> perm(T * k);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  int rows = 0;
  for (int i = 0; i < T * k; ++i) slot(i / k, i % k) = (i % 5 == 2) ? -1 : rows++;
  ivec row_token("row_token", rows), group("group", rows);
  for (int i = 0; i < T * k; ++i)
    if (slot(i / k, i % k) >= 0) row_token(slot(i / k, i % k)) = i / k;
  for (int r = 0; r < rows; ++r) group(r) = r % E;
  auto fill = [&](mat& m) {
    for (std::size_t i = 0; i < m.extent(0); ++i)
      for (std::size_t c = 0; c < m.extent(1); ++c) m(i, c) = S(std::uniform_real_distribution<double>(-1, 1)(rng));
  };
  mat x("x", T, d), ys("ys", rows, d), w("w", T, k), bias("bias", E, d), dy("dy", T, d);
  fill(x), fill(ys), fill(w), fill(bias), fill(dy);
  EXPECT_EQ(moka::impl::packs_fit(x, d, W), d % W == 0) << "d = " << d;

  mat xs("xs", rows, d);
  fill(xs);  // every row is written (each kept row has one (t, j))
  moka::impl::gather_rows(HostExec(), x, slot, xs);
  mat y("y", T, d);
  moka::impl::combine_rows(HostExec(), ys, slot, w, y);
  mat dx("dx", T, d);
  fill(dx);
  mat dx0("dx0", T, d);
  Kokkos::deep_copy(dx0, dx);
  moka::impl::scatter_add_rows(HostExec(), ys, slot, dx);
  mat yb("yb", rows, d);
  Kokkos::deep_copy(yb, ys);
  moka::impl::add_row_bias(HostExec(), rows, yb, bias, group);
  mat dscore("dscore", T, k), dys("dys", rows, d);
  Kokkos::View<moka::bf16**, Kokkos::LayoutRight, Kokkos::HostSpace> dys_b("dys_b", rows, d);
  moka::impl::combine_backward(HostExec(), dy, ys, slot, w, dscore, dys, dys_b);
  HostExec().fence();

  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < d; ++c) {
      ASSERT_EQ(xs(r, c), x(row_token(r), c));
      ASSERT_EQ(yb(r, c), ys(r, c) + bias(group(r), c));
    }
  for (int t = 0; t < T; ++t) {
    for (int c = 0; c < d; ++c) {
      S acc = 0, add = dx0(t, c);
      for (int j = 0; j < k; ++j)
        if (slot(t, j) >= 0) {
          acc += w(t, j) * ys(slot(t, j), c);
          add += ys(slot(t, j), c);
        }
      ASSERT_EQ(y(t, c), acc) << "combine t " << t << " c " << c;  // same order: exact
      ASSERT_EQ(dx(t, c), add) << "undispatch t " << t << " c " << c;
    }
    for (int j = 0; j < k; ++j) {
      const int r = slot(t, j);
      double dot  = 0;
      for (int c = 0; c < d && r >= 0; ++c) {
        dot += double(dy(t, c)) * double(ys(r, c));
        ASSERT_EQ(dys(r, c), w(t, j) * dy(t, c));
        ASSERT_EQ(float(dys_b(r, c)), float(moka::bf16(float(w(t, j) * dy(t, c)))));
      }
      EXPECT_NEAR(double(dscore(t, j)), dot, (sizeof(S) == 8 ? 1e-13 : 1e-5) * d) << "dscore t " << t << " j " << j;
    }
  }

  // The one-rank bf16 layer's forms: bf16 expert outputs with b2 added in
  // the combine and in its backward (which then writes the bf16 gradient
  // only), and bf16 rows in the undispatch.
  using bmat = Kokkos::View<moka::bf16**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  bmat ys_b("ys_b", rows, d);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < d; ++c) ys_b(r, c) = moka::bf16(float(ys(r, c)));
  mat y2("y2", T, d), dx2("dx2", T, d), dscore2("dscore2", T, k);
  Kokkos::deep_copy(dx2, dx0);
  bmat dys_b2("dys_b2", rows, d);
  moka::impl::combine_rows(HostExec(), ys_b, slot, w, y2, bias, group);
  moka::impl::scatter_add_rows(HostExec(), ys_b, slot, dx2);
  moka::impl::combine_backward(HostExec(), dy, ys_b, slot, w, dscore2, mat(), dys_b2, bias, group);
  HostExec().fence();
  for (int t = 0; t < T; ++t) {
    for (int c = 0; c < d; ++c) {
      S acc = 0, add = dx0(t, c);
      for (int j = 0; j < k; ++j) {
        const int r = slot(t, j);
        if (r < 0) continue;
        acc += w(t, j) * (S(float(ys_b(r, c))) + bias(group(r), c));
        add += S(float(ys_b(r, c)));
      }
      ASSERT_EQ(y2(t, c), acc) << "bf16 combine t " << t << " c " << c;
      ASSERT_EQ(dx2(t, c), add) << "bf16 undispatch t " << t << " c " << c;
    }
    for (int j = 0; j < k; ++j) {
      const int r = slot(t, j);
      double dot  = 0;
      for (int c = 0; c < d && r >= 0; ++c) {
        dot += double(dy(t, c)) * (double(float(ys_b(r, c))) + double(bias(group(r), c)));
        ASSERT_EQ(float(dys_b2(r, c)), float(moka::bf16(float(w(t, j) * dy(t, c)))));
      }
      EXPECT_NEAR(double(dscore2(t, j)), dot, (sizeof(S) == 8 ? 1e-13 : 1e-5) * d) << "bf16 dscore t " << t;
    }
  }
}

// convert_to_bf16 on the default execution space (the device in CUDA
// builds): eight elements per thread where aligned, one each for the tail
// and for misaligned arrays; every element rounded as bf16(float) rounds.
TEST(MoEKernels, ConvertToBf16PacksAndTail) {
  const std::size_t n = 8 * 1000 + 16;
  Kokkos::View<float*> src("src", n);
  Kokkos::View<moka::bf16*> dst("dst", n);
  auto h_src = Kokkos::create_mirror_view(src);
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<float> u(-3, 3);
  for (std::size_t i = 0; i < n; ++i) h_src(i) = u(rng) * std::ldexp(1.f, int(i % 40) - 20);
  Kokkos::deep_copy(src, h_src);
  // (offset into src, offset into dst, count): aligned with a tail of 5; aligned
  // and whole packs; src misaligned; dst misaligned.
  for (const auto& c : {std::array<std::size_t, 3>{0, 0, 8 * 1000 + 5}, std::array<std::size_t, 3>{8, 8, 8 * 999},
                        std::array<std::size_t, 3>{1, 0, 8 * 999}, std::array<std::size_t, 3>{0, 3, 8 * 999}}) {
    Kokkos::deep_copy(dst, moka::bf16(0.f));
    moka::impl::convert_to_bf16(Kokkos::DefaultExecutionSpace(), "test_convert", src.data() + c[0], dst.data() + c[1],
                                c[2]);
    auto h_dst = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dst);
    for (std::size_t i = 0; i < n; ++i) {
      const bool inside = i >= c[1] && i < c[1] + c[2];
      const std::uint16_t want = inside ? moka::bf16(h_src(i - c[1] + c[0])).bits : std::uint16_t(0);
      ASSERT_EQ(h_dst(i).bits, want) << "case " << c[0] << "/" << c[1] << "/" << c[2] << ", element " << i;
    }
  }
}

// grow_rows' zero fill: 16-byte stores and a byte tail (3 x 5 bf16: one
// word and 14 bytes; 1000 x 24: words only), every element zero.
TEST(MoEKernels, GrowRowsZeroFills) {
  using bmat = Kokkos::View<moka::bf16**, Kokkos::LayoutRight>;
  for (const auto& shape : {std::array<long, 2>{3, 5}, std::array<long, 2>{1000, 24}}) {
    bmat m("m", shape[0], shape[1]);
    Kokkos::deep_copy(m, moka::bf16(1.5f));
    moka::impl::fill_zero(m);
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m);
    for (long r = 0; r < shape[0]; ++r)
      for (long c = 0; c < shape[1]; ++c) ASSERT_EQ(h(r, c).bits, 0) << r << " " << c;
    bmat g;
    moka::impl::grow_rows(g, shape[0], shape[1], "test_grow");
    ASSERT_EQ(long(g.extent(0)), shape[0]);
    auto hg = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), g);
    for (long r = 0; r < shape[0]; ++r)
      for (long c = 0; c < shape[1]; ++c) ASSERT_EQ(hg(r, c).bits, 0) << r << " " << c;
  }
}

// The bf16 activation backward of a one-input activation runs in place in
// the layer (dh is dhpre's buffer): each element of dh is read before its
// dhpre is written, so in place gives bitwise what a separate output gives;
// the chunk kernel (biases, column sums) and the row kernel (no biases).
TEST(MoEKernels, Bf16ActivationBackwardInPlace) {
  using bmat = Kokkos::View<moka::bf16**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  using fmat = Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  const int rows = 20, dff = 16, chunk = 8;
  ivec offsets("offsets", 3), chunk_start("chunk_start", 3);
  offsets(0) = 0, offsets(1) = 13, offsets(2) = rows;
  // chunks: rows 0-7, 8-12 | 13-19
  chunk_start(0) = 0, chunk_start(1) = 2, chunk_start(2) = 3;
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(-2, 2);
  bmat dh("dh", rows, dff), hpre("hpre", rows, dff), out("out", rows, dff), inplace("inplace", rows, dff);
  fmat b1("b1", 2, dff), work_a("work_a", 3, dff), work_b("work_b", 3, dff);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < dff; ++c) dh(r, c) = moka::bf16(u(rng)), hpre(r, c) = moka::bf16(u(rng));
  for (int e = 0; e < 2; ++e)
    for (int c = 0; c < dff; ++c) b1(e, c) = u(rng);
  Kokkos::deep_copy(inplace, dh);
  for (const auto act : {moka::Activation::gelu_erf, moka::Activation::relu}) {
    moka::impl::activation_backward_bf16(HostExec(), act, true, 3, chunk, dff, chunk_start, offsets, dh, hpre, b1, out,
                                         work_a);
    Kokkos::deep_copy(inplace, dh);
    moka::impl::activation_backward_bf16(HostExec(), act, true, 3, chunk, dff, chunk_start, offsets, inplace, hpre, b1,
                                         inplace, work_b);
    HostExec().fence();
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < dff; ++c) {
        const int e = r < 13 ? 0 : 1;
        const float want =
            float(moka::bf16(float(dh(r, c)) * moka::impl::activate_grad(act, float(hpre(r, c)) + b1(e, c))));
        ASSERT_EQ(float(out(r, c)), want) << r << " " << c;
        ASSERT_EQ(float(inplace(r, c)), want) << r << " " << c;
      }
    // The b1 gradient's first pass: each chunk's column sums of what was
    // written, in row order (float sums).
    const int chunk_rows[4] = {0, 8, 13, rows};
    for (int q = 0; q < 3; ++q)
      for (int c = 0; c < dff; ++c) {
        float sum = 0.f;
        for (int r = chunk_rows[q]; r < chunk_rows[q + 1]; ++r) sum += float(out(r, c));
        ASSERT_EQ(work_a(q, c), sum) << q << " " << c;
        ASSERT_EQ(work_b(q, c), sum) << q << " " << c;
      }
    // Without biases, by rows (4 a thread: 20 rows, then 19 with a partial
    // last group), apart and in place.
    for (const int n : {rows, rows - 1}) {
      Kokkos::deep_copy(out, moka::bf16(7.f));
      Kokkos::deep_copy(inplace, dh);
      moka::impl::activation_backward_bf16_rows(HostExec(), act, n, dff, dh, hpre, out);
      moka::impl::activation_backward_bf16_rows(HostExec(), act, n, dff, inplace, hpre, inplace);
      HostExec().fence();
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < dff; ++c) {
          const float want = r < n ? float(moka::bf16(float(dh(r, c)) * moka::impl::activate_grad(act, float(hpre(r, c)))))
                                   : 7.f;
          ASSERT_EQ(float(out(r, c)), want) << n << ": " << r << " " << c;
          ASSERT_EQ(float(inplace(r, c)), r < n ? want : float(dh(r, c))) << n << ": " << r << " " << c;
        }
    }
  }
}

// SwiGLU's backward by rows (no biases): both halves of the pre-activation
// gradient from dh and the two halves of hpre, apart and in place into
// hpre's buffer (as the layer runs it), a partial last group of rows.
TEST(MoEKernels, Bf16SwigluBackwardByRows) {
  using bmat = Kokkos::View<moka::bf16**, Kokkos::LayoutRight, Kokkos::HostSpace>;
  const int rows = 11, dff = 16;
  const auto act = moka::Activation::swiglu;
  std::mt19937_64 rng(6);
  std::uniform_real_distribution<float> u(-2, 2);
  bmat dh("dh", rows, dff), hpre("hpre", rows, 2 * dff), out("out", rows, 2 * dff), inplace("inplace", rows, 2 * dff);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < dff; ++c) dh(r, c) = moka::bf16(u(rng));
    for (int c = 0; c < 2 * dff; ++c) hpre(r, c) = moka::bf16(u(rng));
  }
  Kokkos::deep_copy(inplace, hpre);
  moka::impl::activation_backward_bf16_rows(HostExec(), act, rows, dff, dh, hpre, out);
  moka::impl::activation_backward_bf16_rows(HostExec(), act, rows, dff, dh, inplace, inplace);
  HostExec().fence();
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < dff; ++c) {
      const float g = float(dh(r, c)), a = float(hpre(r, c)), v = float(hpre(r, dff + c));
      const float want_a = float(moka::bf16(g * v * moka::impl::activate_grad(act, a)));
      const float want_v = float(moka::bf16(g * moka::impl::activate(act, a)));
      ASSERT_EQ(float(out(r, c)), want_a) << r << " " << c;
      ASSERT_EQ(float(out(r, dff + c)), want_v) << r << " " << c;
      ASSERT_EQ(float(inplace(r, c)), want_a) << r << " " << c;
      ASSERT_EQ(float(inplace(r, dff + c)), want_v) << r << " " << c;
    }
}

// Row buffers: exact the first time, 1/8 spare rows when they grow again,
// kept when smaller row counts come.
TEST(MoEKernels, GrowRowsExactFirstThenSpare) {
  Kokkos::View<float**, Kokkos::LayoutRight, Kokkos::HostSpace> m;
  moka::impl::grow_rows(m, 800, 4, "test_rows");
  EXPECT_EQ(m.extent(0), 800u);
  EXPECT_EQ(m.label(), "moka::moe::test_rows");
  const float* p = m.data();
  moka::impl::grow_rows(m, 700, 4, "test_rows");
  EXPECT_EQ(m.data(), p);
  moka::impl::grow_rows(m, 801, 4, "test_rows");
  EXPECT_EQ(m.extent(0), 801u + 801u / 8 + 1);
  moka::impl::grow_rows(m, 10, 6, "test_rows");  // other columns: a new first allocation
  EXPECT_EQ(m.extent(0), 10u);
  EXPECT_EQ(m.extent(1), 6u);
}

TEST(MoEKernels, PackedRowKernelsMatchLoops) {
  // Top-2, and top-6: more choices than the combine backward takes in one
  // pass over dy (4), so two passes, the second only partly filled (2).
  for (int k : {2, 6})
    for (int d : {13, 16}) {
      check_row_kernels<float>(d, k);
      check_row_kernels<double>(d, k);
    }
}

// The small gates' kernels (up to impl::gate_small_experts experts): the
// logits in one pass over the tokens, and the gate's part of dx summed in
// the undispatch pass, against double sums; token counts that do not fill
// the last team, expert counts below and at both register widths, and one
// gate too large for them (the GEMM's, reported by returning false);
// model widths that change how many lanes share a token group.
template <class S>
void check_small_gate(int T, int d, int E) {
  using M   = moka::memory_space;
  using dm  = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  using im  = Kokkos::View<int**, Kokkos::LayoutRight, M>;
  moka::execution_space space;
  const int k = 2, rows = T * k - 3;  // the last three assignments dropped
  dm x("x", T, d), w("w", d, E), wt("wt", E, d), logits("logits", T, E), gd("gd", T, E), src("src", rows, d),
      dx("dx", T, d);
  im slot("slot", T, k);
  auto hx = Kokkos::create_mirror_view(x), hw = Kokkos::create_mirror_view(w), hg = Kokkos::create_mirror_view(gd),
       hs = Kokkos::create_mirror_view(src);
  auto hslot = Kokkos::create_mirror_view(slot);
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(-1, 1);
  for (int t = 0; t < T; ++t)
    for (int c = 0; c < d; ++c) hx(t, c) = S(u(rng));
  for (int c = 0; c < d; ++c)
    for (int e = 0; e < E; ++e) hw(c, e) = S(u(rng));
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) hg(t, e) = S(u(rng));
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < d; ++c) hs(r, c) = S(u(rng));
  for (int i = 0; i < T * k; ++i) hslot(i / k, i % k) = i < rows ? (i * 7) % rows : -1;  // rows permuted
  Kokkos::deep_copy(x, hx), Kokkos::deep_copy(w, hw), Kokkos::deep_copy(gd, hg), Kokkos::deep_copy(src, hs);
  Kokkos::deep_copy(slot, hslot);
  moka::impl::transpose_gate_weights(space, w, wt);
  const bool small = moka::impl::gate_logits(space, x, wt, logits);
  ASSERT_EQ(small, E <= moka::impl::gate_small_experts) << "E " << E;
  if (!small) return;
  moka::impl::scatter_add_rows(space, src, slot, dx, gd, wt);
  // The 2-tokens-a-thread undispatch that scatter_add_rows picks on CUDA,
  // called directly so that host builds run it too (odd T: a half pair).
  dm dx2("dx2", T, d);
  moka::impl::undispatch_gate_packs<1, 2>(space, "undispatch2", src, slot, dx2, gd, wt);
  space.fence();
  auto hl = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), logits);
  auto hdx = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dx);
  auto hdx2 = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), dx2);
  const double tol = std::is_same<S, float>::value ? 2e-6 : 1e-14;
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      double ref = 0, mag = 0;
      for (int c = 0; c < d; ++c) ref += double(hx(t, c)) * double(hw(c, e)), mag += std::abs(double(hx(t, c)) * hw(c, e));
      ASSERT_NEAR(double(hl(t, e)), ref, tol * mag) << "logit t " << t << " e " << e << " E " << E;
    }
    for (int c = 0; c < d; ++c) {
      double ref = 0, mag = 0;
      for (int e = 0; e < E; ++e) ref += double(hg(t, e)) * double(hw(c, e)), mag += std::abs(double(hg(t, e)) * hw(c, e));
      for (int j = 0; j < k; ++j)
        if (hslot(t, j) >= 0) ref += double(hs(hslot(t, j), c)), mag += std::abs(double(hs(hslot(t, j), c)));
      ASSERT_NEAR(double(hdx(t, c)), ref, tol * mag) << "dx t " << t << " c " << c << " E " << E;
      ASSERT_NEAR(double(hdx2(t, c)), ref, tol * mag) << "dx (2 tokens) t " << t << " c " << c << " E " << E;
    }
  }
}

TEST(MoEKernels, SmallGateLogitsAndUndispatchGatePart) {
  for (int E : {1, 3, 8, 13, 16, 17}) {
    check_small_gate<float>(37, 40, E);  // d a multiple of the packs
    check_small_gate<double>(37, 13, E);  // and not
  }
  check_small_gate<float>(1000, 256, 8);
  // Widths that give the CUDA kernel 8, 16 and 32 lanes a token group
  // (4 above); token counts that leave the last group part full.
  check_small_gate<float>(45, 1024, 16);
  check_small_gate<float>(45, 2048, 8);
  check_small_gate<float>(45, 4096, 13);
  check_small_gate<double>(45, 2048, 16);
}
