// Checkpoint and restart (issue 14), at 1, 2 and 4 ranks: a restart on the
// same layout is bitwise the run that never stopped (losses, metrics lines,
// weights, moments; gathered and MPI-IO writes); under the adaptive
// balancer the re-plans after a restart are the uninterrupted run's; a
// restart on another rank count or EP / EDP / slicing / slot layout
// continues within round-off of the run on that layout; SIGTERM writes a
// checkpoint and stops; bad files and decks are named on every rank and
// leave the earlier checkpoints as they were.
#include "TestHelpers.hpp"

#include <moka/checkpoint/Checkpoint.hpp>
#include <moka/core/Collective.hpp>
#include <moka/train/Trainer.hpp>

#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

namespace {

namespace fs = std::filesystem;
using moka_test::world_rank;
using moka_test::world_size;

/// A directory every rank names alike, empty, under the test's working directory.
std::string fresh_dir(const std::string& name) {
  long pid = static_cast<long>(getpid());
  MPI_Bcast(&pid, 1, MPI_LONG, 0, MPI_COMM_WORLD);
  const std::string d = (fs::current_path() / ("ck_" + std::to_string(pid) + "_" + name)).string();
  if (world_rank() == 0) {
    fs::remove_all(d);
    fs::create_directories(d);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return d;
}

const std::string base_deck =
    "run.name = ck\nrun.comm_check = false\nio.log_every = 100\nio.eval_every = 4\n"
    "task.train_size = 320\ntask.test_size = 64\nmodel.blocks = 2\nmoe.d_model = 8\nmoe.d_ff = 16\n"
    "moe.num_experts = 8\nmoe.top_k = 2\ntrain.steps = 12\ntrain.batch_size = 64\ntrain.lr = 3e-3\n"
    "train.warmup_steps = 2\nio.checkpoint_every = 6\nio.checkpoint_keep = 0\nio.checkpoint_final = true\n";

struct TrainRun {
  moka::TrainResult result;
  std::string log;
};

/// \p text with each key's last line only (the tests append settings to a base deck).
std::string last_wins(const std::string& text) {
  std::vector<std::string> order;
  std::map<std::string, std::string> line_of;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) {
    const std::string key = l.substr(0, l.find_first_of(" ="));
    if (key.empty()) continue;
    if (!line_of.count(key)) order.push_back(key);
    line_of[key] = l;
  }
  std::string out;
  for (const auto& k : order) out += line_of[k] + "\n";
  return out;
}

/// moka-train's loop on \p comm (all ranks of it call) for \p deck.
TrainRun train(const std::string& deck_text, MPI_Comm comm = MPI_COMM_WORLD) {
  auto deck = moka::InputDeck::parse_string(last_wins(deck_text), "checkpoint.deck");
  deck.validate(moka::train_schema());
  std::ostringstream log;
  TrainRun r;
  r.result = moka::train_regime_model(comm, deck, log);
  r.log    = log.str();
  return r;
}

/// The first \p n ranks of the world (MPI_COMM_NULL on the others).
MPI_Comm first_ranks(int n) {
  MPI_Comm c = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() < n ? 0 : MPI_UNDEFINED, world_rank(), &c);
  return c;
}

/// Largest relative difference of the datasets under \p prefix of two
/// checkpoints (each by logical expert: the layouts that wrote them do not
/// matter); -1 when one lacks a dataset of the other.
double max_difference(const std::string& a, const std::string& b, const std::string& prefix) {
  moka::CheckpointReader ra(a), rb(b);
  double worst = 0;
  for (const std::string& n : ra.datasets()) {
    if (n.rfind(prefix, 0) != 0) continue;
    if (!rb.has(n) || rb.shape(n) != ra.shape(n)) return -1;
    if (ra.type(n) == moka::CheckpointType::int64) {
      if (ra.read<std::int64_t>(n) != rb.read<std::int64_t>(n)) worst = std::max(worst, 1.0);
      continue;
    }
    const auto s = ra.shape(n);
    const auto x = ra.read_block<double>(n, std::vector<long>(s.size(), 0), s);
    const auto y = rb.read_block<double>(n, std::vector<long>(s.size(), 0), s);
    for (std::size_t i = 0; i < x.size(); ++i)
      worst = std::max(worst, std::abs(x[i] - y[i]) / std::max(1e-3, std::abs(x[i])));
  }
  return worst;
}

