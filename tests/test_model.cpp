// Dense layers, the model and the trainer: forward against direct formulas,
// every backward against central finite differences in fp64, and training
// that lowers the held-out loss.
#include <moka/model/Dense.hpp>
#include <moka/model/MoEModel.hpp>
#include <moka/train/RegimeTask.hpp>
#include <moka/train/Trainer.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <sstream>

namespace {

using M      = Kokkos::HostSpace;
using Exec   = Kokkos::DefaultHostExecutionSpace;
using matrix = Kokkos::View<double**, Kokkos::LayoutRight, M>;

matrix random_matrix(const char* label, long m, long n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(-1, 1);
  matrix a(std::string(label), m, n);
  for (long i = 0; i < m; ++i)
    for (long j = 0; j < n; ++j) a(i, j) = u(rng);
  return a;
}

double dot(const matrix& a, const matrix& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.extent(0); ++i)
    for (std::size_t j = 0; j < a.extent(1); ++j) s += a(i, j) * b(i, j);
  return s;
}

// Checks grad (analytic) of L(v) = f() against central differences over every element of v.
template <class V, class F>
void check_fd(const char* what, V v, V grad, F&& loss, double tol = 1e-7) {
  const double h = 1e-6;
  auto* p = v.data();
  for (std::size_t i = 0; i < v.size(); ++i) {
    const double save = p[i];
    p[i] = save + h;
    const double lp = loss();
    p[i] = save - h;
    const double lm = loss();
    p[i] = save;
    const double fd = (lp - lm) / (2 * h);
    ASSERT_NEAR(grad.data()[i], fd, tol * (1 + std::fabs(fd))) << what << " element " << i;
  }
}

}  // namespace

TEST(Dense, LinearForwardAndGradients) {
  std::mt19937_64 rng(3);
  Exec space;
  moka::Linear<double, M> lin("lin", 5, 3);
  lin.init_parameters(11);
  auto b = lin.bias();
  for (int c = 0; c < 3; ++c) b(c) = 0.1 * (c + 1);
  matrix x = random_matrix("x", 7, 5, rng), G = random_matrix("G", 7, 3, rng), y("y", 7, 3), dx("dx", 7, 5);
  lin.forward(space, x, y);
  space.fence();
  for (int t = 0; t < 7; ++t)
    for (int c = 0; c < 3; ++c) {
      double ref = b(c);
      for (int i = 0; i < 5; ++i) ref += x(t, i) * lin.weight()(i, c);
      ASSERT_NEAR(y(t, c), ref, 1e-14);
    }
  lin.zero_grad(space);
  lin.backward(space, G, dx);
  space.fence();
  auto loss = [&]() {
    lin.forward(space, x, y);
    space.fence();
    return dot(y, G);
  };
  check_fd("dW", lin.weight(), lin.weight_grad(), loss);
  check_fd("db", lin.bias(), lin.bias_grad(), loss);
  check_fd("dx", x, dx, loss);
}

TEST(Dense, LayerNormForwardAndGradients) {
  std::mt19937_64 rng(4);
  Exec space;
  moka::LayerNorm<double, M> ln("ln", 6);
  auto g = ln.gamma();
  auto be = ln.beta();
  for (int c = 0; c < 6; ++c) {
    g(c)  = 0.5 + 0.1 * c;
    be(c) = -0.2 + 0.05 * c;
  }
  matrix x = random_matrix("x", 5, 6, rng), G = random_matrix("G", 5, 6, rng), y("y", 5, 6), dx("dx", 5, 6);
  ln.forward(space, x, y);
  space.fence();
  for (int t = 0; t < 5; ++t) {
    double mean = 0, var = 0;
    for (int c = 0; c < 6; ++c) mean += x(t, c) / 6;
    for (int c = 0; c < 6; ++c) var += (x(t, c) - mean) * (x(t, c) - mean) / 6;
    for (int c = 0; c < 6; ++c) ASSERT_NEAR(y(t, c), g(c) * (x(t, c) - mean) / std::sqrt(var + 1e-5) + be(c), 1e-14);
  }
  ln.zero_grad(space);
  ln.backward(space, G, dx);
  space.fence();
  auto loss = [&]() {
    ln.forward(space, x, y);
    space.fence();
    return dot(y, G);
  };
  check_fd("dgamma", ln.gamma(), ln.gamma_grad(), loss);
  check_fd("dbeta", ln.beta(), ln.beta_grad(), loss);
  check_fd("dx", x, dx, loss);
}

