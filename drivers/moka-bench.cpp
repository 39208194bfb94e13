// moka-bench: times zero_grad + forward + backward of one MoE layer for a deck and
// prints ms, the TFLOP/s of the expert GEMMs, and the rate of plain dense
// GEMMs of the same shapes and FLOPs measured in the same run.
//
//   moka-bench input_decks/bench_layer.deck [key=value ...]   (H100, bf16)
//   moka-bench input_decks/bench_cpu.deck                     (CPU, fp32)
//   mpirun -np 4 moka-bench input_decks/bench_exchange.deck    (token exchange vs all-to-all)
//   mpirun -np 2 moka-bench input_decks/calibrate_cpu.deck     (machine profile for the cost model)
//   mpirun -np 4 moka-bench input_decks/bench_step.deck bench.profile=cpu.profile
//                                                              (a distributed layer step, measured and predicted)

#include <moka/core/Collective.hpp>
#include <moka/train/BenchConfig.hpp>
#include <moka/model/Optimizer.hpp>
#include <moka/parallel/GradSync.hpp>
#include <moka/plan/Calibration.hpp>
#include <moka/plan/CostModel.hpp>
#include <moka/plan/MachineProfile.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/moe/MoELayer.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/core/MemoryWatch.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/train/RunConfig.hpp>
#include <moka/core/Runtime.hpp>
#include <moka/linalg/impl/CublasGemm.hpp>

#include <Kokkos_Random.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <sstream>
#include <iostream>
#include <mpi.h>
#include <vector>

namespace {

using moka::median_of;

/// Median over \p iters runs (after \p warmup) of the slowest rank's time
/// of \p op, every rank starting together and \p space fenced around it.
template <class Op>
double slowest_median(const moka::execution_space& space, long warmup, long iters, Op&& op) {
  std::vector<double> t;
  for (long it = 0; it < warmup + iters; ++it) {
    space.fence();
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    op();
    space.fence();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it >= warmup) t.push_back(s);
  }
  return median_of(t);
}

