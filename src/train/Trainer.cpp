#include <moka/balance/Balancer.hpp>
#include <moka/checkpoint/Checkpoint.hpp>
#include <moka/comm/CommCheck.hpp>
#include <moka/moe/LayerMemory.hpp>
#include <moka/core/Log.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/train/Trainer.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <memory>
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
  s.merge(BalanceConfig::schema());
  s.merge(CheckpointConfig::schema());
  return s;
}

namespace {

/// The signal that asked for a checkpoint and a clean exit (SIGTERM,
/// SIGUSR1), or 0. Set by the handler, read at step boundaries.
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void moka_stop_handler(int sig) { g_stop_signal = sig; }

/// Installs the handler for SIGTERM and SIGUSR1 for its lifetime.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    m_term = std::signal(SIGTERM, moka_stop_handler);
    m_usr1 = std::signal(SIGUSR1, moka_stop_handler);
  }
  ~StopSignals() {
    std::signal(SIGTERM, m_term == SIG_ERR ? SIG_DFL : m_term);
    std::signal(SIGUSR1, m_usr1 == SIG_ERR ? SIG_DFL : m_usr1);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  void (*m_term)(int) = nullptr;
  void (*m_usr1)(int) = nullptr;
};

const char* signal_name(int sig) { return sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "a signal"; }

Placement initial_placement(int num_experts, int ep, int slots) {
  const int base = num_experts / ep;
  if (slots == base) return Placement();
  // Spare slots start with replicas of the experts that follow the rank's
  // own (never one it holds); the balancer moves them from the first re-plan.
  std::vector<int> s;
  for (int r = 0; r < ep; ++r) {
    for (int l = 0; l < base; ++l) s.push_back(r * base + l);
    for (int j = 0; j < slots - base; ++j) s.push_back(((r + 1) * base + j) % num_experts);
  }
  return Placement::from_slots(num_experts, ep, s);
}


std::string format_seconds(double s) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1) << s << "s";
  return os.str();
}

/// Copies samples of \p data (rows \p index(i) for i < n) into a host mirror pair.
template <class HX, class HY, class Index>
void copy_samples(const RegimeData& data, long n, Index index, HX& hx, HY& hy) {
  for (long i = 0; i < n; ++i) {
    const long s = index(i);
    for (int j = 0; j < data.d_in; ++j) hx(i, j) = typename HX::value_type(data.x[s * data.d_in + j]);
    for (int j = 0; j < data.d_out; ++j) hy(i, j) = typename HY::value_type(data.y[s * data.d_out + j]);
  }
}

/// One training run of the regime task, as named steps: the global batch
/// of a step and this rank's slice of it, the step itself, the expert-load
/// metric, the held-out evaluation, the metrics line and the progress line.
template <class S>
class RegimeRun {
 public:
  using M      = memory_space;
  using Exec   = execution_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;