/// The metrics file without the columns that are timings (elapsed,
/// samples/s, step and MoE ms, migration ms).
std::string metrics_without_timings(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream out;
  std::string line;
  while (std::getline(in, line)) {
    std::stringstream ss(line);
    std::string cell;
    for (int c = 0; std::getline(ss, cell, ','); ++c)
      if (c != 6 && c != 9 && c != 10 && c != 11 && c != 15) out << cell << ",";
    out << "\n";
  }
  return out.str();
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string io_modes_deck(const std::string& io) { return "io.checkpoint_io = " + io + "\n"; }

TEST(Checkpoint, RestartIsBitwise) {
  const int W = world_size();
  std::vector<std::string> modes{"gather"};
  if (moka::CheckpointWriter::parallel_available()) modes.push_back("parallel");
  for (const std::string& io : modes) {
    const std::string dir = fresh_dir("bitwise_" + io);
    const std::string deck = base_deck + io_modes_deck(io) + "gate.type = noisy\nparallel.expert_parallel = " +
                             std::to_string(W) + "\n";
    const TrainRun a = train(deck + "io.checkpoint_dir = " + dir + "/a\nio.metrics_file = " + dir + "/a.csv\n");
    ASSERT_EQ(a.result.checkpoint, dir + "/a/ck.step00000012.h5");
    if (world_rank() == 0) fs::copy_file(dir + "/a.csv", dir + "/b.csv");
    MPI_Barrier(MPI_COMM_WORLD);
    const TrainRun b = train(deck + "io.checkpoint_dir = " + dir + "/b\nio.metrics_file = " + dir + "/b.csv\n" +
                        "io.restart = " + dir + "/a/ck.step00000006.h5\n");
    EXPECT_EQ(b.result.first_step, 6);
    EXPECT_EQ(b.result.final_train_loss, a.result.final_train_loss) << io;
    EXPECT_EQ(b.result.final_test_loss, a.result.final_test_loss) << io;
    EXPECT_EQ(b.result.initial_test_loss, a.result.initial_test_loss) << io;
    if (world_rank() == 0) {
      EXPECT_NE(b.log.find("restart: step 6 from " + dir + "/a/ck.step00000006.h5"), std::string::npos) << b.log;
      EXPECT_EQ(max_difference(a.result.checkpoint, b.result.checkpoint, "model/"), 0.0) << io;
      EXPECT_EQ(max_difference(a.result.checkpoint, b.result.checkpoint, "optimizer/"), 0.0) << io;
      EXPECT_EQ(max_difference(a.result.checkpoint, b.result.checkpoint, "run/"), 0.0) << io;
      const std::string ma = metrics_without_timings(dir + "/a.csv");
      EXPECT_EQ(metrics_without_timings(dir + "/b.csv"), ma) << io;
      EXPECT_GT(std::count(ma.begin(), ma.end(), '\n'), 12);
    }
  }
}

// The trace gate walks the fixture trace (real skew). A restart at step 6
// restores placement and load history: with the SmartMoE policy (a re-plan
// every 3 steps) the re-plans of steps 9 and 12 are the uninterrupted
// run's; with the moka policy and a spare slot per rank (replicas) the
// placement and the weights at the end are bitwise the uninterrupted run's.
TEST(Checkpoint, BalancerContinuesAsIfUninterrupted) {
  const int W = world_size();
  if (W == 1) GTEST_SKIP() << "placement across ranks: 2 or 4 ranks";
  const std::string dir = fresh_dir("balance");
  const std::string deck = base_deck + "moe.num_experts = 32\ngate.type = trace\ngate.trace_file = " +
                           moka_test::data_file("gpt_moe_32e_cut.h5") + "\ngate.trace_iteration = 0\n"
                           "parallel.expert_parallel = " + std::to_string(W) + "\n"
                           "balance.interval = 3\nbalance.row_ns = 1000\nbalance.migration_gbs = 1e6\n"
                           "io.metrics_file = none\n";
  auto replans_after_6 = [](const std::string& log) {
    std::string out;
    std::istringstream in(log);
    for (std::string l; std::getline(in, l);)
      if (l.rfind("balance: step 9", 0) == 0 || l.rfind("balance: step 12", 0) == 0)
        out += l.substr(0, l.find(", migration estimated")) + "\n";
    return out;
  };
  const std::string smart = deck + "balance.policy = smartmoe\n";
  const TrainRun a = train(smart + "io.checkpoint_dir = " + dir + "/a\n");
  const TrainRun b = train(smart + "io.checkpoint_dir = " + dir + "/b\nio.restart = " + dir + "/a/ck.step00000006.h5\n");
  const std::string moka = deck + "balance.policy = moka\nbalance.slots_per_rank = " + std::to_string(32 / W + 1) + "\n";
  const TrainRun c = train(moka + "io.checkpoint_dir = " + dir + "/c\n");
  const TrainRun d = train(moka + "io.checkpoint_dir = " + dir + "/d\nio.restart = " + dir + "/c/ck.step00000006.h5\n");
  if (world_rank() == 0) {
    EXPECT_NE(replans_after_6(a.log).find("balance: step 12 layer"), std::string::npos) << a.log;
    EXPECT_EQ(replans_after_6(b.log), replans_after_6(a.log));
    EXPECT_EQ(max_difference(a.result.checkpoint, b.result.checkpoint, "model/"), 0.0);
    EXPECT_EQ(max_difference(a.result.checkpoint, b.result.checkpoint, "balance/block"), 0.0);
    EXPECT_NE(c.log.find("experts replicated"), std::string::npos) << c.log;
    EXPECT_EQ(max_difference(c.result.checkpoint, d.result.checkpoint, "model/"), 0.0);
    EXPECT_EQ(max_difference(c.result.checkpoint, d.result.checkpoint, "optimizer/"), 0.0);
    EXPECT_EQ(max_difference(c.result.checkpoint, d.result.checkpoint, "balance/block"), 0.0);
  }
}

// Written on one layout, continued on another: the same run within
// round-off (fp64; sums over other rank counts add in another order).
TEST(Checkpoint, RestartsOnAnotherLayout) {
  const int W = world_size();
  if (W == 1) GTEST_SKIP() << "another rank count: 2 or 4 ranks";
  struct Case {
    int from_ranks;
    std::string from;
    int to_ranks;
    std::string to;
  };
  std::vector<Case> cases;
  const std::string moka2 = "balance.policy = moka\nbalance.slots_per_rank = ";
  if (W == 2) {
    cases = {{2, "parallel.expert_parallel = 2\n", 1, ""},
             {1, "", 2, "parallel.expert_parallel = 2\n"},
             {2, "parallel.expert_slicing = 2\n", 2, "parallel.expert_parallel = 2\n" + moka2 + "5\n"}};
  } else {
    cases = {{4, "parallel.expert_parallel = 4\n", 2, "parallel.expert_parallel = 2\n"},
             {2, "parallel.expert_parallel = 2\n", 4, "parallel.expert_parallel = 4\n" + moka2 + "3\n"},
             {4, "parallel.expert_parallel = 2\nparallel.expert_slicing = 2\n", 1, ""},
             {4, "parallel.expert_parallel = 2\n", 4, "parallel.expert_parallel = 4\n"}};
  }
  int k = 0;
  for (const Case& c : cases) {
    const std::string dir = fresh_dir("layout" + std::to_string(k++));
    const std::string deck = base_deck + "train.precision = fp64\ngate.type = gshard\nio.metrics_file = none\n";
    MPI_Comm from = first_ranks(c.from_ranks), to = first_ranks(c.to_ranks);
    if (from != MPI_COMM_NULL) train(deck + c.from + "io.checkpoint_dir = " + dir + "/from\n", from);
    MPI_Barrier(MPI_COMM_WORLD);
    if (to != MPI_COMM_NULL) {
      const TrainRun ref = train(deck + c.to + "io.checkpoint_dir = " + dir + "/ref\n", to);
      const TrainRun re  = train(deck + c.to + "io.checkpoint_dir = " + dir + "/re\nio.restart = " + dir +
                           "/from/ck.step00000006.h5\n", to);
      EXPECT_EQ(re.result.first_step, 6);
      EXPECT_NEAR(re.result.final_train_loss, ref.result.final_train_loss, 1e-10 * ref.result.final_train_loss)
          << c.from << " -> " << c.to;
      EXPECT_NEAR(re.result.final_test_loss, ref.result.final_test_loss, 1e-10 * ref.result.final_test_loss);
      int r = 0;
      MPI_Comm_rank(to, &r);
      if (r == 0) {
        const double d = max_difference(ref.result.checkpoint, re.result.checkpoint, "model/");
        EXPECT_GE(d, 0.0);
        EXPECT_LT(d, 1e-9) << c.from << " -> " << c.to;
        EXPECT_LT(max_difference(ref.result.checkpoint, re.result.checkpoint, "optimizer/"), 1e-6);
      }
      MPI_Comm_free(&to);
    }
    if (from != MPI_COMM_NULL) MPI_Comm_free(&from);
    MPI_Barrier(MPI_COMM_WORLD);
  }
}

TEST(Checkpoint, SignalWritesOneAndStops) {
  const std::string dir = fresh_dir("signal");
  const std::string deck = base_deck + "io.checkpoint_every = 0\nio.metrics_file = none\nio.checkpoint_dir = " + dir +
                           "\nparallel.expert_parallel = " + std::to_string(world_size()) + "\n";
  const TrainRun full = train(deck + "run.name = full\n");
  setenv("MOKA_TEST_SIGNAL_AT_STEP", "5", 1);  // rank 0 raises SIGTERM after step 5
  const TrainRun cut = train(deck);
  unsetenv("MOKA_TEST_SIGNAL_AT_STEP");
  EXPECT_TRUE(cut.result.interrupted);
  EXPECT_EQ(cut.result.steps, 5);
  EXPECT_EQ(cut.result.checkpoint, dir + "/ck.step00000005.h5");
  if (world_rank() == 0)
    EXPECT_NE(cut.log.find("stopped by SIGTERM after step 5 of 12: checkpoint " + dir + "/ck.step00000005.h5 written"),
              std::string::npos)
        << cut.log;
  const TrainRun rest = train(deck + "io.restart = latest\n");
  EXPECT_FALSE(rest.result.interrupted);
  EXPECT_EQ(rest.result.first_step, 5);
  EXPECT_EQ(rest.result.final_train_loss, full.result.final_train_loss);
  EXPECT_EQ(rest.result.final_test_loss, full.result.final_test_loss);
}

/// The error every rank gets from \p f (a moka::CollectiveError), or "".
std::string collective_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const moka::CollectiveError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not a CollectiveError: ") + e.what();
  }
  return "";
}

