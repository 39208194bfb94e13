// Deck loading in MPI runs: rank 0 parses and broadcasts; every rank ends up
// with the same deck, and an error on rank 0 is thrown on every rank.
#include <moka/deck/InputDeck.hpp>
#include <moka/train/RunConfig.hpp>

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

namespace {
int rank_of(MPI_Comm c) {
  int r = 0;
  MPI_Comm_rank(c, &r);
  return r;
}
// A file name every rank agrees on, written by rank 0 only.
std::string shared_file(const std::string& tag, const std::string& text) {
  char name[256];
  if (rank_of(MPI_COMM_WORLD) == 0) {
    std::snprintf(name, sizeof name, "/tmp/moka_deck_mpi_%d_%s.deck", static_cast<int>(::getpid()), tag.c_str());
    std::ofstream(name) << text;
  }
  MPI_Bcast(name, sizeof name, MPI_CHAR, 0, MPI_COMM_WORLD);
  return name;
}
}  // namespace

TEST(DeckMPI, EveryRankGetsTheSameDeck) {
  const std::string path = shared_file("same", "run.name = \"mpi run\"\nrun.seed = 99\n");
  auto d = moka::InputDeck::load(MPI_COMM_WORLD, path, {"run.comm_check=false"});
  d.validate(moka::RunConfig::schema());
  const auto run = moka::RunConfig::from_deck(d);
  EXPECT_EQ(run.name, "mpi run");
  EXPECT_EQ(run.seed, 99);
  EXPECT_FALSE(run.comm_check);
  // Compare the serialised deck across ranks.
  const std::string mine = d.serialize();
  unsigned long len = mine.size(), len0 = len;
  MPI_Bcast(&len0, 1, MPI_UNSIGNED_LONG, 0, MPI_COMM_WORLD);
  ASSERT_EQ(len, len0);
  std::string root = mine;
  MPI_Bcast(&root[0], static_cast<int>(len), MPI_CHAR, 0, MPI_COMM_WORLD);
  EXPECT_EQ(root, mine);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank_of(MPI_COMM_WORLD) == 0) std::remove(path.c_str());
}

TEST(DeckMPI, ParseErrorOnRankZeroReachesAllRanks) {
  const std::string path = shared_file("bad", "run.seed = 1\nrun.name \"no equals\"\n");
  try {
    moka::InputDeck::load(MPI_COMM_WORLD, path);
    FAIL() << "no throw on rank " << rank_of(MPI_COMM_WORLD);
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find(":2: expected 'key = value'"), std::string::npos) << e.what();
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank_of(MPI_COMM_WORLD) == 0) std::remove(path.c_str());
}

TEST(DeckMPI, MissingFileReachesAllRanks) {
  EXPECT_THROW(moka::InputDeck::load(MPI_COMM_WORLD, "/nonexistent/dir/x.deck"), moka::Error);
}

TEST(DeckMPI, BadOverrideReachesAllRanks) {
  const std::string path = shared_file("ovr", "run.seed = 1\n");
  EXPECT_THROW(moka::InputDeck::load(MPI_COMM_WORLD, path, {"run.seed"}), moka::Error);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank_of(MPI_COMM_WORLD) == 0) std::remove(path.c_str());
}