  RegimeRun(MPI_Comm comm, const InputDeck& deck, std::ostream& log)
      : m_log(log),
        m_run(RunConfig::from_deck(deck)),
        m_task(RegimeTaskConfig::from_deck(deck)),
        m_mcfg(model_config(deck, m_task)),
        m_ocfg(OptimizerConfig::from_deck(deck)),
        m_tcfg(TrainerConfig::from_deck(deck)),
        m_pcfg(ParallelConfig::from_deck(deck)),
        m_groups(std::make_shared<ProcessGroups>(comm, m_pcfg, m_mcfg.moe.num_experts, m_mcfg.moe.d_ff,
                                                 !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible)),
        m_world(m_groups->world()),
        m_rank(m_world.rank()),
        m_size(m_world.size()),
        m_local_batch(local_batch(m_tcfg, m_size)),
        m_train(make_regime_data(m_task, 0)),
        m_test(make_regime_data(m_task, 1)),
        m_bcfg(BalanceConfig::from_deck(deck)),
        m_model(m_mcfg, m_groups,
                initial_placement(m_mcfg.moe.num_experts, m_groups->ep_size(),
                                  m_bcfg.slots(m_mcfg.moe.num_experts, m_groups->ep_size()))),
        m_opt(m_ocfg),
        m_order(m_train.n),
        m_ccfg(CheckpointConfig::from_deck(deck, m_tcfg.metrics_file)),
        m_deck_text(deck.resolved_text()) {
    if (m_run.comm_check) {
      const CommCheckResult c = check_communication(m_world);
      log::info(c.summary());
      if (!c.mpi_ok || (c.nccl_ran && !c.nccl_ok)) throw Error("communication check failed: " + c.summary());
    }
    m_model.init_parameters(static_cast<std::uint64_t>(m_run.seed));
    const auto params = m_model.parameters();
    for (const auto& p : params) m_opt.add(p.param, p.grad, p.bf16_copy);
    // bf16: the optimizer writes the experts' bf16 weight copies in its update.
    if (m_mcfg.moe.bf16_compute) m_model.set_bf16_weights_managed(true);
    m_sync = std::make_unique<GradSync<S, M>>(m_groups, params, m_pcfg.bucket_mb);
    std::vector<MoELayer<S, M>*> layers;
    for (int b = 0; b < m_mcfg.blocks; ++b) layers.push_back(&m_model.moe(b));
    m_balancer = std::make_unique<Balancer<S, M>>(m_bcfg, layers, &m_opt);
    m_x    = matrix("moka::train.x", m_local_batch, m_mcfg.d_in);
    m_y    = matrix("moka::train.y", m_local_batch, m_mcfg.d_out);
    m_out  = matrix("moka::train.out", m_local_batch, m_mcfg.d_out);
    m_dout = matrix("moka::train.dout", m_local_batch, m_mcfg.d_out);
    m_hx   = Kokkos::create_mirror_view(m_x);
    m_hy   = Kokkos::create_mirror_view(m_y);
    std::iota(m_order.begin(), m_order.end(), 0L);
    if (!m_ccfg.restart.empty()) restart();
  }

  TrainResult train() {
    open_metrics();
    TrainResult result;
    result.first_step        = m_start;
    result.initial_test_loss = m_start > 0 ? m_initial_loss : held_out_loss(m_model, m_test, m_world, m_space);
    m_initial_loss           = result.initial_test_loss;
    log_start(result.initial_test_loss);
    StopSignals signals;
    const char* sig_env   = std::getenv("MOKA_TEST_SIGNAL_AT_STEP");  // tests: rank 0 signals itself after step N
    const long sig_step   = sig_env ? std::atol(sig_env) : -1;
    // Failure injection for the abort test: MOKA_TEST_FAIL_RANK=r makes rank r
    // throw at step 3 while the others wait in the step's collectives.
    const char* fail_env = std::getenv("MOKA_TEST_FAIL_RANK");
    const int fail_rank  = fail_env ? std::atoi(fail_env) : -1;
    const auto t0 = std::chrono::steady_clock::now();
    double loss = 0;
    for (long step = m_start; step < m_ocfg.total_steps; ++step) {
      if (step == 2 && m_rank == fail_rank)
        throw Error("failure injected at step 3 on rank " + std::to_string(m_rank) + " (MOKA_TEST_FAIL_RANK)");
      load_batch();
      StepLine line;
      line.step = step;
      line.lr   = m_ocfg.learning_rate(step);
      take_step(line);
      loss = line.loss;
      expert_load(line.load_min, line.load_max);
      balance(line);
      const bool last = step + 1 == m_ocfg.total_steps;
      if ((step + 1) % m_tcfg.eval_every == 0 || last) line.test_loss = held_out_loss(m_model, m_test, m_world, m_space);
      line.elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      line.sps     = double(step + 1 - m_start) * m_tcfg.batch_size / line.elapsed;
      write_metrics(line);
      if ((step + 1) % m_tcfg.log_every == 0 || step == m_start || last) log_progress(line);
      if (last) result.final_test_loss = line.test_loss;
      result.steps = step + 1;
      if (step + 1 == sig_step && m_rank == 0) std::raise(SIGTERM);
      // A stop signal on any rank: every rank checkpoints and leaves.
      int sig = g_stop_signal;
      if (m_size > 1) MPI_Allreduce(MPI_IN_PLACE, &sig, 1, MPI_INT, MPI_MAX, m_world.mpi_comm());
      if (sig != 0 && !last) {
        result.checkpoint  = checkpoint(step + 1);
        result.interrupted = true;
        if (m_rank == 0)
          m_log << "stopped by " << signal_name(sig) << " after step " << step + 1 << " of "
                << m_ocfg.total_steps << ": checkpoint " << result.checkpoint
                << " written; continue with io.restart=latest" << std::endl;
        break;
      }
      if ((m_ccfg.every > 0 && (step + 1) % m_ccfg.every == 0) || (last && m_ccfg.at_end))
        result.checkpoint = checkpoint(step + 1);
    }
    const long done           = result.steps - m_start;
    result.seconds            = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.final_train_loss   = loss;
    result.samples_per_second = double(done) * m_tcfg.batch_size / std::max(result.seconds, 1e-9);
    if (!result.interrupted) log_end(result);
    return result;
  }

