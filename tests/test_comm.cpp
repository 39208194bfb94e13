// moka::Communicator: every operation against values each rank can work
// out alone, at 1, 2 and 4 ranks, on host memory (MPI) and, on CUDA builds,
// on device memory through NCCL (when every rank has a GPU) and through
// MPI with host staging. Also sub-communicators and the host control ops.
#include <moka/comm/Communicator.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <numeric>

namespace {

template <class M>
using vec = Kokkos::View<double*, M>;

template <class M>
std::vector<double> host(const vec<M>& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return std::vector<double>(h.data(), h.data() + h.size());
}

template <class M>
vec<M> make(const std::vector<double>& x) {
  vec<M> v("v", x.size());
  auto h = Kokkos::create_mirror_view(v);
  for (std::size_t i = 0; i < x.size(); ++i) h(i) = x[i];
  Kokkos::deep_copy(v, h);
  return v;
}

/// Value element i of the message from rank `from` to rank `to`.
double value(int from, int to, long i) { return 1000.0 * from + 10.0 * to + double(i) * 0.5; }

template <class M>
void check_backend(moka::CommBackend backend) {
  using Exec = typename M::execution_space;
  Exec space;
  auto comm = moka::make_communicator(MPI_COMM_WORLD, backend);
  const int r = comm->rank(), P = comm->size();
  const auto mem  = moka::memory_kind_of<M>();
  const auto type = moka::DataType::f64;
  const std::string what = moka::to_string(backend) + (mem == moka::MemoryKind::host ? " host" : " device");

  // alltoallv: to peer p, p + r + 1 elements; displacements packed.
  {
    std::vector<long> sc(P), sd(P), rc(P), rd(P);
    std::vector<double> send;
    for (int p = 0; p < P; ++p) {
      sc[p] = p + r + 1;
      sd[p] = static_cast<long>(send.size());
      for (long i = 0; i < sc[p]; ++i) send.push_back(value(r, p, i));
    }
    long total = 0;
    for (int p = 0; p < P; ++p) {
      rc[p] = r + p + 1;
      rd[p] = total;
      total += rc[p];
    }
    auto s = make<M>(send);
    vec<M> out("out", total);
    comm->alltoallv(space, s.data(), sc, sd, out.data(), rc, rd, type, mem);
    space.fence();
    const auto got = host(out);
    for (int p = 0; p < P; ++p)
      for (long i = 0; i < rc[p]; ++i) ASSERT_EQ(got[rd[p] + i], value(p, r, i)) << what << " alltoallv from " << p;
  }
  // alltoallv_blocks: two blocks per peer, received in reverse placement.
  {
    std::vector<moka::Communicator::Block> sends, recvs;
    std::vector<double> send;
    for (int p = 0; p < P; ++p)
      for (int b = 0; b < 2; ++b) {
        const long n = 1 + b + p;  // block b to peer p
        sends.push_back({p, static_cast<long>(send.size()), n});
        for (long i = 0; i < n; ++i) send.push_back(value(r, p, 100 * b + i));
      }
    // From peer p: blocks of 1 + b + r elements; block 1 placed before block 0.
    long total = 0;
    std::vector<long> at(2 * P);
    for (int p = 0; p < P; ++p) {
      at[2 * p + 1] = total;
      total += 2 + r;
      at[2 * p] = total;
      total += 1 + r;
    }
    for (int p = 0; p < P; ++p)
      for (int b = 0; b < 2; ++b) recvs.push_back({p, at[2 * p + b], 1 + b + r});
    auto s = make<M>(send);
    vec<M> out("out", total);
    comm->alltoallv_blocks(space, s.data(), sends, out.data(), recvs, type, mem);
    space.fence();
    const auto got = host(out);
    for (int p = 0; p < P; ++p)
      for (int b = 0; b < 2; ++b)
        for (long i = 0; i < 1 + b + r; ++i)
          ASSERT_EQ(got[at[2 * p + b] + i], value(p, r, 100 * b + i)) << what << " blocks from " << p << " block " << b;
  }
  // alltoall (equal counts), allreduce, broadcast, reduce.
  {
    const long n = 3;
    std::vector<double> send(n * P);
    for (int p = 0; p < P; ++p)
      for (long i = 0; i < n; ++i) send[p * n + i] = value(r, p, i);
    auto s = make<M>(send);
    vec<M> out("out", n * P);
    comm->alltoall(space, s.data(), out.data(), n, type, mem);
    auto red = make<M>({double(r + 1), 2.0 * (r + 1)});
    moka::allreduce_sum(*comm, space, red);
    auto bc = make<M>({r == P - 1 ? 42.0 : -1.0, r == P - 1 ? 43.0 : -1.0});
    moka::broadcast(*comm, space, bc, P - 1);
    auto mine = make<M>({double(r), 1.0});
    vec<M> sum("sum", 2);
    comm->reduce_sum(space, mine.data(), sum.data(), 2, type, 0, mem);
    space.fence();
    const auto got = host(out);
    for (int p = 0; p < P; ++p)
      for (long i = 0; i < n; ++i) EXPECT_EQ(got[p * n + i], value(p, r, i)) << what << " alltoall";
    const double tri = P * (P + 1) / 2.0;
    EXPECT_EQ(host(red), (std::vector<double>{tri, 2 * tri})) << what << " allreduce";
    EXPECT_EQ(host(bc), (std::vector<double>{42.0, 43.0})) << what << " broadcast";
    if (r == 0) EXPECT_EQ(host(sum), (std::vector<double>{P * (P - 1) / 2.0, double(P)})) << what << " reduce";
  }
  // send / recv around a ring (even ranks send first: no deadlock for blocking MPI).
  if (P > 1) {
    const int next = (r + 1) % P, prev = (r + P - 1) % P;
    auto s = make<M>({value(r, next, 0), value(r, next, 1)});
    vec<M> in("in", 2);
    if (r % 2 == 0) {
      comm->send(space, s.data(), 2, type, next, mem);
      comm->recv(space, in.data(), 2, type, prev, mem);
    } else {
      comm->recv(space, in.data(), 2, type, prev, mem);
      comm->send(space, s.data(), 2, type, next, mem);
    }
    space.fence();
    EXPECT_EQ(host(in), (std::vector<double>{value(prev, r, 0), value(prev, r, 1)})) << what << " send/recv";
  }
  // split: even and odd ranks, ordered by descending rank.
  {
    auto sub = comm->split(r % 2, -r);
    EXPECT_EQ(sub->backend(), backend);
    EXPECT_EQ(sub->size(), (P - r % 2 + 1) / 2) << what;
    auto v = make<M>({double(r)});
    moka::allreduce_sum(*sub, space, v);
    space.fence();
    double want = 0;
    int higher  = 0;
    for (int q = r % 2; q < P; q += 2) {
      want += q;
      higher += q > r ? 1 : 0;
    }
    EXPECT_EQ(host(v)[0], want) << what << " split allreduce";
    EXPECT_EQ(sub->rank(), higher) << what << " split order";
  }
}

}  // namespace