template <class S>
int run(const moka::InputDeck& deck, int rank) {
  using M      = moka::memory_space;
  using Exec   = moka::execution_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  moka::MoEConfig cfg = moka::MoEConfig::from_deck(deck);
  cfg.bf16_compute    = deck.get<std::string>("bench.precision") == "bf16";
  const long T        = deck.get<long>("bench.tokens");
  const long warmup = deck.get<long>("bench.warmup"), iters = deck.get<long>("bench.iters");
  Exec space;
  // Every allocation of the layer and of this program from here on: a
  // step's peak memory (below).
  moka::MemoryWatch watch;
  moka::MoELayer<S, M> layer(cfg);
  layer.init_parameters(static_cast<std::uint64_t>(deck.get<long>("run.seed")));
  // As in training, where the optimizer writes the bf16 weight copies fused
  // into its update: forward+backward does not convert the weights.
  layer.set_bf16_weights_managed(true);
  matrix x("x", T, cfg.d_model), y("y", T, cfg.d_model), dy("dy", T, cfg.d_model), dx("dx", T, cfg.d_model);
  {
    Kokkos::Random_XorShift64_Pool<Exec> pool(7);
    Kokkos::fill_random(x, pool, S(-1), S(1));
    Kokkos::fill_random(dy, pool, S(-1), S(1));
  }
  auto time_ms = [&](auto&& step) {
    space.fence();
    Kokkos::fence();
    const auto t0 = std::chrono::steady_clock::now();
    step();
    space.fence();
    Kokkos::fence();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  // One training step's layer work: zero_grad (which leaves the expert
  // weight gradients to the backward's GEMMs), forward, backward.
  auto layer_step = [&]() {
    layer.zero_grad(space);
    layer.forward(space, x, y);
    layer.backward(space, dy, dx);
  };
  for (long it = 0; it < std::max(warmup, 1L); ++it) time_ms(layer_step);  // at least one: the row count
  if (deck.get<bool>("bench.profile_step")) {  // one step for the profiler (ncu --profile-from-start off)
    moka::profiler_capture(true);
    layer_step();
    moka::profiler_capture(false);
  }
  auto hc = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.expert_counts());
  long rows = 0;
  for (std::size_t e = 0; e < hc.extent(0); ++e) rows += hc(e);
  const double d = cfg.d_model, dff = cfg.d_ff, dfi = cfg.d_ff_in();
  // forward: up + down; backward: weight and input gradients of each.
  const double flops = 3.0 * 2.0 * rows * d * (dfi + dff);

  // Dense reference: the same six GEMM shapes as single products over all
  // rows. Each is timed in its steady state: warmed up for
  // bench.warmup_seconds as well as bench.warmup iterations, since an H200
  // reaches its power cap (and lower clocks) only after a few tenths of a
  // second of load; or alternately with the layer (bench.alternate).
  const double warm_s  = deck.get<double>("bench.warmup_seconds");
  const bool alternate = deck.get<bool>("bench.alternate");
  // Runs \p step at least \p n times and for at least warm_s seconds.
  auto warm_up = [&](long n, auto&& step) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < n || std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < warm_s;
         ++it)
      step();
  };
  std::vector<double> times, dense, batched;
  long m_pad = 0;  // bench.batched: rows per expert, padded to the largest count
  {
#ifdef KOKKOS_ENABLE_CUDA
    const bool use_cublas = cfg.bf16_compute;
#else
    const bool use_cublas = false;
#endif
    const int n = static_cast<int>(rows), di = int(d), fi = int(dfi), f = int(dff);
    auto interleave = [&](auto&& dense_step) {
      if (alternate) {
        warm_up(warmup, [&] {
          time_ms(layer_step);
          time_ms(dense_step);
        });
        for (long it = 0; it < iters; ++it) {
          times.push_back(time_ms(layer_step));
          dense.push_back(time_ms(dense_step));
        }
      } else {  // each in its own steady state: the layer steps, then the dense GEMMs
        warm_up(0, [&] { time_ms(layer_step); });
        for (long it = 0; it < iters; ++it) times.push_back(time_ms(layer_step));
        warm_up(warmup, [&] { time_ms(dense_step); });
        for (long it = 0; it < iters; ++it) dense.push_back(time_ms(dense_step));
      }
    };
    if (use_cublas) {
#ifdef KOKKOS_ENABLE_CUDA
      using bm = Kokkos::View<moka::bf16*, Kokkos::CudaSpace>;
      using fm = Kokkos::View<float*, Kokkos::CudaSpace>;
      // Output types as in the layer: the pre-activation and dh in bf16,
      // y, dx and the weight gradients in fp32 (written, beta 0, as the
      // layer's first backward after zero_grad does).
      bm X("X", std::size_t(n) * di), W1("W1", std::size_t(di) * fi), H("H", std::size_t(n) * f),
          W2("W2", std::size_t(f) * di), DY("DY", std::size_t(n) * di), DH("DH", std::size_t(n) * fi);
      bm HP("HP", std::size_t(n) * fi), DHf("DHf", std::size_t(n) * f);
      fm Y("Y", std::size_t(n) * di), G1("G1", std::size_t(di) * fi), G2("G2", std::size_t(f) * di),
          DX("DX", std::size_t(n) * di);
      Kokkos::Random_XorShift64_Pool<Kokkos::Cuda> pool(3);
      for (auto* v : {&X, &W1, &H, &W2, &DY, &DH}) {
        fm tmp("tmp", v->extent(0));
        Kokkos::fill_random(tmp, pool, -1.f, 1.f);
        moka::impl::convert_to_bf16(space, "bench_fill", tmp.data(), v->data(), v->extent(0));
      }
      interleave([&]() {
        moka::impl::gemm_bf16_bf16(space, false, false, n, fi, di, 1.f, X.data(), di, W1.data(), fi, 0.f, HP.data(), fi);
        moka::impl::gemm_bf16_f32(space, false, false, n, di, f, 1.f, H.data(), f, W2.data(), di, 0.f, Y.data(), di);
        moka::impl::gemm_bf16_f32(space, true, false, f, di, n, 1.f, H.data(), f, DY.data(), di, 0.f, G2.data(), di);
        moka::impl::gemm_bf16_bf16(space, false, true, n, f, di, 1.f, DY.data(), di, W2.data(), di, 0.f, DHf.data(), f);
        moka::impl::gemm_bf16_f32(space, true, false, di, fi, n, 1.f, X.data(), di, DH.data(), fi, 0.f, G1.data(), fi);
        moka::impl::gemm_bf16_f32(space, false, true, n, di, fi, 1.f, DH.data(), fi, W1.data(), fi, 0.f, DX.data(), di);
      });
      if (deck.get<bool>("bench.batched")) {
        // The same six kinds as strided-batched GEMMs over the experts, each
        // padded to the largest count (the FLOPs of the real rows count).
        const int L = static_cast<int>(hc.extent(0));
        for (int e = 0; e < L; ++e) m_pad = std::max<long>(m_pad, hc(e));
        const int p = static_cast<int>(m_pad);
        const std::size_t R = std::size_t(L) * p;
        bm BX("BX", R * di), BW1("BW1", std::size_t(L) * di * fi), BH("BH", R * f), BW2("BW2", std::size_t(L) * f * di),
            BDY("BDY", R * di), BDH("BDH", R * fi), BHP("BHP", R * fi), BDHf("BDHf", R * f);
        fm BY("BY", R * di), BG1("BG1", std::size_t(L) * di * fi), BG2("BG2", std::size_t(L) * f * di), BDX("BDX", R * di);
        for (auto* v : {&BX, &BW1, &BH, &BW2, &BDY, &BDH}) {
          fm tmp("tmp", v->extent(0));
          Kokkos::fill_random(tmp, pool, -1.f, 1.f);
          moka::impl::convert_to_bf16(space, "bench_fill", tmp.data(), v->data(), v->extent(0));
        }
        const long long sx = (long long)p * di, sf = (long long)p * f, sfi = (long long)p * fi,
                        sw1 = (long long)di * fi, sw2 = (long long)f * di;
        auto batched_step = [&]() {
          using moka::impl::gemm_bf16_batched;
          gemm_bf16_batched(space, false, false, p, fi, di, 1.f, BX.data(), di, sx, BW1.data(), fi, sw1, 0.f,
                            BHP.data(), false, fi, sfi, L);
          gemm_bf16_batched(space, false, false, p, di, f, 1.f, BH.data(), f, sf, BW2.data(), di, sw2, 0.f, BY.data(),
                            true, di, sx, L);
          gemm_bf16_batched(space, true, false, f, di, p, 1.f, BH.data(), f, sf, BDY.data(), di, sx, 0.f, BG2.data(),
                            true, di, sw2, L);
          gemm_bf16_batched(space, false, true, p, f, di, 1.f, BDY.data(), di, sx, BW2.data(), di, sw2, 0.f,
                            BDHf.data(), false, f, sf, L);
          gemm_bf16_batched(space, true, false, di, fi, p, 1.f, BX.data(), di, sx, BDH.data(), fi, sfi, 0.f,
                            BG1.data(), true, fi, sw1, L);
          gemm_bf16_batched(space, false, true, p, di, fi, 1.f, BDH.data(), fi, sfi, BW1.data(), fi, sw1, 0.f,
                            BDX.data(), true, di, sx, L);
        };
        warm_up(warmup, [&] { time_ms(batched_step); });
        for (long it = 0; it < iters; ++it) batched.push_back(time_ms(batched_step));
      }
#endif
    } else {
      matrix X("X", n, di), W1("W1", di, fi), HP("HP", n, fi), H("H", n, f), W2("W2", f, di), Y("Y", n, di);
      matrix G1("G1", di, fi), G2("G2", f, di), DY("DY", n, di), DHf("DHf", n, f), DH("DH", n, fi), DX("DX", n, di);
      Kokkos::Random_XorShift64_Pool<Exec> pool(3);
      for (auto* v : {&X, &W1, &H, &W2, &DY, &DH}) Kokkos::fill_random(*v, pool, S(-1), S(1));
      interleave([&]() {
        moka::impl::gemm("N", "N", S(1), X, W1, S(0), HP);
        moka::impl::gemm("N", "N", S(1), H, W2, S(0), Y);
        moka::impl::gemm("T", "N", S(1), H, DY, S(0), G2);
        moka::impl::gemm("N", "T", S(1), DY, W2, S(0), DHf);
        moka::impl::gemm("T", "N", S(1), X, DH, S(0), G1);
        moka::impl::gemm("N", "T", S(1), DH, W1, S(0), DX);
      });
    }
  }
  const double t_layer = median_of(times);
  const double t_dense = median_of(dense);
  // Forward only, in evaluation mode (inference).
  std::vector<double> fwd;
  layer.set_training(false);
  for (long it = 0; it < iters; ++it) fwd.push_back(time_ms([&]() { layer.forward(space, x, y); }));
  layer.set_training(true);
  const double t_fwd = median_of(fwd);
  // Peak memory of one more step (the dense reference's buffers are gone):
  // all of it, and beyond the parameters and the input x, which is what the
  // PyTorch reference's "peak extra memory" counts (its base holds its
  // weights and input; gradients, activations and workspaces are extra).
  watch.reset_peak();
  time_ms(layer_step);
  const double mib = 1.0 / 1048576.0;
  const double peak = double(watch.peak(M::name()));
  double param_bytes = 0, grad_bytes = 0, copy_bytes = 0;
  for (const auto& p : layer.parameters()) {
    param_bytes += double(p.param.size()) * sizeof(S);
    grad_bytes += double(p.grad.size()) * sizeof(S);
    if (p.bf16_copy) copy_bytes += double(p.param.size()) * sizeof(moka::bf16);
  }
  const double beyond = peak - param_bytes - double(x.size()) * sizeof(S);
  // What is left beyond the training state (the gradients, and the bf16
  // weight copies of mixed precision): activations and workspaces.
  const double work = beyond - grad_bytes - copy_bytes;
  if (rank == 0) {
    std::printf("moka-bench: %s, T=%ld, d=%d, d_ff=%d, E=%d, top-%d, %s gate, %s, %s%s\n",
                Kokkos::DefaultExecutionSpace::name(), T, cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k,
                moka::to_string(cfg.gate), moka::to_string(cfg.activation),
                deck.get<std::string>("bench.precision").c_str(), cfg.dropless ? ", dropless" : "");
    std::printf("  expert rows (kept assignments): %ld; expert GEMM FLOPs per step: %.3e\n", rows, flops);
    std::printf("  b1 and activation: %s\n", layer.fused_epilogue() ? "in the GEMMs' cuBLASLt epilogues"
                                                                      : "separate kernels");
    if (cfg.bf16_compute) {
      // How the last expert stage ran (expert.gemm_streams, expert.gemm_grouped; auto: by rows per expert).
      const auto g    = layer.last_expert_gemms();
      std::string how = g.batched   ? "one strided-batched GEMM per kind over the experts' rows padded to " +
                                          std::to_string(layer.padded_rows())
                        : g.grouped ? "cuBLAS grouped GEMMs"
                                    : "one GEMM per expert";
      if (g.streams > 1) how += " on " + std::to_string(g.streams) + " CUDA streams";
      if (!layer.gemm_grouped_refused().empty())
        how += "; refused by cuBLAS, so one GEMM per expert: " + layer.gemm_grouped_refused();
      std::printf("  expert GEMMs (expert.gemm_streams %s, expert.gemm_grouped %s, expert.gemm_batched %s): %s\n",
                  layer.gemm_streams_auto() ? "auto" : std::to_string(layer.gemm_streams()).c_str(),
                  moka::to_string(layer.gemm_grouped()), moka::to_string(layer.gemm_batched()), how.c_str());
    }
    std::printf("  layer zero_grad+forward+backward:  median %.3f ms  (min %.3f ms over %ld iterations)\n", t_layer,
                *std::min_element(times.begin(), times.end()), iters);
    if (deck.get<bool>("bench.print_steps")) {
      std::printf("  iterations in order (ms, layer / dense%s):", alternate ? ", alternating" : ", each back to back");
      for (long it = 0; it < iters; ++it) std::printf(" %.3f/%.3f", times[it], dense[it]);
      std::printf("\n");
    }
    std::printf("  expert GEMMs in the layer: %.4g TFLOP/s (FLOPs / layer time)\n", flops / t_layer * 1e-9);
    std::printf("  dense GEMMs, same shapes:  %.3f ms = %.4g TFLOP/s  (median; timed %s)\n", t_dense,
                flops / t_dense * 1e-9,
                alternate ? "alternately with the layer" : "after the layer steps");
    std::printf("  layer time / dense GEMM time: %.2f (%.0f%% of dense)\n", t_layer / t_dense,
                100.0 * t_dense / t_layer);
    if (!batched.empty()) {
      const double t_b = median_of(batched);
      std::printf("  strided-batched GEMMs, %d experts padded to %ld rows: %.3f ms = %.4g TFLOP/s of the real rows "
                  "(%.2f of dense)\n",
                  static_cast<int>(hc.extent(0)), m_pad, t_b, flops / t_b * 1e-9, t_b / t_dense);
    }
    std::printf("  layer forward only (evaluation mode): median %.3f ms\n", t_fwd);
    // torch_moe_reference.py's "peak extra memory" is the peak less what
    // was allocated before the timed runs: for its loop layer (run first)
    // parameters and input, for its grouped layer also the gradients the
    // loop left allocated. The two MoKA figures to set beside them:
    std::printf("  peak %s memory of a layer step: %.1f MiB; beyond the parameters and the input x: %.1f MiB "
                "(as torch_moe_reference.py counts its loop layer)\n",
                M::name(), peak * mib, beyond * mib);
    std::printf("  of which gradients %.1f MiB, bf16 weight copies %.1f MiB; activations and workspaces %.1f MiB "
                "(as it counts its grouped layer, whose gradients are allocated before)\n",
                grad_bytes * mib, copy_bytes * mib, work * mib);
    // Where the peak comes from: the largest allocations live at that moment.
    const auto held = watch.peak_by_label(M::name());
    std::printf("  held at the peak (largest):");
    for (std::size_t i = 0; i < held.size() && i < 12; ++i)
      std::printf("%s %s %.1f MiB", i ? "," : "", held[i].first.c_str(), held[i].second * mib);
    std::printf("\n");
  }
  if (deck.get<bool>("bench.breakdown")) {
    // Per-stage device time: every region fences at its ends.
    moka::TimerTable::instance().clear();
    moka::set_fence_regions(true);
    for (long it = 0; it < iters; ++it) layer_step();
    moka::set_fence_regions(false);
    if (rank == 0) std::printf("  stage breakdown (seconds over %ld fenced iterations):\n", iters);
    moka::TimerTable::instance().report(MPI_COMM_WORLD, std::cout);
  }
  return 0;
}