 private:
  struct StepLine {
    long step = 0;
    double loss = 0, aux = 0, test_loss = -1, lr = 0, norm = 0, sps = 0, load_min = 1, load_max = 1, elapsed = 0;
    double step_ms = 0;        // this step's forward, backward, sums and update (fenced)
    double moe_ms  = 0;        // of it, the MoE layers' forward and backward (host time of their regions)
    double imbalance = 1;      // busiest / mean rank load of the step, the worst MoE layer
    long moved = 0;            // expert slots migrated after this step
    double moved_bytes = 0, migration_ms = 0;
  };

  /// Writes the state after \p steps steps to io.checkpoint_dir, prunes old
  /// ones, logs at rank 0; returns the path.
  std::string checkpoint(long steps) {
    const std::string path = m_ccfg.file_for(m_run.name, steps);
    agree_on_failure(m_world.mpi_comm(), [&] {
      if (m_rank != 0) return;
      std::error_code ec;
      std::filesystem::create_directories(m_ccfg.dir, ec);
      MOKA_REQUIRE(std::filesystem::is_directory(m_ccfg.dir), "cannot create io.checkpoint_dir '", m_ccfg.dir, "'",
                   ec ? " (" + ec.message() + ")" : std::string());
    });
    RunCounters c;
    c.step              = steps;
    c.epoch             = m_epoch;
    c.cursor            = m_cursor;
    c.migrated          = m_migrated;
    c.initial_test_loss = m_initial_loss;
    c.order.assign(m_order.begin(), m_order.end());
    // Fault tests: MOKA_TEST_KILL_IN_CHECKPOINT=N kills rank 0 with SIGKILL
    // in the middle of writing the checkpoint of step N.
    const char* kill_env = std::getenv("MOKA_TEST_KILL_IN_CHECKPOINT");
    const long kill_step = kill_env ? std::atol(kill_env) : -1;
    auto before_commit   = [&] {
      if (steps == kill_step && m_rank == 0) std::raise(SIGKILL);
    };
    const CheckpointStats st = save_checkpoint(path, m_ccfg.parallel_io(), m_model, m_opt, m_balancer.get(), c,
                                               m_deck_text, m_world, before_commit);
    if (m_rank == 0) {
      const auto removed = prune_checkpoints(m_ccfg.dir, m_run.name, m_ccfg.keep);
      m_log << std::fixed << std::setprecision(1) << "checkpoint: step " << steps << " -> " << path << " ("
            << st.bytes / 1048576.0 << " MB in " << std::setprecision(3) << st.seconds << " s, "
            << st.verify_seconds << " s of it reading back"
            << (m_ccfg.parallel_io() && m_size > 1 ? ", MPI-IO" : "") << ")";
      if (!removed.empty()) m_log << ", " << removed.size() << " older removed";
      m_log << std::endl;
    }
    return path;
  }

