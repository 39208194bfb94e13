// Distributed experts against one rank. For every layout EP x EDP x S of
// the world (1, 2 or 4 ranks) and a set of gates covering every feature
// that depends on the whole batch (random streams, balance losses, z-loss,
// bias balancing, global capacity, trace assignment), the layer's outputs
// and all gradients (summed by GradSync) equal those of one layer that sees
// the whole batch; 20 training steps of the model end at the same losses.
// Edge cases: uneven token splits, a rank with no tokens, every token to
// one expert (the other experts receive nothing); invalid layouts.
//
// fp64 on the host (MPI backend); on CUDA builds the same comparisons run
// on the device with the default backend (NCCL when every rank has a GPU)
// and with MPI staging through host buffers.
#include <moka/parallel/GradSync.hpp>
#include <moka/parallel/ReplicaSplit.hpp>
#include <moka/moe/MoELayer.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/train/Trainer.hpp>

#include <gtest/gtest.h>

#include "MoETestUtils.hpp"

#include <fstream>
#include <functional>
#include <random>
#include <sstream>

namespace {

using moka_test::world_rank;
using moka_test::world_size;

struct Layout {
  int ep, slice;
};

/// Every EP x S with EP S dividing the world, E % EP == 0 and d_ff % S == 0.
std::vector<Layout> layouts(int E, int dff) {
  std::vector<Layout> out;
  const int W = world_size();
  for (int ep = 1; ep <= W; ++ep)
    for (int s = 1; s <= W; ++s)
      if (W % (ep * s) == 0 && E % ep == 0 && dff % s == 0) out.push_back({ep, s});
  return out;
}

std::string describe(const Layout& l) {
  return "EP " + std::to_string(l.ep) + " x EDP " + std::to_string(world_size() / (l.ep * l.slice)) + " x S " +
         std::to_string(l.slice);
}

struct GateCase {
  std::string name;
  std::function<void(moka::MoEConfig&)> set;
};

// The routing-trace fixture (layer 1 of it is layer 3 of the shared GPT-MoE trace).
std::string trace_file() { return moka_test::data_file("gpt_moe_32e_cut.h5"); }

std::vector<GateCase> gate_cases() {
  using moka::GateType;
  return {
      {"topk", [](moka::MoEConfig& c) { c.gate = GateType::topk; }},
      {"softmax_renorm_zloss_biasbalance",
       [](moka::MoEConfig& c) {
         c.gate          = GateType::softmax;
         c.renormalize   = true;
         c.z_loss_weight = 0.1;
         c.bias_balance  = true;
         c.bias_update_rate = 0.05;
       }},
      {"noisy_swiglu",
       [](moka::MoEConfig& c) {
         c.gate       = GateType::noisy;
         c.activation = moka::Activation::swiglu;
       }},
      {"gshard_global_capacity",
       [](moka::MoEConfig& c) {
         c.gate            = GateType::gshard;
         c.dropless        = false;
         c.capacity_factor = 0.75;
         c.capacity_scope  = moka::CapacityScope::global;
       }},
      {"switch_capacity",
       [](moka::MoEConfig& c) {
         c.gate            = GateType::switch_top1;
         c.top_k           = 1;
         c.dropless        = false;
         c.capacity_factor = 1.0;
         c.z_loss_weight   = 0.01;
       }},
      {"zero_all_to_expert0", [](moka::MoEConfig& c) { c.gate = GateType::zero; }},
      {"trace",
       [](moka::MoEConfig& c) {
         c.gate        = GateType::trace;
         c.num_experts = 32;
         c.trace_file  = trace_file();
         c.trace_layer = 1;
       }},
  };
}

moka::MoEConfig base_config() {
  moka::MoEConfig c;
  c.d_model     = 6;
  c.d_ff        = 8;
  c.num_experts = 4;
  c.top_k       = 2;
  c.balance_weight = 0.05;
  return c;
}

/// The part of a single-rank expert tensor this rank holds: its local slots'
/// experts (the placement's), its slice of d_ff (the layout of
/// MoELayer::init_parameters).
template <class Layer>
std::vector<double> local_part(const Layer& dist, const std::vector<double>& full, const char* which) {
  const auto& c  = dist.config();
  const long d   = c.d_model, dff = c.d_ff, dfi = c.d_ff_in();
  const long L   = dist.local_experts(), dffl = dist.local_d_ff();
  const long dfil = dfi / (dff / dffl), s0 = dist.groups() ? dist.groups()->slice_rank() * dffl : 0;
  const bool swiglu = c.activation == moka::Activation::swiglu;
  std::vector<double> out;
  const std::string w(which);
  if ((w == "b1" || w == "b2") && full.empty()) return out;
  out.assign(w == "w1" ? L * d * dfil : w == "b1" ? L * dfil : w == "w2" ? L * dffl * d : L * d, 0);
  for (long l = 0; l < L; ++l) {
    const long e = dist.local_expert(int(l));
    if (w == "w1") {
      for (long i = 0; i < d; ++i)
        for (long j = 0; j < dfil; ++j) {
          const long half = swiglu && j >= dffl ? 1 : 0, col = half * dff + s0 + (j - half * dffl);
          out[(l * d + i) * dfil + j] = full[(e * d + i) * dfi + col];
        }
    } else if (w == "b1") {
      for (long j = 0; j < dfil; ++j) {
        const long half = swiglu && j >= dffl ? 1 : 0, col = half * dff + s0 + (j - half * dffl);
        out[l * dfil + j] = full[e * dfi + col];
      }
    } else if (w == "w2") {
      for (long r = 0; r < dffl; ++r)
        for (long j = 0; j < d; ++j) out[(l * dffl + r) * d + j] = full[(e * dff + s0 + r) * d + j];
    } else {  // b2
      for (long j = 0; j < d; ++j) out[l * d + j] = full[e * d + j];
    }
  }
  return out;
}

/// A placement that is not contiguous: slot s holds expert (E - s) mod E,
/// so experts change ranks and their order within a rank.
moka::Placement permuted_placement(int E, int P) {
  std::vector<int> slots(E);
  for (int s = 0; s < E; ++s) slots[s] = (E - s) % E;
  return moka::Placement::from_slots(E, P, slots);
}

/// How the test places the experts.
enum class Placed { contiguous, permuted, replicated };

/// The permuted placement plus one spare slot per rank (P > 1), holding a
/// replica of the first expert of the next rank: every rank holds one
/// replicated expert and the rows of each are split between two ranks.
moka::Placement replicated_placement(int E, int P) {
  const moka::Placement base = permuted_placement(E, P);
  if (P == 1) return base;
  const int L = E / P;
  std::vector<int> slots;
  for (int r = 0; r < P; ++r) {
    for (int l = 0; l < L; ++l) slots.push_back(base.expert_at(r, l));
    slots.push_back(base.expert_at((r + 1) % P, 0));
  }
  return moka::Placement::from_slots(E, P, slots);
}

moka::Placement placement_for(Placed how, int E, int P) {
  switch (how) {
    case Placed::permuted: return permuted_placement(E, P);
    case Placed::replicated: return replicated_placement(E, P);
    case Placed::contiguous: break;
  }
  return moka::Placement();
}

const char* describe(Placed how) {
  return how == Placed::permuted ? ", permuted placement" : how == Placed::replicated ? ", replicated experts" : "";
}

std::vector<double> rows(const std::vector<double>& m, long first, long n, long width) {
  return std::vector<double>(m.begin() + first * width, m.begin() + (first + n) * width);
}

/// Largest relative error seen by compare() since the last reset (reported per layout).
double g_max_rel = 0;

/// Max |a - b| / max |b| <= tol with a message; exact when \p bitwise.
void compare(const std::vector<double>& got, const std::vector<double>& want, bool bitwise, double tol,
             const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num = std::max(num, std::fabs(got[i] - want[i]));
    den = std::max(den, std::fabs(want[i]));
  }
  g_max_rel = std::max(g_max_rel, num / std::max(den, 1e-30));
  if (bitwise) EXPECT_EQ(num, 0.0) << what << ": not bitwise equal (max abs diff " << num << ")";
  else EXPECT_LE(num, tol * std::max(den, 1e-30)) << what << ": relative error " << num / std::max(den, 1e-30);
}

