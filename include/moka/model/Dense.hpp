#pragma once
/// \file Dense.hpp
/// \brief The dense parts of a model around MoE layers: moka::Linear and
/// moka::LayerNorm, each with forward and backward. Gradients accumulate.

#include <moka/core/Core.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/core/impl/Init.hpp>
#include <moka/core/impl/Math.hpp>
#include <moka/linalg/ColumnSums.hpp>
#include <moka/linalg/Gemm.hpp>

#include <cmath>
#include <cstdint>
#include <string>

namespace moka {

/// \brief y = x W + b, W [in, out], b [out].
template <class Scalar, class MemorySpace = memory_space>
class Linear {
 public:
  using execution_space = typename MemorySpace::execution_space;
  using matrix          = Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>;
  using vector          = Kokkos::View<Scalar*, MemorySpace>;

  Linear() = default;
  /// \brief Zero weights of shape [in, out], labelled \p name.
  Linear(const std::string& name, int in, int out)
      : m_w(name + ".w", in, out), m_b(name + ".b", out), m_dw(name + ".dw", in, out), m_db(name + ".db", out) {
    MOKA_REQUIRE(in > 0 && out > 0, name, ": shape ", in, " x ", out, " must be positive");
  }

  /// \brief uniform(-1/sqrt(in), 1/sqrt(in)) weights from \p seed, zero bias.
  void init_parameters(std::uint64_t seed) {
    impl::SplitMix64 rng{seed};
    impl::fill_uniform(m_w, rng, 1.0 / std::sqrt(double(m_w.extent(0))));
    Kokkos::deep_copy(m_b, Scalar(0));
  }

  void forward(const execution_space& space, const matrix& x, const matrix& y) {
    const std::string where = "moka::Linear::forward";
    require_extent(where, x, 1, m_w.extent(0), "columns");
    require_extent(where, y, 0, x.extent(0), "rows");
    require_extent(where, y, 1, m_w.extent(1), "columns");
    m_x = x;
    impl::gemm(space, "N", "N", Scalar(1), x, m_w, Scalar(0), y);
    auto b = m_b;
    Kokkos::parallel_for(
        "moka::linear_bias",
        impl::row_major_2d(space, long(y.extent(0)), long(y.extent(1))),
        KOKKOS_LAMBDA(long t, long c) { y(t, c) += b(c); });
  }

  /// \brief dW += x^T dy, db += column sums of dy, dx = dy W^T (dx may be empty: not computed).
  void backward(const execution_space& space, const matrix& dy, const matrix& dx) {
    const std::string where = "moka::Linear::backward";
    MOKA_REQUIRE(m_x.data() != nullptr || m_x.extent(0) == 0, "call forward before backward");
    require_extent(where, dy, 0, m_x.extent(0), "rows");
    require_extent(where, dy, 1, m_w.extent(1), "columns");
    impl::add_column_sums(
        space, long(dy.extent(0)), long(dy.extent(1)), KOKKOS_LAMBDA(long t, long c) { return dy(t, c); }, m_work,
        m_db);
    impl::gemm(space, "T", "N", Scalar(1), m_x, dy, Scalar(1), m_dw);
    if (dx.extent(0) > 0) {
      require_extent(where, dx, 0, m_x.extent(0), "rows");
      require_extent(where, dx, 1, m_w.extent(0), "columns");
      impl::gemm(space, "N", "T", Scalar(1), dy, m_w, Scalar(0), dx);
    }
  }

  void zero_grad(const execution_space& space) {
    Kokkos::deep_copy(space, m_dw, Scalar(0));
    Kokkos::deep_copy(space, m_db, Scalar(0));
  }

  const matrix& weight() const { return m_w; }
  const vector& bias() const { return m_b; }
  const matrix& weight_grad() const { return m_dw; }
  const vector& bias_grad() const { return m_db; }

 private:
  matrix m_w;
  vector m_b;
  matrix m_dw;
  vector m_db;
  matrix m_x;
  matrix m_work;  // partial column sums of db
};

/// \brief y = gamma (x - mean) / sqrt(var + eps) + beta over each row.
template <class Scalar, class MemorySpace = memory_space>
class LayerNorm {
 public:
  using execution_space = typename MemorySpace::execution_space;
  using matrix          = Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>;
  using vector          = Kokkos::View<Scalar*, MemorySpace>;

