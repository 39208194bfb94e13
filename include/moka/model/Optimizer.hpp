#pragma once
/// \file Optimizer.hpp
/// \brief SGD with momentum, Adam and AdamW with fp32 (or fp64) state,
/// global-norm gradient clipping, and the warmup + cosine learning-rate
/// schedule. The `train.*` optimizer keys of a deck.

#include <moka/core/Core.hpp>
#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/core/impl/Math.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace moka {

/// \brief Update rule.
enum class OptimizerType {
  sgd,   ///< buf = momentum buf + g; p -= lr buf (weight decay added to g)
  adam,  ///< Adam with bias correction; weight decay added to g (L2)
  adamw  ///< Adam with decoupled weight decay: p -= lr wd p
};

/// \brief Optimizer and schedule settings.
struct OptimizerConfig {
  OptimizerType type = OptimizerType::adamw;  ///< train.optimizer
  double lr           = 1e-3;   ///< train.lr: peak learning rate
  double min_lr_ratio = 0.1;    ///< train.min_lr_ratio: final lr / peak lr of the cosine decay
  long warmup_steps   = 0;      ///< train.warmup_steps: linear warmup from lr/warmup
  long total_steps    = 1000;   ///< train.steps: end of the cosine decay
  double momentum     = 0.9;    ///< train.momentum (sgd)
  double beta1        = 0.9;    ///< train.beta1 (adam, adamw)
  double beta2        = 0.999;  ///< train.beta2
  double eps          = 1e-8;   ///< train.eps
  double weight_decay = 0.0;    ///< train.weight_decay
  double clip_norm    = 0.0;    ///< train.clip_norm: global gradient norm limit (0: off)

  /// \brief Learning rate at step \p step (0-based): linear warmup over
  /// warmup_steps, then cosine decay from lr to min_lr_ratio * lr at total_steps.
  double learning_rate(long step) const;
  /// \brief Throws moka::Error on inconsistent values.
  void validate() const;
  /// \brief The deck keys.
  static DeckSchema schema();
  /// \brief Reads the keys of a validated deck.
  static OptimizerConfig from_deck(const InputDeck& deck);
};

/// \brief Parses "sgd", "adam" or "adamw"; throws moka::Error otherwise.
OptimizerType optimizer_type_from_string(const std::string& s);

/// \brief Updates a set of parameter tensors from their gradients.
///
/// Tensors are registered once (any rank, contiguous); state (momentum or
/// the two Adam moments) is kept per tensor in the parameters' precision
/// (fp32 for fp32 parameters, fp64 for fp64).
template <class Scalar, class MemorySpace = memory_space>
class Optimizer {
 public:
  using execution_space = typename MemorySpace::execution_space;
  using flat            = Kokkos::View<Scalar*, MemorySpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

  explicit Optimizer(const OptimizerConfig& config) : m_cfg((config.validate(), config)) {}

  /// \brief Registers a parameter and its gradient (same extents, contiguous).
  using bf16_flat = Kokkos::View<bf16*, MemorySpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  /// \brief Registers a parameter and its gradient (same extents,
  /// contiguous); with \p bf16_copy (param.size() elements), every step
  /// also writes bf16(param) there, fused into the update (mixed precision:
  /// the bf16 GEMM operands of MoELayer::set_bf16_weights_managed).
  template <class View>
  void add(const View& param, const View& grad, bf16* bf16_copy = nullptr) {
    MOKA_REQUIRE(param.span_is_contiguous() && grad.span_is_contiguous(), "'", param.label(),
                 "' must be contiguous");
    MOKA_REQUIRE(param.size() == grad.size(), "'", param.label(), "' has ", param.size(), " elements, its gradient ",
                 grad.size(), " (", grad.label(), ")");
    Entry e;
    e.param  = flat(param.data(), param.size());
    e.shadow = bf16_flat(bf16_copy, bf16_copy ? param.size() : 0);
    e.grad  = flat(grad.data(), grad.size());
    e.m     = Kokkos::View<Scalar*, MemorySpace>(param.label() + ".opt_m", param.size());
    if (m_cfg.type != OptimizerType::sgd) e.v = Kokkos::View<Scalar*, MemorySpace>(param.label() + ".opt_v", param.size());
    m_entries.push_back(e);
  }

  /// \brief sqrt(sum of squared gradients) over every registered tensor.
  double grad_norm(const execution_space& space) const {
    double total = 0;
    for (const auto& e : m_entries) total += impl::sum_of_squares(space, e.grad);
    return std::sqrt(total);
  }