  /// Continues from io.restart: checks the checkpoint's deck against this
  /// run's, loads the state (resharded to this layout), restores the loop.
  void restart() {
    std::string path = m_ccfg.restart;
    agree_on_failure(m_world.mpi_comm(), [&] {
      if (path == "latest") path = latest_checkpoint(m_ccfg.dir, m_run.name);
      CheckpointReader r(path);
      MOKA_REQUIRE(r.has_attribute("deck"), "checkpoint '", path, "': no deck attribute (not a MoKA checkpoint?)");
      const auto diff = deck_differences(r.attribute("deck"), m_deck_text);
      if (!diff.empty()) {
        std::string m = "checkpoint '" + path + "' was written by a run with another model, task or optimizer:";
        for (const auto& d : diff) m += "\n  " + d;
        throw Error(m);
      }
    });
    bool placement_kept = false;
    const RunCounters c = load_checkpoint(path, m_model, m_opt, m_balancer.get(), m_world, &placement_kept);
    agree_on_failure(m_world.mpi_comm(), [&] {
      MOKA_REQUIRE(c.step < m_ocfg.total_steps, "checkpoint '", path, "' is at step ", c.step, " and train.steps = ",
                   m_ocfg.total_steps, ": nothing left to run (raise train.steps to continue)");
      MOKA_REQUIRE(c.order.empty() || long(c.order.size()) == m_train.n, "checkpoint '", path, "': a sample order of ",
                   c.order.size(), " for task.train_size = ", m_train.n);
    });
    m_start        = c.step;
    m_epoch        = c.epoch;
    m_cursor       = c.cursor;
    m_migrated     = c.migrated;
    m_initial_loss = c.initial_test_loss;
    if (!c.order.empty()) m_order.assign(c.order.begin(), c.order.end());
    if (m_rank == 0) {
      CheckpointReader r(path);
      m_log << "restart: step " << c.step << " from " << path << " (written by " << r.attribute("written_by")
            << "; here " << m_size << " rank" << (m_size > 1 ? "s" : "") << ", " << m_groups->describe() << ")";
      if (m_mcfg.blocks > 0 && !placement_kept)
        m_log << "; its expert placement is for another EP size or slot count, so the run starts from the "
                 "contiguous one (load history kept)";
      m_log << std::endl;
    }
    m_restarted_from = path;
  }

  static ModelConfig model_config(const InputDeck& deck, const RegimeTaskConfig& task) {
    ModelConfig c       = ModelConfig::from_deck(deck);
    c.moe.bf16_compute  = deck.get<std::string>("train.precision") == "bf16";
    // Dynamic shadowing: the layers keep balance.max_shadowed extra slots.
    if (deck.get<bool>("balance.shadowing")) c.moe.shadow_slots = deck.get<int>("balance.max_shadowed");
    c.d_in              = task.input_dim;
    c.d_out             = RegimeTaskConfig::output_dim;
    return c;
  }
  static long local_batch(const TrainerConfig& t, int size) {
    MOKA_REQUIRE(t.batch_size % size == 0, "train.batch_size = ", t.batch_size,
                 " is not a multiple of the number of ranks (", size, ")");
    return t.batch_size / size;
  }

  /// The global batch: the next batch_size samples of this epoch's
  /// permutation (the same on every rank); this rank takes its slice.
  void load_batch() {
    if (m_cursor + m_tcfg.batch_size > m_train.n) {
      impl::SplitMix64 rng{static_cast<std::uint64_t>(m_run.seed) * 7919 + static_cast<std::uint64_t>(m_epoch++)};
      for (long i = m_train.n - 1; i > 0; --i) std::swap(m_order[i], m_order[rng.next() % (i + 1)]);
      m_cursor = 0;
    }
    const long first = m_cursor + m_rank * m_local_batch;
    copy_samples(m_train, m_local_batch, [&](long i) { return m_order[(first + i) % m_train.n]; }, m_hx, m_hy);
    m_cursor += m_tcfg.batch_size;
    Kokkos::deep_copy(m_x, m_hx);
    Kokkos::deep_copy(m_y, m_hy);
  }

  /// Seconds spent so far in the MoE layers' forward and backward regions.
  static double moe_seconds() {
    const auto t = TimerTable::instance().snapshot();
    double s     = 0;
    for (const char* r : {"moka::MoELayer::forward", "moka::MoELayer::backward"}) {
      const auto it = t.find(r);
      if (it != t.end()) s += it->second.seconds;
    }
    return s;
  }

