#include <moka/Log.hpp>
#include <moka/Trainer.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <numeric>
#include <sstream>

namespace moka {

DeckSchema TrainerConfig::schema() {
  DeckSchema s;
  s.add("train.batch_size", DeckType::integer).set_default("256").set_min(1)
      .set_doc("Samples per step over all ranks (a multiple of the number of ranks).");
  s.add("train.precision", DeckType::string).set_default("fp32").set_choices({"fp32", "fp64", "bf16"})
      .set_doc("fp32 or fp64 throughout; bf16: expert GEMMs with bf16 operands and fp32 accumulation, fp32 "
               "master weights and optimizer state (CUDA builds).");
  s.add("io.log_every", DeckType::integer).set_default("50").set_min(1).set_doc("Steps between progress lines.");
  s.add("io.eval_every", DeckType::integer).set_default("100").set_min(1)
      .set_doc("Steps between held-out loss evaluations (also at the start and the end).");
  s.add("io.metrics_file", DeckType::string).set_default("")
      .set_doc("CSV of per-step metrics written by rank 0; \"\" means <run.name>.metrics.csv, none disables it.");
  return s;
}

TrainerConfig TrainerConfig::from_deck(const InputDeck& deck) {
  TrainerConfig c;
  c.batch_size   = deck.get<long>("train.batch_size");
  c.precision    = deck.get<std::string>("train.precision");
  c.log_every    = deck.get<long>("io.log_every");
  c.eval_every   = deck.get<long>("io.eval_every");
  c.metrics_file = deck.get<std::string>("io.metrics_file");
  if (c.metrics_file.empty()) c.metrics_file = deck.get<std::string>("run.name") + ".metrics.csv";
  if (c.metrics_file == "none") c.metrics_file.clear();
  return c;
}

DeckSchema train_schema() {
  DeckSchema s = RunConfig::schema();
  s.merge(RegimeTaskConfig::schema());
  s.merge(ModelConfig::schema());
  s.merge(OptimizerConfig::schema());
  s.merge(TrainerConfig::schema());
  s.merge(ParallelConfig::schema());
  return s;
}

namespace {

std::string format_seconds(double s) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1) << s << "s";
  return os.str();
}

