#include <moka/balance/Policy.hpp>
#include <moka/core/Error.hpp>
#include <moka/parallel/ReplicaSplit.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moka {

BalancePolicy balance_policy_from_string(const std::string& s) {
  if (s == "static") return BalancePolicy::static_placement;
  if (s == "smartmoe") return BalancePolicy::smartmoe;
  if (s == "moka") return BalancePolicy::moka;
  throw Error("balance.policy = '" + s + "': expected static, smartmoe or moka");
}

const char* to_string(BalancePolicy p) {
  switch (p) {
    case BalancePolicy::static_placement: return "static";
    case BalancePolicy::smartmoe: return "smartmoe";
    case BalancePolicy::moka: return "moka";
  }
  return "?";
}

RankExperts layout_of(const Placement& p) {
  RankExperts out(p.ep_size());
  for (int r = 0; r < p.ep_size(); ++r)
    for (int l = 0; l < p.slots_per_rank(); ++l) out[r].push_back(p.expert_at(r, l));
  return out;
}

Placement placement_of(const RankExperts& want, const Placement& current, int num_experts) {
  const int P = static_cast<int>(want.size()), L = current.slots_per_rank();
  MOKA_REQUIRE(P == current.ep_size(), "moka::placement_of: a layout of ", P, " ranks for a placement of ",
               current.ep_size());
  std::vector<int> slots(std::size_t(P) * L, -1);
  for (int r = 0; r < P; ++r) {
    MOKA_REQUIRE(static_cast<int>(want[r].size()) == L, "moka::placement_of: rank ", r, " holds ", want[r].size(),
                 " experts for ", L, " slots (every slot of a layer holds one)");
    std::vector<int> pending;
    for (int e : want[r]) {
      int kept = -1;
      for (int l = 0; l < L && kept < 0; ++l)
        if (current.expert_at(r, l) == e && slots[r * L + l] < 0) kept = l;
      if (kept >= 0) slots[r * L + kept] = e;
      else pending.push_back(e);
    }
    std::size_t next = 0;
    for (int l = 0; l < L; ++l)
      if (slots[r * L + l] < 0) slots[r * L + l] = pending.at(next++);
  }
  return Placement::from_slots(num_experts, P, slots);
}

namespace {
std::vector<int> replica_counts(const RankExperts& layout, int E) {
  std::vector<int> R(E, 0);
  for (const auto& r : layout)
    for (int e : r) ++R[e];
  return R;
}
}  // namespace

std::vector<double> rank_loads(const std::vector<double>& load, const RankExperts& layout) {
  const auto share = split_replica_rows(layout, load, false);
  std::vector<double> out(layout.size(), 0.0);
  for (std::size_t r = 0; r < layout.size(); ++r) out[r] = std::accumulate(share[r].begin(), share[r].end(), 0.0);
  return out;
}

double imbalance(const std::vector<double>& load, const RankExperts& layout) {
  const auto rl     = rank_loads(load, layout);
  const double most = *std::max_element(rl.begin(), rl.end());
  const double mean = std::accumulate(rl.begin(), rl.end(), 0.0) / rl.size();
  return mean > 0 ? most / mean : 1.0;
}

long moved_slots(const RankExperts& from, const RankExperts& to) {
  long n = 0;
  for (std::size_t r = 0; r < to.size(); ++r)
    for (int e : to[r])
      if (r >= from.size() || std::find(from[r].begin(), from[r].end(), e) == from[r].end()) ++n;
  return n;
}

RankExperts contiguous_layout(int num_experts, int ranks) {
  MOKA_REQUIRE(ranks >= 1 && num_experts % ranks == 0, "moka::contiguous_layout: ", num_experts,
               " experts do not split evenly over ", ranks, " ranks");
  RankExperts out(ranks);
  for (int e = 0; e < num_experts; ++e) out[e / (num_experts / ranks)].push_back(e);
  return out;
}

