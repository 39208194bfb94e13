// The Kokkos and Kokkos Kernels features MoKA builds on, checked on the
// default execution space (the GPU on CUDA builds) against plain host
// references. Kokkos 3.4.01 predates Hopper: this suite is part of the proof
// that the patched build is sound there (docs/gpu-validation.md).

#include <moka/core/Core.hpp>
#include <moka/core/Error.hpp>
#include <moka/core/MemoryWatch.hpp>

#include <KokkosBlas3_gemm.hpp>
#include <Kokkos_Random.hpp>
#include <Kokkos_Sort.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

using exec = moka::execution_space;
using mem  = moka::memory_space;

// nvcc cannot compile device lambdas inside TEST bodies (private member
// functions), so each test body is a free function.
void kokkosstack_ParallelForReduceOnInstance() {
  exec space;
  const long n = 1 << 20;
  Kokkos::View<double*, mem> a("a", n);
  Kokkos::parallel_for(
      "fill", Kokkos::RangePolicy<exec>(space, 0, n), KOKKOS_LAMBDA(long i) { a(i) = 0.5 * i; });
  double sum = 0, mx = 0;
  Kokkos::parallel_reduce(
      "sum", Kokkos::RangePolicy<exec>(space, 0, n), KOKKOS_LAMBDA(long i, double& s) { s += a(i); }, sum);
  Kokkos::parallel_reduce(
      "max", Kokkos::RangePolicy<exec>(space, 0, n),
      KOKKOS_LAMBDA(long i, double& m) {
        if (a(i) > m) m = a(i);
      },
      Kokkos::Max<double>(mx));
  space.fence();
  EXPECT_DOUBLE_EQ(sum, 0.5 * (double(n) * (n - 1) / 2));
  EXPECT_DOUBLE_EQ(mx, 0.5 * (n - 1));
}

void kokkosstack_MDRangeAndLayoutRight() {
  const int m = 37, k = 53;
  moka::Matrix<float> x("x", m, k);
  Kokkos::parallel_for(
      "md", Kokkos::MDRangePolicy<exec, Kokkos::Rank<2>>({0, 0}, {m, k}),
      KOKKOS_LAMBDA(int i, int j) { x(i, j) = float(i * 1000 + j); });
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), x);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < k; ++j) ASSERT_EQ(h(i, j), float(i * 1000 + j));
  // LayoutRight: rows are contiguous.
  EXPECT_EQ(&h(1, 0) - &h(0, 0), k);
}

void kokkosstack_ExclusiveScan() {
  const int n = 100003;
  Kokkos::View<int*, mem> counts("counts", n), offsets("offsets", n);
  Kokkos::parallel_for(
      "c", Kokkos::RangePolicy<exec>(0, n), KOKKOS_LAMBDA(int i) { counts(i) = (i * 7) % 5; });
  int total = 0;
  Kokkos::parallel_scan(
      "scan", Kokkos::RangePolicy<exec>(0, n),
      KOKKOS_LAMBDA(int i, int& partial, bool final) {
        if (final) offsets(i) = partial;
        partial += counts(i);
      },
      total);
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), offsets);
  int run = 0;
  for (int i = 0; i < n; ++i) {
    ASSERT_EQ(h(i), run) << i;
    run += (i * 7) % 5;
  }
  EXPECT_EQ(total, run);
}

void kokkosstack_TeamScratchAndAtomics() {
  using team_policy = Kokkos::TeamPolicy<exec>;
  using member      = team_policy::member_type;
  using scratch     = Kokkos::View<int*, exec::scratch_memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  const int leagues = 64, per = 256, bins = 16;
  Kokkos::View<int*, mem> hist("hist", bins);
  team_policy policy(leagues, Kokkos::AUTO);
  policy = policy.set_scratch_size(0, Kokkos::PerTeam(scratch::shmem_size(bins)));
  Kokkos::parallel_for(
      "hist", policy, KOKKOS_LAMBDA(const member& t) {
        scratch local(t.team_scratch(0), bins);
        Kokkos::parallel_for(Kokkos::TeamThreadRange(t, bins), [&](int b) { local(b) = 0; });
        t.team_barrier();
        Kokkos::parallel_for(Kokkos::TeamThreadRange(t, per), [&](int i) {
          Kokkos::atomic_add(&local((t.league_rank() * per + i) % bins), 1);
        });
        t.team_barrier();
        Kokkos::parallel_for(Kokkos::TeamThreadRange(t, bins),
                             [&](int b) { Kokkos::atomic_add(&hist(b), local(b)); });
      });
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), hist);
  for (int b = 0; b < bins; ++b) EXPECT_EQ(h(b), leagues * per / bins) << b;
}

