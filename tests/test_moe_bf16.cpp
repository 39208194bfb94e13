// bf16 expert GEMMs on CUDA (label gpu): the float layer with bf16 operands
// and fp32 accumulation against the double-precision reference and the
// fp64 layer, and a bf16 training run. Skipped without CUDA.
#include <moka/MoELayer.hpp>
#include <moka/Trainer.hpp>

#include <gtest/gtest.h>

#include "MoETestUtils.hpp"

#include <cmath>
#include <sstream>

using namespace moka_test;

namespace {

double rel_norm_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

#ifdef MOKA_HAVE_CUDA
class Bf16Cases : public ::testing::TestWithParam<std::pair<moka::GateType, moka::Activation>> {};

TEST_P(Bf16Cases, MatchesReferenceWithinBf16Tolerance) {
  moka::MoEConfig cfg;
  cfg.d_model = 64;
  cfg.d_ff = 96;
  cfg.num_experts = 8;
  cfg.top_k = 2;
  cfg.gate = GetParam().first;
  cfg.activation = GetParam().second;
  cfg.dropless = false;
  cfg.capacity_factor = 1.0;
  const int T = 512;
  std::mt19937_64 rng(11);
  moka::MoEConfig cfg16 = cfg;
  cfg16.bf16_compute = true;
  moka::MoELayer<float, Kokkos::CudaSpace> L16(cfg16);
  moka::MoELayer<double, Kokkos::CudaSpace> L64(cfg);
  L16.init_parameters(21);
  L64.init_parameters(21);
  const RefParams p = params_of(L64);
  const auto x = random_vec(T * cfg.d_model, rng);
  const auto G = random_vec(T * cfg.d_model, rng);
  const auto r16 = run_layer(L16, T, x, G);
  const auto r64 = run_layer(L64, T, x, G);
  RefRouting ref;  // with the layers' random draws (GShard random routing; same seed in both)
  const auto y_ref = moka_test::ref_forward(cfg, T, x, p, &ref, &r64.random);
  ASSERT_EQ(r16.random.rr.size(), r64.random.rr.size());
  for (std::size_t t = 0; t < r16.random.rr.size(); ++t)  // the same stream, stored in float and double
    ASSERT_NEAR(r16.random.rr[t], r64.random.rr[t], 1e-6) << t;
  // The gate runs in fp32 in both: the routing must agree on this data.
  ASSERT_EQ(r16.routing.idx, ref.idx);
  ASSERT_EQ(r16.routing.kept, ref.kept);
  EXPECT_LT(max_rel_err(r64.y, y_ref), 1e-12);
  // bf16 operands (8-bit significands), fp32 accumulation: ~1e-2 relative.
  const double ey = rel_norm_err(r16.y, y_ref);
  const double edx = rel_norm_err(r16.dx, r64.dx), ew1 = rel_norm_err(r16.dw1, r64.dw1);
  const double ew2 = rel_norm_err(r16.dw2, r64.dw2), ewg = rel_norm_err(r16.dwg, r64.dwg);
  std::cout << "bf16 relative errors: y " << ey << ", dx " << edx << ", dW1 " << ew1 << ", dW2 " << ew2 << ", dWg "
            << ewg << "\n";
  EXPECT_LT(ey, 1e-2);
  // ReLU's derivative is a step: bf16 rounding of pre-activations near zero
  // flips some of its mask entries, which moves dx and dW1 more (3.6e-2
  // measured on an H100 for this case, against 3e-3 for the smooth ones).
  const double tol_w1 = cfg.activation == moka::Activation::relu ? 5e-2 : 2e-2;
  EXPECT_LT(edx, tol_w1);
  EXPECT_LT(ew1, tol_w1);
  EXPECT_LT(ew2, 2e-2);
  EXPECT_LT(ewg, 2e-2);
  EXPECT_GT(ey, 1e-6) << "suspiciously exact: are the GEMMs in bf16?";
}

INSTANTIATE_TEST_SUITE_P(
    Gpu, Bf16Cases,
    ::testing::Values(std::make_pair(moka::GateType::topk, moka::Activation::gelu_erf),
                      std::make_pair(moka::GateType::softmax, moka::Activation::swiglu),
                      std::make_pair(moka::GateType::gshard, moka::Activation::relu)));

TEST(Bf16, TrainingConverges) {
  auto deck = moka::InputDeck::parse_string(
      "run.name = bf16\nio.metrics_file = none\ntask.train_size = 4096\ntask.test_size = 1024\n"
      "model.blocks = 2\nmoe.d_model = 64\nmoe.d_ff = 128\nmoe.num_experts = 4\nmoe.top_k = 2\n"
      "train.steps = 600\ntrain.batch_size = 256\ntrain.lr = 3e-3\ntrain.warmup_steps = 20\n"
      "train.precision = bf16\nio.log_every = 200\nio.eval_every = 600\n",
      "bf16.deck");
  deck.validate(moka::train_schema());
  std::ostringstream log;
  const auto r = moka::train_regime_model(MPI_COMM_WORLD, deck, log);
  std::cout << log.str();
  EXPECT_LT(r.final_test_loss, 0.2 * r.initial_test_loss);
}
#else
TEST(Bf16, NeedsCuda) { GTEST_SKIP() << "bf16 expert GEMMs need a CUDA build"; }
#endif