namespace {

/// Where each expert is now (the first rank holding it, -1 if none).
std::vector<int> home_of(const RankExperts& layout, int E) {
  std::vector<int> home(E, -1);
  for (std::size_t r = 0; r < layout.size(); ++r)
    for (int e : layout[r])
      if (home[e] < 0) home[e] = static_cast<int>(r);
  return home;
}

bool holds(const RankExperts& layout, int r, int e) {
  return std::find(layout[r].begin(), layout[r].end(), e) != layout[r].end();
}

/// Improves a packing by swaps: while swapping a replica of the busiest
/// rank with one of another rank (neither rank holding the other's expert
/// afterwards) lowers the larger of the two loads, the best such swap is
/// made (at most 10000 swaps).
void refine(RankExperts& out, const std::vector<std::pair<int, double>>& items) {
  std::vector<double> per(0);
  int E = 0;
  for (const auto& it : items) E = std::max(E, it.first + 1);
  per.assign(E, 0.0);
  for (const auto& it : items) per[it.first] = it.second;  // every replica of an expert carries the same load
  const int P = static_cast<int>(out.size());
  std::vector<double> load(P, 0.0);
  for (int r = 0; r < P; ++r)
    for (int e : out[r]) load[r] += per[e];
  for (int round = 0; round < 10000; ++round) {
    const int b = static_cast<int>(std::max_element(load.begin(), load.end()) - load.begin());
    double best_gain = 1e-12 * std::max(1.0, load[b]);
    int bi = -1, br = -1, bj = -1;
    for (std::size_t i = 0; i < out[b].size(); ++i) {
      const int x = out[b][i];
      for (int r = 0; r < P; ++r) {
        if (r == b || holds(out, r, x)) continue;
        for (std::size_t j = 0; j < out[r].size(); ++j) {
          const int y = out[r][j];
          if (per[y] >= per[x] || holds(out, b, y)) continue;
          const double nb = load[b] - per[x] + per[y], nr = load[r] - per[y] + per[x];
          const double gain = load[b] - std::max(nb, nr);
          if (gain > best_gain) {
            best_gain = gain;
            bi = static_cast<int>(i);
            br = r;
            bj = static_cast<int>(j);
          }
        }
      }
    }
    if (bi < 0) break;
    const int x = out[b][bi], y = out[br][bj];
    out[b][bi]  = y;
    out[br][bj] = x;
    load[b] += per[y] - per[x];
    load[br] += per[x] - per[y];
  }
}

/// Packs items (expert, load) heaviest first onto the least-loaded rank with
/// a free slot that does not hold the expert; \p sticky_load > 0 prefers
/// the expert's current rank(s) when within that much of the least loaded.
/// Empty when some replica finds no such rank (the caller skips it).
RankExperts pack(std::vector<std::pair<int, double>> items, const RankExperts& current, int P, int slots,
                 double sticky_load) {
  std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) {
    return a.second != b.second ? a.second > b.second : a.first < b.first;
  });
  RankExperts out(P);
  std::vector<double> load(P, 0.0);
  for (const auto& it : items) {
    const int e = it.first;
    int best = -1, here = -1;
    for (int r = 0; r < P; ++r) {
      if (static_cast<int>(out[r].size()) >= slots || holds(out, r, e)) continue;
      const bool was = holds(current, r, e);
      if (best < 0 || load[r] < load[best] || (load[r] == load[best] && was && !holds(current, best, e))) best = r;
      if (was && (here < 0 || load[r] < load[here])) here = r;
    }
    if (best < 0) return {};  // the free slots are all on ranks that hold e: not a layout
    if (sticky_load > 0 && here >= 0 && load[here] <= load[best] + sticky_load) best = here;
    out[best].push_back(e);
    load[best] += it.second;
  }
  refine(out, items);
  return out;
}

/// The expected busiest rank load of \p layout: over the predicted load and
/// the recent samples (each step's own routing decides the split).
double expected_busiest(const std::vector<double>& load, const std::vector<std::vector<double>>& recent,
                        const RankExperts& layout) {
  auto busiest = [&](const std::vector<double>& l) {
    const auto rl = rank_loads(l, layout);
    return *std::max_element(rl.begin(), rl.end());
  };
  double sum = busiest(load);
  for (const auto& r : recent) sum += busiest(r);
  return sum / double(1 + recent.size());
}

void fill_decision(PlanDecision& d, const std::vector<double>& load, const std::vector<std::vector<double>>& recent,
                   const RankExperts& current, const PlanCost& cost) {
  d.busiest_before = expected_busiest(load, recent, current);
  d.busiest_after  = expected_busiest(load, recent, d.layout);
  d.mean           = std::accumulate(load.begin(), load.end(), 0.0) / current.size();
  d.moved_slots     = moved_slots(current, d.layout);
  d.bytes           = double(d.moved_slots) * cost.slot_bytes;
  d.migration_seconds = cost.bandwidth > 0 ? d.bytes / cost.bandwidth : 0;
  d.saving_seconds  = (d.busiest_before - d.busiest_after) * cost.row_seconds * cost.horizon_steps;
  const auto R      = replica_counts(d.layout, static_cast<int>(load.size()));
  d.replicated      = std::count_if(R.begin(), R.end(), [](int r) { return r > 1; });
}

