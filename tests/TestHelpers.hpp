#pragma once
// Helpers shared by MoKA's test programs.

#include <moka/Runtime.hpp>

#include <memory>

namespace moka_test {

/// Rank in MPI_COMM_WORLD.
inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

/// Size of MPI_COMM_WORLD.
inline int world_size() {
  int s = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

/// A moka::Runtime nested in the test main's (MPI and Kokkos are up), as
/// an embedding code would make one; \p nccl asks for its own NCCL communicator.
inline std::unique_ptr<moka::Runtime> nested_runtime(bool nccl) {
  static char name[] = "moka_test";
  static char* args[] = {name, nullptr};
  int argc    = 1;
  char** argv = args;
  moka::RuntimeOptions opts;
  opts.init_nccl = nccl;
  return std::make_unique<moka::Runtime>(argc, argv, opts);
}

}  // namespace moka_test
