// Test main shared by all MoKA test programs: starts MPI and Kokkos through
// moka::Runtime, runs GoogleTest on every rank, prints the results on rank
// 0, each failure of another rank with its rank, and fails on every rank if
// any rank failed.

#include <moka/core/Runtime.hpp>

#include <gtest/gtest.h>

#include <iostream>
#include <sstream>

namespace {

/// On ranks other than 0: only the failures, each with the rank (a failure
/// seen by rank 2 alone must not pass unseen because only rank 0 prints).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : m_rank(rank) {}
  // The test's name is kept at its start: OnTestPartResult runs with the
  // framework's lock held (for an exception thrown out of a test body), so
  // asking for current_test_info() there deadlocks.
  void OnTestStart(const ::testing::TestInfo& info) override {
    m_test = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::ostringstream os;
    os << "[rank " << m_rank << "] " << m_test << ": " << (r.file_name() ? r.file_name() : "?") << ":"
       << r.line_number() << ": " << r.summary() << "\n";
    std::cerr << os.str() << std::flush;  // one write: lines of ranks do not interleave
  }

 private:
  int m_rank;
  std::string m_test;
};

}  // namespace

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (runtime.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(runtime.rank()));
  }
  const int local = RUN_ALL_TESTS();
  int global      = 0;
  MPI_Allreduce(&local, &global, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (global != 0 && local == 0) {
    // This rank passed, another failed: say so, since only rank 0 prints.
    std::cerr << "[rank " << runtime.rank() << "] passed, but another rank failed" << std::endl;
  }
  return global;
}