  /// Forward, loss, backward, gradient sums and the optimizer step, timed.
  void take_step(StepLine& line) {
    const double moe0 = moe_seconds();
    const auto t0     = std::chrono::steady_clock::now();
    m_model.zero_grad(m_space);
    m_model.forward(m_space, m_x, m_out);
    // dout scaled by the whole batch: the ranks' gradients sum to its gradient.
    double loss = mse_loss<S, M>(m_space, m_out, m_y, m_dout, double(m_tcfg.batch_size) * m_mcfg.d_out);
    line.aux    = m_model.aux_loss();  // over the whole batch already
    m_model.backward(m_space, m_dout);
    m_sync->sync(m_space);
    m_space.fence();
    m_world.allreduce_host(&loss, 1);
    line.loss = loss / m_size;
    line.norm = m_opt.step(m_space, m_sync->global_norm(m_space));
    m_space.fence();
    line.step_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    line.moe_ms  = (moe_seconds() - moe0) * 1e3;
  }

  /// The balancer: the step's loads, and every balance.interval steps a
  /// re-plan (and migration) of each MoE layer, logged at rank 0.
  void balance(StepLine& line) {
    if (m_mcfg.blocks == 0) return;
    m_balancer->record(m_space);
    m_balancer->observe_step_seconds(line.step_ms * 1e-3);
    const auto& imb = m_balancer->imbalance_per_layer();
    line.imbalance  = *std::max_element(imb.begin(), imb.end());
    for (const BalanceEvent& ev : m_balancer->rebalance(m_space, line.step + 1)) {
      line.moved += ev.migration.moves;
      m_migrated += ev.migration.moves;
      line.moved_bytes += double(ev.migration.bytes);
      line.migration_ms += ev.migration.seconds * 1e3;
      if (m_rank != 0) continue;
      const PlanDecision& d = ev.decision;
      m_log << std::fixed << std::setprecision(2) << "balance: step " << ev.step << " layer " << ev.layer << " "
            << to_string(m_bcfg.policy) << ": predicted busiest/mean " << d.busiest_before / d.mean << " -> "
            << d.busiest_after / d.mean << ", " << ev.migration.moves << " slots moved (" << ev.migration.remote_moves
            << " between ranks), " << d.replicated << " experts replicated, " << std::setprecision(3)
            << ev.migration.bytes / 1048576.0 << " MB, migration estimated " << d.migration_seconds * 1e3
            << " ms, measured " << ev.migration.seconds * 1e3 << " ms" << std::endl;
    }
  }

