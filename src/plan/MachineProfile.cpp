#include <moka/plan/MachineProfile.hpp>

#include <moka/core/Error.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <set>
#include <sstream>

namespace moka {

namespace {

std::string trim(const std::string& s) {
  const auto a = s.find_first_not_of(" \t\r");
  if (a == std::string::npos) return "";
  const auto b = s.find_last_not_of(" \t\r");
  return s.substr(a, b - a + 1);
}

std::vector<std::string> words(const std::string& s) {
  std::istringstream is(s);
  std::vector<std::string> w;
  for (std::string t; is >> t;) w.push_back(t);
  return w;
}

}  // namespace

bool MachineProfile::has_expert_shape(int d, int dff) const {
  for (const auto& c : experts)
    if (c.d_model == d && c.d_ff == dff) return true;
  return false;
}

const MachineProfile::Link* MachineProfile::link(const std::string& path) const {
  for (const auto& l : exchange)
    if (l.path == path) return &l;
  return nullptr;
}

double MachineProfile::expert_seconds(int d, int dff, double rows) const {
  MOKA_REQUIRE(!experts.empty(), "the machine profile ", source.empty() ? std::string("") : "'" + source + "' ",
               "has no expert curve (run moka-bench with bench.mode = calibrate)");
  if (rows <= 0) return 0.0;
  // The measured shape nearest in log(d) and log(dff); scaled by the work.
  const ExpertCurve* best = nullptr;
  double best_dist        = std::numeric_limits<double>::max();
  for (const auto& c : experts) {
    const double dd = std::log(double(c.d_model) / d), df = std::log(double(c.d_ff) / dff);
    const double dist = dd * dd + df * df;
    if (dist < best_dist) best_dist = dist, best = &c;
  }
  const auto& c     = *best;
  const double scale = (double(d) * dff) / (double(c.d_model) * c.d_ff);
  const auto& r = c.rows;
  const auto& s = c.seconds;
  double t;
  if (r.size() == 1) {
    t = s[0] * rows / r[0];
  } else if (rows <= r.front()) {
    // Below the first point: between the first point's time and the cost
    // of its rows at the first segment's per-row rate, never below zero.
    const double slope = (s[1] - s[0]) / (r[1] - r[0]);
    t = std::max(s[0] * rows / r[0], s[0] - slope * (r[0] - rows));
  } else {
    std::size_t i = 1;
    while (i + 1 < r.size() && r[i] < rows) ++i;
    const double slope = (s[i] - s[i - 1]) / (r[i] - r[i - 1]);
    t = s[i - 1] + slope * (rows - r[i - 1]);
  }
  return std::max(t, 0.0) * scale;
}

void MachineProfile::write(const std::string& path) const {
  std::ofstream os(path);
  MOKA_REQUIRE(os.good(), "cannot write the machine profile '", path, "'");
  os << std::setprecision(6);
  os << "# MoKA machine profile, written by moka-bench bench.mode = calibrate (docs/cost-model.md).\n"
     << "# Seconds per unit of work on this machine; the cost model multiplies by these.\n"
     << "moka_profile     = " << format_version << "\n"
     << "card             = " << card << "\n"
     << "backend          = " << backend << "\n"
     << "precision        = " << precision << "\n"
     << "ranks_per_node   = " << ranks_per_node << "\n"
     << "concurrent_ranks = " << concurrent_ranks << "\n"
     << "comm             = " << comm << "\n"
     << "created          = " << created << "\n"
     << "layer_fixed_s    = " << layer_fixed << "\n"
     << "gate_flop_s      = " << gate_flop << "\n"
     << "gate_elem_s      = " << gate_elem << "\n"
     << "token_elem_s     = " << token_elem << "\n"
     << "expert_shared_s  = " << expert_shared << "\n"
     << "schedule_overlap = " << schedule_overlap << "\n"
     << "exchange_fixed_s = " << exchange_fixed << "\n"
     << "optimizer_elem_s = " << optimizer_elem << "\n"
     << "allreduce        = " << allreduce.latency << " " << allreduce.bandwidth << "\n";
  for (const auto& l : exchange) os << "exchange         = " << l.path << " " << l.latency << " " << l.bandwidth << "\n";
  os << "# expert = d_model d_ff_per_rank rows seconds   (one expert, forward + backward)\n";
  for (const auto& c : experts)
    for (std::size_t i = 0; i < c.rows.size(); ++i)
      os << "expert           = " << c.d_model << " " << c.d_ff << " " << long(c.rows[i]) << " " << c.seconds[i]
         << "\n";
  os.flush();
  MOKA_REQUIRE(os.good(), "writing the machine profile '", path, "' failed");
}

MachineProfile MachineProfile::read(const std::string& path) {
  std::ifstream is(path);
  MOKA_REQUIRE(is.good(), "cannot open the machine profile '", path,
               "' (write one with: moka-bench <deck> bench.mode=calibrate bench.profile_out=", path, ")");
  std::stringstream ss;
  ss << is.rdbuf();
  MachineProfile p = parse(ss.str(), path);
  p.source         = path;
  return p;
}

MachineProfile MachineProfile::parse(const std::string& text, const std::string& name) {
  MachineProfile p;
  std::istringstream is(text);
  std::set<std::string> seen;
  int lineno = 0;
  auto fail = [&](const std::string& what) {
    throw Error("machine profile '" + name + "', line " + std::to_string(lineno) + ": " + what);
  };
  auto any_number = [&](const std::string& key, const std::string& v) {
    errno = 0;
    char* end      = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(x)) fail(key + ": '" + v + "' is not a number");
    return x;
  };
  auto number = [&](const std::string& key, const std::string& v) {
    const double x = any_number(key, v);
    if (x < 0) fail(key + " = " + v + " is negative");
    return x;
  };
  std::map<std::pair<int, int>, std::vector<std::pair<double, double>>> curves;
  for (std::string line; std::getline(is, line);) {
    ++lineno;
    const auto hash = line.find('#');
    if (hash != std::string::npos) line = line.substr(0, hash);
    line = trim(line);
    if (line.empty()) continue;
    const auto eq = line.find('=');
    if (eq == std::string::npos) fail("expected 'key = value', got '" + line + "'");
    const std::string key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
    const bool table = key == "expert" || key == "exchange";
    if (!table && !seen.insert(key).second) fail("'" + key + "' given twice");
    if (key == "moka_profile") {
      const double v = number(key, value);
      if (v != format_version)
        fail("format version " + value + "; this MoKA reads version " + std::to_string(format_version) +
             " (calibrate again with this build's moka-bench)");
    } else if (key == "card") {
      p.card = value;
    } else if (key == "backend") {
      p.backend = value;
    } else if (key == "precision") {
      if (value != "fp32" && value != "bf16" && value != "fp64") fail("precision '" + value + "' (fp32, bf16, fp64)");
      p.precision = value;
    } else if (key == "ranks_per_node") {
      const double v = number(key, value);
      if (v < 1 || v != std::floor(v)) fail("ranks_per_node = " + value + " is not a positive integer");
      p.ranks_per_node = int(v);
    } else if (key == "concurrent_ranks") {
      p.concurrent_ranks = number(key, value);
      if (p.concurrent_ranks < 1) fail("concurrent_ranks = " + value + " is below 1");
    } else if (key == "comm") {
      p.comm = value;
    } else if (key == "created") {
      p.created = value;
    } else if (key == "layer_fixed_s") {
      p.layer_fixed = number(key, value);
    } else if (key == "gate_flop_s") {
      p.gate_flop = number(key, value);
    } else if (key == "gate_elem_s") {
      p.gate_elem = number(key, value);
    } else if (key == "token_elem_s") {
      p.token_elem = number(key, value);
    } else if (key == "expert_shared_s") {
      p.expert_shared = number(key, value);
    } else if (key == "schedule_overlap") {
      p.schedule_overlap = any_number(key, value);
      if (p.schedule_overlap < -1 || p.schedule_overlap > 1)
        fail("schedule_overlap must be in [-1, 1], got '" + value + "'");
    } else if (key == "exchange_fixed_s") {
      p.exchange_fixed = number(key, value);
    } else if (key == "optimizer_elem_s") {
      p.optimizer_elem = number(key, value);
    } else if (key == "allreduce") {
      const auto w = words(value);
      if (w.size() != 2) fail("allreduce takes 'latency_s bytes_per_s', got '" + value + "'");
      p.allreduce.latency   = number(key, w[0]);
      p.allreduce.bandwidth = number(key, w[1]);
    } else if (key == "exchange") {
      const auto w = words(value);
      if (w.size() != 3) fail("exchange takes 'path latency_s bytes_per_s', got '" + value + "'");
      if (w[0] != "mpi" && w[0] != "nccl" && w[0] != "direct") fail("exchange path '" + w[0] + "' (mpi, nccl, direct)");
      if (p.link(w[0])) fail("exchange path '" + w[0] + "' given twice");
      const double bw = number(key, w[2]);
      if (bw <= 0) fail("exchange " + w[0] + ": bandwidth must be positive");
      p.exchange.push_back({w[0], number(key, w[1]), bw});
    } else if (key == "expert") {
      const auto w = words(value);
      if (w.size() != 4) fail("expert takes 'd_model d_ff rows seconds', got '" + value + "'");
      const double d = number(key, w[0]), f = number(key, w[1]), r = number(key, w[2]);
      if (d < 1 || f < 1 || r < 1) fail("expert: d_model, d_ff and rows must be positive, got '" + value + "'");
      auto& c = curves[{int(d), int(f)}];
      for (const auto& pt : c)
        if (pt.first == r) fail("expert " + w[0] + " x " + w[1] + ": rows " + w[2] + " given twice");
      c.push_back({r, number(key, w[3])});
    } else {
      fail("unknown key '" + key + "'");
    }
  }
  lineno = 0;
  for (const char* k : {"moka_profile", "card", "backend", "precision", "ranks_per_node", "concurrent_ranks", "layer_fixed_s",
                        "gate_flop_s", "gate_elem_s", "token_elem_s", "expert_shared_s", "optimizer_elem_s"})
    if (!seen.count(k)) throw Error("machine profile '" + name + "': '" + k + "' is missing");
  if (curves.empty()) throw Error("machine profile '" + name + "': no 'expert' line");
  if (p.concurrent_ranks > p.ranks_per_node)
    throw Error("machine profile '" + name + "': concurrent_ranks = " + std::to_string(p.concurrent_ranks) +
                " exceeds ranks_per_node = " + std::to_string(p.ranks_per_node));
  for (auto& [shape, pts] : curves) {
    std::sort(pts.begin(), pts.end());
    ExpertCurve c;
    c.d_model = shape.first;
    c.d_ff    = shape.second;
    for (const auto& pt : pts) c.rows.push_back(pt.first), c.seconds.push_back(pt.second);
    p.experts.push_back(c);
  }
  return p;
}

}  // namespace moka
