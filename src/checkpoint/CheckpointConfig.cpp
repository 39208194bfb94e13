#include <moka/checkpoint/CheckpointConfig.hpp>
#include <moka/core/Collective.hpp>
#include <moka/core/Config.hpp>
#include <moka/core/Core.hpp>
#include <moka/core/Error.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <map>
#include <ostream>
#include <set>
#include <sstream>

namespace moka {

namespace fs = std::filesystem;

std::string to_string(CheckpointIO io) {
  switch (io) {
    case CheckpointIO::automatic: return "auto";
    case CheckpointIO::parallel: return "parallel";
    case CheckpointIO::gather: return "gather";
  }
  return "?";
}

DeckSchema CheckpointConfig::schema() {
  DeckSchema s;
  s.add("io.checkpoint_dir", DeckType::string).set_default("")
      .set_doc("Directory of checkpoints; \"\" means checkpoints/ beside the metrics file (created when needed).");
  s.add("io.checkpoint_every", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Steps between checkpoints (0: none during the run).");
  s.add("io.checkpoint_final", DeckType::boolean).set_default("false")
      .set_doc("Write a checkpoint after the last step also without io.checkpoint_every (with io.checkpoint_every > 0 "
               "the last step always gets one).");
  s.add("io.checkpoint_keep", DeckType::integer).set_default("3").set_min(0)
      .set_doc("Newest checkpoints of the run kept in io.checkpoint_dir (0: all).");
  s.add("io.checkpoint_io", DeckType::string).set_default("auto").set_choices({"auto", "parallel", "gather"})
      .set_doc("parallel: every rank writes its experts through MPI-IO (parallel HDF5 builds); gather: the blocks "
               "go to rank 0, which writes alone; auto: parallel where the HDF5 can.");
  s.add("io.restart", DeckType::string).set_default("")
      .set_doc("Checkpoint to continue from: a file, or latest (the newest of this run.name in io.checkpoint_dir); "
               "\"\" starts afresh. The rank count and parallel layout may differ from the writer's.");
  return s;
}

CheckpointConfig CheckpointConfig::from_deck(const InputDeck& deck, const std::string& metrics_file) {
  CheckpointConfig c;
  c.dir = deck.get<std::string>("io.checkpoint_dir");
  if (c.dir.empty()) {
    const fs::path parent = fs::path(metrics_file).parent_path();
    c.dir = (parent.empty() ? fs::path("checkpoints") : parent / "checkpoints").string();
  }
  c.every   = deck.get<long>("io.checkpoint_every");
  c.at_end  = deck.get<bool>("io.checkpoint_final") || c.every > 0;
  c.keep    = deck.get<long>("io.checkpoint_keep");
  c.restart = deck.get<std::string>("io.restart");
  const std::string io = deck.get<std::string>("io.checkpoint_io");
  c.io = io == "parallel" ? CheckpointIO::parallel : io == "gather" ? CheckpointIO::gather : CheckpointIO::automatic;
  MOKA_REQUIRE(c.io != CheckpointIO::parallel || CheckpointWriter::parallel_available(),
               "io.checkpoint_io = parallel needs an HDF5 built for MPI-IO; this MoKA's is serial (use gather or auto)");
  return c;
}

namespace {
std::string safe_name(const std::string& run_name) {
  std::string s = run_name.empty() ? "moka" : run_name;
  for (char& ch : s)
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '-' || ch == '_')) ch = '_';
  return s;
}
}  // namespace

std::string CheckpointConfig::file_for(const std::string& run_name, long step) const {
  std::ostringstream os;
  os << safe_name(run_name) << ".step" << std::setw(8) << std::setfill('0') << step << ".h5";
  return (fs::path(dir) / os.str()).string();
}

bool CheckpointConfig::parallel_io() const {
  return io == CheckpointIO::parallel || (io == CheckpointIO::automatic && CheckpointWriter::parallel_available());
}

