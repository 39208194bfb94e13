#include <moka/core/Collective.hpp>

#include <exception>
#include <vector>

namespace moka {

void agree_on_failure(MPI_Comm comm, const std::function<void()>& f) {
  std::string message;
  bool failed = false;
  try {
    f();
  } catch (const std::exception& e) {
    failed  = true;
    message = e.what();
  }
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  int mine = failed ? rank : size, first = size;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first == size) return;
  long len = static_cast<long>(message.size());
  MPI_Bcast(&len, 1, MPI_LONG, first, comm);
  std::vector<char> text(static_cast<std::size_t>(len));
  if (rank == first) text.assign(message.begin(), message.end());
  MPI_Bcast(text.data(), static_cast<int>(len), MPI_CHAR, first, comm);
  const std::string agreed(text.begin(), text.end());
  throw CollectiveError(first == 0 ? agreed : "[rank " + std::to_string(first) + "] " + agreed);
}

}  // namespace moka
