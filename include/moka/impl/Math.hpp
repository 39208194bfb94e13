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
}  // namespace impl
}  // namespace moka
