#pragma once
/// \file ColumnSums.hpp
/// \brief Deterministic column sums (bias gradients of Dense layers and
/// experts): chunked partial sums, then a fixed-order sum over the chunks;
/// no floating-point atomics. Internal (moka::impl).

#include <moka/core/Core.hpp>
#include <moka/core/impl/Math.hpp>

#include <string>

namespace moka {
namespace impl {

/// out(c) += the sum over rows t < T of f(t, c), for c < n: sums over chunks
/// of 64 rows (T/64 x n threads, not n threads each walking all rows), then
/// over the chunks in order; deterministic. \p work grows to [chunks, n].
template <class Exec, class S, class M, class F, class Out>
void add_column_sums(const Exec& space, long T, long n, const F& f, mat<S, M>& work, const Out& out) {
  constexpr long chunk = 64;
  const long chunks    = (T + chunk - 1) / chunk;
  if (static_cast<long>(work.extent(0)) < chunks || static_cast<long>(work.extent(1)) < n)
    work = mat<S, M>(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("moka::column_sums_work")), chunks, n);
  auto w = work;
  Kokkos::parallel_for(
      "moka::column_sums_chunks", impl::row_major_2d(space, chunks, n), KOKKOS_LAMBDA(long q, long c) {
        const long end = (q + 1) * chunk < T ? (q + 1) * chunk : T;
        S acc          = 0;
        for (long t = q * chunk; t < end; ++t) acc += f(t, c);
        w(q, c) = acc;
      });
  Kokkos::parallel_for(
      "moka::column_sums", Kokkos::RangePolicy<Exec>(space, 0, n), KOKKOS_LAMBDA(long c) {
        S acc = 0;
        for (long q = 0; q < chunks; ++q) acc += w(q, c);
        out(c) += acc;
      });
}

}  // namespace impl
}  // namespace moka