  /// \brief One update with the learning rate of the current step; clips the
  /// gradients first when clip_norm > 0. Returns the gradient norm before clipping.
  double step(const execution_space& space) { return step(space, grad_norm(space)); }
  /// \brief As step(space), with the gradient norm given (data parallel:
  /// moka::GradSync::global_norm, where every expert counts once).
  double step(const execution_space& space, double norm) {
    double scale = 1.0;
    if (m_cfg.clip_norm > 0 && norm > m_cfg.clip_norm) scale = m_cfg.clip_norm / (norm + 1e-6);
    ++m_step;
    const double lr = m_cfg.learning_rate(m_step - 1);
    const Scalar s_lr = Scalar(lr), s_scale = Scalar(scale), wd = Scalar(m_cfg.weight_decay);
    const Scalar b1 = Scalar(m_cfg.beta1), b2 = Scalar(m_cfg.beta2), eps = Scalar(m_cfg.eps);
    const Scalar mu = Scalar(m_cfg.momentum);
    const Scalar c1 = Scalar(1.0 - std::pow(m_cfg.beta1, double(m_step)));
    const Scalar c2 = Scalar(1.0 - std::pow(m_cfg.beta2, double(m_step)));
    const OptimizerType type = m_cfg.type;
    for (const auto& e : m_entries) {
      auto p = e.param;
      auto g = e.grad;
      auto m = e.m;
      auto v = e.v;
      auto sh = e.shadow;
      const bool shadow = sh.extent(0) > 0;
      Kokkos::parallel_for(
          "moka::optimizer_step", Kokkos::RangePolicy<execution_space>(space, 0, p.extent(0)), KOKKOS_LAMBDA(long i) {
            Scalar gi = g(i) * s_scale;
            if (type == OptimizerType::sgd) {
              gi += wd * p(i);
              m(i) = mu * m(i) + gi;
              p(i) -= s_lr * m(i);
              if (shadow) sh(i) = bf16(float(p(i)));
              return;
            }
            if (type == OptimizerType::adam) gi += wd * p(i);
            if (type == OptimizerType::adamw) p(i) -= s_lr * wd * p(i);
            m(i) = b1 * m(i) + (Scalar(1) - b1) * gi;
            v(i) = b2 * v(i) + (Scalar(1) - b2) * gi * gi;
            const Scalar mhat = m(i) / c1, vhat = v(i) / c2;
            p(i) -= s_lr * mhat / (impl::sqrt(vhat) + eps);
            if (shadow) sh(i) = bf16(float(p(i)));
          });
    }
    return norm;
  }

  /// \brief Number of steps taken.
  long steps_taken() const { return m_step; }
  /// \brief Sets the step count (a restart: the schedule and Adam's bias
  /// correction continue from \p steps).
  void set_steps_taken(long steps) {
    MOKA_REQUIRE(steps >= 0, "moka::Optimizer::set_steps_taken: ", steps, " steps");
    m_step = steps;
  }
  /// \brief Registered tensors, and the elements of tensor \p i.
  std::size_t tensor_count() const { return m_entries.size(); }
  long tensor_size(std::size_t i) const { return static_cast<long>(entry(i, "tensor_size").param.extent(0)); }