TEST(Model, WholeModelGradientsIncludingMseLoss) {
  std::mt19937_64 rng(5);
  Exec space;
  moka::ModelConfig cfg;
  cfg.d_in = 4;
  cfg.d_out = 2;
  cfg.blocks = 2;
  cfg.moe.d_model = 6;
  cfg.moe.d_ff = 5;
  cfg.moe.num_experts = 3;
  cfg.moe.top_k = 2;
  cfg.moe.gate = moka::GateType::softmax;
  cfg.moe.activation = moka::Activation::swiglu;
  moka::MoEModel<double, M> model(cfg);
  model.init_parameters(8);
  const int T = 9;
  matrix x = random_matrix("x", T, 4, rng), target = random_matrix("target", T, 2, rng);
  matrix out("out", T, 2), dout("dout", T, 2);
  model.zero_grad(space);
  model.forward(space, x, out);
  moka::mse_loss<double, M>(space, out, target, dout);
  model.backward(space, dout);
  space.fence();
  auto loss = [&]() {
    model.forward(space, x, out);
    return moka::mse_loss<double, M>(space, out, target, matrix());
  };
  for (const auto& p : model.parameters()) {
    SCOPED_TRACE(p.name);
    check_fd(p.name.c_str(), p.param, p.grad, loss, 2e-7);
  }
}

TEST(RegimeTask, DeterministicAndFollowsTheLaws) {
  moka::RegimeTaskConfig c;
  c.train_size = 100;
  c.test_size = 50;
  const auto a = moka::make_regime_data(c, 0), b = moka::make_regime_data(c, 0), t = moka::make_regime_data(c, 1);
  EXPECT_EQ(a.x, b.x);
  EXPECT_EQ(a.y, b.y);
  EXPECT_NE(a.x, std::vector<double>(t.x.begin(), t.x.end()));
  std::vector<int> seen(4, 0);
  for (long i = 0; i < a.n; ++i) {
    const double* x = &a.x[i * 4];
    ASSERT_LE(std::fabs(x[0]), 1.0);
    seen[a.regime[i]]++;
    if (x[0] < 0 && x[1] < 0) {
      EXPECT_EQ(a.regime[i], 0);
      EXPECT_NEAR(a.y[i * 2], std::sin(M_PI * x[2]), 1e-15);
      EXPECT_NEAR(a.y[i * 2 + 1], x[2] * x[3], 1e-15);
    }
  }
  for (int r = 0; r < 4; ++r) EXPECT_GT(seen[r], 0) << r;
}

TEST(Trainer, LossFallsOnTheTask) {
  // A short run (any rank count): the held-out loss must drop several-fold.
  auto deck = moka::InputDeck::parse_string(
      "run.name = trainer_test\nio.metrics_file = none\ntask.train_size = 2048\ntask.test_size = 512\n"
      "model.blocks = 1\nmoe.d_model = 16\nmoe.d_ff = 32\nmoe.num_experts = 4\nmoe.top_k = 2\n"
      "train.steps = 800\ntrain.batch_size = 128\ntrain.lr = 3e-3\ntrain.warmup_steps = 10\n"
      "io.log_every = 100\nio.eval_every = 800\n",
      "trainer_test.deck");
  deck.validate(moka::train_schema());
  std::ostringstream log;
  const auto r = moka::train_regime_model(MPI_COMM_WORLD, deck, log);
  EXPECT_EQ(r.steps, 800);
  EXPECT_LT(r.final_test_loss, 0.2 * r.initial_test_loss) << log.str();  // 6.3x measured
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) std::cout << "held-out loss " << r.initial_test_loss << " -> " << r.final_test_loss << "\n";
  EXPECT_GT(r.initial_test_loss, 0.1);
}

