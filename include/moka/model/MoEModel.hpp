#pragma once
/// \file MoEModel.hpp
/// \brief A small model built from the library's parts:
/// input projection -> blocks of [LayerNorm -> MoE FFN -> residual] ->
/// output projection, with a mean-squared-error loss.

#include <moka/model/Dense.hpp>
#include <moka/parallel/GradSync.hpp>
#include <moka/moe/MoELayer.hpp>

#include <memory>
#include <string>
#include <vector>

namespace moka {

/// \brief Shape of the model.
struct ModelConfig {
  int d_in   = 4;  ///< input features (from the task)
  int d_out  = 2;  ///< outputs (from the task)
  int blocks = 2;  ///< model.blocks: number of [norm -> MoE -> residual] blocks
  MoEConfig moe;   ///< every block's MoE layer

  /// \brief The model.* keys (the moe.*, gate.*, expert.* keys are MoEConfig's).
  static DeckSchema schema();
  /// \brief Reads model.* and the MoE keys; d_in / d_out stay as given.
  static ModelConfig from_deck(const InputDeck& deck);
};

template <class Scalar, class MemorySpace = memory_space>
class MoEModel {
 public:
  using execution_space = typename MemorySpace::execution_space;
  using matrix          = Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>;
  using layer_type      = MoELayer<Scalar, MemorySpace>;

  /// \brief The model; \p groups lays its MoE layers out over ranks
  /// (nullptr: this rank alone); \p placement: where every MoE layer's
  /// experts start (empty: contiguous). A trace gate's block b replays
  /// trace layer gate.trace_layer + b.
  explicit MoEModel(const ModelConfig& cfg, std::shared_ptr<ProcessGroups> groups = nullptr,
                    const Placement& placement = Placement())
      : m_cfg(cfg), m_in("moka::model.in", cfg.d_in, cfg.moe.d_model),
        m_out("moka::model.out", cfg.moe.d_model, cfg.d_out) {
    MOKA_REQUIRE(cfg.blocks >= 0, "model.blocks = ", cfg.blocks, " must be >= 0");
    for (int b = 0; b < cfg.blocks; ++b) {
      m_norms.emplace_back("moka::model.norm" + std::to_string(b), cfg.moe.d_model);
      MoEConfig layer_cfg = cfg.moe;
      if (layer_cfg.gate == GateType::trace) layer_cfg.trace_layer += b;
      m_moe.push_back(std::make_unique<layer_type>(layer_cfg, groups, placement));
    }
  }

  /// \brief Deterministic initialisation from \p seed.
  void init_parameters(std::uint64_t seed) {
    m_in.init_parameters(seed * 1000 + 1);
    m_out.init_parameters(seed * 1000 + 2);
    for (int b = 0; b < m_cfg.blocks; ++b) m_moe[b]->init_parameters(seed * 1000 + 10 + b);
  }

  /// \brief out[T, d_out] = model(x[T, d_in]).
  void forward(const execution_space& space, const matrix& x, const matrix& out) {
    ScopedRegion region("moka::MoEModel::forward");
    const long T = x.extent(0);
    const int d  = m_cfg.moe.d_model;
    if (m_h.empty() || m_h[0].extent(0) != std::size_t(T)) {
      m_h.clear();
      m_n.clear();
      m_m.clear();
      for (int b = 0; b <= m_cfg.blocks; ++b) m_h.emplace_back("moka::model.h", T, d);
      for (int b = 0; b < m_cfg.blocks; ++b) {
        m_n.emplace_back("moka::model.n", T, d);
        m_m.emplace_back("moka::model.m", T, d);
      }
      m_dh = matrix("moka::model.dh", T, d);
      m_dn = matrix("moka::model.dn", T, d);
      m_tmp = matrix("moka::model.tmp", T, d);
    }
    m_in.forward(space, x, m_h[0]);
    for (int b = 0; b < m_cfg.blocks; ++b) {
      m_norms[b].forward(space, m_h[b], m_n[b]);
      m_moe[b]->forward(space, m_n[b], m_m[b]);
      auto h0 = m_h[b], h1 = m_h[b + 1], m = m_m[b];
      Kokkos::parallel_for(
          "moka::residual", impl::row_major_2d(space, T, long(d)),
          KOKKOS_LAMBDA(long t, long c) { h1(t, c) = h0(t, c) + m(t, c); });
    }
    m_out.forward(space, m_h[m_cfg.blocks], out);
  }