  /// \brief Everything the optimizer keeps for a run of elements of one
  /// tensor (one expert's part of W1, say), on the host: the parameter
  /// (the fp32 master in mixed precision), the moments (momentum: m only),
  /// the bf16 copy where one is registered, and the step count. What
  /// expert migration and checkpoints move.
  struct SliceState {
    long steps = 0;
    std::vector<Scalar> param, m, v;
    std::vector<bf16> bf16_copy;
  };
  /// \brief Reads elements [\p offset, \p offset + \p count) of tensor
  /// \p i. Fences the default instance (host copies).
  SliceState read_slice(std::size_t i, long offset, long count) const {
    const Entry& e = entry(i, "read_slice");
    check_range(e, offset, count, "read_slice");
    SliceState st;
    st.steps = m_step;
    st.param = to_host(e.param, offset, count);
    st.m     = to_host(e.m, offset, count);
    if (e.v.extent(0) > 0) st.v = to_host(e.v, offset, count);
    if (e.shadow.extent(0) > 0) st.bf16_copy = to_host(e.shadow, offset, count);
    return st;
  }
  /// \brief Writes \p st into elements [\p offset, offset + size) of
  /// tensor \p i (the same or another tensor of the same kind: a migrated
  /// expert lands in another slot). The state must come from the same step
  /// and carry what this tensor keeps (moments by type, the bf16 copy where
  /// one is registered); moka::Error names what differs.
  void write_slice(std::size_t i, long offset, const SliceState& st) {
    Entry& e       = entry(i, "write_slice");
    const long cnt = static_cast<long>(st.param.size());
    check_range(e, offset, cnt, "write_slice");
    MOKA_REQUIRE(st.steps == m_step, "moka::Optimizer::write_slice: the slice's state is from step ", st.steps,
                 ", this optimizer is at step ", m_step);
    MOKA_REQUIRE(long(st.m.size()) == cnt && long(st.v.size()) == (e.v.extent(0) > 0 ? cnt : 0),
                 "moka::Optimizer::write_slice: the slice has ", st.m.size(), " first and ", st.v.size(),
                 " second moments for ", cnt, " elements (", m_cfg.type == OptimizerType::sgd ? "sgd" : "adam",
                 " keeps ", e.v.extent(0) > 0 ? "both" : "the first only", ")");
    MOKA_REQUIRE(long(st.bf16_copy.size()) == (e.shadow.extent(0) > 0 ? cnt : 0),
                 "moka::Optimizer::write_slice: the slice has ", st.bf16_copy.size(), " bf16 values, tensor ", i,
                 e.shadow.extent(0) > 0 ? " keeps a bf16 copy" : " keeps none");
    from_host(st.param, e.param, offset);
    from_host(st.m, e.m, offset);
    if (e.v.extent(0) > 0) from_host(st.v, e.v, offset);
    if (e.shadow.extent(0) > 0) from_host(st.bf16_copy, e.shadow, offset);
  }
  /// \brief The registered tensor whose parameter starts at \p param, or -1.
  long find(const Scalar* param) const {
    for (std::size_t i = 0; i < m_entries.size(); ++i)
      if (m_entries[i].param.data() == param) return static_cast<long>(i);
    return -1;
  }
  /// \brief Tensor \p i's moments in place (device views: momentum or the
  /// first moment, and the second moment, empty for sgd), for code that
  /// moves state without a trip through the host (expert migration).
  flat first_moment(std::size_t i) const {
    const Entry& e = entry(i, "first_moment");
    return flat(e.m.data(), e.m.extent(0));
  }
  flat second_moment(std::size_t i) const {
    const Entry& e = entry(i, "second_moment");
    return flat(e.v.data(), e.v.extent(0));
  }
  /// \brief The configuration.
  const OptimizerConfig& config() const { return m_cfg; }

 private:
  struct Entry {
    flat param, grad;
    bf16_flat shadow;
    Kokkos::View<Scalar*, MemorySpace> m, v;
  };
  const Entry& entry(std::size_t i, const char* op) const {
    MOKA_REQUIRE(i < m_entries.size(), "moka::Optimizer::", op, ": tensor ", i, " of ", m_entries.size(),
                 " registered");
    return m_entries[i];
  }
  Entry& entry(std::size_t i, const char* op) {
    return const_cast<Entry&>(static_cast<const Optimizer&>(*this).entry(i, op));
  }
  static void check_range(const Entry& e, long offset, long count, const char* op) {
    const long n = static_cast<long>(e.param.extent(0));
    MOKA_REQUIRE(offset >= 0 && count >= 0 && offset + count <= n, "moka::Optimizer::", op, ": elements [", offset,
                 ", ", offset + count, ") outside the tensor's ", n);
  }
  template <class V>
  static std::vector<typename V::non_const_value_type> to_host(const V& v, long offset, long count) {
    using T = typename V::non_const_value_type;
    std::vector<T> out(static_cast<std::size_t>(count));
    Kokkos::View<T*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> h(out.data(), out.size());
    Kokkos::deep_copy(h, Kokkos::subview(v, std::make_pair(offset, offset + count)));
    return out;
  }
  template <class T, class V>
  static void from_host(const std::vector<T>& src, const V& v, long offset) {
    Kokkos::View<const T*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> h(src.data(), src.size());
    Kokkos::deep_copy(Kokkos::subview(v, std::make_pair(offset, offset + long(src.size()))), h);
  }
  OptimizerConfig m_cfg;
  std::vector<Entry> m_entries;
  long m_step = 0;
};

}  // namespace moka