/// The layer's token exchange (EP = all ranks): for payloads of
/// exchange_mb_min .. exchange_mb_max MB of dispatched rows per rank, the
/// device time of the exchange regions of a forward (counts all-to-all,
/// rows all-to-all, reordering by expert; and the way back), against the
/// communicator's equal-count all-to-all of the same bytes per rank.
template <class S>
int run_exchange(const moka::InputDeck& deck, int rank, int size) {
  using M      = moka::memory_space;
  using Exec   = moka::execution_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  moka::MoEConfig cfg = moka::MoEConfig::from_deck(deck);
  moka::ParallelConfig pc = moka::ParallelConfig::from_deck(deck);
  pc.expert_parallel      = size;
  pc.expert_slicing       = 1;
  pc.expert_data_parallel = 0;
  const long warmup = deck.get<long>("bench.warmup"), iters = deck.get<long>("bench.iters");
  auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, cfg.num_experts, cfg.d_ff,
                                                      !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible);
  Exec space;
  if (rank == 0)
    std::printf("moka-bench exchange: %s, %s, d=%d, E=%d, top-%d, %zu-byte elements; bandwidth = bytes sent per "
                "rank (all peers, itself included) / time, the slowest rank's time\n",
                Kokkos::DefaultExecutionSpace::name(), groups->describe().c_str(), cfg.d_model, cfg.num_experts,
                cfg.top_k, sizeof(S));
  if (rank == 0)
    std::printf("  %10s %12s %12s %12s %12s %12s %8s\n", "MB/rank", "exchange ms", "GB/s", "(one way ms)",
                "all-to-all ms", "GB/s", "ratio");
  const double mb_max = deck.get<double>("bench.exchange_mb_max");
  for (double mb = deck.get<double>("bench.exchange_mb_min"); mb <= mb_max * 1.0001; mb *= 2) {
    const double bytes = mb * 1024 * 1024;
    const long T       = std::max(1L, static_cast<long>(bytes / (double(cfg.d_model) * sizeof(S) * cfg.top_k)));
    moka::MoELayer<S, M> layer(cfg, groups);
    layer.init_parameters(static_cast<std::uint64_t>(deck.get<long>("run.seed")));
    matrix x("x", T, cfg.d_model), y("y", T, cfg.d_model);
    Kokkos::Random_XorShift64_Pool<Exec> pool(11 + rank);
    Kokkos::fill_random(x, pool, S(-1), S(1));
    for (long it = 0; it < warmup; ++it) layer.forward(space, x, y);
    space.fence();
    // Per forward, the slowest rank's plan, there and back (both directions
    // of a forward); the forward with the median sum is reported, as the
    // references below report the median of the slowest rank's times (a
    // mean let one slow forward, a host hiccup, move a size's figure).
    std::vector<std::array<double, 3>> fwd;
    moka::set_fence_regions(true);
    for (long it = 0; it < iters; ++it) {
      moka::TimerTable::instance().clear();
      layer.forward(space, x, y);
      const auto snap = moka::TimerTable::instance().snapshot();
      auto seconds = [&](const char* n) {
        auto i = snap.find(n);
        return i == snap.end() ? 0.0 : i->second.seconds;
      };
      std::array<double, 3> p{seconds("moka::MoELayer::exchange_plan"), seconds("moka::MoELayer::exchange"),
                              seconds("moka::MoELayer::exchange_back")};
      MPI_Allreduce(MPI_IN_PLACE, p.data(), 3, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      fwd.push_back(p);
    }
    moka::set_fence_regions(false);
    std::sort(fwd.begin(), fwd.end(), [](const std::array<double, 3>& a, const std::array<double, 3>& b) {
      return a[0] + a[1] + a[2] < b[0] + b[1] + b[2];
    });
    const auto& parts = fwd[fwd.size() / 2];
    const double t_ex = parts[0] + parts[1] + parts[2];
    double sent = 0;
    {
      auto hc = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.expert_counts());
      for (std::size_t e = 0; e < hc.extent(0); ++e) sent += double(hc(e)) * cfg.d_model * sizeof(S);
    }
    MPI_Allreduce(MPI_IN_PLACE, &sent, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    sent /= size;
    // Reference: equal-count all-to-all of the same bytes per rank.
    const long count = std::max(1L, static_cast<long>(sent / sizeof(S) / size));
    Kokkos::View<S*, M> sbuf("a2a_send", std::size_t(count) * size), rbuf("a2a_recv", std::size_t(count) * size);
    // Median over iters (after warmup) of the slowest rank's time of op,
    // all ranks starting together.
    auto slowest = [&](auto&& op) { return slowest_median(space, warmup, iters, op); };
    const double t_ref = slowest([&] {
      groups->ep().alltoall(space, sbuf.data(), rbuf.data(), count, moka::data_type_of<S>(), moka::memory_kind_of<M>());
    });
    // The same bytes as one variable-count send/recv per peer (what a
    // coalesced exchange could reach at best with point-to-point calls).
    std::vector<long> cnt(size, count), off(size);
    for (int q = 0; q < size; ++q) off[q] = long(q) * count;
    const double t_p2p = slowest([&] {
      groups->ep().alltoallv(space, sbuf.data(), cnt, off, rbuf.data(), cnt, off, moka::data_type_of<S>(),
                             moka::memory_kind_of<M>());
    });
    // The layer's block pattern with equal blocks (L per peer, landing in
    // (local expert, source rank) order), and with the block sizes of this
    // forward's routing, whole and in pieces of at most 96 MB: what the
    // blocks and their sizes cost against one message per peer.
    const int L    = cfg.num_experts / groups->ep_size();
    const long blk = std::max(1L, count / L);
    const auto type = moka::data_type_of<S>();
    const auto mem  = moka::memory_kind_of<M>();
    std::vector<moka::Communicator::Block> bs, br;
    for (int q = 0; q < size; ++q)
      for (int l = 0; l < L; ++l) {
        bs.push_back({q, (long(q) * L + l) * blk, blk});
        br.push_back({q, (long(l) * size + q) * blk, blk});
      }
    const double t_blocks =
        slowest([&] { groups->ep().alltoallv_blocks(space, sbuf.data(), bs, rbuf.data(), br, type, mem); });
    double t_layer_blocks = 0, t_layer_pieces = 0;
    {
      auto hc = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.expert_counts());
      std::vector<long> out(hc.extent(0)), in(hc.extent(0)), off, at;
      for (std::size_t e = 0; e < hc.extent(0); ++e) out[e] = long(hc(e)) * cfg.d_model;
      groups->ep().alltoall_counts(out.data(), in.data(), L);
      moka::impl::expert_major(in, size, L, off, at);  // the layer's (local expert, source rank) landing places
      long so = 0;
      const long ro = off[L];
      std::vector<moka::Communicator::Block> ls, lr;
      for (int q = 0; q < size; ++q)
        for (int l = 0; l < L; ++l) {
          ls.push_back({q, so, out[q * L + l]});
          lr.push_back({q, at[q * L + l], in[q * L + l]});
          so += out[q * L + l];
        }
      Kokkos::View<S*, M> s2("layer_blocks_send", std::max(1L, so)), r2("layer_blocks_recv", std::max(1L, ro));
      t_layer_blocks = slowest([&] { groups->ep().alltoallv_blocks(space, s2.data(), ls, r2.data(), lr, type, mem); });
      const long cap = (96L << 20) / long(sizeof(S));
      moka::impl::split_blocks(ls, cap);
      moka::impl::split_blocks(lr, cap);
      t_layer_pieces = slowest([&] { groups->ep().alltoallv_blocks(space, s2.data(), ls, r2.data(), lr, type, mem); });
    }
    // The plan's counts exchange alone (host): the direct exchange
    // all-gathers every rank's E counts, the message path sends L + 1 per peer.
    const bool direct = layer.exchange_direct();
    std::vector<long> cs(std::size_t(size) * (L + 1), 1), cr(std::size_t(size) * std::max(L + 1, cfg.num_experts));
    const double t_counts = slowest([&] {
      if (direct) groups->ep().allgather_counts(cs.data(), cr.data(), cfg.num_experts);
      else groups->ep().alltoall_counts(cs.data(), cr.data(), L + 1);
    });
    // The exchange moves the payload twice per forward (there and back).
    const double bw_ex = 2.0 * sent / t_ex * 1e-9, bw_ref = double(count) * size * sizeof(S) / t_ref * 1e-9;
    if (rank == 0)
      std::printf("  %10.1f %12.3f %12.1f %12.3f %12.3f %12.1f %7.0f%%\n", sent / 1048576.0, t_ex * 1e3, bw_ex,
                  t_ex * 5e2, t_ref * 1e3, bw_ref, 100.0 * bw_ex / bw_ref);
    if (rank == 0)
      std::printf("  %10s (%s; counts and plan %.3f ms, rows there %.3f ms, back %.3f ms; slowest rank each; "
                  "one send/recv per peer, same bytes: %.3f ms)\n",
                  "",
                  direct                       ? "direct: one put kernel into symmetric windows"
                  : layer.exchange_coalesced() ? "one message per peer + reorder"
                                               : "one message per block",
                  parts[0] * 1e3, parts[1] * 1e3, parts[2] * 1e3, t_p2p * 1e3);
    if (rank == 0)
      std::printf("  %10s (same bytes as %d equal blocks per peer %.3f ms; the layer's block sizes, fresh buffers "
                  "%.3f ms, in pieces of at most 96 MB %.3f ms; counts %s alone %.3f ms)\n",
                  "", L, t_blocks * 1e3, t_layer_blocks * 1e3, t_layer_pieces * 1e3,
                  direct ? "all-gather" : "all-to-all", t_counts * 1e3);
  }
  return 0;
}

