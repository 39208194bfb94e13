#pragma once
// Helpers shared by the communicator backends (MpiCommunicator.cpp,
// NcclCommunicator.cpp, Communicator.cpp): MPI error checks and types, and
// the backends' constructors. Private to src/comm.

#include <moka/comm/Communicator.hpp>

#include <mpi.h>

#include <climits>
#include <memory>
#include <string>

namespace moka {
namespace comm_impl {

inline void check_mpi(int err, const char* what) {
  if (err == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(err, msg, &len);
  throw Error(std::string("moka::Communicator: ") + what + " failed: " + std::string(msg, len));
}

inline MPI_Datatype mpi_type(DataType t) {
  switch (t) {
    case DataType::f32: return MPI_FLOAT;
    case DataType::f64: return MPI_DOUBLE;
    case DataType::bf16: return MPI_UINT16_T;  // moved as bits; never reduced over MPI
    case DataType::i32: return MPI_INT;
    case DataType::i64: return MPI_LONG;
  }
  return MPI_BYTE;
}

inline int to_int(long v, const char* what) {
  MOKA_REQUIRE(v >= 0 && v <= INT_MAX, "moka::Communicator: ", what, " = ", v,
               " elements does not fit MPI's int counts; split the exchange or use comm.backend = nccl");
  return static_cast<int>(v);
}

inline void require_reducible(DataType t, const char* op) {
  MOKA_REQUIRE(t != DataType::bf16, "moka::Communicator::", op,
               ": bf16 is not reduced by MoKA's communicators (reduce fp32 gradients)");
}

/// The backends, each over \p comm (owned).
std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm);

}  // namespace comm_impl
}  // namespace moka