template <class M>
void check_layer(const Layout& lay, const std::shared_ptr<moka::ProcessGroups>& groups, const GateCase& gc,
                 int T_global, int iters, Placed how, bool batched = false) {
  using Layer = moka::MoELayer<double, M>;
  using matrix = typename Layer::matrix;
  typename Layer::execution_space space;
  moka::MoEConfig cfg = base_config();
  gc.set(cfg);
  if (batched) cfg.gemm_batched = moka::GemmChoice::on;  // the padded rows (both layers)
  const int W = world_size(), rank = world_rank();
  if (cfg.num_experts % lay.ep != 0 || cfg.d_ff % lay.slice != 0) return;
  const std::string what = gc.name + " [" + groups->describe() + describe(how) +
                           ", T = " + std::to_string(T_global) + "]";
  Layer ref(cfg),
      dist(cfg, groups, placement_for(how, cfg.num_experts, lay.ep));
  ref.init_parameters(99);
  dist.init_parameters(99);
  const int d = cfg.d_model;
  // Token split: uneven when T_global % W != 0; a rank may get none.
  const int T   = T_global / W + (rank < T_global % W ? 1 : 0);
  const int t0  = rank * (T_global / W) + std::min(rank, T_global % W);
  // Within round-off, not bitwise: BLAS kernels block by the matrix shape,
  // and the GEMMs of a distributed layer have fewer rows (the gate's: this
  // rank's tokens; an expert's with EDP > 1: its replica's), so a row's
  // dot products may be summed in another order (measured: 1e-17 absolute
  // on O(1) values); sums over ranks and over slices reorder too. One rank
  // with a ProcessGroups of size 1 is bitwise equal.
  const bool exact = W == 1;
  const bool rows_exact = exact, expert_exact = exact;
  const double tol = 1e-12;

  {
    const auto rp = moka_test::params_of(ref), dp = moka_test::params_of(dist);
    compare(dp.wg, rp.wg, true, 0, what + " init gate_w");
    compare(dp.w1, local_part(dist, rp.w1, "w1"), true, 0, what + " init w1");
    compare(dp.w2, local_part(dist, rp.w2, "w2"), true, 0, what + " init w2");
  }
  auto params = [](Layer& L) {
    std::vector<moka::ParamRef<double, M>> out;
    auto add = [&](const char* n, auto p, auto g, moka::ParamTag t) {
      using flat = decltype(moka::ParamRef<double, M>::param);
      if (p.size()) out.push_back({n, flat(p.data(), p.size()), flat(g.data(), g.size()), t});
    };
    add("gate_w", L.params().gate_w, L.grads().gate_w, moka::ParamTag::gate);
    add("noise_w", L.params().noise_w, L.grads().noise_w, moka::ParamTag::gate);
    add("w1", L.params().w1, L.grads().w1, moka::ParamTag::expert);
    add("b1", L.params().b1, L.grads().b1, moka::ParamTag::expert);
    add("w2", L.params().w2, L.grads().w2, moka::ParamTag::expert);
    add("b2", L.params().b2, L.grads().b2, moka::ParamTag::expert_replicated);
    // The replicas' gradients are summed among them (the layer's own
    // parameters() does this too).
    for (auto& p : out)
      if (p.tag == moka::ParamTag::expert || p.tag == moka::ParamTag::expert_replicated)
        p.replicas = L.replica_groups();
    return out;
  };
  moka::GradSync<double, M> sync(groups, params(dist), 1e-4);  // tiny buckets: several per group

  for (int it = 0; it < iters; ++it) {
    std::mt19937_64 rng(1000 + it);
    const auto x  = moka_test::random_vec(std::size_t(T_global) * d, rng);
    const auto dy = moka_test::random_vec(std::size_t(T_global) * d, rng);
    const auto r  = moka_test::run_layer(ref, T_global, x, dy);

    matrix X("x", T, d), Y("y", T, d), DY("dy", T, d), DX("dx", T, d);
    moka_test::from_vec(X, rows(x, t0, T, d));
    moka_test::from_vec(DY, rows(dy, t0, T, d));
    dist.zero_grad(space);
    dist.forward(space, X, Y);
    dist.backward(space, DY, DX);
    sync.sync(space);
    space.fence();
    const std::string at = what + " iteration " + std::to_string(it);
    if (groups->ep_size() > 1 && cfg.num_experts > groups->ep_size() && T_global >= 8) {
      // The way the deck asks for ran (the test's payloads are tiny).
      const bool coalesced = groups->config().exchange_coalesce_mb > 0 && !dist.exchange_direct();
      EXPECT_EQ(dist.exchange_coalesced(), coalesced) << at;
    }
    if (groups->config().exchange_direct != "auto")
      EXPECT_EQ(dist.exchange_direct(), groups->config().exchange_direct == "on") << at;
    if (batched) {
      // Padded where the rows stay on their rank (no exchange) and it kept
      // any (capacity may drop a rank's few tokens), else not.
      double kept = 0;
      for (double c : moka_test::to_vec(dist.expert_counts())) kept += c;
      const bool pads = groups->ep_size() == 1 && groups->slice_size() == 1 && how != Placed::replicated && kept > 0;
      EXPECT_EQ(dist.padded_rows() > 0, pads) << at;
      EXPECT_GT(ref.padded_rows(), 0) << at;
    }
    EXPECT_EQ(dist.tokens_global(), T_global) << at;
    EXPECT_EQ(dist.token_offset(), t0) << at;
    if (how == Placed::replicated && groups->edp_size() == 1 && groups->slice_size() == 1) {
      // The rows this rank's slots took: the split of the whole batch's
      // kept rows per expert (the single-rank counts) by split_replica_rows.
      std::vector<std::vector<int>> layout(groups->ep_size());
      for (int q = 0; q < groups->ep_size(); ++q)
        for (int l = 0; l < dist.local_experts(); ++l) layout[q].push_back(dist.placement().expert_at(q, l));
      const auto share = moka::split_replica_rows(layout, std::vector<double>(r.counts.begin(), r.counts.end()), true);
      double want = 0;
      for (double v : share[groups->ep_rank()]) want += v;
      EXPECT_EQ(double(dist.expert_rows()), want) << at << ": rows of this rank's slots";
    }
    compare(moka_test::to_vec(Y), rows(r.y, t0, T, d), rows_exact, tol, at + " y");
    compare(moka_test::to_vec(DX), rows(r.dx, t0, T, d), rows_exact, tol, at + " dx");
    compare(moka_test::to_vec(dist.grads().gate_w), r.dwg, W == 1, tol, at + " dgate_w");
    compare(moka_test::to_vec(dist.grads().noise_w), r.dwn, W == 1, tol, at + " dnoise_w");
    compare(moka_test::to_vec(dist.grads().w1), local_part(dist, r.dw1, "w1"), expert_exact, tol, at + " dw1");
    compare(moka_test::to_vec(dist.grads().b1), local_part(dist, r.db1, "b1"), expert_exact, tol, at + " db1");
    compare(moka_test::to_vec(dist.grads().w2), local_part(dist, r.dw2, "w2"), expert_exact, tol, at + " dw2");
    compare(moka_test::to_vec(dist.grads().b2), local_part(dist, r.db2, "b2"), expert_exact, tol, at + " db2");
    EXPECT_NEAR(dist.aux_loss(), r.routing.aux, 1e-12 * (1 + std::fabs(r.routing.aux))) << at;
    // Routing of this rank's tokens and the selection bias (bias balancing) as on one rank.
    const auto idx = moka_test::to_vec(dist.expert_index());
    // EXPECT, not ASSERT: returning here alone would leave the other ranks
    // in the collectives below.
    for (int i = 0; i < T * cfg.top_k; ++i)
      if (int(idx[i]) != r.routing.idx[t0 * cfg.top_k + i]) {
        ADD_FAILURE() << at << ": choice " << i << " routed to " << int(idx[i]) << ", one rank routes it to "
                      << r.routing.idx[t0 * cfg.top_k + i];
        break;
      }
    compare(moka_test::to_vec(dist.selection_bias()), moka_test::to_vec(ref.selection_bias()), true, 0,
            at + " selection bias");
    // The global norm counts every expert once: equal to the single-rank norm.
    moka::GradSync<double, M> ref_sync(nullptr, params(ref), 1.0);
    EXPECT_NEAR(sync.global_norm(space), ref_sync.global_norm(space), 1e-12 * ref_sync.global_norm(space)) << at;
  }
}

