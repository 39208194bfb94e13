#pragma once
// Deterministic parameter initialisation: the same numbers on every backend.

#include <Kokkos_Core.hpp>

#include <cstdint>

namespace moka {
namespace impl {

/// splitmix64: a small, portable generator, so parameters are the same
/// numbers on every backend and compiler.
struct SplitMix64 {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z               = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z               = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in [-a, a).
  double uniform(double a) { return a * (2.0 * (static_cast<double>(next() >> 11) * 0x1.0p-53) - 1.0); }
};

template <class View>
void fill_uniform(const View& v, SplitMix64& rng, double bound) {
  auto h = Kokkos::create_mirror_view(Kokkos::HostSpace(), v);
  auto flat = Kokkos::View<typename View::non_const_value_type*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(
      h.data(), h.size());
  for (std::size_t i = 0; i < flat.extent(0); ++i) flat(i) = static_cast<typename View::non_const_value_type>(rng.uniform(bound));
  Kokkos::deep_copy(v, h);
}

/// Draws \p total numbers of the stream (uniform(-bound, bound)) and keeps
/// number g at flat index local(g) of \p v when local(g) >= 0: a rank's part
/// of a tensor initialised as one (the same numbers on every layout).
template <class View, class Map>
void fill_uniform_part(const View& v, SplitMix64& rng, double bound, long total, const Map& local) {
  using T = typename View::non_const_value_type;
  auto h  = Kokkos::create_mirror_view(Kokkos::HostSpace(), v);
  T* out  = h.data();
  for (long g = 0; g < total; ++g) {
    const double u = rng.uniform(bound);
    const long i   = local(g);
    if (i >= 0) out[i] = static_cast<T>(u);
  }
  Kokkos::deep_copy(v, h);
}

}  // namespace impl
}  // namespace moka
