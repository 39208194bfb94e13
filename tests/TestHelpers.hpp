#pragma once
// Helpers shared by MoKA's test programs.

#include <moka/core/Error.hpp>
#include <moka/core/Runtime.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>

#include <memory>
#include <string>

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

/// A file of tests/data (test data lives in the repository: a fresh clone
/// with nothing beside it runs every test).
inline std::string data_file(const std::string& name) { return std::string(MOKA_TEST_DATA_DIR) + "/" + name; }

/// The shared/ folder beside the checkout (MOKA_SHARED_DIR in the
/// environment, else where CMake looked): optional extra tests only.
inline std::string shared_dir() {
  const char* env = std::getenv("MOKA_SHARED_DIR");
  return env ? std::string(env) : std::string(MOKA_SHARED_DIR);
}

/// Whether any rank of MPI_COMM_WORLD has seen a failure in the current
/// test. Collective: ranks that return early on a failure must agree first,
/// or the others wait in the next collective until the test times out.
inline bool any_rank_failed() {
  int mine = ::testing::Test::HasFailure() ? 1 : 0, any = 0;
  MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return any != 0;
}

/// The message of the moka::Error that \p f throws, or "no error".
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const moka::Error& e) {
    return e.what();
  }
  return "no error";
}

/// A moka::Runtime nested in the test main's (MPI and Kokkos are up), as
/// an embedding code would make one.
inline std::unique_ptr<moka::Runtime> nested_runtime() {
  static char name[] = "moka_test";
  static char* args[] = {name, nullptr};
  int argc    = 1;
  char** argv = args;
  return std::make_unique<moka::Runtime>(argc, argv);
}

}  // namespace moka_test