TEST(Checkpoint, BadInputIsNamedAndNothingIsLost) {
  const std::string dir = fresh_dir("bad");
  const std::string deck = base_deck + "io.checkpoint_every = 0\ntrain.steps = 4\nio.metrics_file = none\n"
                           "io.checkpoint_dir = " + dir + "/good\n";
  const std::string good = train(deck).result.checkpoint;
  const std::string before = world_rank() == 0 ? file_bytes(good) : "";
  auto copy = [&](const std::string& name) {
    const std::string p = dir + "/" + name;
    if (world_rank() == 0) fs::copy_file(good, p, fs::copy_options::overwrite_existing);
    return p;
  };
  const std::string more = deck + "train.steps = 8\n";
  auto restart_error = [&](const std::string& file, const std::string& extra = "") {
    return collective_error([&] { train(more + extra + "io.restart = " + file + "\n"); });
  };
  // Truncated.
  const std::string t = copy("truncated.h5");
  if (world_rank() == 0) fs::resize_file(t, fs::file_size(t) / 2);
  MPI_Barrier(MPI_COMM_WORLD);
  std::string e = restart_error(t);
  EXPECT_NE(e.find("checkpoint '" + t + "'"), std::string::npos) << e;
  // Flipped bytes in a dataset's data, found by its checksum.
  const std::string f = copy("flipped.h5");
  if (world_rank() == 0) {
    hid_t h  = H5Fopen(f.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t ds = H5Dopen2(h, "model/block1/w2", H5P_DEFAULT);
    const haddr_t at = H5Dget_offset(ds);
    H5Dclose(ds);
    H5Fclose(h);
    std::fstream io(f, std::ios::in | std::ios::out | std::ios::binary);
    io.seekg(static_cast<std::streamoff>(at) + 40);
    char c = 0;
    io.read(&c, 1);
    c = static_cast<char>(c ^ 0x5a);
    io.seekp(static_cast<std::streamoff>(at) + 40);
    io.write(&c, 1);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  e = restart_error(f);
  EXPECT_NE(e.find("checkpoint '" + f + "': dataset 'model/block1/w2' does not match its checksum"), std::string::npos)
      << e;
  // A missing dataset.
  const std::string m = copy("missing.h5");
  if (world_rank() == 0) {
    hid_t h = H5Fopen(m.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    H5Ldelete(h, "optimizer/v/block0/w1", H5P_DEFAULT);
    H5Fclose(h);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  e = restart_error(m);
  EXPECT_NE(e.find("checkpoint '" + m + "': no second moments ('optimizer/v/block0/w1')"), std::string::npos) << e;
  // A deck that disagrees: every key that differs, with both values.
  e = restart_error(good, "moe.num_experts = 16\ntrain.optimizer = sgd\n");
  EXPECT_NE(e.find("was written by a run with another model, task or optimizer"), std::string::npos) << e;
  EXPECT_NE(e.find("moe.num_experts = 8 in the checkpoint, 16 here"), std::string::npos) << e;
  EXPECT_NE(e.find("train.optimizer = adamw in the checkpoint, sgd here"), std::string::npos) << e;
  // Nothing left to run.
  e = collective_error([&] { train(deck + "io.restart = " + good + "\n"); });
  EXPECT_NE(e.find("is at step 4 and train.steps = 4: nothing left to run"), std::string::npos) << e;
  // A path that does not exist, one that is not HDF5 (a directory).
  e = restart_error(dir + "/no_such.h5");
  EXPECT_NE(e.find("checkpoint '" + dir + "/no_such.h5': cannot open it"), std::string::npos) << e;
  e = restart_error(dir);
  EXPECT_NE(e.find("checkpoint '" + dir + "'"), std::string::npos) << e;
  // latest in a directory without checkpoints of the run, and without the directory.
  e = restart_error("latest", "io.checkpoint_dir = " + dir + "\n");
  EXPECT_NE(e.find("io.restart = latest: no checkpoint of run 'ck' (ck.stepNNNNNNNN.h5) in '" + dir + "'"),
            std::string::npos)
      << e;
  e = restart_error("latest", "io.checkpoint_dir = " + dir + "/none\n");
  EXPECT_NE(e.find("the checkpoint directory '" + dir + "/none' does not exist"), std::string::npos) << e;
  // The earlier checkpoint is as it was, and still restarts.
  if (world_rank() == 0) EXPECT_EQ(file_bytes(good), before);
  EXPECT_EQ(train(more + "io.restart = latest\n").result.first_step, 4);
}

// The library without the driver: a model of another expert count reading
// a checkpoint is told which dataset has which shape.
TEST(Checkpoint, ModelOfAnotherShapeIsNamed) {
  const std::string dir = fresh_dir("shape");
  moka::ModelConfig mc;
  mc.blocks          = 1;
  mc.moe.d_model     = 8;
  mc.moe.d_ff        = 16;
  mc.moe.num_experts = 4;
  // A model without process groups is this rank's alone: one rank's communicator.
  auto world = moka::make_communicator(MPI_COMM_SELF, moka::CommBackend::mpi);
  const std::string four = dir + "/four" + std::to_string(world_rank()) + ".h5";
  auto save = [&](const moka::ModelConfig& c, const std::string& p) {
    moka::MoEModel<double> m(c);
    m.init_parameters(5);
    moka::OptimizerConfig oc;
    moka::Optimizer<double> opt(oc);
    for (auto& r : m.parameters()) opt.add(r.param, r.grad);
    moka::RunCounters rc;
    moka::save_checkpoint(p, false, m, opt, static_cast<moka::Balancer<double, moka::memory_space>*>(nullptr), rc, "", *world);
  };
  save(mc, four);
  moka::ModelConfig other = mc;
  other.moe.num_experts   = 6;
  moka::MoEModel<double> m(other);
  moka::OptimizerConfig oc;
  moka::Optimizer<double> opt(oc);
  for (auto& r : m.parameters()) opt.add(r.param, r.grad);
  const std::string e = collective_error(
      [&] { moka::load_checkpoint(four, m, opt, static_cast<moka::Balancer<double, moka::memory_space>*>(nullptr), *world); });
  EXPECT_NE(e.find("dataset 'model/block0/gate_w' is 8 x 4, the model's is 8 x 6"), std::string::npos) << e;
  // Such a model on a communicator of several ranks is refused, not written twice.
  if (world_size() > 1) {
    auto all = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::mpi);
    moka::RunCounters rc;
    const std::string e2 = collective_error([&] {
      moka::save_checkpoint(dir + "/all.h5", false, m, opt, static_cast<moka::Balancer<double, moka::memory_space>*>(nullptr),
                            rc, "", *all);
    });
    EXPECT_NE(e2.find("the model's layers are laid out over 1 rank, the communicator has " +
                      std::to_string(world_size())),
              std::string::npos)
        << e2;
  }
}

}  // namespace