/// \p coalesce_mb: comm.exchange_coalesce_mb (the test's payloads are tiny:
/// 32 sends one message per peer, 0 one per (peer, local expert));
/// \p max_message_mb: comm.exchange_max_message_mb (1e-4, about 100 bytes,
/// cuts every message into many pieces, mid-row; 0: whole messages);
/// \p direct: comm.exchange_direct ("on" only where it can run: EP > 1,
/// NCCL symmetric windows usable or MOKA_TEST_REQUIRE_DIRECT=1, which makes
/// their absence an error; "auto" elsewhere); \p how: the experts placed
/// contiguously, by permuted_placement() or by replicated_placement();
/// \p batched: expert.gemm_batched = true in both layers.
template <class M>
void check_all_layouts(const std::string& backend, double coalesce_mb, double max_message_mb = 0,
                       const std::string& direct = "off", Placed how = Placed::contiguous, bool batched = false) {
  const moka::MoEConfig base = base_config();
  const bool device = !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible;
  for (const Layout& lay : layouts(base.num_experts, base.d_ff)) {
    // One set of communicators per layout (NCCL communicators are costly to make).
    moka::ParallelConfig pc;
    pc.expert_parallel = lay.ep;
    pc.expert_slicing  = lay.slice;
    pc.backend         = backend;
    pc.exchange_coalesce_mb = coalesce_mb;
    pc.exchange_max_message_mb = max_message_mb;
    pc.exchange_direct = direct == "on" && lay.ep == 1 ? "auto" : direct;
    auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, base.num_experts, base.d_ff, device);
    if (pc.exchange_direct == "on" && !groups->ep().windows_usable() && !std::getenv("MOKA_TEST_REQUIRE_DIRECT")) {
      if (world_rank() == 0) std::cout << "layout " << groups->describe() << ": no symmetric windows here, skipped\n";
      continue;
    }
    if (world_rank() == 0)
      std::cout << "layout " << groups->describe()
                << (pc.exchange_direct == "on" ? ", direct puts"
                    : coalesce_mb > 0          ? ", one message per peer"
                                               : ", blocks")
                << (max_message_mb > 0 ? ", in pieces" : "") << describe(how)
                << "\n";
    for (const auto& gc : gate_cases()) {
      moka::MoEConfig cfg = base;
      gc.set(cfg);
      for (int T : {13, 3}) {
        g_max_rel = 0;
        check_layer<M>(lay, groups, gc, T, 2, how, batched);
        if (world_rank() == 0 && T == 13)
          std::cout << gc.name << " " << describe(lay) << ": largest relative difference " << g_max_rel << "\n";
        // Every rank leaves together (a rank alone leaving hangs the others).
        if (moka_test::any_rank_failed()) return;
      }
    }
  }
}

}  // namespace