  /// Tokens per expert of the step over all ranks and blocks, relative to
  /// the mean of its block: the smallest and the largest.
  void expert_load(double& lo, double& hi) {
    if (m_mcfg.blocks == 0) {
      lo = hi = 1.0;
      return;
    }
    lo = 1e300;
    hi = 0;
    for (int b = 0; b < m_mcfg.blocks; ++b) {
      auto hc = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m_model.moe(b).expert_counts());
      std::vector<long> c(hc.extent(0));
      for (std::size_t e = 0; e < c.size(); ++e) c[e] = hc(e);
      m_world.allreduce_host(c.data(), static_cast<int>(c.size()));
      const double mean = std::accumulate(c.begin(), c.end(), 0.0) / c.size();
      for (long v : c) {
        lo = std::min(lo, v / mean);
        hi = std::max(hi, v / mean);
      }
    }
  }

  void open_metrics() {
    if (m_rank != 0 || m_tcfg.metrics_file.empty()) return;
    if (m_start > 0) {
      // A restart: the lines of steps up to the checkpoint stay, later ones
      // (written after it by the run that stopped) go.
      std::ifstream in(m_tcfg.metrics_file);
      std::string header, l;
      std::vector<std::string> keep;
      if (std::getline(in, header))
        while (std::getline(in, l))
          if (std::atol(l.c_str()) <= m_start) keep.push_back(l);
      in.close();
      if (!header.empty()) {
        m_csv.open(m_tcfg.metrics_file);
        MOKA_REQUIRE(bool(m_csv), "cannot write io.metrics_file '", m_tcfg.metrics_file, "'");
        m_csv << header << "\n";
        for (const auto& k : keep) m_csv << k << "\n";
        return;
      }
    }
    m_csv.open(m_tcfg.metrics_file);
    MOKA_REQUIRE(bool(m_csv), "cannot write io.metrics_file '", m_tcfg.metrics_file, "'");
    m_csv << "step,loss,aux_loss,test_loss,lr,grad_norm,samples_per_s,load_min,load_max,elapsed_s,step_ms,moe_ms,"
             "rank_imbalance,migrated_slots,migration_bytes,migration_ms\n";
  }

  void write_metrics(const StepLine& l) {
    if (m_rank != 0 || !m_csv) return;
    m_csv << l.step + 1 << "," << l.loss << "," << l.aux << ",";
    if (l.test_loss >= 0) m_csv << l.test_loss;
    m_csv << "," << l.lr << "," << l.norm << "," << l.sps << "," << l.load_min << "," << l.load_max << ","
          << l.elapsed << "," << l.step_ms << "," << l.moe_ms << "," << l.imbalance << "," << l.moved << "," << l.moved_bytes << ","
          << l.migration_ms << "\n";
  }

  void log_start(double initial) {
    if (m_rank != 0) return;
    m_log << "training: " << m_mcfg.blocks << " MoE blocks (E=" << m_mcfg.moe.num_experts << ", k=" << m_mcfg.moe.top_k
          << ", d=" << m_mcfg.moe.d_model << ", d_ff=" << m_mcfg.moe.d_ff << ", " << to_string(m_mcfg.moe.gate)
          << " gate, " << to_string(m_mcfg.moe.activation) << "), " << m_tcfg.precision << ", batch "
          << m_tcfg.batch_size << " over " << m_size << " rank" << (m_size > 1 ? "s" : "") << " ("
          << m_groups->describe() << "), " << m_ocfg.total_steps << " steps; initial held-out loss " << initial
          << std::endl;
  }

  void log_progress(const StepLine& l) {
    if (m_rank != 0) return;
    const double eta = l.elapsed / double(l.step + 1) * double(m_ocfg.total_steps - l.step - 1);
    std::ostringstream line;
    line << "step " << std::setw(5) << l.step + 1 << "/" << m_ocfg.total_steps << "  loss " << std::scientific
         << std::setprecision(3) << l.loss;
    if (l.aux > 0) line << "  aux " << l.aux;
    if (l.test_loss >= 0) line << "  held-out " << l.test_loss;
    line << "  lr " << std::setprecision(2) << l.lr << std::fixed << std::setprecision(0) << "  " << l.sps
         << " samples/s  ETA " << format_seconds(eta) << std::setprecision(2) << "  load min/max " << l.load_min
         << "/" << l.load_max << "  ranks busiest/mean " << l.imbalance << "  step " << std::setprecision(1)
         << l.step_ms << " ms (MoE " << l.moe_ms << " ms)";
    if (m_bcfg.policy != BalancePolicy::static_placement) line << "  " << m_migrated << " slots migrated";
    if (m_bcfg.shadowing) line << "  " << m_balancer->shadowed_experts() << " experts shadowed";
    m_log << line.str() << std::endl;
  }

  void log_end(const TrainResult& r) {
    if (m_rank != 0) return;
    m_log << "held-out loss " << std::scientific << std::setprecision(3) << r.initial_test_loss << " -> "
          << r.final_test_loss << std::fixed << std::setprecision(1) << " ("
          << r.initial_test_loss / std::max(r.final_test_loss, 1e-300) << "x lower) in " << format_seconds(r.seconds);
    if (m_csv) m_log << "; metrics in " << m_tcfg.metrics_file;
    m_log << std::endl;
  }

  std::ostream& m_log;
  const RunConfig m_run;
  const RegimeTaskConfig m_task;
  const ModelConfig m_mcfg;
  const OptimizerConfig m_ocfg;
  const TrainerConfig m_tcfg;
  const ParallelConfig m_pcfg;
  std::shared_ptr<ProcessGroups> m_groups;
  Communicator& m_world;
  const int m_rank, m_size;
  const long m_local_batch;
  const RegimeData m_train, m_test;
  const BalanceConfig m_bcfg;
  MoEModel<S, M> m_model;
  Optimizer<S, M> m_opt;
  std::unique_ptr<Balancer<S, M>> m_balancer;
  long m_migrated = 0;
  std::unique_ptr<GradSync<S, M>> m_sync;
  Exec m_space;
  matrix m_x, m_y, m_out, m_dout;
  typename matrix::HostMirror m_hx, m_hy;
  std::vector<long> m_order;
  long m_cursor = std::numeric_limits<long>::max() / 2;  // forces a shuffle at the first step
  long m_epoch  = 0;
  std::ofstream m_csv;
  const CheckpointConfig m_ccfg;
  const std::string m_deck_text;
  long m_start = 0;             // first step of this run (a restart's checkpoint step)
  double m_initial_loss = 0;    // held-out loss before the first step of the whole run
  std::string m_restarted_from;
};

}  // namespace

