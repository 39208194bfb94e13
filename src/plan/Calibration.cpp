#include <moka/plan/Calibration.hpp>

#include <moka/core/Error.hpp>

#include <algorithm>
#include <cmath>

namespace moka {

namespace {

/// Solves the normal equations of the features in \p use (Gaussian
/// elimination with partial pivoting); unused features get 0.
std::vector<double> least_squares(const std::vector<std::vector<double>>& X, const std::vector<double>& y,
                                  const std::vector<bool>& use) {
  const std::size_t n = use.size();
  std::vector<std::size_t> idx;
  for (std::size_t j = 0; j < n; ++j)
    if (use[j]) idx.push_back(j);
  const std::size_t m = idx.size();
  std::vector<double> b(n, 0.0);
  if (m == 0) return b;
  // Scale features to unit size: they differ by many orders of magnitude.
  std::vector<double> scale(m, 0.0);
  for (std::size_t a = 0; a < m; ++a) {
    for (const auto& row : X) scale[a] = std::max(scale[a], std::abs(row[idx[a]]));
    if (scale[a] == 0) scale[a] = 1;
  }
  std::vector<std::vector<double>> A(m, std::vector<double>(m + 1, 0.0));
  for (std::size_t i = 0; i < X.size(); ++i)
    for (std::size_t a = 0; a < m; ++a) {
      const double xa = X[i][idx[a]] / scale[a];
      for (std::size_t c = 0; c < m; ++c) A[a][c] += xa * X[i][idx[c]] / scale[c];
      A[a][m] += xa * y[i];
    }
  for (std::size_t c = 0; c < m; ++c) {
    std::size_t piv = c;
    for (std::size_t r = c + 1; r < m; ++r)
      if (std::abs(A[r][c]) > std::abs(A[piv][c])) piv = r;
    std::swap(A[c], A[piv]);
    if (std::abs(A[c][c]) < 1e-300) continue;  // a feature that never varies: left at 0
    for (std::size_t r = 0; r < m; ++r) {
      if (r == c) continue;
      const double f = A[r][c] / A[c][c];
      for (std::size_t k = c; k <= m; ++k) A[r][k] -= f * A[c][k];
    }
  }
  for (std::size_t a = 0; a < m; ++a) b[idx[a]] = std::abs(A[a][a]) < 1e-300 ? 0.0 : A[a][m] / A[a][a] / scale[a];
  return b;
}

}  // namespace

std::vector<double> fit_nonnegative(const std::vector<std::vector<double>>& X, const std::vector<double>& y) {
  MOKA_REQUIRE(X.size() == y.size(), X.size(), " feature rows for ", y.size(), " measurements");
  MOKA_REQUIRE(!X.empty(), "no measurements to fit");
  const std::size_t n = X[0].size();
  for (const auto& row : X) MOKA_REQUIRE(row.size() == n, "feature rows of different lengths (", row.size(), ", ", n, ")");
  MOKA_REQUIRE(X.size() >= n, X.size(), " measurements cannot fit ", n, " coefficients");
  std::vector<bool> use(n, true);
  for (;;) {
    std::vector<double> b = least_squares(X, y, use);
    bool dropped = false;
    for (std::size_t j = 0; j < n; ++j)
      if (use[j] && b[j] < 0) use[j] = false, dropped = true;
    if (!dropped) return b;
  }
}

MachineProfile::Link fit_link(const std::string& path, const std::vector<double>& bytes,
                              const std::vector<double>& seconds, double transfers) {
  MOKA_REQUIRE(bytes.size() == seconds.size() && bytes.size() >= 2, "a link needs two or more (bytes, seconds) "
               "measurements, got ", bytes.size());
  MOKA_REQUIRE(transfers > 0, "transfers = ", transfers);
  // Relative errors: each measurement divided by its time, so that the
  // largest transfer does not decide the latency of the small ones.
  std::vector<std::vector<double>> X;
  std::vector<double> y;
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    const double w = 1.0 / std::max(seconds[i] / transfers, 1e-12);
    X.push_back({w, bytes[i] * w});
    y.push_back(seconds[i] / transfers * w);
  }
  const auto b = fit_nonnegative(X, y);
  MOKA_REQUIRE(b[1] > 0, "the ", path, " times do not grow with the bytes moved (", seconds.front(), " s for ",
               bytes.front(), " B, ", seconds.back(), " s for ", bytes.back(), " B): no bandwidth");
  return {path, b[0], 1.0 / b[1]};
}

double median_of(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace moka
