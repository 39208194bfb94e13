#pragma once
/// \file Core.hpp
/// \brief Numeric types and Kokkos space aliases used throughout MoKA.

#include <moka/core/BFloat16.hpp>
#include <moka/core/Config.hpp>
#include <moka/core/Error.hpp>

#include <Kokkos_Core.hpp>

#include <string>

namespace moka {

/// \brief The execution space MoKA computes in by default (Cuda on CUDA builds).
using execution_space = Kokkos::DefaultExecutionSpace;
/// \brief Memory space of execution_space.
using memory_space = execution_space::memory_space;
/// \brief Host execution space (OpenMP or Serial).
using host_execution_space = Kokkos::DefaultHostExecutionSpace;
/// \brief Host memory space.
using host_memory_space = Kokkos::HostSpace;

/// \brief Rank-2 row-major View, the shape of token matrices `x[T, d]`.
template <class T, class MemorySpace = memory_space>
using Matrix = Kokkos::View<T**, Kokkos::LayoutRight, MemorySpace>;
/// \brief Rank-1 View.
template <class T, class MemorySpace = memory_space>
using Vector = Kokkos::View<T*, Kokkos::LayoutRight, MemorySpace>;

/// \brief Storage precision of activations and weights.
enum class Precision { fp64, fp32, bf16 };

/// \brief "fp64", "fp32" or "bf16".
std::string to_string(Precision p);
/// \brief Parses "fp64", "fp32" or "bf16"; throws moka::Error otherwise.
Precision precision_from_string(const std::string& s);

/// \brief Version string "major.minor.patch".
const char* version();

}  // namespace moka