void kokkosstack_RandomPoolIsDeterministicAndUniform() {
  const int n = 1 << 18;
  auto draw = [&](unsigned seed) {
    Kokkos::Random_XorShift64_Pool<exec> pool(seed);
    Kokkos::View<double*, mem> u("u", n);
    Kokkos::fill_random(u, pool, 0.0, 1.0);
    return Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), u);
  };
  auto a = draw(7);
  auto b = draw(7);
  double mean = 0;
  for (int i = 0; i < n; ++i) {
    ASSERT_EQ(a(i), b(i));
    ASSERT_GE(a(i), 0.0);
    ASSERT_LT(a(i), 1.0);
    mean += a(i);
  }
  mean /= n;
  EXPECT_NEAR(mean, 0.5, 0.01);
}

void kokkosstack_BinSortIsAPermutationByKey() {
  const int n = 50000, nbins = 32;
  Kokkos::View<int*, mem> keys("keys", n), vals("vals", n);
  Kokkos::parallel_for(
      "k", Kokkos::RangePolicy<exec>(0, n), KOKKOS_LAMBDA(int i) {
        keys(i) = (i * 2654435761u) % nbins;
        vals(i) = i;
      });
  using op_t = Kokkos::BinOp1D<Kokkos::View<int*, mem>>;
  Kokkos::BinSort<Kokkos::View<int*, mem>, op_t> sorter(keys, op_t(nbins, 0, nbins), false);
  sorter.create_permute_vector();
  sorter.sort(keys);
  sorter.sort(vals);
  auto hk = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), keys);
  auto hv = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), vals);
  std::vector<int> seen(n, 0);
  for (int i = 0; i < n; ++i) {
    if (i) ASSERT_LE(hk(i - 1), hk(i));
    ASSERT_EQ(hk(i), int((hv(i) * 2654435761u) % nbins));
    seen[hv(i)]++;
  }
  for (int i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1);
}

template <class T>
void check_gemm(const char* ta, const char* tb, int m, int n, int k, double tol) {
  // C = alpha op(A) op(B) + beta C against a double-precision host loop.
  const bool tA = ta[0] == 'T', tB = tb[0] == 'T';
  moka::Matrix<T> A("A", tA ? k : m, tA ? m : k), B("B", tB ? n : k, tB ? k : n), C("C", m, n);
  Kokkos::Random_XorShift64_Pool<exec> pool(11);
  Kokkos::fill_random(A, pool, T(-1), T(1));
  Kokkos::fill_random(B, pool, T(-1), T(1));
  Kokkos::fill_random(C, pool, T(-1), T(1));
  auto hA = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), A);
  auto hB = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), B);
  // A real copy (create_mirror, not _view): on host builds a mirror view
  // would alias C, which gemm overwrites.
  auto hC = Kokkos::create_mirror(Kokkos::HostSpace(), C);
  Kokkos::deep_copy(hC, C);
  const T alpha = T(1.5), beta = T(-0.5);
  KokkosBlas::gemm(ta, tb, alpha, A, B, beta, C);
  auto got = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), C);
  double err = 0, ref_norm = 0;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int l = 0; l < k; ++l) {
        const double a = tA ? hA(l, i) : hA(i, l);
        const double b = tB ? hB(j, l) : hB(l, j);
        acc += a * b;
      }
      const double ref = double(alpha) * acc + double(beta) * hC(i, j);
      err += (got(i, j) - ref) * (got(i, j) - ref);
      ref_norm += ref * ref;
    }
  }
  EXPECT_LT(std::sqrt(err / ref_norm), tol) << "gemm " << ta << tb << " m=" << m << " n=" << n << " k=" << k;
}