/// Seconds of one layer step (zero_grad + forward + backward) by kind of
/// work, from the fenced regions of one step (this rank).
struct StepParts {
  double gate = 0, tokens = 0, experts = 0, exchange = 0, total = 0;
};

StepParts parts_of(const std::map<std::string, moka::TimerStats>& snap) {
  auto sec = [&](const char* n) {
    auto i = snap.find(std::string("moka::MoELayer::") + n);
    return i == snap.end() ? 0.0 : i->second.seconds;
  };
  StepParts p;
  p.gate     = sec("gate") + sec("gate_backward");
  p.exchange = sec("exchange_plan") + sec("exchange") + sec("exchange_back");
  p.tokens   = sec("dispatch") - sec("exchange_plan") + sec("combine") + sec("combine_backward") + sec("undispatch");
  p.experts  = sec("to_bf16") + sec("expert_up") + sec("activation") + sec("expert_down") +
              sec("expert_down_backward") + sec("activation_backward") + sec("expert_up_backward");
  return p;
}

/// One layer measured for calibration: every rank runs its own (groups
/// nullptr) or the EP group's, all ranks at once.
struct Measured {
  double total = 0;      ///< unfenced zero_grad + forward + backward, slowest rank, median
  StepParts parts;       ///< fenced regions, slowest rank per kind, median
  std::vector<double> counts;  ///< kept assignments per expert (summed over the layer's ranks), last forward
  long T = 0;
  bool direct = false;   ///< the exchange stored rows straight into the peers' buffers
};

