// moka-replay: replays a recorded expert-routing trace through the
// placement policies without training, and prints how balanced each keeps
// the ranks (docs/balance.md).
//
//   moka-replay input_decks/replay.deck [key=value ...]
//
// Per trace iteration and layer, a rank's load is the assignments its
// slots receive, summed over source ranks and micro-batches (a replicated
// expert's rows split among its replicas by moka::split_replica_rows, as
// the layer splits them). Every replay.interval
// iterations each policy re-plans from the loads of the iterations it has
// already seen. One line per policy, starting "policy <name>:", and a CSV
// row per policy, iteration and layer (replay.csv_file).

#include <moka/balance/BalanceConfig.hpp>
#include <moka/balance/LoadMonitor.hpp>
#include <moka/balance/Policy.hpp>
#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/io/RoutingTrace.hpp>
#include <moka/moe/MoEConfig.hpp>

#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <sstream>

namespace {

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t i = std::min(v.size() - 1, static_cast<std::size_t>(q * (v.size() - 1) + 0.5));
  return v[i];
}

int replay(const moka::InputDeck& deck) {
  const std::string file = deck.get<std::string>("replay.trace_file");
  moka::RoutingTrace trace;
  try {
    trace = moka::read_routing_trace(file);
  } catch (const moka::Error& e) {
    throw moka::Error(std::string("replay.trace_file: ") + e.what());
  }
  const int E = static_cast<int>(trace.n_experts), P = deck.get<int>("replay.ranks");
  if (deck.find("moe.num_experts"))
    MOKA_REQUIRE(deck.get<int>("moe.num_experts") == E, "moe.num_experts = ", deck.get<int>("moe.num_experts"),
                 " but replay.trace_file '", file, "' has ", E, " experts");
  MOKA_REQUIRE(E % P == 0, "replay.ranks = ", P, " does not divide the trace's ", E, " experts");
  int slots = deck.get<int>("replay.slots_per_rank");
  if (slots == 0) slots = E / P;
  MOKA_REQUIRE(slots >= E / P, "replay.slots_per_rank = ", slots, " is fewer than the ", E / P,
               " experts each rank must hold");
  MOKA_REQUIRE(slots <= E, "replay.slots_per_rank = ", slots, " is more than the trace's ", E, " experts");
  const int first = deck.get<int>("replay.first_layer");
  int layers      = deck.get<int>("replay.layers");
  MOKA_REQUIRE(first < trace.n_layers, "replay.first_layer = ", first, " but the trace has ", trace.n_layers,
               " layers");
  if (layers == 0) layers = static_cast<int>(trace.n_layers) - first;
  MOKA_REQUIRE(first + layers <= trace.n_layers, "replay.first_layer + replay.layers = ", first + layers,
               " but the trace has ", trace.n_layers, " layers");
  const int interval        = deck.get<int>("replay.interval");
  const moka::BalanceConfig bc = moka::BalanceConfig::from_deck(deck);
  const moka::MoEConfig mc     = moka::MoEConfig::from_deck(deck);
  // An expert slot's state: parameters, gradients and the moments (fp32).
  const double per_expert = double(mc.d_model) * mc.d_ff_in() + double(mc.d_ff) * mc.d_model +
                            (mc.expert_bias ? mc.d_ff_in() + mc.d_model : 0);
  moka::PlanCost cost;
  cost.slot_bytes    = per_expert * 4.0 * (2 + deck.get<int>("replay.optimizer_moments"));
  cost.bandwidth     = bc.migration_gbs * 1e9;
  cost.row_seconds   = bc.row_seconds(mc.d_model, mc.d_ff_in(), mc.d_ff);
  // A trace row stands for the training steps up to the next recorded one
  // (the shared trace keeps every 10th): re-plans are that many steps apart.
  const long stride  = trace.n_iter > 1 ? std::max(1, trace.iterations[1] - trace.iterations[0]) : 1;
  cost.horizon_steps = double(interval) * stride;
  cost.sticky        = bc.sticky;

  std::ofstream csv;
  const std::string csv_file = deck.get<std::string>("replay.csv_file");
  if (!csv_file.empty()) {
    csv.open(csv_file);
    MOKA_REQUIRE(csv.good(), "replay.csv_file: cannot write '", csv_file, "'");
    csv << "policy,iteration,trace_iteration,layer,busiest,mean,imbalance,moved_slots,bytes,replicated,placement,loads\n";
  }
  std::printf("moka-replay: %s: %ld iterations x %d layers, %d experts on %d ranks x %d slots, re-plan every %d\n",
              file.c_str(), trace.n_iter, layers, E, P, slots, interval);
  std::printf("  model: d_model %d, d_ff %d: %.2f MB per expert slot moved; row time %.3g ns; migration %.3g GB/s; "
              "a trace iteration stands for %ld training steps\n",
              mc.d_model, mc.d_ff, cost.slot_bytes / 1048576.0, cost.row_seconds * 1e9, bc.migration_gbs, stride);
  for (const std::string& name : deck.get_list<std::string>("replay.policies")) {
    const moka::BalancePolicy policy = moka::balance_policy_from_string(name);
    std::vector<moka::RankExperts> layout(layers, moka::contiguous_layout(E, P));
    moka::LoadMonitor monitor(layers, E, bc.predictor);
    std::vector<double> ratios;
    long replans = 0, moved = 0;
    double bytes = 0, layer_s = 0, migration_s = 0;
    for (long it = 0; it < trace.n_iter; ++it)
      for (int l = 0; l < layers; ++l) {
        const std::vector<long> c = trace.expert_counts(it, first + l);
        const std::vector<double> load(c.begin(), c.end());
        long moved_now = 0;
        double bytes_now = 0;
        if (it > 0 && it % interval == 0 && policy != moka::BalancePolicy::static_placement) {
          const moka::PlanDecision d = moka::plan_placement(
              policy, monitor.predicted(l), layout[l], slots, cost,
              std::vector<std::vector<double>>(monitor.history(l).begin(), monitor.history(l).end()));
          if (d.changed) {
            layout[l] = d.layout;
            ++replans;
            moved_now = d.moved_slots;
            bytes_now = d.bytes;
            moved += d.moved_slots;
            bytes += d.bytes;
            migration_s += d.migration_seconds;
          }
        }
        const std::vector<double> rl = moka::rank_loads(load, layout[l]);
        const double busiest = *std::max_element(rl.begin(), rl.end());
        const double mean    = std::accumulate(rl.begin(), rl.end(), 0.0) / P;
        const double ratio   = mean > 0 ? busiest / mean : 1.0;
        ratios.push_back(ratio);
        layer_s += busiest * cost.row_seconds * stride;
        monitor.record(l, load);
        if (csv.is_open()) {
          std::ostringstream where;
          for (int r = 0; r < P; ++r) {
            where << (r ? "|" : "");
            for (std::size_t i = 0; i < layout[l][r].size(); ++i) where << (i ? " " : "") << layout[l][r][i];
          }
          std::vector<int> R(E, 0);
          for (const auto& rr : layout[l])
            for (int e : rr) ++R[e];
          csv << name << "," << it << "," << trace.iterations[it] << "," << first + l << "," << busiest << "," << mean
              << "," << ratio << "," << moved_now << "," << bytes_now << ","
              << std::count_if(R.begin(), R.end(), [](int r) { return r > 1; }) << "," << where.str() << ",";
          for (int e = 0; e < E; ++e) csv << (e ? " " : "") << c[e];
          csv << "\n";
        }
      }
    const double mean_ratio = std::accumulate(ratios.begin(), ratios.end(), 0.0) / ratios.size();
    std::printf("policy %s: imbalance mean %.3f p95 %.3f, re-plans %ld, slots moved %ld, bytes moved %.3g GB, "
                "predicted MoE-layer time %.3f s (layers %.3f s + migration %.3f s)\n",
                name.c_str(), mean_ratio, percentile(ratios, 0.95), replans, moved, bytes / 1e9, layer_s + migration_s,
                layer_s, migration_s);
  }
  if (deck.get<bool>("replay.shadowing")) {
    // FasterMoE's dynamic shadowing on the static placement: the trace's
    // source ranks, in contiguous blocks, are the run's ranks.
    moka::ShadowCost sc;
    sc.row_seconds  = cost.row_seconds;
    sc.expert_bytes = per_expert * 4.0;  // fp32 parameters out, gradients back
    sc.bandwidth    = bc.migration_gbs * 1e9;
    sc.max_shadowed = deck.get<int>("replay.max_shadowed");
    const moka::RankExperts layout = moka::contiguous_layout(E, P);
    std::vector<double> ratios;
    double layer_s = 0, shadow_s = 0;
    long shadowed = 0, steps = 0;
    for (long it = 0; it < trace.n_iter; ++it)
      for (int l = 0; l < layers; ++l) {
        const auto sc_rows = trace.source_counts(it, first + l);
        std::vector<std::vector<double>> src(P, std::vector<double>(E, 0.0));
        for (long s = 0; s < trace.n_ranks; ++s)
          for (int e = 0; e < E; ++e) src[std::size_t(s * P / trace.n_ranks)][e] += sc_rows[s][e];
        const moka::ShadowDecision d = moka::choose_shadowed(src, layout, sc);
        const auto rl     = moka::shadowed_rank_loads(src, layout, d.experts);
        const double mean = std::accumulate(rl.begin(), rl.end(), 0.0) / P;
        ratios.push_back(mean > 0 ? d.busiest_after / mean : 1.0);
        layer_s += d.busiest_after * cost.row_seconds * stride;
        shadow_s += double(d.experts.size()) * sc.per_expert() * stride;
        shadowed += long(d.experts.size());
        ++steps;
        if (csv.is_open()) {
          csv << "shadowing," << it << "," << trace.iterations[it] << "," << first + l << "," << d.busiest_after << ","
              << mean << "," << ratios.back() << ",0," << double(d.experts.size()) * sc.expert_bytes * 2 << ","
              << d.experts.size() << ",";
          for (std::size_t i = 0; i < d.experts.size(); ++i) csv << (i ? " " : "") << d.experts[i];
          csv << ",\n";
        }
      }
    const double mean_ratio = std::accumulate(ratios.begin(), ratios.end(), 0.0) / ratios.size();
    std::printf("policy static + shadowing: imbalance mean %.3f p95 %.3f, %.2f experts shadowed per step and layer "
                "(at most %d), predicted MoE-layer time %.3f s (layers %.3f s + shadowing %.3f s)\n",
                mean_ratio, percentile(ratios, 0.95), double(shadowed) / std::max(1L, steps), sc.max_shadowed,
                layer_s + shadow_s, layer_s, shadow_s);
  }
  return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::vector<std::string> args(argv + 1, argv + argc);
  int rc = 0;
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    if (rank == 0) std::cout << "usage: moka-replay <deck> [key=value ...]\n       moka-replay --deck-reference\n";
    rc = args.empty() ? 2 : 0;
  } else if (args[0] == "--deck-reference") {
    if (rank == 0) std::cout << moka::replay_schema().markdown();
  } else {
    // One process does the work (the replay is a host simulation); others wait.
    try {
      moka::InputDeck deck =
          moka::InputDeck::load(MPI_COMM_WORLD, args[0], std::vector<std::string>(args.begin() + 1, args.end()));
      deck.validate(moka::replay_schema());
      if (rank == 0) rc = replay(deck);
    } catch (const std::exception& e) {
      if (rank == 0) std::cerr << "moka-replay: error: " << e.what() << std::endl;
      rc = 2;
    }
  }
  MPI_Bcast(&rc, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return rc;
}