template <class S>
TrainResult train_typed(MPI_Comm comm, const InputDeck& deck, std::ostream& log) {
  using M      = memory_space;
  using Exec   = execution_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);

  const RunConfig run         = RunConfig::from_deck(deck);
  const RegimeTaskConfig task = RegimeTaskConfig::from_deck(deck);
  ModelConfig mcfg            = ModelConfig::from_deck(deck);
  mcfg.moe.bf16_compute       = deck.get<std::string>("train.precision") == "bf16";
  mcfg.d_in                   = task.input_dim;
  mcfg.d_out                  = RegimeTaskConfig::output_dim;
  const OptimizerConfig ocfg  = OptimizerConfig::from_deck(deck);
  const TrainerConfig tcfg    = TrainerConfig::from_deck(deck);
  MOKA_REQUIRE(tcfg.batch_size % size == 0, "train.batch_size = ", tcfg.batch_size,
               " is not a multiple of the number of ranks (", size, ")");
  const long local_batch = tcfg.batch_size / size;
  const ParallelConfig pcfg = ParallelConfig::from_deck(deck);
  auto groups = std::make_shared<ProcessGroups>(comm, pcfg, mcfg.moe.num_experts, mcfg.moe.d_ff,
                                                !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible);

  const RegimeData train = make_regime_data(task, 0);
  const RegimeData test  = make_regime_data(task, 1);
  MoEModel<S, M> model(mcfg, groups);
  model.init_parameters(static_cast<std::uint64_t>(run.seed));
  const auto params = model.parameters();
  Optimizer<S, M> opt(ocfg);
  for (const auto& p : params) opt.add(p.param, p.grad, p.bf16_copy);
  // bf16: the optimizer writes the experts' bf16 weight copies in its update.
  if (mcfg.moe.bf16_compute) model.set_bf16_weights_managed(true);
  GradSync<S, M> sync(groups, params, pcfg.bucket_mb);

  Exec space;
  matrix x("moka::train.x", local_batch, mcfg.d_in), y("moka::train.y", local_batch, mcfg.d_out);
  matrix out("moka::train.out", local_batch, mcfg.d_out), dout("moka::train.dout", local_batch, mcfg.d_out);
  auto hx = Kokkos::create_mirror_view(x);
  auto hy = Kokkos::create_mirror_view(y);

  // Held-out loss: each rank a contiguous slice of the test set, in chunks.
  auto evaluate = [&]() {
    model.set_training(false);
    const long per = (test.n + size - 1) / size;
    const long b = std::min(test.n, rank * per), e = std::min(test.n, b + per);
    double sse = 0;
    const long chunk = 1024;
    // The same number of forwards on every rank (the MoE layers exchange
    // tokens): a rank past the end of the test set passes empty chunks.
    for (long c0 = b; c0 < b + per; c0 += chunk) {
      const long n = std::max(0L, std::min(chunk, e - c0));
      matrix tx("moka::eval.x", n, mcfg.d_in), ty("moka::eval.y", n, mcfg.d_out), to("moka::eval.out", n, mcfg.d_out);
      auto htx = Kokkos::create_mirror_view(tx);
      auto hty = Kokkos::create_mirror_view(ty);
      for (long i = 0; i < n; ++i) {
        for (int j = 0; j < mcfg.d_in; ++j) htx(i, j) = S(test.x[(c0 + i) * mcfg.d_in + j]);
        for (int j = 0; j < mcfg.d_out; ++j) hty(i, j) = S(test.y[(c0 + i) * mcfg.d_out + j]);
      }
      Kokkos::deep_copy(tx, htx);
      Kokkos::deep_copy(ty, hty);
      model.forward(space, tx, to);
      if (n > 0) sse += mse_loss<S, M>(space, to, ty, matrix()) * double(n) * mcfg.d_out;
    }
    double total = 0;
    MPI_Allreduce(&sse, &total, 1, MPI_DOUBLE, MPI_SUM, comm);
    model.set_training(true);
    return total / (double(test.n) * mcfg.d_out);
  };

  std::ofstream csv;
  if (rank == 0 && !tcfg.metrics_file.empty()) {
    csv.open(tcfg.metrics_file);
    MOKA_REQUIRE(bool(csv), "cannot write io.metrics_file '", tcfg.metrics_file, "'");
    csv << "step,loss,aux_loss,test_loss,lr,grad_norm,samples_per_s,load_min,load_max,elapsed_s\n";
  }

  TrainResult result;
  result.initial_test_loss = evaluate();
  if (rank == 0) {
    log << "training: " << mcfg.blocks << " MoE blocks (E=" << mcfg.moe.num_experts << ", k=" << mcfg.moe.top_k
        << ", d=" << mcfg.moe.d_model << ", d_ff=" << mcfg.moe.d_ff << ", " << to_string(mcfg.moe.gate) << " gate, "
        << to_string(mcfg.moe.activation) << "), " << tcfg.precision << ", batch " << tcfg.batch_size << " over "
        << size << " rank" << (size > 1 ? "s" : "") << " (" << groups->describe() << "), " << ocfg.total_steps
        << " steps; initial held-out loss "
        << result.initial_test_loss << std::endl;
  }

  std::vector<long> order(train.n);
  std::iota(order.begin(), order.end(), 0L);
  long cursor = train.n;  // forces a shuffle at the first step
  long epoch  = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double loss = 0;
  // Failure injection for the abort test: MOKA_TEST_FAIL_RANK=r makes rank r
  // throw at step 3 while the others wait in the step's collectives.
  const char* fail_env = std::getenv("MOKA_TEST_FAIL_RANK");
  const int fail_rank  = fail_env ? std::atoi(fail_env) : -1;
  for (long step = 0; step < ocfg.total_steps; ++step) {
    if (step == 2 && rank == fail_rank)
      throw Error("failure injected at step 3 on rank " + std::to_string(rank) + " (MOKA_TEST_FAIL_RANK)");
    // The global batch: the next batch_size samples of this epoch's
    // permutation (the same on every rank); each rank takes its slice.
    if (cursor + tcfg.batch_size > train.n) {
      impl::SplitMix64 rng{static_cast<std::uint64_t>(run.seed) * 7919 + static_cast<std::uint64_t>(epoch++)};
      for (long i = train.n - 1; i > 0; --i) std::swap(order[i], order[rng.next() % (i + 1)]);
      cursor = 0;
    }
    for (long i = 0; i < local_batch; ++i) {
      const long s = order[(cursor + rank * local_batch + i) % train.n];
      for (int j = 0; j < mcfg.d_in; ++j) hx(i, j) = S(train.x[s * mcfg.d_in + j]);
      for (int j = 0; j < mcfg.d_out; ++j) hy(i, j) = S(train.y[s * mcfg.d_out + j]);
    }
    cursor += tcfg.batch_size;
    Kokkos::deep_copy(x, hx);
    Kokkos::deep_copy(y, hy);

    model.zero_grad(space);
    model.forward(space, x, out);
    // dout scaled by the whole batch: the ranks' gradients sum to its gradient.
    const double local_loss = mse_loss<S, M>(space, out, y, dout, double(tcfg.batch_size) * mcfg.d_out);
    const double aux        = model.aux_loss();  // over the whole batch already
    model.backward(space, dout);
    sync.sync(space);
    space.fence();
    MPI_Allreduce(&local_loss, &loss, 1, MPI_DOUBLE, MPI_SUM, comm);
    loss /= size;
    const double lr   = ocfg.learning_rate(step);
    const double norm = opt.step(space, sync.global_norm(space));

    // Expert load of the step: tokens per expert over all ranks and blocks,
    // relative to the mean of its block.
    double load_min = 1e300, load_max = 0;
    for (int b = 0; b < mcfg.blocks; ++b) {
      auto hc = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), model.moe(b).expert_counts());
      std::vector<long> c(hc.extent(0));
      for (std::size_t e = 0; e < c.size(); ++e) c[e] = hc(e);
      MPI_Allreduce(MPI_IN_PLACE, c.data(), static_cast<int>(c.size()), MPI_LONG, MPI_SUM, comm);
      const double mean = std::accumulate(c.begin(), c.end(), 0.0) / c.size();
      for (long v : c) {
        load_min = std::min(load_min, v / mean);
        load_max = std::max(load_max, v / mean);
      }
    }
    if (mcfg.blocks == 0) load_min = load_max = 1.0;

    const bool last = step + 1 == ocfg.total_steps;
    double test_loss = -1;
    if ((step + 1) % tcfg.eval_every == 0 || last) test_loss = evaluate();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double sps     = double(step + 1) * tcfg.batch_size / elapsed;
    if (rank == 0) {
      if (csv) {
        csv << step + 1 << "," << loss << "," << aux << ",";
        if (test_loss >= 0) csv << test_loss;
        csv << "," << lr << "," << norm << "," << sps << "," << load_min << "," << load_max << "," << elapsed << "\n";
      }
      if ((step + 1) % tcfg.log_every == 0 || step == 0 || last) {
        const double eta = elapsed / double(step + 1) * double(ocfg.total_steps - step - 1);
        std::ostringstream line;
        line << "step " << std::setw(5) << step + 1 << "/" << ocfg.total_steps << "  loss " << std::scientific
             << std::setprecision(3) << loss;
        if (aux > 0) line << "  aux " << aux;
        if (test_loss >= 0) line << "  held-out " << test_loss;
        line << "  lr " << std::setprecision(2) << lr << std::fixed << std::setprecision(0) << "  " << sps
             << " samples/s  ETA " << format_seconds(eta) << std::setprecision(2) << "  load min/max " << load_min
             << "/" << load_max;
        log << line.str() << std::endl;
      }
    }
    if (last) result.final_test_loss = test_loss;
  }
  result.seconds            = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  result.steps              = ocfg.total_steps;
  result.final_train_loss   = loss;
  result.samples_per_second = double(ocfg.total_steps) * tcfg.batch_size / result.seconds;
  if (rank == 0) {
    log << "held-out loss " << std::scientific << std::setprecision(3) << result.initial_test_loss << " -> "
        << result.final_test_loss << std::fixed << std::setprecision(1) << " ("
        << result.initial_test_loss / std::max(result.final_test_loss, 1e-300) << "x lower) in "
        << format_seconds(result.seconds);
    if (csv) log << "; metrics in " << tcfg.metrics_file;
    log << std::endl;
  }
  return result;
}

}  // namespace

TrainResult train_regime_model(MPI_Comm comm, const InputDeck& deck, std::ostream& log) {
  ScopedRegion region("moka::train_regime_model");
  const std::string precision = deck.get<std::string>("train.precision");
  if (precision == "fp64") return train_typed<double>(comm, deck, log);
#ifndef KOKKOS_ENABLE_CUDA
  MOKA_REQUIRE(precision != "bf16", "train.precision = bf16 needs a CUDA build (this one runs on ",
               Kokkos::DefaultExecutionSpace::name(), ")");
#endif
  return train_typed<float>(comm, deck, log);
}

}  // namespace moka