  LayerNorm() = default;
  /// \brief gamma = 1, beta = 0 over rows of width \p d.
  LayerNorm(const std::string& name, int d, double eps = 1e-5)
      : m_gamma(name + ".gamma", d), m_beta(name + ".beta", d), m_dgamma(name + ".dgamma", d),
        m_dbeta(name + ".dbeta", d), m_eps(Scalar(eps)) {
    Kokkos::deep_copy(m_gamma, Scalar(1));
  }

  void forward(const execution_space& space, const matrix& x, const matrix& y) {
    const std::string where = "moka::LayerNorm::forward";
    require_extent(where, x, 1, m_gamma.extent(0), "columns");
    require_extent(where, y, 0, x.extent(0), "rows");
    require_extent(where, y, 1, m_gamma.extent(0), "columns");
    const long T = x.extent(0);
    const int d  = static_cast<int>(x.extent(1));
    if (static_cast<long>(m_rstd.extent(0)) != T) {
      m_rstd = vector("moka::layernorm.rstd", T);
      m_xhat = matrix("moka::layernorm.xhat", T, d);
    }
    auto rstd = m_rstd;
    auto xhat = m_xhat;
    auto gamma = m_gamma;
    auto beta = m_beta;
    const Scalar eps = m_eps;
    Kokkos::parallel_for(
        "moka::layernorm_forward", Kokkos::RangePolicy<execution_space>(space, 0, T), KOKKOS_LAMBDA(long t) {
          Scalar mean = 0;
          for (int c = 0; c < d; ++c) mean += x(t, c);
          mean /= Scalar(d);
          Scalar var = 0;
          for (int c = 0; c < d; ++c) var += (x(t, c) - mean) * (x(t, c) - mean);
          var /= Scalar(d);
          const Scalar r = Scalar(1) / impl::sqrt(var + eps);
          rstd(t)        = r;
          for (int c = 0; c < d; ++c) {
            xhat(t, c) = (x(t, c) - mean) * r;
            y(t, c)    = gamma(c) * xhat(t, c) + beta(c);
          }
        });
  }

  /// \brief dgamma, dbeta += their part; dx = the input gradient.
  void backward(const execution_space& space, const matrix& dy, const matrix& dx) {
    const std::string where = "moka::LayerNorm::backward";
    require_extent(where, dy, 0, m_xhat.extent(0), "rows");
    require_extent(where, dy, 1, m_gamma.extent(0), "columns");
    require_extent(where, dx, 0, m_xhat.extent(0), "rows");
    const long T = dy.extent(0);
    const int d  = static_cast<int>(dy.extent(1));
    auto rstd = m_rstd;
    auto xhat = m_xhat;
    auto gamma = m_gamma;
    impl::add_column_sums(
        space, T, d, KOKKOS_LAMBDA(long t, long c) { return dy(t, c) * xhat(t, c); }, m_work, m_dgamma);
    impl::add_column_sums(space, T, d, KOKKOS_LAMBDA(long t, long c) { return dy(t, c); }, m_work, m_dbeta);
    Kokkos::parallel_for(
        "moka::layernorm_dx", Kokkos::RangePolicy<execution_space>(space, 0, T), KOKKOS_LAMBDA(long t) {
          Scalar mg = 0, mgx = 0;
          for (int c = 0; c < d; ++c) {
            const Scalar g = dy(t, c) * gamma(c);
            mg += g;
            mgx += g * xhat(t, c);
          }
          mg /= Scalar(d);
          mgx /= Scalar(d);
          for (int c = 0; c < d; ++c) dx(t, c) = rstd(t) * (dy(t, c) * gamma(c) - mg - xhat(t, c) * mgx);
        });
  }

  void zero_grad(const execution_space& space) {
    Kokkos::deep_copy(space, m_dgamma, Scalar(0));
    Kokkos::deep_copy(space, m_dbeta, Scalar(0));
  }

  const vector& gamma() const { return m_gamma; }
  const vector& beta() const { return m_beta; }
  const vector& gamma_grad() const { return m_dgamma; }
  const vector& beta_grad() const { return m_dbeta; }

 private:
  vector m_gamma, m_beta, m_dgamma, m_dbeta, m_rstd;
  matrix m_xhat;
  matrix m_work;  // partial column sums of dgamma and dbeta
  Scalar m_eps = Scalar(1e-5);
};

}  // namespace moka
