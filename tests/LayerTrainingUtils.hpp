#pragma once
// What the layer-training tests share (test_migration, test_shadowing,
// test_schedule): a small gshard layer with capacity drops, trained with
// Adam and the gradient sums, and every expert's tensor gathered by
// logical expert over the EP group.

#include "MoETestUtils.hpp"

#include <moka/model/Optimizer.hpp>
#include <moka/parallel/GradSync.hpp>

#include <mpi.h>

#include <memory>
#include <vector>

namespace moka_test {

/// d 8, d_ff 12, 8 experts, top-2, gshard with capacity factor 1 (rows are
/// dropped: what is compared must keep the drops as they are), biases.
inline moka::MoEConfig small_gshard_config() {
  moka::MoEConfig c;
  c.d_model         = 8;
  c.d_ff            = 12;
  c.num_experts     = 8;
  c.top_k           = 2;
  c.gate            = moka::GateType::gshard;
  c.dropless        = false;
  c.capacity_factor = 1.0;
  c.expert_bias     = true;
  return c;
}

/// Adam, lr 1e-2, over 100 steps.
inline moka::OptimizerConfig small_adam() {
  moka::OptimizerConfig o;
  o.type        = moka::OptimizerType::adam;
  o.lr          = 1e-2;
  o.total_steps = 100;
  return o;
}

/// A layer (parameters from \p seed), Adam over its parameters, and its
/// gradient sums over \p g.
template <class M>
struct AdamLayerRun {
  using Layer = moka::MoELayer<double, M>;
  std::shared_ptr<moka::ProcessGroups> groups;
  Layer layer;
  moka::Optimizer<double, M> opt;
  moka::GradSync<double, M> sync;
  AdamLayerRun(const moka::MoEConfig& cfg, std::shared_ptr<moka::ProcessGroups> g,
               const moka::Placement& placement, unsigned seed)
      : groups(g), layer(cfg, g, placement), opt(small_adam()), sync(g, layer.parameters(), 1.0) {
    layer.init_parameters(seed);
    for (auto& r : layer.parameters()) opt.add(r.param, r.grad);
  }
};

/// Every expert's tensor \p v [local slots x n] by logical expert [E x n],
/// gathered over the EP group from the first holder of each expert: exact
/// (x + 0 = x).
template <class Layer, class View>
std::vector<double> by_expert(const Layer& layer, const View& v) {
  const int L = layer.local_experts(), E = layer.config().num_experts;
  const auto h = to_vec(v);
  const long n = static_cast<long>(h.size()) / L;
  std::vector<double> out(std::size_t(E) * n, 0.0);
  const auto& rg = *layer.replica_groups();
  for (int l = 0; l < L; ++l)
    if (rg.counted[l]) std::copy(h.begin() + l * n, h.begin() + (l + 1) * n, out.begin() + layer.local_expert(l) * n);
  if (layer.groups())
    MPI_Allreduce(MPI_IN_PLACE, out.data(), int(out.size()), MPI_DOUBLE, MPI_SUM, layer.groups()->ep().mpi_comm());
  return out;
}

}  // namespace moka_test