/// SmartMoE's rule: experts by load, heaviest first, each to the
/// least-loaded rank with a free slot (E / P per rank; ties: its rank).
RankExperts smartmoe_layout(const std::vector<double>& load, const RankExperts& current) {
  const int E = static_cast<int>(load.size()), P = static_cast<int>(current.size());
  MOKA_REQUIRE(E % P == 0, "smartmoe: ", E, " experts do not split evenly over ", P, " ranks");
  const int per = E / P;
  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return load[a] > load[b]; });
  const auto home = home_of(current, E);
  RankExperts out(P);
  std::vector<double> rl(P, 0.0);
  for (int e : order) {
    int best = -1;
    for (int r = 0; r < P; ++r) {
      if (static_cast<int>(out[r].size()) >= per) continue;
      if (best < 0 || rl[r] < rl[best] || (rl[r] == rl[best] && r == home[e])) best = r;
    }
    out[best].push_back(e);
    rl[best] += load[e];
  }
  return out;
}

}  // namespace

double update_bandwidth(double estimate, double bytes, double seconds) {
  MOKA_REQUIRE(estimate > 0, "moka::update_bandwidth: estimate ", estimate, " B/s must be positive");
  if (!(bytes > 0) || !(seconds > 0)) return estimate;
  return std::sqrt(estimate * (bytes / seconds));
}

PlanDecision plan_placement(BalancePolicy policy, const std::vector<double>& load, const RankExperts& current,
                            int slots, const PlanCost& cost, const std::vector<std::vector<double>>& recent) {
  const int E = static_cast<int>(load.size()), P = static_cast<int>(current.size());
  MOKA_REQUIRE(P >= 1 && slots >= 1 && slots * P >= E, "moka balancer: ", P, " ranks x ", slots,
               " slots cannot hold ", E, " experts");
  PlanDecision keep;
  keep.layout = current;
  fill_decision(keep, load, recent, current, cost);
  if (policy == BalancePolicy::static_placement) return keep;
  if (policy == BalancePolicy::smartmoe) {
    // The published rule compares the busiest rank under the predicted load only.
    fill_decision(keep, load, {}, current, cost);
    // One slot per expert, E / P per rank as the published system (spare
    // slots are not used).
    PlanDecision d;
    d.layout = smartmoe_layout(load, current);
    fill_decision(d, load, {}, current, cost);
    if (d.busiest_after >= d.busiest_before || d.moved_slots == 0) return keep;
    d.changed = true;
    return d;
  }
  // moka: candidate replica counts (spare slots to the experts with the
  // largest load per replica; or the hottest experts spread over as many
  // ranks as the spare slots allow: their rows then even out the ranks
  // step by step), each packed strictly and stickily.
  const int spare_slots = P * slots - E;
  std::vector<std::vector<int>> counts;
  {
    // Each spare slot to the expert with the largest weight per replica.
    auto by_weight = [&](const std::vector<double>& w) {
      std::vector<int> R(E, 1);
      for (int spare = spare_slots; spare > 0; --spare) {
        int best = -1;
        for (int e = 0; e < E; ++e)
          if (R[e] < P && (best < 0 || w[e] / R[e] > w[best] / R[best])) best = e;
        if (best < 0) break;
        ++R[best];
      }
      return R;
    };
    const std::vector<int> R = by_weight(load);
    counts.push_back(R);
    // The same by the recent peak of each expert's load: hedges against
    // the swings the average hides.
    if (!recent.empty()) {
      std::vector<double> peak = load;
      for (const auto& r : recent)
        for (int e = 0; e < E; ++e) peak[e] = std::max(peak[e], r[e]);
      const std::vector<int> Rp = by_weight(peak);
      if (Rp != R) counts.push_back(Rp);
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return load[a] > load[b]; });
    std::vector<int> S(E, 1);
    int left = spare_slots;
    for (int e : order) {
      const int add = std::min(left, P - 1);
      S[e] += add;
      left -= add;
      if (left == 0) break;
    }
    if (S != R) counts.push_back(S);
  }
  const double mean = std::accumulate(load.begin(), load.end(), 0.0) / P;
  std::vector<RankExperts> candidates;
  for (const auto& R : counts) {
    std::vector<std::pair<int, double>> items;
    for (int e = 0; e < E; ++e)
      for (int i = 0; i < R[e]; ++i) items.push_back({e, load[e] / R[e]});
    for (double sticky : {0.0, cost.sticky * mean}) candidates.push_back(pack(items, current, P, slots, sticky));
  }
  if (spare_slots == 0) candidates.push_back(smartmoe_layout(load, current));
  // The candidate with the least time over the horizon, migration
  // included, if it saves more than it costs.
  PlanDecision best = keep;
  double best_time  = keep.busiest_after * cost.row_seconds * cost.horizon_steps;
  for (auto& layout : candidates) {
    bool full = static_cast<int>(layout.size()) == P;  // a layer fills every slot
    for (const auto& r : layout) full = full && static_cast<int>(r.size()) == slots;
    if (!full) continue;
    PlanDecision d;
    d.layout = std::move(layout);
    fill_decision(d, load, recent, current, cost);
    const double t = d.busiest_after * cost.row_seconds * cost.horizon_steps + d.migration_seconds;
    if (d.moved_slots > 0 && t < best_time && d.saving_seconds > d.migration_seconds) {
      best         = d;
      best_time    = t;
      best.changed = true;
    }
  }
  return best;
}