template <class S>
Measured measure_layer(const moka::MoEConfig& cfg, std::shared_ptr<moka::ProcessGroups> groups, long T, long warmup,
                       long iters, std::uint64_t seed, bool active = true) {
  using M      = moka::memory_space;
  using Exec   = moka::execution_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  Exec space;
  moka::MoELayer<S, M> layer(cfg, groups);
  layer.init_parameters(seed);
  layer.set_bf16_weights_managed(true);
  if (cfg.bf16_compute) layer.refresh_bf16_weights(space);
  matrix x("x", T, cfg.d_model), y("y", T, cfg.d_model), dy("dy", T, cfg.d_model), dx("dx", T, cfg.d_model);
  {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    Kokkos::Random_XorShift64_Pool<Exec> pool(17 + r);
    Kokkos::fill_random(x, pool, S(-1), S(1));
    Kokkos::fill_random(dy, pool, S(-1), S(1));
  }
  auto step = [&] {
    if (!active) return;  // this rank waits while the others compute
    layer.zero_grad(space);
    layer.forward(space, x, y);
    layer.backward(space, dy, dx);
  };
  for (long i = 0; i < std::max(1L, warmup); ++i) step();
  Measured out;
  out.T = T;
  out.total = slowest_median(space, 0, iters, step);
  std::vector<StepParts> parts;
  moka::set_fence_regions(true);
  for (long i = 0; i < iters; ++i) {
    space.fence();
    MPI_Barrier(MPI_COMM_WORLD);
    moka::TimerTable::instance().clear();
    step();
    StepParts p = parts_of(moka::TimerTable::instance().snapshot());
    double v[4] = {p.gate, p.tokens, p.experts, p.exchange};
    MPI_Allreduce(MPI_IN_PLACE, v, 4, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    parts.push_back({v[0], v[1], v[2], v[3], 0});
  }
  moka::set_fence_regions(false);
  moka::TimerTable::instance().clear();
  auto med  = [&](double StepParts::*f) {
    std::vector<double> v;
    for (const auto& p : parts) v.push_back(p.*f);
    return moka::median_of(v);
  };
  out.parts = {med(&StepParts::gate), med(&StepParts::tokens), med(&StepParts::experts), med(&StepParts::exchange),
               out.total};
  auto hc = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.expert_counts());
  std::vector<long> c(hc.extent(0));
  for (std::size_t e = 0; e < c.size(); ++e) c[e] = hc(e);
  if (groups) groups->moe().allreduce_host(c.data(), int(c.size()));
  out.counts.assign(c.begin(), c.end());
  out.direct = layer.exchange_direct();
  return out;
}

