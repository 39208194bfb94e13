#include <moka/balance/Migration.hpp>

#include <algorithm>
#include <set>

namespace moka {

MigrationPlan MigrationPlan::make(const Placement& from, const Placement& to, long slot_elems, long budget_elems) {
  MOKA_REQUIRE(from.num_experts() == to.num_experts() && from.ep_size() == to.ep_size() &&
                   from.slots_per_rank() == to.slots_per_rank(),
               "moka::migrate_experts: placements of different shapes (", from.num_experts(), " experts on ",
               from.ep_size(), " x ", from.slots_per_rank(), " slots, then ", to.num_experts(), " on ", to.ep_size(),
               " x ", to.slots_per_rank(), ")");
  const int P = from.ep_size(), L = from.slots_per_rank();
  MigrationPlan plan;
  std::vector<long> sends(P, 0);
  std::set<int> gained;
  for (int r = 0; r < P; ++r)
    for (int l = 0; l < L; ++l) {
      const int e = to.expert_at(r, l);
      if (from.expert_at(r, l) == e) continue;
      SlotMove m;
      m.expert = e;
      m.to     = {r, l};
      bool local = false;
      for (const auto& s : from.slots_of(e))
        if (s.rank == r) {
          m.from = s;
          local  = true;
        }
      if (!local) {
        std::vector<Placement::Slot> holders = from.slots_of(e);
        std::sort(holders.begin(), holders.end(), [&](const Placement::Slot& a, const Placement::Slot& b) {
          return sends[a.rank] != sends[b.rank] ? sends[a.rank] < sends[b.rank] : a.rank < b.rank;
        });
        m.from = holders.front();
        ++sends[m.from.rank];
        gained.insert(e);
      }
      plan.moves.push_back(m);
    }
  plan.moved_experts = static_cast<long>(gained.size());
  // Rounds: a move may go once no unfinished move other than those of its
  // own round reads its destination (reads come before writes in a round).
  const std::size_t n = plan.moves.size();
  std::vector<char> done(n, 0);
  std::size_t left = n;
  const long budget = std::max(budget_elems, slot_elems);
  auto reads = [&](std::size_t a, const Placement::Slot& s) { return plan.moves[a].from == s; };
  while (left > 0) {
    std::vector<char> chosen(n, 0);
    std::vector<long> out(P, 0), in(P, 0);
    bool grew = true, any = false;
    while (grew) {
      grew = false;
      for (std::size_t i = 0; i < n; ++i) {
        if (done[i] || chosen[i]) continue;
        const SlotMove& m = plan.moves[i];
        bool blocked = false;
        for (std::size_t j = 0; j < n && !blocked; ++j)
          blocked = j != i && !done[j] && !chosen[j] && reads(j, m.to);
        if (blocked) continue;
        if (out[m.from.rank] + slot_elems > budget || in[m.to.rank] + slot_elems > budget) continue;
        chosen[i] = 1;
        out[m.from.rank] += slot_elems;
        in[m.to.rank] += slot_elems;
        grew = any = true;
      }
    }
    if (!any) {
      // A cycle of slots that read each other: all that is left, at once.
      plan.over_budget = true;
      for (std::size_t i = 0; i < n; ++i) chosen[i] = !done[i];
    }
    for (std::size_t i = 0; i < n; ++i)
      if (chosen[i]) {
        plan.moves[i].round = plan.rounds;
        done[i]             = 1;
        --left;
      }
    ++plan.rounds;
  }
  return plan;
}

long MigrationPlan::remote_moves() const {
  return static_cast<long>(
      std::count_if(moves.begin(), moves.end(), [](const SlotMove& m) { return m.from.rank != m.to.rank; }));
}

}  // namespace moka