TEST(Comm, MpiHostMemory) { check_backend<Kokkos::HostSpace>(moka::CommBackend::mpi); }

#ifdef KOKKOS_ENABLE_CUDA
TEST(Comm, MpiDeviceMemoryStaged) { check_backend<Kokkos::CudaSpace>(moka::CommBackend::mpi); }
TEST(Comm, NcclDeviceMemory) {
  if (!moka::nccl_usable(MPI_COMM_WORLD)) GTEST_SKIP() << "ranks share a GPU: NCCL needs one per rank";
  check_backend<Kokkos::CudaSpace>(moka::CommBackend::nccl);
}
#endif

#ifdef KOKKOS_ENABLE_CUDA
namespace {
/// Elements rank s puts into rank q's window (several 256 KB tiles of doubles).
long put_count(int s, int q) { return 50000 + 997 * s + 13 * q; }
}  // namespace

TEST(Comm, NcclWindowPuts) {
  // Symmetric windows: every rank puts a run to every peer, cut into a
  // number of pieces that differs by rank (so that ranks pass different
  // numbers of puts, through every kernel size), then bf16 runs of odd
  // lengths at odd offsets (2-byte accesses) with one rank putting nothing.
  if (!moka::nccl_usable(MPI_COMM_WORLD)) GTEST_SKIP() << "ranks share a GPU: NCCL needs one per rank";
  auto comm = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::nccl);
  if (!comm->windows_usable()) {
    if (std::getenv("MOKA_TEST_REQUIRE_DIRECT")) FAIL() << "symmetric windows are not usable on these GPUs";
    GTEST_SKIP() << "symmetric windows are not usable here (NCCL 2.28 and GPUs that reach each other's memory)";
  }
  Kokkos::Cuda space;
  const int r = comm->rank(), P = comm->size();
  using u16 = std::uint16_t;
  // Where rank s's run lands in rank q's window, and the window's size (the
  // same on every rank: the largest part).
  auto landing = [&](int s, int q) {
    long at = 0;
    for (int t = 0; t < s; ++t) at += put_count(t, q);
    return at;
  };
  long most = 0;
  for (int q = 0; q < P; ++q) most = std::max(most, landing(P, q));
  auto win = comm->make_window(std::size_t(most) * sizeof(double));
  ASSERT_GE(win->bytes(), std::size_t(most) * sizeof(double));
  Kokkos::View<double*, Kokkos::CudaSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> part(
      static_cast<double*>(win->data()), most);
  {
    std::vector<double> send;
    std::vector<moka::Communicator::Put> puts;
    const int pieces = r == 0 ? 1 : 60 * r;  // 1 put per peer on rank 0; up to 720 on rank 3
    for (int q = 0; q < P; ++q) {
      const long n = put_count(r, q), src = static_cast<long>(send.size()), dst = landing(r, q);
      for (long i = 0; i < n; ++i) send.push_back(value(r, q, i));
      for (int k = 0; k < pieces; ++k) {
        const long b = k * n / pieces, e = (k + 1) * n / pieces;
        puts.push_back({q, src + b, dst + b, e - b});
      }
    }
    auto s = make<Kokkos::CudaSpace>(send);
    Kokkos::deep_copy(space, part, -1.0);
    comm->put(space, *win, s.data(), puts, moka::DataType::f64);
    space.fence();
    auto got = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), part);
    long bad = 0;
    for (int src = 0; src < P; ++src)
      for (long i = 0; i < put_count(src, r); ++i) bad += got(landing(src, r) + i) != value(src, r, i);
    for (long i = landing(P, r); i < most; ++i) bad += got(i) != -1.0;  // beyond the runs: untouched
    EXPECT_EQ(bad, 0) << "rank " << r;
  }
  {
    // bf16-sized elements: rank s sends 7 + 2 s + q to rank q, landing at
    // odd offsets; rank 1 sends nothing (its places keep the fill).
    auto n = [&](int s, int q) { return P > 1 && s == 1 ? 0L : 7L + 2 * s + q; };
    auto at = [&](int s, int q) {
      long a = 1;
      for (int t = 0; t < s; ++t) a += 7 + 2 * t + q;  // every rank's place kept, used or not
      return a;
    };
    std::vector<u16> send;
    std::vector<moka::Communicator::Put> puts;
    for (int q = 0; q < P; ++q) {
      const long src = static_cast<long>(send.size());
      for (long i = 0; i < n(r, q); ++i) send.push_back(static_cast<u16>(100 * r + 10 * q + i));
      if (n(r, q) > 0) puts.push_back({q, src, at(r, q), n(r, q)});
    }
    Kokkos::View<u16*, Kokkos::CudaSpace> s("send16", std::max<std::size_t>(1, send.size()));
    if (!send.empty())
      Kokkos::deep_copy(s, Kokkos::View<u16*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(
                               send.data(), send.size()));
    Kokkos::View<u16*, Kokkos::CudaSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> part16(
        static_cast<u16*>(win->data()), 2 * most);
    Kokkos::deep_copy(space, part16, u16(0xFFFF));
    comm->put(space, *win, s.data(), puts, moka::DataType::bf16);
    space.fence();
    auto got = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), part16);
    long bad = 0;
    for (int src = 0; src < P; ++src)
      for (long i = 0; i < 7 + 2 * src + r; ++i)
        bad += got(at(src, r) + i) != (n(src, r) > 0 ? u16(100 * src + 10 * r + i) : u16(0xFFFF));
    bad += got(0) != u16(0xFFFF);
    EXPECT_EQ(bad, 0) << "rank " << r;
  }
  // A put past the window's end (its size rounded up to NCCL's alignment)
  // is refused, naming it.
  const long end = static_cast<long>(win->bytes() / sizeof(double));
  std::vector<moka::Communicator::Put> past{{r, 0, end - 1, 2}};
  try {
    comm->put(space, *win, win->data(), past, moka::DataType::f64);
    FAIL() << "a put past the window accepted";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("window"), std::string::npos) << e.what();
  }
}
#endif