void kokkosstack_KokkosBlasGemmMatchesDoubleReference() {
  for (const char* ta : {"N", "T"}) {
    for (const char* tb : {"N", "T"}) {
      check_gemm<double>(ta, tb, 67, 45, 129, 1e-13);
      check_gemm<float>(ta, tb, 67, 45, 129, 1e-5);
    }
  }
  check_gemm<float>("N", "N", 256, 512, 384, 1e-5);
}

TEST(KokkosStack, ParallelForReduceOnInstance) { kokkosstack_ParallelForReduceOnInstance(); }
TEST(KokkosStack, MDRangeAndLayoutRight) { kokkosstack_MDRangeAndLayoutRight(); }
TEST(KokkosStack, ExclusiveScan) { kokkosstack_ExclusiveScan(); }
TEST(KokkosStack, TeamScratchAndAtomics) { kokkosstack_TeamScratchAndAtomics(); }
TEST(KokkosStack, RandomPoolIsDeterministicAndUniform) { kokkosstack_RandomPoolIsDeterministicAndUniform(); }
TEST(KokkosStack, BinSortIsAPermutationByKey) { kokkosstack_BinSortIsAPermutationByKey(); }
TEST(KokkosStack, KokkosBlasGemmMatchesDoubleReference) { kokkosstack_KokkosBlasGemmMatchesDoubleReference(); }

// moka::MemoryWatch counts the bytes of allocations made while it watches,
// per memory space, keeps their peak, and passes each event on to the
// callbacks installed before it (a loaded tool's).
namespace {
int g_earlier_tool_events = 0;
void earlier_tool(const Kokkos_Profiling_SpaceHandle, const char*, const void*, const uint64_t) {
  ++g_earlier_tool_events;
}
}  // namespace

TEST(MemoryWatch, LiveAndPeakBytesPerSpaceAndEventsPassedOn) {
  namespace kt              = Kokkos::Tools::Experimental;
  const kt::EventSet before = kt::get_callbacks();
  kt::set_allocate_data_callback(&earlier_tool);
  const std::string host = Kokkos::HostSpace::name();
  Kokkos::View<double*, Kokkos::HostSpace> old("allocated before the watch", 100);
  const int events0 = g_earlier_tool_events;
  {
    moka::MemoryWatch w;
    EXPECT_EQ(w.live(host), 0);
    EXPECT_THROW(moka::MemoryWatch second, moka::Error);
    {
      Kokkos::View<double*, Kokkos::HostSpace> a("a", 1000);
      EXPECT_EQ(w.live(host), 8000);
      {
        Kokkos::View<float*, Kokkos::HostSpace> b("b", 500);
        EXPECT_EQ(w.live(host), 10000);
      }
      old = Kokkos::View<double*, Kokkos::HostSpace>();  // freed, never counted
      EXPECT_EQ(w.live(host), 8000);
      EXPECT_EQ(w.peak(host), 10000);
      using labelled = std::vector<std::pair<std::string, long>>;
      EXPECT_EQ(w.peak_by_label(host), (labelled{{"a", 8000}, {"b", 2000}}));
      w.reset_peak();
      EXPECT_EQ(w.peak(host), 8000);
      EXPECT_EQ(w.peak_by_label(host), (labelled{{"a", 8000}}));
      EXPECT_TRUE(w.peak_by_label("no such space").empty());
    }
    EXPECT_EQ(w.live(host), 0);
    EXPECT_EQ(w.peak(host), 8000);
    EXPECT_EQ(w.live("no such space"), 0);
  }
  EXPECT_EQ(g_earlier_tool_events - events0, 2);  // a and b
  // The watch gave the earlier callbacks back.
  Kokkos::View<double*, Kokkos::HostSpace> c("c", 10);
  EXPECT_EQ(g_earlier_tool_events - events0, 3);
  kt::set_callbacks(before);
}
