#include <moka/core/Log.hpp>

#include <atomic>
#include <cstdlib>
#include <mutex>

namespace moka {
namespace log {

namespace {
Level initial_level() {
  if (const char* env = std::getenv("MOKA_LOG_LEVEL")) {
    try {
      return level_from_string(env);
    } catch (const Error&) {
      std::cerr << "moka: ignoring MOKA_LOG_LEVEL='" << env
                << "' (expected error, warn, info or debug)\n";
    }
  }
  return Level::info;
}
std::atomic<int> g_level{-1};
MPI_Comm g_comm = MPI_COMM_NULL;
std::mutex g_mutex;
}  // namespace

void set_level(Level l) { g_level = static_cast<int>(l); }

Level level() {
  int l = g_level.load();
  if (l < 0) {
    l = static_cast<int>(initial_level());
    g_level = l;
  }
  return static_cast<Level>(l);
}

Level level_from_string(const std::string& s) {
  if (s == "error") return Level::error;
  if (s == "warn") return Level::warn;
  if (s == "info") return Level::info;
  if (s == "debug") return Level::debug;
  moka::impl::fail("moka::log::level_from_string", "unknown log level '", s,
                   "' (expected error, warn, info or debug)");
}

void set_comm(MPI_Comm comm) { g_comm = comm; }

int rank() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (!init || fin) return 0;
  int r = 0;
  MPI_Comm_rank(g_comm == MPI_COMM_NULL ? MPI_COMM_WORLD : g_comm, &r);
  return r;
}

namespace impl {
void emit(Level lvl, bool every_rank, const std::string& message) {
  const int r = rank();
  if (!every_rank && r != 0) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (every_rank) {
    std::cerr << ("[rank " + std::to_string(r) + "] " + message + "\n") << std::flush;  // one write (see Runtime::abort)
  } else if (lvl == Level::warn) {
    std::cout << "warning: " << message << std::endl;
  } else {
    std::cout << message << std::endl;
  }
}
}  // namespace impl

}  // namespace log
}  // namespace moka