template <class S, class M>
double held_out_loss(MoEModel<S, M>& model, const RegimeData& data, Communicator& world,
                     const typename M::execution_space& space) {
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  ScopedRegion region("moka::held_out_loss");
  const bool was_training = model.training();
  model.set_training(false);
  const int rank = world.rank(), size = world.size();
  const long per = (data.n + size - 1) / size;
  const long b = std::min(data.n, rank * per), e = std::min(data.n, b + per);
  double sse = 0;
  const long chunk = 1024;
  // The same number of forwards on every rank (the MoE layers exchange
  // tokens): a rank past the end of the data passes empty chunks.
  for (long c0 = b; c0 < b + per; c0 += chunk) {
    const long n = std::max(0L, std::min(chunk, e - c0));
    matrix tx("moka::eval.x", n, data.d_in), ty("moka::eval.y", n, data.d_out), to("moka::eval.out", n, data.d_out);
    auto htx = Kokkos::create_mirror_view(tx);
    auto hty = Kokkos::create_mirror_view(ty);
    copy_samples(data, n, [&](long i) { return c0 + i; }, htx, hty);
    Kokkos::deep_copy(tx, htx);
    Kokkos::deep_copy(ty, hty);
    model.forward(space, tx, to);
    if (n > 0) sse += mse_loss<S, M>(space, to, ty, matrix()) * double(n) * data.d_out;
  }
  world.allreduce_host(&sse, 1);
  model.set_training(was_training);
  return sse / (double(data.n) * data.d_out);
}

template double held_out_loss<float, memory_space>(MoEModel<float, memory_space>&, const RegimeData&, Communicator&,
                                                   const execution_space&);
template double held_out_loss<double, memory_space>(MoEModel<double, memory_space>&, const RegimeData&,
                                                    Communicator&, const execution_space&);

