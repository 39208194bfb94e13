// Explicit instantiations of moka::MoELayer for the common scalar types and
// memory spaces, so user code and tests do not compile the layer again.
#include <moka/moe/MoELayer.hpp>

namespace moka {
template struct MoEParams<double, Kokkos::HostSpace>;
template struct MoEParams<float, Kokkos::HostSpace>;
template class MoELayer<double, Kokkos::HostSpace>;
template class MoELayer<float, Kokkos::HostSpace>;
#ifdef KOKKOS_ENABLE_CUDA
template struct MoEParams<double, Kokkos::CudaSpace>;
template struct MoEParams<float, Kokkos::CudaSpace>;
template class MoELayer<double, Kokkos::CudaSpace>;
template class MoELayer<float, Kokkos::CudaSpace>;
#endif
}  // namespace moka