TEST(Distributed, LayerEqualsOneRankHost) { check_all_layouts<Kokkos::HostSpace>("mpi", 32); }
// expert.gemm_batched = true: the one-rank reference pads its expert rows;
// the distributed layer pads where no exchange moves them (EDP only) and
// runs packed under EP or slicing: all equal within round-off.
TEST(Distributed, LayerEqualsOneRankHostPadded) {
  check_all_layouts<Kokkos::HostSpace>("mpi", 32, 0, "off", Placed::contiguous, true);
}
TEST(Distributed, LayerEqualsOneRankHostBlocks) { check_all_layouts<Kokkos::HostSpace>("mpi", 0); }
TEST(Distributed, LayerEqualsOneRankHostPieces) { check_all_layouts<Kokkos::HostSpace>("mpi", 0, 1e-4); }
// The placement seam: experts on other ranks and in another order than the
// contiguous placement; results as on one rank, as bitwise as above.
TEST(Distributed, LayerEqualsOneRankHostPermuted) {
  check_all_layouts<Kokkos::HostSpace>("mpi", 32, 0, "off", Placed::permuted);
  check_all_layouts<Kokkos::HostSpace>("mpi", 0, 0, "off", Placed::permuted);
}
// Replicas in spare slots: a replicated expert's rows split between two
// ranks, its gradients summed among the replicas; results as on one rank
// within the same round-off, the norm counting each expert once.
TEST(Distributed, LayerEqualsOneRankHostReplicated) {
  check_all_layouts<Kokkos::HostSpace>("mpi", 32, 0, "off", Placed::replicated);
  check_all_layouts<Kokkos::HostSpace>("mpi", 0, 1e-4, "off", Placed::replicated);
}