MemoryEstimate training_memory(const InputDeck& deck, int world_size) {
  const RegimeTaskConfig task = RegimeTaskConfig::from_deck(deck);
  ModelConfig m               = ModelConfig::from_deck(deck);
  const OptimizerConfig o     = OptimizerConfig::from_deck(deck);
  const TrainerConfig t       = TrainerConfig::from_deck(deck);
  const ParallelConfig p      = ParallelConfig::from_deck(deck);
  m.moe.bf16_compute          = t.precision == "bf16";
  if (deck.get<bool>("balance.shadowing")) m.moe.shadow_slots = deck.get<int>("balance.max_shadowed");
  const std::size_t s         = t.precision == "fp64" ? 8 : 4;
  const double ranks = std::max(1, world_size);
  // The largest forward: a training batch slice, or an evaluation chunk.
  const double T = std::max(double(t.batch_size) / ranks, std::min(1024.0, std::ceil(double(task.test_size) / ranks)));
  MemoryEstimate est;
  LayerMemoryShape shape;
  shape.tokens       = T;
  shape.ep           = std::max(1, p.expert_parallel);
  shape.slices       = std::max(1, p.expert_slicing);
  shape.slots_per_rank = deck.get<int>("balance.slots_per_rank");
  shape.layers       = m.blocks;
  shape.scalar_bytes = s;
  shape.moments      = o.type == OptimizerType::sgd ? 1 : 2;
  if (m.blocks > 0) add_moe_layer_memory(est, m.moe, shape);
  const double d = m.moe.d_model, din = task.input_dim, dout = RegimeTaskConfig::output_dim;
  // Input and output projections and the blocks' norms, with gradients and
  // optimizer state; the model's activations (MoEModel: three per block,
  // three more) and the trainer's batch buffers.
  est.add("dense weights, gradients and optimizer state", "task.input_dim, moe.d_model",
          ((din + 1) * d + (d + 1) * dout + 2 * d * m.blocks) * s * (2 + shape.moments));
  est.add("dense activations", "train.batch_size, moe.d_model, task.input_dim, model.blocks",
          T * (d * (3.0 * m.blocks + 3) + din + 3 * dout) * s);
  // The task's samples, in doubles on the host of every rank, and the
  // training set's permutation.
  const double samples = double(task.train_size) + double(task.test_size);
  est.add("task data (host)", "task.train_size, task.test_size, task.input_dim",
          samples * ((din + dout) * 8 + 4) + double(task.train_size) * 8, false);
  return est;
}

void check_training_deck(const InputDeck& deck, int world_size, int ranks_on_node) {
  (void)RunConfig::from_deck(deck);
  const RegimeTaskConfig task = RegimeTaskConfig::from_deck(deck);
  const ModelConfig m         = ModelConfig::from_deck(deck);  // validates the MoE keys
  const OptimizerConfig o = OptimizerConfig::from_deck(deck);  // validates
  if (o.warmup_steps > o.total_steps)
    log::warn("train.warmup_steps = ", o.warmup_steps, " exceeds train.steps = ", o.total_steps,
              ": the learning rate ends at ", o.learning_rate(o.total_steps - 1), ", short of train.lr = ", o.lr);
  const TrainerConfig t = TrainerConfig::from_deck(deck);
  MOKA_REQUIRE(t.batch_size % world_size == 0, "train.batch_size = ", t.batch_size,
               " is not a multiple of the number of ranks (", world_size, ")");
  ParallelConfig::from_deck(deck).validate(world_size, m.moe.num_experts, m.moe.d_ff);
#ifndef KOKKOS_ENABLE_CUDA
  MOKA_REQUIRE(t.precision != "bf16", "train.precision = bf16 needs a CUDA build (this one runs on ",
               Kokkos::DefaultExecutionSpace::name(), ")");
#endif
  (void)task;
  if (m.blocks > 0 && m.moe.gate == GateType::trace) {
    MoEConfig last = m.moe;  // the last block replays trace layer gate.trace_layer + blocks - 1
    last.trace_layer += m.blocks - 1;
    (void)read_trace_gate_rows(last);
  }
  const ParallelConfig pc = ParallelConfig::from_deck(deck);
  (void)BalanceConfig::from_deck(deck).slots(m.moe.num_experts, pc.expert_parallel);
  (void)CheckpointConfig::from_deck(deck, t.metrics_file);  // io.checkpoint_io = parallel on a serial HDF5
  check_memory_fits(training_memory(deck, world_size), ranks_on_node, "the run");
}

TrainResult train_regime_model(MPI_Comm comm, const InputDeck& deck, std::ostream& log) {
  ScopedRegion region("moka::train_regime_model");
  const std::string precision = deck.get<std::string>("train.precision");
  if (precision == "fp64") return RegimeRun<double>(comm, deck, log).train();
#ifndef KOKKOS_ENABLE_CUDA
  MOKA_REQUIRE(precision != "bf16", "train.precision = bf16 needs a CUDA build (this one runs on ",
               Kokkos::DefaultExecutionSpace::name(), ")");
#endif
  return RegimeRun<float>(comm, deck, log).train();
}

}  // namespace moka
