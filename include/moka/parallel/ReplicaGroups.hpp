#pragma once
/// \file ReplicaGroups.hpp
/// \brief moka::ReplicaGroups: for one rank of an EP group, which of its
/// expert slots hold a replicated expert and where the other replicas are.
/// moka::GradSync sums a replicated expert's gradients among its replicas
/// (in rank order, so every replica gets bitwise the same sum and applies
/// the same update) and counts each logical expert once in the global
/// norm. Built from a moka::Placement; MoELayer keeps one and rebuilds it
/// in place when the placement changes, so whoever holds it sees the
/// placement of the moment.

#include <moka/parallel/Placement.hpp>

#include <algorithm>
#include <vector>

namespace moka {

/// \brief Replicas of the experts on one rank's slots.
struct ReplicaGroups {
  int slots_per_rank = 0;
  /// \brief Per local slot: its expert, and every slot of that expert
  /// (this one included), by rank.
  std::vector<int> expert;
  std::vector<std::vector<Placement::Slot>> holders;
  /// \brief Per local slot: whether this rank counts the slot in norms (the
  /// expert's first holder does).
  std::vector<char> counted;
  /// \brief Whether any local slot holds a replicated expert.
  bool any = false;
  /// \brief Whether the placement replicates any expert (the same on every
  /// rank: what decides whether the collective replica sum runs).
  bool placement_replicated = false;

  ReplicaGroups() = default;
  /// \brief For EP rank \p rank of \p p.
  ReplicaGroups(const Placement& p, int rank) { rebuild(p, rank); }

  void rebuild(const Placement& p, int rank) {
    slots_per_rank = p.slots_per_rank();
    expert.assign(slots_per_rank, -1);
    holders.assign(slots_per_rank, {});
    counted.assign(slots_per_rank, 1);
    any = false;
    placement_replicated = !p.single_slot();
    for (int l = 0; l < slots_per_rank; ++l) {
      const int e = p.expert_at(rank, l);
      expert[l]   = e;
      holders[l]  = p.slots_of(e);
      std::sort(holders[l].begin(), holders[l].end(), [](const Placement::Slot& a, const Placement::Slot& b) {
        return a.rank != b.rank ? a.rank < b.rank : a.local < b.local;
      });
      counted[l] = holders[l].front().rank == rank && holders[l].front().local == l;
      any        = any || holders[l].size() > 1;
    }
  }
};

}  // namespace moka