#ifdef KOKKOS_ENABLE_CUDA
// Device builds only (a host-only build has no second memory space to test).
TEST(Distributed, LayerEqualsOneRankDevice) {
  // Direct puts into symmetric windows (NCCL on one node's GPUs), then
  // messages: one per peer, blocks, blocks in pieces.
  check_all_layouts<moka::memory_space>("auto", 0, 0, "on");
  check_all_layouts<moka::memory_space>("auto", 0, 0, "on", Placed::permuted);
  check_all_layouts<moka::memory_space>("auto", 0, 0, "on", Placed::replicated);
  check_all_layouts<moka::memory_space>("auto", 32, 0, "off", Placed::replicated);
  for (auto [mb, cap] : {std::pair{32.0, 0.0}, {0.0, 0.0}, {0.0, 1e-4}}) {
    check_all_layouts<moka::memory_space>("auto", mb, cap);  // NCCL where every rank has a GPU
    check_all_layouts<moka::memory_space>("mpi", mb, cap);   // device data staged through host buffers
  }
}
#endif

TEST(Distributed, DirectExchangeWhereImpossibleIsAnError) {
  // comm.exchange_direct = on with the rows in host memory (MPI): every rank
  // stops at the plan with the reason, before any row moves.
  // One rank has no EP exchange to decide on: there, EP 2 itself is
  // refused, naming the rank count.
  if (world_size() < 2) {
    moka::ParallelConfig one;
    one.expert_parallel = 2;
    try {
      moka::ProcessGroups g(MPI_COMM_WORLD, one, 8, 16, false);
      FAIL() << "EP 2 accepted on one rank";
    } catch (const moka::Error& e) {
      EXPECT_NE(std::string(e.what()).find("does not divide the 1 ranks"), std::string::npos) << e.what();
    }
    return;
  }
  moka::MoEConfig cfg = base_config();
  moka::ParallelConfig pc;
  pc.expert_parallel = 2;
  pc.backend         = "mpi";
  pc.exchange_direct = "on";
  auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, cfg.num_experts, cfg.d_ff, false);
  moka::MoELayer<double, Kokkos::HostSpace> layer(cfg, groups);
  using matrix = moka::MoELayer<double, Kokkos::HostSpace>::matrix;
  matrix X("x", 6, cfg.d_model), Y("y", 6, cfg.d_model);
  try {
    layer.forward(Kokkos::DefaultHostExecutionSpace(), X, Y);
    FAIL() << "the layer ran with comm.exchange_direct = on in host memory";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("comm.exchange_direct = on, but the layer's rows are in host memory"),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(layer.exchange_direct());
}