std::string exchange_path(const moka::ProcessGroups* g, bool direct) {
  if (!g || g->ep_size() == 1) return "none";
  if (direct) return "direct";
  return moka::to_string(g->ep().backend());
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

/// bench.mode = calibrate: measures what moka::MachineProfile holds on
/// this machine with this many ranks running side by side, and writes the
/// profile (rank 0).
template <class S>
int run_calibrate(const moka::InputDeck& deck, int rank, int size, int ranks_per_node) {
  using M = moka::memory_space;
  moka::MoEConfig cfg = moka::MoEConfig::from_deck(deck);
  cfg.bf16_compute    = deck.get<std::string>("bench.precision") == "bf16";
  const long T0 = deck.get<long>("bench.tokens");
  const long warmup = deck.get<long>("bench.warmup"), iters = deck.get<long>("bench.iters");
  const auto seed = static_cast<std::uint64_t>(deck.get<long>("run.seed"));
  moka::MachineProfile prof;
  prof.card           = moka::Runtime::device_name();
  prof.backend        = Kokkos::DefaultExecutionSpace::name();
  prof.precision      = deck.get<std::string>("bench.precision");
  prof.ranks_per_node = ranks_per_node;
  prof.created        = utc_now();
  auto say = [&](const std::string& s) {
    if (rank == 0) std::printf("%s\n", s.c_str()), std::fflush(stdout);
  };
  say("moka-bench calibrate: " + prof.card + ", " + prof.backend + ", " + prof.precision + ", " +
      std::to_string(size) + " rank(s) side by side");

  // 1. Expert curves: one expert (E = 1, top-1), rows = tokens.
  std::vector<std::pair<int, int>> shapes;
  for (int sl : {1, 2, 4})
    if (cfg.d_ff % sl == 0 && cfg.d_ff / sl >= 8) shapes.push_back({cfg.d_model, cfg.d_ff / sl});
  {
    std::istringstream is(deck.get<std::string>("bench.calibrate_shapes"));
    for (std::string w; is >> w;) {
      const auto x = w.find('x');
      shapes.push_back({std::stoi(w.substr(0, x)), std::stoi(w.substr(x + 1))});
    }
  }
  // Each shape once (a listed shape may be one of the deck's).
  {
    std::vector<std::pair<int, int>> once;
    for (const auto& sh : shapes)
      if (std::find(once.begin(), once.end(), sh) == once.end()) once.push_back(sh);
    shapes = once;
  }
  long rows_max = deck.get<long>("bench.calibrate_rows_max");
  if (rows_max <= 0) rows_max = T0 * cfg.top_k;
  std::vector<long> grid;
  for (long r = 32; r < rows_max; r *= 2) grid.push_back(r);
  grid.push_back(rows_max);
  struct Point {
    double T, d, E, k, total, gate, tokens;
    std::vector<double> counts;
    int dff;
  };
  // Each rank's own layer, built as a run's layer is (process groups of
  // this rank alone), so that whatever that costs is in the figures.
  // One set for all of them: making communicators (NCCL's) costs more
  // than the measurements.
  std::shared_ptr<moka::ProcessGroups> self;
  {
    moka::ParallelConfig pc = moka::ParallelConfig::from_deck(deck);
    pc.expert_parallel = 1, pc.expert_slicing = 1, pc.expert_data_parallel = 0;
    self = std::make_shared<moka::ProcessGroups>(MPI_COMM_SELF, pc, 1, 1,
                                                 !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible);
  }
  auto self_groups = [&](const moka::MoEConfig&) { return self; };
  std::vector<Point> points;   // multi-expert layers
  std::vector<Point> singles;  // one expert, by shape
  for (const auto& [d, f] : shapes) {
    moka::MoEConfig c1 = cfg;
    c1.d_model = d, c1.d_ff = f, c1.num_experts = 1, c1.top_k = 1, c1.gate = moka::GateType::topk;
    c1.dropless = true, c1.trace_file.clear(), c1.bias_balance = false, c1.renormalize = false;
    // Three rounds over the rows, the median of each point's rounds: a
    // slow spell of a shared machine then moves one round of a point, not
    // the curve's shape.
    std::vector<std::vector<Measured>> rounds(grid.size());
    for (int round = 0; round < 3; ++round)
      for (std::size_t i = 0; i < grid.size(); ++i)
        rounds[i].push_back(measure_layer<S>(c1, self_groups(c1), grid[i], warmup, iters, seed));
    for (std::size_t i = 0; i < grid.size(); ++i) {
      auto& r = rounds[i];
      std::sort(r.begin(), r.end(), [](const Measured& a, const Measured& b) { return a.total < b.total; });
      const Measured& m = r[r.size() / 2];
      singles.push_back({double(grid[i]), double(d), 1, 1, m.total, m.parts.gate, m.parts.tokens, m.counts, f});
    }
  }
  // How much faster one rank computes while the others wait: ranks that
  // share cores (or a device) give it their share.
  prof.concurrent_ranks = ranks_per_node;
  if (size > 1) {
    moka::MoEConfig c1 = cfg;
    c1.num_experts = 1, c1.top_k = 1, c1.gate = moka::GateType::topk, c1.dropless = true, c1.trace_file.clear();
    c1.bias_balance = false, c1.renormalize = false;
    const Measured alone = measure_layer<S>(c1, self_groups(c1), rows_max, warmup, iters, seed, rank == 0);
    const double side    = singles[grid.size() - 1].total;  // the deck's shape at rows_max, every rank busy
    const double ratio   = side / std::max(alone.total, 1e-12);
    prof.concurrent_ranks = std::min(double(ranks_per_node), std::max(1.0, ranks_per_node / ratio));
    std::ostringstream os;
    os << "  one rank alone: " << alone.total * 1e3 << " ms for " << rows_max << " rows (" << side * 1e3
       << " ms with every rank busy): " << prof.concurrent_ranks << " of " << ranks_per_node
       << " ranks compute at full speed at once";
    say(os.str());
  }
  // 2. Gate and token work: the deck's layer (and twice the experts) at
  // several token counts.
  {
    moka::MoEConfig c2 = cfg;
    if (c2.gate == moka::GateType::trace) c2.gate = moka::GateType::topk, c2.trace_file.clear();
    for (int emul : {1, 2})
      for (long T : {std::max(1L, T0 / 4), std::max(1L, T0 / 2), T0}) {
        moka::MoEConfig c = c2;
        c.num_experts     = cfg.num_experts * emul;
        const Measured m  = measure_layer<S>(c, self_groups(c), T, warmup, iters, seed);
        points.push_back({double(T), double(c.d_model), double(c.num_experts), double(c.top_k), m.total, m.parts.gate,
                          m.parts.tokens, m.counts, c.d_ff});
      }
  }
  {
    // Gate and token work from their (fenced) regions, over every run.
    std::vector<std::vector<double>> Xg, Xt;
    std::vector<double> yg, yt;
    for (const auto* set : {&singles, &points})
      for (const auto& p : *set) {
        Xg.push_back({p.T * p.d * p.E, p.T * p.E});
        yg.push_back(p.gate);
        Xt.push_back({p.T * p.k * p.d});
        yt.push_back(p.tokens);
      }
    const auto g = moka::fit_nonnegative(Xg, yg);
    const auto t = moka::fit_nonnegative(Xt, yt);
    prof.gate_flop = g[0], prof.gate_elem = g[1], prof.token_elem = t[0];
    auto gate_tokens = [&](const Point& p) {
      return p.T * p.d * p.E * prof.gate_flop + p.T * p.E * prof.gate_elem + p.T * p.k * p.d * prof.token_elem;
    };
    // Expert curves: the one-expert layer's unfenced time less its gate and
    // token work (what a step with one expert of that many rows costs).
    for (std::size_t i = 0; i < singles.size(); ++i) {
      const Point& p = singles[i];
      if (prof.experts.empty() || prof.experts.back().d_model != int(p.d) || prof.experts.back().d_ff != p.dff)
        prof.experts.push_back({int(p.d), p.dff, {}, {}});
      prof.experts.back().rows.push_back(p.T);
      prof.experts.back().seconds.push_back(std::max(1e-9, p.total - gate_tokens(p)));
    }
    for (const auto& curve : prof.experts) {
      std::ostringstream os;
      os << "  expert " << curve.d_model << " x " << curve.d_ff << ":";
      for (std::size_t i = 0; i < curve.rows.size(); ++i)
        os << " " << long(curve.rows[i]) << " rows " << curve.seconds[i] * 1e3 << " ms;";
      say(os.str());
    }
    // A layer of n experts pays once what each one-expert step holds
    // (launches, host work, kernels over all rows): the curves' sum exceeds
    // it by expert_shared per expert beyond the first; what is left over a
    // whole layer is layer_fixed.
    std::vector<std::vector<double>> Xs;
    std::vector<double> ys;
    for (const auto& p : points) {
      double sum = 0, used = 0;
      for (double c : p.counts) sum += prof.expert_seconds(int(p.d), p.dff, c), used += c > 0;
      Xs.push_back({used - 1, -1.0});
      ys.push_back(sum - (p.total - gate_tokens(p)));
    }
    const auto sh = moka::fit_nonnegative(Xs, ys);
    prof.expert_shared = sh[0];
    prof.layer_fixed   = sh[1];
    std::ostringstream os;
    os << "  gate " << prof.gate_flop << " s per T d E + " << prof.gate_elem << " s per T E; tokens "
       << prof.token_elem << " s per T k d; fixed " << prof.layer_fixed * 1e3 << " ms per layer step; experts share "
       << prof.expert_shared * 1e3 << " ms per expert beyond the first";
    say(os.str());
  }
  // 3. Exchange (EP = every rank) and all-reduce.
  if (size > 1) {
    moka::ParallelConfig pc = moka::ParallelConfig::from_deck(deck);
    pc.expert_parallel = size, pc.expert_slicing = 1, pc.expert_data_parallel = 0;
    moka::MoEConfig c3 = cfg;
    if (c3.gate == moka::GateType::trace) c3.gate = moka::GateType::topk, c3.trace_file.clear();
    c3.num_experts = size * ((cfg.num_experts + size - 1) / size);
    auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, c3.num_experts, c3.d_ff,
                                                        !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible);
    std::vector<double> bytes, secs;
    std::vector<Measured> ms;
    std::string path;
    moka::StepShape shape;
    shape.moe = c3, shape.scalar_bytes = sizeof(S);
    moka::LayoutChoice lay;
    lay.ep = size;
    for (long T : {std::max(1L, T0 / 8), std::max(1L, T0 / 2), T0}) {
      Measured m = measure_layer<S>(c3, groups, T, warmup, iters, seed);
      shape.tokens = double(T);
      std::vector<double> rank_rows(size, 0.0);
      const int L = c3.num_experts / size;
      for (int e = 0; e < c3.num_experts; ++e) rank_rows[e / L] += m.counts[e];
      bytes.push_back(moka::exchange_busiest_rows(shape, lay, m.counts, rank_rows) * c3.d_model * sizeof(S));
      secs.push_back(m.parts.exchange);
      ms.push_back(m);
    }
    path = exchange_path(groups.get(), ms.back().direct);  // the path those layers' exchange took
    prof.comm = moka::to_string(groups->ep().backend());
    prof.exchange.push_back(moka::fit_link(path, bytes, secs, 4.0));
    lay.exchange = path;
    std::vector<double> rest;
    for (std::size_t i = 0; i < ms.size(); ++i) {
      shape.tokens = double(ms[i].T);
      moka::MachineProfile p = prof;
      p.exchange_fixed       = 0;
      p.allreduce            = {"allreduce", 0, 1e30};
      const auto pred        = moka::predict_step(p, shape, lay, ms[i].counts);
      rest.push_back(ms[i].total - pred.layer);
    }
    prof.exchange_fixed = std::max(0.0, moka::median_of(rest));
    // Smart scheduling: the largest of those layers again in peer groups
    // (degree = ranks); what it gains over what it could hide at most
    // (negative: it costs). bf16 layers run unscheduled: 0.
    if (!cfg.bf16_compute) {
      moka::ParallelConfig ps = pc;
      ps.schedule_degree      = size;
      auto gs = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, ps, c3.num_experts, c3.d_ff,
                                                      !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible);
      const Measured m2 = measure_layer<S>(c3, gs, T0, warmup, iters, seed);
      shape.tokens      = double(T0);
      moka::MachineProfile pp = prof;
      pp.allreduce            = {"allreduce", 0, 1e30};  // measured below; the layer terms do not use it
      const auto pred         = moka::predict_step(pp, shape, lay, ms.back().counts);
      const double most = (1.0 - 1.0 / size) * std::min(pred.experts, pred.exchange);
      const double gain = ms.back().total - m2.total;
      prof.schedule_overlap = most > 0 ? std::min(1.0, std::max(-1.0, gain / most)) : 0.0;
      std::ostringstream so;
      so << "  smart scheduling (degree " << size << "): layer " << ms.back().total * 1e3 << " -> " << m2.total * 1e3
         << " ms; hides " << prof.schedule_overlap << " of min(experts, exchange)";
      say(so.str());
    }
    // All-reduce over every rank, as the gradient buckets go.
    std::vector<double> ab, as;
    moka::execution_space space;
    for (double mb : {0.0625, 1.0, 8.0, 32.0}) {
      const long n = std::max(1L, long(mb * 1048576 / sizeof(S)));
      Kokkos::View<S*, M> buf("allreduce", n);
      ab.push_back(double(n) * sizeof(S));
      as.push_back(slowest_median(space, warmup, iters, [&] { moka::allreduce_sum(groups->world(), space, buf); }));
    }
    prof.allreduce = moka::fit_link("allreduce", ab, as, 1.0);
    std::ostringstream os;
    os << "  exchange (" << path << ") " << prof.exchange[0].latency * 1e6 << " us + bytes / "
       << prof.exchange[0].bandwidth * 1e-9 << " GB/s per transfer; fixed " << prof.exchange_fixed * 1e3
       << " ms per layer step; all-reduce " << prof.allreduce.latency * 1e6 << " us + bytes / "
       << prof.allreduce.bandwidth * 1e-9 << " GB/s";
    say(os.str());
  }
  // 4. The optimizer's update (AdamW) per parameter.
  {
    moka::execution_space space;
    const long n = 1L << 21;
    Kokkos::View<S*, M> w("calibrate_w", n), g("calibrate_g", n);
    moka::Optimizer<S, M> opt{moka::OptimizerConfig()};
    opt.add(w, g);
    prof.optimizer_elem = slowest_median(space, warmup, iters, [&] { opt.step(space); }) / double(n);
  }
  const std::string out = deck.get<std::string>("bench.profile_out");
  if (rank == 0) prof.write(out);
  say("  wrote " + out);
  return 0;
}