std::vector<double> shadowed_rank_loads(const std::vector<std::vector<double>>& per_source, const RankExperts& layout,
                                        const std::vector<int>& shadowed) {
  const int P = static_cast<int>(layout.size());
  MOKA_REQUIRE(int(per_source.size()) == P, per_source.size(), " source ranks for a layout of ", P, " ranks");
  MOKA_REQUIRE(P > 0, "a layout of no ranks");
  const int E = static_cast<int>(per_source[0].size());
  std::vector<double> travel(E, 0.0);
  for (const auto& row : per_source) {
    MOKA_REQUIRE(int(row.size()) == E, "source rows of ", row.size(), " and ", E, " experts");
    for (int e = 0; e < E; ++e) travel[e] += row[e];
  }
  for (int e : shadowed) {
    MOKA_REQUIRE(e >= 0 && e < E, "shadowed expert ", e, " of ", E);
    travel[e] = 0;  // computed at the source
  }
  std::vector<double> load = rank_loads(travel, layout);
  for (int r = 0; r < P; ++r)
    for (int e : shadowed) load[r] += per_source[r][e];
  return load;
}

ShadowDecision choose_shadowed(const std::vector<std::vector<double>>& per_source, const RankExperts& layout,
                               const ShadowCost& cost) {
  MOKA_REQUIRE(cost.row_seconds >= 0 && cost.bandwidth > 0 && cost.max_shadowed >= 0,
               "shadowing costs: row_seconds ", cost.row_seconds, ", bandwidth ", cost.bandwidth, ", max ",
               cost.max_shadowed);
  ShadowDecision d;
  auto busiest = [&](const std::vector<int>& s) {
    const auto l = shadowed_rank_loads(per_source, layout, s);
    return *std::max_element(l.begin(), l.end());
  };
  auto seconds = [&](double rows, std::size_t n) { return rows * cost.row_seconds + double(n) * cost.per_expert(); };
  d.busiest_before = d.busiest_after = busiest({});
  d.seconds_before = d.seconds_after = seconds(d.busiest_before, 0);
  const int E = per_source.empty() ? 0 : static_cast<int>(per_source[0].size());
  while (static_cast<int>(d.experts.size()) < cost.max_shadowed) {
    int best = -1;
    double best_rows = 0, best_s = d.seconds_after;
    for (int e = 0; e < E; ++e) {
      if (std::find(d.experts.begin(), d.experts.end(), e) != d.experts.end()) continue;
      std::vector<int> s = d.experts;
      s.push_back(e);
      const double rows = busiest(s), t = seconds(rows, s.size());
      if (t < best_s) best = e, best_s = t, best_rows = rows;
    }
    if (best < 0) break;
    d.experts.push_back(best);
    d.busiest_after = best_rows;
    d.seconds_after = best_s;
  }
  return d;
}

}  // namespace moka