TEST(Trainer, BatchMustSplitOverRanks) {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  // 2 size + 1 samples split over one rank, and over no larger count.
  auto deck = moka::InputDeck::parse_string("train.batch_size = " + std::to_string(2 * size + 1) +
                                                "\ntrain.steps = 1\nio.metrics_file = none\n",
                                            "b.deck");
  deck.validate(moka::train_schema());
  std::ostringstream log;
  if (size == 1) {
    EXPECT_NO_THROW(moka::train_regime_model(MPI_COMM_WORLD, deck, log));
  } else {
    try {
      moka::train_regime_model(MPI_COMM_WORLD, deck, log);
      FAIL() << "no throw";
    } catch (const moka::Error& e) {
      EXPECT_NE(std::string(e.what()).find("is not a multiple of the number of ranks"), std::string::npos) << e.what();
    }
  }
}

TEST(Trainer, HeldOutLossIsInEvaluationMode) {
  // A gate whose training mode changes the outputs a lot (random routing,
  // a training capacity that drops most assignments): the held-out loss
  // must be the evaluation-mode loss, the same at every call, and leave the
  // model in the mode it was in.
  using DM = moka::memory_space;
  using dmatrix = Kokkos::View<double**, Kokkos::LayoutRight, DM>;
  moka::RegimeTaskConfig task;
  task.test_size = 200;
  const moka::RegimeData data = moka::make_regime_data(task, 1);
  moka::ModelConfig cfg;
  cfg.d_in = task.input_dim;
  cfg.d_out = moka::RegimeTaskConfig::output_dim;
  cfg.blocks = 1;
  cfg.moe.d_model = 8;
  cfg.moe.d_ff = 8;
  cfg.moe.num_experts = 4;
  cfg.moe.top_k = 2;
  cfg.moe.gate = moka::GateType::gshard;
  cfg.moe.dropless = false;
  cfg.moe.capacity_factor = 0.25;
  cfg.moe.capacity_factor_eval = 2.0;  // an expert can take every token: nothing dropped
  moka::MoEModel<double, DM> model(cfg);
  model.init_parameters(3);
  auto world = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::mpi);
  moka::execution_space space;
  ASSERT_TRUE(model.training());
  const double a = moka::held_out_loss(model, data, *world, space);
  EXPECT_TRUE(model.training());
  const double b = moka::held_out_loss(model, data, *world, space);
  EXPECT_EQ(a, b);
  // The reference: the whole set in one evaluation-mode forward.
  model.set_training(false);
  dmatrix x("x", data.n, data.d_in), y("y", data.n, data.d_out), out("out", data.n, data.d_out);
  auto hx = Kokkos::create_mirror_view(x);
  auto hy = Kokkos::create_mirror_view(y);
  for (long i = 0; i < data.n; ++i) {
    for (int j = 0; j < data.d_in; ++j) hx(i, j) = data.x[i * data.d_in + j];
    for (int j = 0; j < data.d_out; ++j) hy(i, j) = data.y[i * data.d_out + j];
  }
  Kokkos::deep_copy(x, hx);
  Kokkos::deep_copy(y, hy);
  model.forward(space, x, out);
  const double ref = moka::mse_loss<double, DM>(space, out, y, dmatrix());
  EXPECT_NEAR(a, ref, 1e-12 * ref);
  // And it is not the training-mode loss.
  model.set_training(true);
  model.forward(space, x, out);
  EXPECT_GT(std::fabs(moka::mse_loss<double, DM>(space, out, y, dmatrix()) - ref), 1e-3 * ref);
}