std::vector<std::pair<long, std::string>> list_checkpoints(const std::string& dir, const std::string& run_name) {
  std::vector<std::pair<long, std::string>> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  const std::string prefix = safe_name(run_name) + ".step";
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string n = entry.path().filename().string();
    if (n.size() != prefix.size() + 8 + 3 || n.compare(0, prefix.size(), prefix) != 0 ||
        n.compare(n.size() - 3, 3, ".h5") != 0)
      continue;
    const std::string digits = n.substr(prefix.size(), 8);
    if (!std::all_of(digits.begin(), digits.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
      continue;
    out.emplace_back(std::stol(digits), entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string latest_checkpoint(const std::string& dir, const std::string& run_name) {
  std::error_code ec;
  MOKA_REQUIRE(fs::is_directory(dir, ec), "io.restart = latest: the checkpoint directory '", dir,
               "' does not exist (io.checkpoint_dir)");
  const auto all = list_checkpoints(dir, run_name);
  MOKA_REQUIRE(!all.empty(), "io.restart = latest: no checkpoint of run '", run_name, "' (", safe_name(run_name),
               ".stepNNNNNNNN.h5) in '", dir, "'");
  return all.back().second;
}

std::vector<std::string> prune_checkpoints(const std::string& dir, const std::string& run_name, long keep) {
  std::vector<std::string> removed;
  const auto all = list_checkpoints(dir, run_name);
  if (keep > 0)
    for (std::size_t i = 0; i + std::size_t(keep) < all.size(); ++i)
      if (std::remove(all[i].second.c_str()) == 0) removed.push_back(all[i].second);
  // Temporary files of writes that died (a killed run) and are not the newest complete.
  std::error_code ec;
  const std::string prefix = safe_name(run_name) + ".step";
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string n = entry.path().filename().string();
    if (n.compare(0, prefix.size(), prefix) == 0 && n.size() > 4 && n.compare(n.size() - 4, 4, ".tmp") == 0)
      if (std::remove(entry.path().string().c_str()) == 0) removed.push_back(entry.path().string());
  }
  return removed;
}

std::vector<std::string> deck_differences(const std::string& checkpoint_deck, const std::string& run_deck) {
  auto values = [](const std::string& text, const std::string& name) {
    std::map<std::string, std::string> m;
    const InputDeck deck = InputDeck::parse_string(text, name);
    for (const DeckEntry& e : deck.entries()) {
      std::string v;
      for (std::size_t i = 0; i < e.values.size(); ++i) v += (i ? " " : "") + e.values[i];
      m[e.key] = v;
    }
    return m;
  };
  const auto a = values(checkpoint_deck, "<checkpoint deck>"), b = values(run_deck, "<run deck>");
  auto must_match = [](const std::string& k) {
    static const std::set<std::string> keys{"model.blocks", "moe.d_model", "moe.d_ff", "moe.num_experts",
                                            "expert.activation", "expert.bias", "gate.type", "train.optimizer",
                                            "run.seed"};
    return keys.count(k) > 0 || k.compare(0, 5, "task.") == 0;
  };
  std::set<std::string> keys;
  for (const auto& kv : a) keys.insert(kv.first);
  for (const auto& kv : b) keys.insert(kv.first);
  std::vector<std::string> out;
  for (const std::string& k : keys) {
    if (!must_match(k)) continue;
    const auto ia = a.find(k), ib = b.find(k);
    const std::string va = ia == a.end() ? "(unset)" : ia->second, vb = ib == b.end() ? "(unset)" : ib->second;
    if (va != vb) out.push_back(k + " = " + va + " in the checkpoint, " + vb + " here");
  }
  return out;
}

void verify_checkpoint(const std::string& path, MPI_Comm comm) {
  int rank = 0, size = 1;
  if (comm != MPI_COMM_NULL) {
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
  }
  std::string failure;
  std::vector<std::string> names;
  std::vector<std::uint64_t> got, want;
  try {
    CheckpointReader r(path);
    names = r.datasets();
    MOKA_REQUIRE(!names.empty(), "checkpoint '", path, "': holds no datasets");
    for (const std::string& n : names) {
      const std::vector<long> s = r.shape(n);
      const long rows = s.empty() ? 0 : s[0];
      got.push_back(r.checksum_rows(n, rows * rank / size, rows * (rank + 1) / size - rows * rank / size));
      want.push_back(r.stored_checksum(n));
    }
  } catch (const Error& e) {
    failure = e.what();
  }
  int bad = !failure.empty(), any = bad;
  if (comm != MPI_COMM_NULL) MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, comm);
  if (any) {
    // The first failing rank's message, on every rank.
    int first = bad ? rank : size, root = first;
    if (comm != MPI_COMM_NULL) MPI_Allreduce(&first, &root, 1, MPI_INT, MPI_MIN, comm);
    int len = static_cast<int>(failure.size());
    if (comm != MPI_COMM_NULL) MPI_Bcast(&len, 1, MPI_INT, root, comm);
    failure.resize(static_cast<std::size_t>(len));
    if (comm != MPI_COMM_NULL) MPI_Bcast(&failure[0], len, MPI_CHAR, root, comm);
    if (comm != MPI_COMM_NULL) throw CollectiveError(failure);
    throw Error(failure);
  }
  if (comm != MPI_COMM_NULL)
    MPI_Allreduce(MPI_IN_PLACE, got.data(), static_cast<int>(got.size()), MPI_UINT64_T, MPI_SUM, comm);
  for (std::size_t i = 0; i < names.size(); ++i)
    if (got[i] != want[i]) {
      const std::string m = "checkpoint '" + path + "': dataset '" + names[i] +
                            "' does not match its checksum (the file is damaged)";
      if (comm != MPI_COMM_NULL) throw CollectiveError(m);
      throw Error(m);
    }
}

void describe_checkpoint(const std::string& path, std::ostream& out, bool show_deck) {
  CheckpointReader r(path);
  out << "checkpoint " << path << "\n";
  for (const char* a : {"format", "format_version", "moka_version", "build", "written_by", "precision", "optimizer",
                        "created"})
    if (r.has_attribute(a)) out << "  " << std::left << std::setw(15) << a << r.attribute(a) << "\n";
  auto scalar = [&](const std::string& n) -> std::string {
    if (!r.has(n)) return "-";
    return std::to_string(r.read<std::int64_t>(n).at(0));
  };
  out << "  step " << scalar("run/step") << ", epoch " << scalar("run/epoch") << ", optimizer steps "
      << scalar("optimizer/steps") << "\n";
  const auto names = r.datasets();
  for (const std::string& n : names) {
    if (n.rfind("balance/", 0) != 0 || n.find("placement") == std::string::npos) continue;
    const auto s = r.shape(n);
    const auto v = r.read<std::int64_t>(n);
    out << "  " << n << " (" << s[0] << " ranks x " << s[1] << " slots):";
    for (long i = 0; i < s[0]; ++i) {
      out << (i ? " |" : "") << " rank " << i << ":";
      for (long l = 0; l < s[1]; ++l) out << " " << v[i * s[1] + l];
    }
    out << "\n";
  }
  out << "  datasets (" << names.size() << "):\n";
  std::string failure;
  for (const std::string& n : names) {
    const auto s = r.shape(n);
    std::ostringstream shape;
    for (std::size_t i = 0; i < s.size(); ++i) shape << (i ? " x " : "") << s[i];
    std::string state;
    try {
      const long rows = s.empty() ? 0 : s[0];
      state = r.checksum_rows(n, 0, rows) == r.stored_checksum(n) ? "checksum ok" : "CHECKSUM MISMATCH";
    } catch (const Error& e) {
      state = std::string("UNREADABLE: ") + e.what();
    }
    if (state != "checksum ok" && failure.empty()) failure = "checkpoint '" + path + "': dataset '" + n + "': " + state;
    out << "    " << std::left << std::setw(34) << n << " " << std::setw(8) << to_string(r.type(n)) << " "
        << std::setw(22) << shape.str() << " " << state << "\n";
  }
  if (show_deck && r.has_attribute("deck")) out << "  deck:\n" << r.attribute("deck");
  if (!failure.empty()) throw Error(failure);
}

std::string build_description() {
  std::ostringstream os;
  os << "MoKA " << version() << ", Kokkos " << Kokkos::DefaultExecutionSpace::name();
#ifdef MOKA_HAVE_CUDA
  os << " (CUDA)";
#endif
#ifdef MOKA_HAVE_NCCL
  os << ", NCCL";
#endif
  os << ", HDF5 " << (CheckpointWriter::parallel_available() ? "parallel" : "serial");
  return os.str();
}

}  // namespace moka