TEST(Distributed, LocalCapacityPerRank) {
  // GShard's local capacity: each rank keeps at most ceil(f T_rank k / E)
  // of its own assignments per expert, whatever the other ranks route.
  moka::MoEConfig cfg = base_config();
  cfg.gate            = moka::GateType::gshard;
  cfg.random_routing  = false;
  cfg.dropless        = false;
  cfg.capacity_factor = 0.5;
  cfg.capacity_scope  = moka::CapacityScope::local;
  for (const Layout& lay : layouts(cfg.num_experts, cfg.d_ff)) {
    moka::ParallelConfig pc;
    pc.expert_parallel = lay.ep;
    pc.expert_slicing  = lay.slice;
    auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, cfg.num_experts, cfg.d_ff, false);
    moka::MoELayer<double, Kokkos::HostSpace> layer(cfg, groups);
    layer.init_parameters(5);
    const int T = 10 + 3 * world_rank();
    std::mt19937_64 rng(7 + world_rank());
    Kokkos::View<double**, Kokkos::LayoutRight, Kokkos::HostSpace> x("x", T, cfg.d_model), y("y", T, cfg.d_model);
    moka_test::from_vec(x, moka_test::random_vec(std::size_t(T) * cfg.d_model, rng));
    Kokkos::DefaultHostExecutionSpace space;
    layer.forward(space, x, y);
    EXPECT_EQ(layer.capacity(), cfg.capacity(T)) << describe(lay);
    const auto idx    = moka_test::to_vec(layer.expert_index());
    const auto counts = moka_test::to_vec(layer.expert_counts());
    for (int e = 0; e < cfg.num_experts; ++e) {
      long routed = 0;
      for (double v : idx) routed += int(v) == e ? 1 : 0;
      EXPECT_EQ(long(counts[e]), std::min(routed, layer.capacity())) << describe(lay) << " expert " << e;
    }
  }
}

