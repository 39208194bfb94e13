#include <moka/plan/CostModel.hpp>

#include <moka/core/Error.hpp>
#include <moka/moe/LayerMemory.hpp>
#include <moka/parallel/ReplicaSplit.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

namespace moka {

std::string LayoutChoice::describe(int num_experts) const {
  std::ostringstream os;
  os << "EP " << ep << " x S " << slices << " x EDP " << edp << ", " << slots_per_rank(num_experts) << " slot"
     << (slots_per_rank(num_experts) == 1 ? "" : "s") << ", " << exchange;
  if (shadowing > 0) os << ", shadowing " << shadowing;
  if (schedule > 1) os << ", schedule " << schedule;
  return os.str();
}

namespace {

/// Columns of an expert's first GEMM per rank (swiglu: two halves).
double dff_in_local(const MoEConfig& m, int slices) { return double(m.d_ff_in()) / slices; }

/// Parameters of one expert slot on one rank.
double slot_params(const MoEConfig& m, int slices) {
  const double d = m.d_model, dfi = dff_in_local(m, slices), dff = double(m.d_ff) / slices;
  return d * dfi + dff * d + (m.expert_bias ? dfi + d : 0.0);
}

double gate_params(const MoEConfig& m) {
  return double(m.d_model) * m.num_experts * (m.gate == GateType::noisy ? 2 : 1);
}

/// Seconds to all-reduce \p values of \p bytes each in buckets of \p bucket_mb.
double allreduce_seconds(const MachineProfile& p, double values, std::size_t bytes, double bucket_mb) {
  if (values <= 0) return 0.0;
  MOKA_REQUIRE(p.allreduce.bandwidth > 0, "the machine profile ", p.source.empty() ? "" : "'" + p.source + "' ",
               "has no all-reduce figures (it was measured on one rank); calibrate on as many ranks per node as the "
               "run uses");
  const double total   = values * bytes;
  const double bucket  = std::max(1.0, bucket_mb * 1048576.0);
  const double buckets = std::ceil(total / bucket);
  return buckets * p.allreduce.latency + total / p.allreduce.bandwidth;
}

}  // namespace

double shared_node_seconds(const MachineProfile& p, const std::vector<double>& rank_seconds, int copies) {
  if (rank_seconds.empty()) return 0.0;
  const double R = std::max(1, p.ranks_per_node);
  const double K = std::min(R, std::max(1.0, p.concurrent_ranks));
  if (K >= R) return *std::max_element(rank_seconds.begin(), rank_seconds.end());
  // The ranks of one node: the EP ranks' work, each as many times as there
  // are EP groups and slice ranks (copies), as far as a node holds them.
  std::vector<double> w;
  for (int c = 0; c < std::max(1, copies); ++c)
    for (double t : rank_seconds) w.push_back(t);
  std::sort(w.begin(), w.end());
  if (w.size() > std::size_t(R)) w.erase(w.begin(), w.end() - std::size_t(R));  // the busiest node's ranks
  // Processor sharing: the times were measured with every rank busy
  // (each at K / R of full speed); with m ranks busy each runs at
  // min(1, K / m) of full speed.
  const double slow = R / K;
  double t = 0, done = 0;
  const std::size_t n = w.size();
  for (std::size_t i = 0; i < n; ++i) {
    const double work = w[i] / slow;  // full-speed seconds
    const double rate = std::min(1.0, K / double(n - i));
    t += (work - done) / rate;
    done = work;
  }
  return t;
}

double exchange_busiest_rows(const StepShape& shape, const LayoutChoice& layout, const std::vector<double>& counts,
                             const std::vector<double>& rank_rows) {
  const int EP = layout.ep, S = layout.slices;
  if (EP <= 1) return 0.0;
  const double T = shape.tokens, k = shape.moe.top_k;
  const double total = std::accumulate(counts.begin(), counts.end(), 0.0);
  // A rank's own tokens spread over the experts as the whole batch does:
  // of what it routes, the share of the other ranks' experts leaves; of
  // its experts' rows, the other EP ranks' share arrives. Rows of an EP
  // rank come from the tokens of its S slice ranks; each moves its own.
  const double kept = total / std::max(T * k * EP * S, 1.0);  // below 1 when rows are dropped
  double busiest = 0;
  for (int r = 0; r < EP; ++r) {
    const double share = rank_rows[r] / std::max(total, 1.0);
    const double sent  = T * k * kept * (1.0 - share);
    const double recv  = rank_rows[r] / S * (EP - 1) / EP;
    busiest = std::max({busiest, sent, recv});
  }
  return busiest;
}

double parameters_per_rank(const StepShape& shape, const LayoutChoice& layout) {
  const int slots = layout.slots_per_rank(shape.moe.num_experts);
  return shape.layers * (gate_params(shape.moe) + slots * slot_params(shape.moe, layout.slices)) + shape.dense_params;
}

StepPrediction predict_step(const MachineProfile& p, const StepShape& shape, const LayoutChoice& layout,
                            const std::vector<double>& counts, const RankExperts& experts_at) {
  const MoEConfig& m = shape.moe;
  const int E = m.num_experts, EP = layout.ep, S = layout.slices;
  MOKA_REQUIRE(int(counts.size()) == E, counts.size(), " expert counts for ", E, " experts");
  MOKA_REQUIRE(EP >= 1 && S >= 1 && layout.edp >= 1, "layout ", layout.describe(E), " has a size below 1");
  MOKA_REQUIRE(E % EP == 0, "moe.num_experts = ", E, " is not divisible by EP = ", EP);
  RankExperts at = experts_at.empty() ? contiguous_layout(E, EP) : experts_at;
  MOKA_REQUIRE(int(at.size()) == EP, "placement of ", at.size(), " ranks for EP = ", EP);
  {
    std::vector<int> held(E, 0);
    for (int r = 0; r < EP; ++r)
      for (int e : at[r]) {
        MOKA_REQUIRE(e >= 0 && e < E, "placement: rank ", r, " holds expert ", e, " of ", E);
        ++held[e];
      }
    for (int e = 0; e < E; ++e) MOKA_REQUIRE(held[e] > 0, "placement: expert ", e, " has no slot");
  }

  StepPrediction out;
  const double T = shape.tokens, d = m.d_model, k = m.top_k;
  const double row_bytes = d * double(shape.scalar_bytes);
  const int world        = layout.world();
  out.fixed  = p.layer_fixed + (world > 1 ? p.exchange_fixed : 0.0);
  out.gate   = T * d * E * p.gate_flop + T * E * p.gate_elem;
  out.tokens = T * k * d * p.token_elem;

  // Dynamic shadowing: which experts, and the counts that still move.
  std::vector<double> moving = counts;
  std::vector<int> shadowed;
  if (layout.shadowing > 0 && EP > 1) {
    MOKA_REQUIRE(int(at.front().size()) * EP == E, "shadowing needs one slot per expert (layout ", layout.describe(E),
                 ")");
    MOKA_REQUIRE(S == 1, "shadowing needs no expert slicing (layout ", layout.describe(E), ")");
    const double total = std::accumulate(counts.begin(), counts.end(), 0.0);
    std::vector<std::vector<double>> per_source(EP, std::vector<double>(E));
    for (int r = 0; r < EP; ++r)
      for (int e = 0; e < E; ++e) per_source[r][e] = counts[e] / EP;
    shadowed = choose_shadowed(per_source, at, shadow_cost(p, shape, layout, total / E, layout.shadowing)).experts;
    const ShadowCost sc = shadow_cost(p, shape, layout, total / E, layout.shadowing);
    out.shadowed  = double(shadowed.size());
    out.shadowing = out.shadowed * sc.per_expert();
    for (int e : shadowed) moving[e] = 0;
  }
  // Rows of each slot: a replicated expert's rows split as MoELayer splits
  // them; a shadowed expert's in a shadow slot on every rank.
  const auto share  = split_replica_rows(at, moving, true);
  const int dff_loc = m.d_ff / S;
  double total_rows = std::accumulate(counts.begin(), counts.end(), 0.0);
  std::vector<double> rank_rows(EP, 0.0), moving_rows(EP, 0.0);  // moving: without shadowed rows
  out.rank_expert_seconds.assign(EP, 0.0);
  for (int r = 0; r < EP; ++r) {
    int used = 0;
    for (std::size_t l = 0; l < share[r].size(); ++l) {
      rank_rows[r] += share[r][l];
      out.rank_expert_seconds[r] += p.expert_seconds(m.d_model, dff_loc, share[r][l]);
      used += share[r][l] > 0;
    }
    moving_rows[r] = rank_rows[r];
    for (int e : shadowed) {
      rank_rows[r] += counts[e] / EP;
      out.rank_expert_seconds[r] += p.expert_seconds(m.d_model, dff_loc, counts[e] / EP);
      used += counts[e] > 0;
    }
    out.rank_expert_seconds[r] = std::max(0.0, out.rank_expert_seconds[r] - std::max(0, used - 1) * p.expert_shared);
  }
  out.experts      = shared_node_seconds(p, out.rank_expert_seconds, layout.world() / EP);
  out.busiest_rows = *std::max_element(rank_rows.begin(), rank_rows.end());
  out.rank_rows    = rank_rows;
  out.mean_rows    = total_rows / EP;

  if (EP > 1) {
    const MachineProfile::Link* link = p.link(layout.exchange);
    MOKA_REQUIRE(link, "the machine profile ", p.source.empty() ? "" : "'" + p.source + "' ",
                 "has no figures for the exchange path '", layout.exchange, "'");
    out.exchange = 4.0 * (link->latency + exchange_busiest_rows(shape, layout, moving, moving_rows) * row_bytes /
                                              link->bandwidth);
  }
  if (S > 1) {
    const MachineProfile::Link* link = p.link(layout.exchange == "none" ? std::string("mpi") : layout.exchange);
    if (!link && !p.exchange.empty()) link = &p.exchange.front();
    MOKA_REQUIRE(link, "the machine profile has no exchange figures for expert slicing over ", S, " ranks");
    out.slicing = 4.0 * (link->latency + out.busiest_rows * row_bytes * (S - 1) / S / link->bandwidth);
  }
  if (layout.schedule > 1 && EP > 1 && S == 1) {
    const double G = std::min(layout.schedule, EP);
    out.overlap    = p.schedule_overlap * (1.0 - 1.0 / G) * std::min(out.experts, out.exchange);
  }
  out.layer = out.fixed + out.gate + out.tokens + out.experts + out.exchange + out.slicing + out.shadowing - out.overlap;

  // Gradient sums: gate over the world, experts over EDP (and replicas), b2 over the slice group.
  const double L = layout.slots_per_rank(E);
  if (world > 1) out.grad_sync += shape.layers * allreduce_seconds(p, gate_params(m), shape.scalar_bytes, shape.bucket_mb);
  if (layout.edp > 1)
    out.grad_sync += shape.layers * allreduce_seconds(p, L * slot_params(m, S), shape.scalar_bytes, shape.bucket_mb);
  if (L * EP > E) {
    // Replicated experts: their slots' gradients summed among the replicas.
    const double extra = L - double(E) / EP;
    out.grad_sync += shape.layers * allreduce_seconds(p, extra * slot_params(m, S), shape.scalar_bytes, shape.bucket_mb);
  }
  if (S > 1 && m.expert_bias) out.grad_sync += shape.layers * allreduce_seconds(p, L * d, shape.scalar_bytes, shape.bucket_mb);
  if (world > 1 && shape.dense_params > 0)
    out.grad_sync += allreduce_seconds(p, shape.dense_params, shape.scalar_bytes, shape.bucket_mb);
  out.optimizer = parameters_per_rank(shape, layout) * p.optimizer_elem;
  out.step      = shape.layers * out.layer + out.grad_sync + out.optimizer;
  return out;
}

ShadowCost shadow_cost(const MachineProfile& p, const StepShape& shape, const LayoutChoice& layout,
                       double rows_per_expert, int max_shadowed) {
  MOKA_REQUIRE(p.allreduce.bandwidth > 0, "the machine profile ", p.source.empty() ? "" : "'" + p.source + "' ",
               "has no all-reduce figures (measured on one rank): shadowing's broadcast cannot be costed");
  const MoEConfig& m = shape.moe;
  const int dff      = m.d_ff / layout.slices;
  const double r     = std::max(1.0, rows_per_expert);
  ShadowCost c;
  c.row_seconds  = std::max(0.0, (p.expert_seconds(m.d_model, dff, 2 * r) - p.expert_seconds(m.d_model, dff, r)) / r);
  c.expert_bytes = slot_params(m, layout.slices) * double(shape.scalar_bytes);
  c.bandwidth    = p.allreduce.bandwidth;
  c.latency      = p.allreduce.latency;
  c.max_shadowed = max_shadowed;
  return c;
}

MemoryEstimate layout_memory(const StepShape& shape, const LayoutChoice& layout, int optimizer_moments) {
  MemoryEstimate est;
  LayerMemoryShape ls;
  ls.tokens         = shape.tokens;
  ls.ep             = layout.ep;
  ls.slices         = layout.slices;
  ls.slots_per_rank = layout.slots;
  ls.layers         = shape.layers;
  ls.scalar_bytes   = shape.scalar_bytes;
  ls.moments        = optimizer_moments;
  MoEConfig moe     = shape.moe;
  moe.shadow_slots  = layout.shadowing;
  add_moe_layer_memory(est, moe, ls);
  if (shape.dense_params > 0)
    est.add("dense weights, gradients and optimizer state", "model", shape.dense_params * shape.scalar_bytes *
                                                                         (2.0 + optimizer_moments));
  return est;
}

}  // namespace moka