TEST(Comm, HostControlOps) {
  auto comm = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::mpi);
  const int r = comm->rank(), P = comm->size();
  std::vector<long> send(2 * P), recv(2 * P), all(2 * P), pre(2);
  for (int p = 0; p < P; ++p) {
    send[2 * p]     = 10 * r + p;
    send[2 * p + 1] = -r;
  }
  comm->alltoall_counts(send.data(), recv.data(), 2);
  for (int p = 0; p < P; ++p) {
    EXPECT_EQ(recv[2 * p], 10 * p + r);
    EXPECT_EQ(recv[2 * p + 1], -p);
  }
  const long mine[2] = {r + 1L, 7};
  comm->allgather_counts(mine, all.data(), 2);
  for (int p = 0; p < P; ++p) EXPECT_EQ(all[2 * p], p + 1L);
  comm->exscan_host(mine, pre.data(), 2);
  EXPECT_EQ(pre[0], long(r) * (r + 1) / 2);
  EXPECT_EQ(pre[1], 7L * r);
  double d = 0.5;
  comm->allreduce_host(&d, 1);
  EXPECT_EQ(d, 0.5 * P);
}

TEST(Comm, BadInputIsNamed) {
  auto comm = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::mpi);
  std::vector<long> one(1, 0);
  double x = 0;
  if (comm->size() > 1) {
    try {
      comm->alltoallv(Kokkos::DefaultHostExecutionSpace(), &x, one, one, &x, one, one, moka::DataType::f64,
                      moka::MemoryKind::host);
      FAIL() << "alltoallv with one count for several ranks accepted";
    } catch (const moka::Error& e) {
      EXPECT_NE(std::string(e.what()).find("need one entry per rank"), std::string::npos) << e.what();
    }
  }
  try {
    comm->allreduce_sum(Kokkos::DefaultHostExecutionSpace(), &x, 1, moka::DataType::bf16, moka::MemoryKind::host);
    FAIL() << "bf16 all-reduce accepted";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16 is not reduced"), std::string::npos) << e.what();
  }
  EXPECT_THROW(moka::comm_backend_from_string("gloo"), moka::Error);
  // Symmetric windows are the NCCL backend's; MPI says so.
  EXPECT_FALSE(comm->windows_usable());
  try {
    comm->make_window(64);
    FAIL() << "an MPI communicator made a symmetric window";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("symmetric windows need the NCCL backend"), std::string::npos) << e.what();
  }
#ifndef MOKA_HAVE_NCCL
  try {
    moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::nccl);
    FAIL() << "NCCL communicator made without NCCL";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("built without NCCL"), std::string::npos) << e.what();
  }
#endif
}