  /// \brief Gradients of every parameter += their part for dout = dLoss/dout.
  void backward(const execution_space& space, const matrix& dout) {
    ScopedRegion region("moka::MoEModel::backward");
    const long T = dout.extent(0);
    const int d  = m_cfg.moe.d_model;
    m_out.backward(space, dout, m_dh);
    for (int b = m_cfg.blocks - 1; b >= 0; --b) {
      // h1 = h0 + moe(norm(h0)): dh0 = dh1 + norm^T(moe^T(dh1)).
      m_moe[b]->backward(space, m_dh, m_dn);
      m_norms[b].backward(space, m_dn, m_tmp);
      auto dh = m_dh;
      auto tmp = m_tmp;
      Kokkos::parallel_for(
          "moka::residual_backward", impl::row_major_2d(space, T, long(d)),
          KOKKOS_LAMBDA(long t, long c) { dh(t, c) += tmp(t, c); });
    }
    m_in.backward(space, m_dh, matrix());
  }

  /// \brief Clears every gradient.
  void zero_grad(const execution_space& space) {
    m_in.zero_grad(space);
    m_out.zero_grad(space);
    for (auto& n : m_norms) n.zero_grad(space);
    for (auto& m : m_moe) m->zero_grad(space);
  }

  /// \brief Every parameter tensor with its gradient and synchronisation
  /// tag, in a fixed order (this rank's part of the expert tensors).
  std::vector<ParamRef<Scalar, MemorySpace>> parameters() {
    std::vector<ParamRef<Scalar, MemorySpace>> out;
    auto add = [&](const std::string& name, auto p, auto g, ParamTag tag = ParamTag::dense) {
      using flat = decltype(ParamRef<Scalar, MemorySpace>::param);
      out.push_back({name, flat(p.data(), p.size()), flat(g.data(), g.size()), tag, nullptr, nullptr, extents_of(p)});
    };
    add("in.w", m_in.weight(), m_in.weight_grad());
    add("in.b", m_in.bias(), m_in.bias_grad());
    for (int b = 0; b < m_cfg.blocks; ++b) {
      const std::string p = "block" + std::to_string(b) + ".";
      add(p + "norm.gamma", m_norms[b].gamma(), m_norms[b].gamma_grad());
      add(p + "norm.beta", m_norms[b].beta(), m_norms[b].beta_grad());
      for (auto& r : m_moe[b]->parameters(p)) out.push_back(r);
    }
    add("out.w", m_out.weight(), m_out.weight_grad());
    add("out.b", m_out.bias(), m_out.bias_grad());
    return out;
  }

  /// \brief MoELayer::set_bf16_weights_managed for every MoE layer.
  void set_bf16_weights_managed(bool on) {
    for (auto& m : m_moe) m->set_bf16_weights_managed(on);
  }

  /// \brief Training or evaluation mode of every MoE layer (noise, jitter,
  /// random routing, capacity factor, bias updates).
  void set_training(bool training) {
    m_training = training;
    for (auto& m : m_moe) m->set_training(training);
  }
  bool training() const { return m_training; }
  /// \brief Sum of the MoE layers' auxiliary losses (balance + z) of the
  /// last forward; their gradients are part of backward().
  double aux_loss() const {
    double s = 0;
    for (const auto& m : m_moe) s += m->aux_loss();
    return s;
  }

  /// \brief The MoE layer of block \p b.
  layer_type& moe(int b) { return *m_moe.at(b); }
  /// \brief The configuration.
  const ModelConfig& config() const { return m_cfg; }

 private:
  ModelConfig m_cfg;
  Linear<Scalar, MemorySpace> m_in, m_out;
  std::vector<LayerNorm<Scalar, MemorySpace>> m_norms;
  std::vector<std::unique_ptr<layer_type>> m_moe;
  bool m_training = true;
  std::vector<matrix> m_h, m_n, m_m;
  matrix m_dh, m_dn, m_tmp;
};

/// \brief Mean squared error over all elements, and its gradient
/// dout = 2 (out - target) / N when \p dout is not empty, N = \p grad_count
/// or, when that is 0, T * d_out. Data parallel: pass the element count of
/// the whole batch, so that the ranks' gradients sum to the batch's.
template <class Scalar, class MemorySpace, class Exec>
double mse_loss(const Exec& space, const Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>& out,
                const Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>& target,
                const Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>& dout, double grad_count = 0) {
  require_extent("moka::mse_loss", target, 0, out.extent(0), "rows");
  require_extent("moka::mse_loss", target, 1, out.extent(1), "columns");
  const long T = out.extent(0), n = out.extent(1);
  const double count = double(T) * double(n);
  double sum = 0;
  Kokkos::parallel_reduce(
      "moka::mse", impl::row_major_2d(space, T, n),
      KOKKOS_LAMBDA(long t, long c, double& acc) {
        const double e = double(out(t, c)) - double(target(t, c));
        acc += e * e;
      },
      sum);
  if (dout.extent(0) > 0) {
    const Scalar scale = Scalar(2.0 / (grad_count > 0 ? grad_count : count));
    Kokkos::parallel_for(
        "moka::mse_grad", impl::row_major_2d(space, T, n),
        KOKKOS_LAMBDA(long t, long c) { dout(t, c) = scale * (out(t, c) - target(t, c)); });
  }
  return count > 0 ? sum / count : 0.0;
}

}  // namespace moka
