#pragma once
// Math functions usable in kernels with Kokkos 3.x (Kokkos::Experimental)
// and 4.x (Kokkos::), as moka::impl::exp etc.

#include <Kokkos_Core.hpp>

namespace moka {
namespace impl {
#if KOKKOS_VERSION >= 40000
using Kokkos::cos;
using Kokkos::erf;
using Kokkos::exp;
using Kokkos::log;
using Kokkos::sqrt;
using Kokkos::tanh;
#else
using Kokkos::Experimental::cos;
using Kokkos::Experimental::erf;
using Kokkos::Experimental::exp;
using Kokkos::Experimental::log;
using Kokkos::Experimental::sqrt;
using Kokkos::Experimental::tanh;
#endif
/// 2D iteration over row-major (LayoutRight) data: the column index moves
/// fastest on every backend (Kokkos' CUDA default would make rows fastest,
/// uncoalesced for LayoutRight).
template <class Exec>
using RowMajor2D = Kokkos::MDRangePolicy<Exec, Kokkos::Rank<2, Kokkos::Iterate::Right, Kokkos::Iterate::Right>>;
}  // namespace impl
}  // namespace moka