/// bench.mode = step: one MoE layer laid out by parallel.* over the ranks,
/// timed as a training step (zero_grad + forward + backward, then the
/// gradient sums and the optimizer), and predicted by the cost model when
/// bench.profile names a machine profile.
template <class S>
int run_step(const moka::InputDeck& deck, int rank, int size) {
  using M      = moka::memory_space;
  using Exec   = moka::execution_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  moka::MoEConfig cfg     = moka::MoEConfig::from_deck(deck);
  cfg.bf16_compute        = deck.get<std::string>("bench.precision") == "bf16";
  moka::ParallelConfig pc = moka::ParallelConfig::from_deck(deck);
  const long T = deck.get<long>("bench.tokens");
  const long warmup = deck.get<long>("bench.warmup"), iters = deck.get<long>("bench.iters");
  auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, cfg.num_experts, cfg.d_ff,
                                                      !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible);
  Exec space;
  moka::MoELayer<S, M> layer(cfg, groups);
  layer.init_parameters(static_cast<std::uint64_t>(deck.get<long>("run.seed")));
  layer.set_bf16_weights_managed(true);
  auto params = layer.parameters();
  moka::Optimizer<S, M> opt{moka::OptimizerConfig()};
  for (const auto& p : params) opt.add(p.param, p.grad, p.bf16_copy);
  moka::GradSync<S, M> sync(groups, params, pc.bucket_mb);
  if (cfg.bf16_compute) layer.refresh_bf16_weights(space);
  matrix x("x", T, cfg.d_model), y("y", T, cfg.d_model), dy("dy", T, cfg.d_model), dx("dx", T, cfg.d_model);
  {
    Kokkos::Random_XorShift64_Pool<Exec> pool(29 + rank);
    Kokkos::fill_random(x, pool, S(-1), S(1));
    Kokkos::fill_random(dy, pool, S(-1), S(1));
  }
  const int E = cfg.num_experts;
  std::vector<double> t_layer, t_step;
  std::vector<std::vector<double>> counts;
  const bool with_opt = deck.get<bool>("bench.step_optimizer");
  for (long it = 0; it < warmup + iters; ++it) {
    Kokkos::fence();  // the whole device idle: nothing left over from the last step on any stream
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    layer.zero_grad(space);
    layer.forward(space, x, y);
    layer.backward(space, dy, dx);
    space.fence();
    const auto t1 = std::chrono::steady_clock::now();
    if (with_opt) {
      sync.sync(space);
      opt.step(space, sync.global_norm(space));
    }
    space.fence();
    const auto t2 = std::chrono::steady_clock::now();
    double t[2] = {std::chrono::duration<double>(t1 - t0).count(), std::chrono::duration<double>(t2 - t0).count()};
    MPI_Allreduce(MPI_IN_PLACE, t, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it < warmup) continue;
    t_layer.push_back(t[0]);
    t_step.push_back(t[1]);
    auto hc = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), layer.expert_counts());
    std::vector<long> c(E);
    for (int e = 0; e < E; ++e) c[e] = hc(e);
    groups->moe().allreduce_host(c.data(), E);
    counts.emplace_back(c.begin(), c.end());
  }
  const double ml = moka::median_of(t_layer), mstep = moka::median_of(t_step);
  if (deck.get<bool>("bench.breakdown")) {
    // Per-stage time of the layer step (every region fences at its ends).
    moka::TimerTable::instance().clear();
    moka::set_fence_regions(true);
    for (long it = 0; it < iters; ++it) {
      layer.zero_grad(space);
      layer.forward(space, x, y);
      layer.backward(space, dy, dx);
    }
    moka::set_fence_regions(false);
    if (rank == 0) std::printf("  stage breakdown (seconds over %ld fenced iterations):\n", iters);
    moka::TimerTable::instance().report(MPI_COMM_WORLD, std::cout);
    moka::TimerTable::instance().clear();
  }
  moka::LayoutChoice lay;
  lay.ep       = groups->ep_size();
  lay.slices   = pc.expert_slicing;
  lay.edp      = size / (lay.ep * lay.slices);
  lay.exchange = exchange_path(groups.get(), layer.exchange_direct());
  lay.schedule = layer.exchange_scheduled() ? layer.schedule_phases() : 1;
  if (rank == 0) {
    std::printf("moka-bench step: %s, %s, T=%ld per rank, d=%d, d_ff=%d, E=%d, top-%d, %s gate, %s\n",
                Kokkos::DefaultExecutionSpace::name(), lay.describe(E).c_str(), T, cfg.d_model, cfg.d_ff, E,
                cfg.top_k, moka::to_string(cfg.gate), deck.get<std::string>("bench.precision").c_str());
    std::printf("  layer zero_grad+forward+backward: median %.3f ms; step (+ gradient sums + AdamW): median %.3f ms "
                "(slowest rank, %ld iterations)\n", ml * 1e3, mstep * 1e3, iters);
  }
  const std::string pf = deck.get<std::string>("bench.profile");
  if (!pf.empty()) {
    const moka::MachineProfile prof = moka::MachineProfile::read(pf);
    moka::StepShape shape;
    shape.moe          = cfg;
    shape.tokens       = double(T);
    shape.scalar_bytes = sizeof(S);
    shape.bucket_mb    = pc.bucket_mb;
    std::vector<double> pl, ps;
    moka::StepPrediction last;
    for (const auto& c : counts) {
      last = moka::predict_step(prof, shape, lay, c);
      pl.push_back(last.layer);
      ps.push_back(last.step);
    }
    const double pml = moka::median_of(pl), pms = moka::median_of(ps);
    if (rank == 0) {
      if (prof.ranks_per_node != size)
        std::printf("  note: the profile was measured with %d rank(s) per node, this run has %d\n",
                    prof.ranks_per_node, size);
      std::printf("  predicted (%s, %s): layer %.3f ms (fixed %.3f, gate %.3f, tokens %.3f, experts %.3f, exchange "
                  "%.3f, slicing %.3f), step %.3f ms (gradient sums %.3f, optimizer %.3f)\n",
                  pf.c_str(), prof.card.c_str(), pml * 1e3, last.fixed * 1e3, last.gate * 1e3, last.tokens * 1e3,
                  last.experts * 1e3, last.exchange * 1e3, last.slicing * 1e3, pms * 1e3, last.grad_sync * 1e3,
                  last.optimizer * 1e3);
      std::printf("  error: layer %+.1f%%, step %+.1f%% (busiest EP rank %.0f rows, mean %.0f)\n",
                  100.0 * (pml - ml) / ml, 100.0 * (pms - mstep) / mstep, last.busiest_rows, last.mean_rows);
      std::printf("validate: layer_ms=%.4f predicted_layer_ms=%.4f step_ms=%.4f predicted_step_ms=%.4f\n", ml * 1e3,
                  pml * 1e3, mstep * 1e3, pms * 1e3);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    if (runtime.rank() == 0)
      std::cout << "usage: moka-bench <deck> [key=value ...]\n       moka-bench --deck-reference\n";
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--deck-reference") {
    if (runtime.rank() == 0) std::cout << moka::bench_schema().markdown();
    return 0;
  }
  moka::InputDeck deck;
  try {
    deck = moka::InputDeck::load(runtime.comm(), args[0], std::vector<std::string>(args.begin() + 1, args.end()));
    deck.validate(moka::bench_schema());
  } catch (const std::exception& e) {
    if (runtime.rank() == 0) std::cerr << "moka-bench: error: " << e.what() << std::endl;
    return 2;
  }
  try {
    moka::agree_on_failure(runtime.comm(), [&] {
      moka::check_bench_deck(deck, runtime.size(), runtime.local_size());
    });
  } catch (const moka::CollectiveError& e) {
    if (runtime.rank() == 0) std::cerr << "moka-bench: error: " << e.what() << std::endl;
    return 2;
  }
  try {
    const std::string p = deck.get<std::string>("bench.precision");
    const std::string mode = deck.get<std::string>("bench.mode");
    if (mode == "calibrate") {
      if (p == "fp64") return run_calibrate<double>(deck, runtime.rank(), runtime.size(), runtime.local_size());
      return run_calibrate<float>(deck, runtime.rank(), runtime.size(), runtime.local_size());
    }
    if (mode == "step") {
      if (p == "fp64") return run_step<double>(deck, runtime.rank(), runtime.size());
      return run_step<float>(deck, runtime.rank(), runtime.size());
    }
    if (mode == "exchange") {
      if (p == "fp64") return run_exchange<double>(deck, runtime.rank(), runtime.size());
      return run_exchange<float>(deck, runtime.rank(), runtime.size());
    }
    if (p == "fp64") return run<double>(deck, runtime.rank());
    return run<float>(deck, runtime.rank());
  } catch (const std::exception& e) {
    moka::Runtime::abort("moka-bench", e);
  }
}
