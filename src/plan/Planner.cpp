#include <moka/plan/Planner.hpp>

#include <moka/core/Error.hpp>
#include <moka/io/RoutingTrace.hpp>
#include <moka/parallel/ProcessGroups.hpp>

#include <algorithm>
#include <cmath>
#include <iomanip>
#include <numeric>
#include <random>
#include <sstream>

namespace moka {

Workload uniform_workload(int num_experts) {
  MOKA_REQUIRE(num_experts > 0, "moe.num_experts = ", num_experts);
  return {"uniform", {std::vector<double>(num_experts, 1.0 / num_experts)}};
}

Workload zipf_workload(int num_experts, double s, std::uint64_t seed) {
  MOKA_REQUIRE(num_experts > 0, "moe.num_experts = ", num_experts);
  MOKA_REQUIRE(s >= 0 && std::isfinite(s), "plan.zipf_exponent = ", s, " must be >= 0");
  std::vector<int> order(num_experts);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  for (int i = num_experts - 1; i > 0; --i) std::swap(order[i], order[std::uniform_int_distribution<int>(0, i)(rng)]);
  std::vector<double> share(num_experts);
  double total = 0;
  for (int i = 0; i < num_experts; ++i) total += share[order[i]] = 1.0 / std::pow(double(i + 1), s);
  for (double& v : share) v /= total;
  std::ostringstream os;
  os << "zipf " << s;
  return {os.str(), {share}};
}

Workload trace_workload(const std::string& path, int layer, int num_experts) {
  const RoutingTrace t = read_routing_trace(path);
  MOKA_REQUIRE(t.n_experts == num_experts, "the trace '", path, "' has ", t.n_experts, " experts, moe.num_experts = ",
               num_experts);
  MOKA_REQUIRE(layer >= 0 && layer < t.n_layers, "plan.trace_layer = ", layer, ", the trace '", path, "' has ",
               t.n_layers, " layer(s)");
  Workload w;
  for (long i = 0; i < t.n_iter; ++i) {
    const auto c = t.expert_counts(i, layer);
    const double total = std::accumulate(c.begin(), c.end(), 0.0);
    if (total <= 0) continue;
    std::vector<double> s(c.size());
    for (std::size_t e = 0; e < c.size(); ++e) s[e] = c[e] / total;
    w.shares.push_back(s);
  }
  MOKA_REQUIRE(!w.shares.empty(), "the trace '", path, "' has no routed tokens in layer ", layer);
  std::ostringstream os;
  os << "trace " << path << " layer " << layer << " (" << w.shares.size() << " steps)";
  w.what = os.str();
  return w;
}

namespace {

std::vector<int> divisors(int n) {
  std::vector<int> d;
  for (int i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

/// Kept rows per expert of one MoE group's batch for \p share: all of them
/// when dropless, else at most the capacity per expert.
std::vector<double> group_counts(const StepShape& shape, const LayoutChoice& lay, const std::vector<double>& share) {
  const double rows = shape.tokens * lay.ep * lay.slices * shape.moe.top_k;
  const double cap  = shape.moe.dropless ? rows : std::ceil(shape.moe.capacity_factor * rows / shape.moe.num_experts);
  std::vector<double> c(share.size());
  for (std::size_t e = 0; e < share.size(); ++e) c[e] = std::min(cap, share[e] * rows);
  return c;
}

void add(StepPrediction& sum, const StepPrediction& p, double w) {
  sum.fixed += w * p.fixed, sum.gate += w * p.gate, sum.tokens += w * p.tokens, sum.experts += w * p.experts;
  sum.exchange += w * p.exchange, sum.slicing += w * p.slicing, sum.layer += w * p.layer;
  sum.grad_sync += w * p.grad_sync, sum.optimizer += w * p.optimizer, sum.step += w * p.step;
  sum.busiest_rows += w * p.busiest_rows, sum.mean_rows += w * p.mean_rows;
}

/// Where \p policy puts the experts for a workload of mean counts \p mean
/// and per-step counts \p steps: contiguous (static), or the policy's plan
/// from the contiguous start; moka's spare slots all filled, as a layer's
/// are (a policy may leave one empty where a replica does not pay), with
/// the heaviest experts the rank does not hold yet.
RankExperts planned_placement(const std::string& policy, const std::vector<double>& mean,
                              const std::vector<std::vector<double>>& steps, int E, int ep, int L) {
  const RankExperts current = contiguous_layout(E, ep);
  if (policy == "static") return current;
  PlanCost cost;
  cost.bandwidth     = 1e30;  // a plan, not a migration: where the experts should be
  cost.horizon_steps = 1e6;
  RankExperts at = plan_placement(policy == "moka" ? BalancePolicy::moka : BalancePolicy::smartmoe, mean, current, L,
                                  cost, steps)
                       .layout;
  if (policy == "moka")
    for (auto& held : at)
      while (int(held.size()) < L) {
        int best = -1;
        for (int e = 0; e < E; ++e)
          if (std::find(held.begin(), held.end(), e) == held.end() && (best < 0 || mean[e] > mean[best])) best = e;
        held.push_back(best);
      }
  return at;
}

}  // namespace

std::vector<PlanCandidate> plan_layouts(const MachineProfile& profile, const StepShape& shape, const Workload& workload,
                                        const PlanOptions& opt) {
  const MoEConfig& m = shape.moe;
  const int E = m.num_experts, P = opt.ranks;
  MOKA_REQUIRE(P >= 1, "plan.ranks = ", P, " must be positive");
  MOKA_REQUIRE(!workload.shares.empty(), "the workload has no steps");
  for (const auto& p : opt.policies)
    MOKA_REQUIRE(p == "static" || p == "smartmoe" || p == "moka", "plan.policies: '", p,
                 "' is not a placement policy (static, smartmoe, moka)");
  for (const auto& s : workload.shares)
    MOKA_REQUIRE(int(s.size()) == E, "the workload has ", s.size(), " experts, moe.num_experts = ", E);
  std::vector<PlanCandidate> out;
  // Mean load per expert and the steps' loads (for placement policies).
  std::vector<double> mean(E, 0.0);
  for (const auto& s : workload.shares)
    for (int e = 0; e < E; ++e) mean[e] += s[e] / workload.shares.size();

  for (int ep : divisors(P))
    for (int S : divisors(P / ep)) {
      LayoutChoice base;
      base.ep = ep, base.slices = S, base.edp = P / (ep * S);
      std::string why;
      try {
        ParallelConfig pc;
        pc.expert_parallel = ep, pc.expert_slicing = S, pc.expert_data_parallel = base.edp;
        pc.validate(P, E, m.d_ff);
      } catch (const Error& e) {
        why = e.what();
      }
      std::vector<std::string> paths{"none"};
      if (ep > 1) {
        paths.clear();
        for (const auto& l : profile.exchange) paths.push_back(l.path);
        if (paths.empty()) paths.push_back("mpi");  // refused below: the profile has no exchange figures
      }
      const int L0 = ep <= E && E % ep == 0 ? E / ep : 0;
      for (const std::string& path : paths)
        for (int extra = 0; extra <= (ep > 1 ? opt.max_extra_slots : 0); ++extra) {
          const int L = L0 + extra;
          if (extra > 0 && L > E) break;  // a rank never holds two of one expert
          std::vector<std::string> policies;
          if (extra > 0) policies = {"moka"};
          else if (ep > 1) policies = {"static", "smartmoe"};
          else policies = {"static"};
          // Dynamic shadowing: with one slot per expert and more than one EP rank.
          std::vector<int> shadows{0};
          if (opt.max_shadowed > 0 && extra == 0 && ep > 1 && S == 1) shadows.push_back(opt.max_shadowed);
          // Smart scheduling: at degree EP where the layer can run it.
          std::vector<int> degrees{1};
          if (opt.try_schedule && ep > 1 && S == 1 && !m.bf16_compute) degrees.push_back(ep);
          for (const std::string& policy : policies)
          for (int shadow : shadows)
          for (int degree : degrees) {
            if (std::find(opt.policies.begin(), opt.policies.end(), policy) == opt.policies.end()) continue;
            PlanCandidate c;
            c.layout          = base;
            c.layout.slots    = extra > 0 ? L : 0;
            c.layout.exchange = path;
            c.layout.shadowing = shadow;
            c.layout.schedule  = degree;
            c.policy          = policy;
            c.refused         = why;
            if (c.refused.empty()) {
              try {
                const MemoryEstimate est = layout_memory(shape, c.layout, opt.optimizer_moments);
                c.memory                 = est.total(true);
                if (opt.memory_per_rank > 0 && c.memory > opt.memory_per_rank) {
                  const MemoryEstimate::Item* big = nullptr;
                  for (const auto& it : est.items())
                    if (!big || it.bytes > big->bytes) big = &it;
                  c.refused = "needs " + format_bytes(c.memory) + " per rank, " + format_bytes(opt.memory_per_rank) +
                              " allowed (largest: " + big->what + ", " + format_bytes(big->bytes) + ")";
                }
                if (c.refused.empty()) {
                  std::vector<std::vector<double>> steps;
                  for (const auto& s : workload.shares) steps.push_back(group_counts(shape, c.layout, s));
                  c.experts_at = planned_placement(policy, group_counts(shape, c.layout, mean), steps, E, ep, L);
                  const double w = 1.0 / steps.size();
                  for (const auto& counts : steps)
                    add(c.predicted, predict_step(profile, shape, c.layout, counts, c.experts_at), w);
                }
              } catch (const Error& e) {
                c.refused = e.what();
              }
            }
            out.push_back(c);
          }
        }
    }
  std::stable_sort(out.begin(), out.end(), [](const PlanCandidate& a, const PlanCandidate& b) {
    if (a.refused.empty() != b.refused.empty()) return a.refused.empty();
    return a.refused.empty() && a.predicted.step < b.predicted.step;
  });
  return out;
}

std::string deck_fragment(const PlanCandidate& c, const MoEConfig& moe, const std::string& header) {
  MOKA_REQUIRE(c.refused.empty(), "layout ", c.layout.describe(moe.num_experts), " was refused: ", c.refused);
  std::ostringstream os;
  os << header;
  os << "parallel.expert_parallel      = " << c.layout.ep << "\n"
     << "parallel.expert_slicing       = " << c.layout.slices << "\n"
     << "parallel.expert_data_parallel = " << c.layout.edp << "\n"
     << "balance.policy                = " << c.policy << "\n"
     << "balance.slots_per_rank        = " << c.layout.slots << "\n"
     << "balance.shadowing             = " << (c.layout.shadowing > 0 ? "true" : "false") << "\n";
  if (c.layout.shadowing > 0) os << "balance.max_shadowed          = " << c.layout.shadowing << "\n";
  os << "comm.schedule_degree          = " << c.layout.schedule << "\n";
  if (c.layout.exchange == "mpi") os << "comm.backend                  = mpi\n";
  if (c.layout.exchange == "nccl") os << "comm.backend                  = nccl\ncomm.exchange_direct          = off\n";
  if (c.layout.exchange == "direct") os << "comm.backend                  = nccl\ncomm.exchange_direct          = on\n";
  return os.str();
}

}  // namespace moka