TEST(Distributed, TrainingEqualsOneRank) {
  // 20 steps of the model in fp64 on every layout end at the losses of one
  // rank training on the whole batch (within round-off: the gradient sums
  // over ranks change the order of additions).
  const std::string base =
      "run.name = dist_test\nio.metrics_file = none\ntask.train_size = 512\ntask.test_size = 96\n"
      "model.blocks = 2\nmoe.d_model = 8\nmoe.d_ff = 16\nmoe.num_experts = 4\nmoe.top_k = 2\n"
      "gate.type = gshard\ngate.dropless = false\ngate.capacity_factor = 1.0\ngate.capacity_scope = global\n"
      "gate.z_loss_weight = 0.01\ntrain.precision = fp64\ntrain.steps = 20\ntrain.batch_size = 64\n"
      "train.lr = 3e-3\ntrain.clip_norm = 0.5\nio.log_every = 100\nio.eval_every = 10\n";
  auto single = moka::InputDeck::parse_string(base, "single.deck");
  single.validate(moka::train_schema());
  std::ostringstream log;
  const auto want = moka::train_regime_model(MPI_COMM_SELF, single, log);
  for (const Layout& lay : layouts(4, 16)) {
    auto deck = moka::InputDeck::parse_string(base + "parallel.expert_parallel = " + std::to_string(lay.ep) +
                                                  "\nparallel.expert_slicing = " + std::to_string(lay.slice) + "\n",
                                              "dist.deck");
    deck.validate(moka::train_schema());
    const auto got = moka::train_regime_model(MPI_COMM_WORLD, deck, log);
    EXPECT_NEAR(got.final_train_loss, want.final_train_loss, 1e-10 * want.final_train_loss) << describe(lay);
    EXPECT_NEAR(got.final_test_loss, want.final_test_loss, 1e-10 * want.final_test_loss) << describe(lay);
    EXPECT_NEAR(got.initial_test_loss, want.initial_test_loss, 1e-12 * want.initial_test_loss) << describe(lay);
    if (world_rank() == 0)
      std::cout << describe(lay) << ": final train loss " << got.final_train_loss << " (one rank "
                << want.final_train_loss << "), held-out " << got.final_test_loss << " (" << want.final_test_loss
                << ")\n";
  }
}

TEST(Distributed, InvalidLayoutsAreRejected) {
  auto msg = [](const moka::ParallelConfig& p, int world, int E, int dff) {
    try {
      p.validate(world, E, dff);
    } catch (const moka::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  moka::ParallelConfig p;
  p.expert_parallel = 3;
  EXPECT_NE(msg(p, 4, 6, 8).find("does not divide the 4 ranks"), std::string::npos) << msg(p, 4, 6, 8);
  p.expert_parallel = 2;
  EXPECT_NE(msg(p, 4, 3, 8).find("moe.num_experts = 3 is not divisible by parallel.expert_parallel = 2"),
            std::string::npos);
  p.expert_slicing = 2;
  EXPECT_NE(msg(p, 4, 4, 7).find("moe.d_ff = 7 is not divisible by parallel.expert_slicing = 2"), std::string::npos);
  p.expert_slicing       = 1;
  p.expert_data_parallel = 3;
  EXPECT_NE(msg(p, 4, 4, 8).find("EP x EDP x S must equal the 4 ranks"), std::string::npos) << msg(p, 4, 4, 8);
  p.expert_data_parallel = 2;
  EXPECT_EQ(msg(p, 4, 4, 8), "no error");
  p.backend = "gloo";
  EXPECT_NE(msg(p, 4, 4, 8).find("unknown communication backend 'gloo'"), std::string::npos);
  p.backend         = "auto";
  p.exchange_direct = "yes";
  EXPECT_NE(msg(p, 4, 4, 8).find("comm.exchange_direct = 'yes' (expected auto, on or off)"), std::string::npos)
      << msg(p, 4, 4, 8);
  // A global capacity keeps the first assignments in global order: not by score.
  moka::MoEConfig c = base_config();
  c.gate            = moka::GateType::switch_top1;
  c.top_k           = 1;
  c.dropless        = false;
  c.drop_policy     = moka::DropPolicy::score;
  try {
    c.validate();
    FAIL() << "switch + score policy + global capacity accepted";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("needs gate.drop_policy = position"), std::string::npos) << e.what();
  }
  c.capacity_scope = moka::CapacityScope::local;
  EXPECT_NO_THROW(c.validate());
}
