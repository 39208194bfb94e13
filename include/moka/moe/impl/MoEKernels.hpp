#pragma once
/// \file MoEKernels.hpp
/// \brief Kokkos kernels of the MoE layer (gating, top-k, capacity,
/// dispatch, activation, combine) and their backward. Internal: use
/// moka::MoELayer.
///
/// Kernels are free functions (nvcc does not compile device lambdas inside
/// private member functions) that take the execution-space instance first.
/// None uses atomics on floating-point data, so results are bitwise
/// reproducible on a given backend.

#include <moka/core/Core.hpp>
#include <moka/moe/MoEConfig.hpp>
#include <moka/moe/impl/GateKernels.hpp>
#include <moka/linalg/ColumnSums.hpp>
#include <moka/linalg/Gemm.hpp>
#include <moka/linalg/impl/CublasGemm.hpp>
#include <moka/core/impl/Math.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace moka {
namespace impl {

/// Sets every byte of \p m's span to zero: 16-byte stores where aligned
/// (Kokkos 3.4 value-initialises a View of a class type such as bf16 one
/// element per thread: 2.5 ms for a 512 MiB row buffer on an H200, at 4% of
/// its memory bandwidth), then fences \p m's execution space.
template <class V>
void fill_zero(const V& m) {
  using Exec              = typename V::execution_space;
  using Word              = Pack<std::uint32_t, 4>;
  char* p                 = reinterpret_cast<char*>(m.data());
  const std::size_t bytes = m.span() * sizeof(typename V::value_type);
  const std::size_t words = reinterpret_cast<std::uintptr_t>(p) % sizeof(Word) == 0 ? bytes / sizeof(Word) : 0;
  if (words > 0)
    Kokkos::parallel_for(
        "moka::fill_zero", Kokkos::RangePolicy<Exec>(Exec(), 0, words), KOKKOS_LAMBDA(std::size_t i) {
          store_pack<4>(reinterpret_cast<std::uint32_t*>(p) + 4 * i, Word{{0u, 0u, 0u, 0u}});
        });
  if (words * sizeof(Word) < bytes)
    Kokkos::parallel_for(
        "moka::fill_zero_tail", Kokkos::RangePolicy<Exec>(Exec(), words * sizeof(Word), bytes),
        KOKKOS_LAMBDA(std::size_t i) { p[i] = 0; });
  Exec().fence();
}

/// Grows \p m to at least \p rows x \p cols (contents not kept). The first
/// allocation is exact (one rank without drops: the row count never
/// changes, and spare rows would be 1/8 more memory for nothing); a regrowth
/// keeps 1/8 spare rows, which avoids a reallocation for every small change
/// of the row count (rows that move between ranks).
template <class V>
void grow_rows(V& m, long rows, long cols, const char* label) {
  const bool had = m.data() != nullptr && static_cast<long>(m.extent(1)) == cols;
  if (had && static_cast<long>(m.extent(0)) >= rows) return;
  // Zero-filled once per growth: rows past the current forward's are never
  // read, but compute-sanitizer's initcheck (which does not see every
  // cuBLAS store) then has nothing to report, at the cost of one fill.
  m = V();  // the old rows are free before the new ones are taken
  m = V(Kokkos::view_alloc(std::string("moka::moe::") + label, Kokkos::WithoutInitializing),
        had ? rows + rows / 8 + 1 : std::max(rows, 1L), cols);
  fill_zero(m);
}

/// One operand of a grouped expert GEMM: expert e's matrix starts at
/// base + (row offsets(e) + expert e) elements.
struct ExpertOperand {
  const void* base = nullptr;
  long row         = 0;  ///< elements per row of the row buffers (0: a per-expert operand)
  long expert      = 0;  ///< elements per expert of the weights (0: a row-buffer operand)
};

/// out = (A_0 .. A_{L-1}, B_0 .., C_0 ..): the addresses (as integers) of each expert's
/// operands (A and B bf16, C of \p c_bytes per element) from the expert
/// offsets on the device (no host copy on the stream).
template <class Exec, class M>
void expert_operand_pointers(const Exec& space, const Kokkos::View<int*, M>& offsets, int L, const ExpertOperand& a,
                             const ExpertOperand& b, const ExpertOperand& c, std::size_t c_bytes,
                             const Kokkos::View<std::uintptr_t*, M>& out) {
  const auto pa = reinterpret_cast<std::uintptr_t>(a.base), pb = reinterpret_cast<std::uintptr_t>(b.base),
             pc = reinterpret_cast<std::uintptr_t>(c.base);
  const std::uintptr_t h = 2, cb = c_bytes;  // bf16: 2 bytes
  const std::uintptr_t ar = a.row * h, ae = a.expert * h, br = b.row * h, be = b.expert * h, cr = c.row * cb,
             ce = c.expert * cb;
  Kokkos::parallel_for(
      "moka::grouped_gemm_pointers", Kokkos::RangePolicy<Exec>(space, 0, L), KOKKOS_LAMBDA(int e) {
        const std::uintptr_t o = offsets(e);
        out(e)         = pa + ar * o + ae * e;
        out(L + e)     = pb + br * o + be * e;
        out(2 * L + e) = pc + cr * o + ce * e;
      });
}

/// counts(e) = how many (token, choice) of \p route go to e, for e < counts.extent(0).
template <class Exec, class C, class M>
void count_routed(const Exec& space, const Kokkos::View<int**, Kokkos::LayoutRight, M>& route, const C& counts) {
  const int T = static_cast<int>(route.extent(0)), k = static_cast<int>(route.extent(1));
  Kokkos::parallel_for(
      "moka::routed_counts", Kokkos::RangePolicy<Exec>(space, 0, counts.extent(0)), KOKKOS_LAMBDA(int e) {
        long c = 0;
        for (int t = 0; t < T; ++t)
          for (int j = 0; j < k; ++j) c += route(t, j) == e ? 1 : 0;
        counts(e) = c;
      });
}

// ------------------------------------------------------------ activations
template <class S>
KOKKOS_FORCEINLINE_FUNCTION S sigmoid(S x) {
  return impl::act_recip(S(1) + impl::act_exp(-x));
}

/// act(x) for the elementwise activations (swiglu uses silu on its gate half).
template <class S>
KOKKOS_FORCEINLINE_FUNCTION S activate(Activation a, S x) {
  switch (a) {
    case Activation::gelu_erf: return x * impl::act_cdf(x);
    case Activation::gelu_tanh: {
      const S c = S(0.79788456080286535588);  // sqrt(2/pi)
      return S(0.5) * x * (S(1) + impl::tanh(c * (x + S(0.044715) * x * x * x)));
    }
    case Activation::relu: return x > S(0) ? x : S(0);
    case Activation::silu:
    case Activation::swiglu: return x * sigmoid(x);
  }
  return x;
}

/// d act / dx.
template <class S>
KOKKOS_FORCEINLINE_FUNCTION S activate_grad(Activation a, S x) {
  switch (a) {
    case Activation::gelu_erf: {
      S cdf, pdf;
      impl::act_cdf_pdf(x, cdf, pdf);
      return cdf + x * pdf;
    }
    case Activation::gelu_tanh: {
      const S c = S(0.79788456080286535588);
      const S u = c * (x + S(0.044715) * x * x * x);
      const S th = impl::tanh(u);
      return S(0.5) * (S(1) + th) + S(0.5) * x * (S(1) - th * th) * c * (S(1) + S(3 * 0.044715) * x * x);
    }
    case Activation::relu: return x > S(0) ? S(1) : S(0);
    case Activation::silu:
    case Activation::swiglu: {
      const S sg = sigmoid(x);
      return sg * (S(1) + x * (S(1) - sg));
    }
  }
  return S(1);
}

/// Host rows: out[c] = act(x[c]) (times gate[c] for SwiGLU's product when
/// \p gate is given) and out[c] = g[c] act'(x[c]), c < n, with the
/// activation a template argument so that each loop is one straight body
/// the compiler vectorizes (GCC 12 does not unswitch a switch in a loop).
template <Activation A, class S>
KOKKOS_INLINE_FUNCTION void activation_row(const S* x, const S* gate, S* out, long n) {
  if (gate)
    for (long c = 0; c < n; ++c) out[c] = activate(A, x[c]) * gate[c];
  else
    for (long c = 0; c < n; ++c) out[c] = activate(A, x[c]);
}
template <Activation A, class S>
KOKKOS_INLINE_FUNCTION void activation_grad_row(const S* g, const S* x, const S* gate, S* out, S* out_gate, long n) {
  if (gate) {
    for (long c = 0; c < n; ++c) {
      out[c]      = g[c] * gate[c] * activate_grad(A, x[c]);
      out_gate[c] = g[c] * activate(A, x[c]);
    }
  } else {
    for (long c = 0; c < n; ++c) out[c] = g[c] * activate_grad(A, x[c]);
  }
}
// --------------------------------------------------- capacity and slots
/// Workspace of assign_slots, kept by the layer across steps (grow-only):
/// allocating it per forward costs device allocations and synchronising
/// frees.
template <class M>
struct SlotWork {
  Kokkos::View<int*, M> total, start;                 // per expert [E], offsets [E + 1]
  Kokkos::View<int*, M> base, end;                    // per expert [E]: the rank scan's bounds
  Kokkos::View<int*, M> rank, keep, group;            // per assignment [N]
  Kokkos::View<int**, Kokkos::LayoutRight, M> hist;   // per (chunk, expert)
  int chunk = 16;                                     // assignments per chunk

  void ensure(long N, int E) {
    chunk = 16;
    while (((N + chunk - 1) / chunk) * long(E) > (1L << 22)) chunk *= 2;
    const long chunks = (N + chunk - 1) / chunk;
    auto grow = [](Kokkos::View<int*, M>& v, long n, const char* label) {
      if (static_cast<long>(v.extent(0)) < n)
        v = Kokkos::View<int*, M>(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), n);
    };
    grow(total, E, "moka::slots::total");
    grow(base, E, "moka::slots::base");
    grow(end, E, "moka::slots::end");
    grow(start, E + 1, "moka::slots::start");
    grow(rank, N, "moka::slots::rank");
    grow(keep, N, "moka::slots::keep");
    grow(group, N, "moka::slots::group");
    if (static_cast<long>(hist.extent(0)) < chunks || static_cast<int>(hist.extent(1)) != E)
      hist = Kokkos::View<int**, Kokkos::LayoutRight, M>(
          Kokkos::view_alloc(Kokkos::WithoutInitializing, "moka::slots::hist"), chunks, E);
  }
};

/// rank(i) = how many assignments i' < i ((token, choice) order) go to the
/// same expert and pass \p mask (every routed one when \p use_mask is
/// false); total(e) = how many pass per expert. Assignments that do not
/// pass get rank -1. A histogram per chunk of assignments (one thread per
/// chunk), an exclusive scan of the chunks per expert (one scan over all
/// (expert, chunk) pairs, each expert's base taken off after), then one
/// thread per chunk hands out the ranks: the same result as a sequential
/// count, in O(N) work.
template <class Exec, class M>
void rank_within_expert(const Exec& space, const Kokkos::View<int**, Kokkos::LayoutRight, M>& idx, bool use_mask,
                        const Kokkos::View<int*, M>& mask, SlotWork<M>& work, const Kokkos::View<int*, M>& rank,
                        const Kokkos::View<int*, M>& total) {
  const int k = static_cast<int>(idx.extent(1));
  const int N = static_cast<int>(idx.extent(0)) * k;
  const int E = static_cast<int>(work.hist.extent(1));
  const int chunk = work.chunk, chunks = (N + chunk - 1) / chunk;
  auto hist = work.hist;
  auto base = work.base, end = work.end;
  Kokkos::parallel_for(
      "moka::rank_histogram", Kokkos::RangePolicy<Exec>(space, 0, chunks), KOKKOS_LAMBDA(int q) {
        for (int e = 0; e < E; ++e) hist(q, e) = 0;
        const int last = (q + 1) * chunk < N ? (q + 1) * chunk : N;
        for (int i = q * chunk; i < last; ++i) {
          const int e = idx(i / k, i % k);
          if (e >= 0 && (!use_mask || mask(i))) ++hist(q, e);
        }
      });
  // The chunks of expert e are i = e chunks + q of one scan (a team per
  // expert scanning its chunks left E one-block teams: 64 us for 16 x 4096
  // chunks on an H200, at 0.1% of its memory bandwidth).
  Kokkos::parallel_scan(
      "moka::rank_scan", Kokkos::RangePolicy<Exec>(space, 0, long(E) * chunks),
      KOKKOS_LAMBDA(long i, int& partial, bool final) {
        const int e = static_cast<int>(i / chunks), q = static_cast<int>(i % chunks);
        const int c = hist(q, e);
        if (final) {
          if (q == 0) base(e) = partial;
          if (q == chunks - 1) end(e) = partial + c;
          hist(q, e) = partial;
        }
        partial += c;
      });
  Kokkos::parallel_for(
      "moka::rank_totals", Kokkos::RangePolicy<Exec>(space, 0, E),
      KOKKOS_LAMBDA(int e) { total(e) = chunks > 0 ? end(e) - base(e) : 0; });
  Kokkos::parallel_for(
      "moka::rank_assign", Kokkos::RangePolicy<Exec>(space, 0, chunks), KOKKOS_LAMBDA(int q) {
        const int last = (q + 1) * chunk < N ? (q + 1) * chunk : N;
        for (int i = q * chunk; i < last; ++i) {
          const int e = idx(i / k, i % k);
          rank(i)     = (e >= 0 && (!use_mask || mask(i))) ? hist(q, e)++ - base(e) : -1;
        }
      });
}

/// Turns the routing idx[T,k] (and score, for the score policy) into slots:
/// slot(t,j) = row of assignment (t,j) in the expert-ordered buffer, or -1
/// if dropped (over capacity, or not routed: idx = -1). Rows of an expert
/// keep token order (t, then j). counts[E] and offsets[E+1] describe the
/// buffer (\p h_offsets gets a host copy). Every kept row belongs to
/// exactly one (t, j).
/// \p base (empty, or one per expert) counts assignments to each expert that
/// come before this rank's in global token order (a global capacity): an
/// assignment is kept when base + its rank < capacity.
/// Returns the number of kept assignments (a fence of \p space).
template <class Exec, class S, class M>
long assign_slots(const Exec& space, DropPolicy policy, long capacity, const Kokkos::View<long*, M>& base,
                  const Kokkos::View<int**, Kokkos::LayoutRight, M>& idx, const mat<S, M>& score,
                  const Kokkos::View<int*, M>& counts, const Kokkos::View<int*, M>& offsets,
                  const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot, SlotWork<M>& work,
                  std::vector<int>& h_offsets) {
  const int T = static_cast<int>(idx.extent(0));
  const int k = static_cast<int>(idx.extent(1));
  const int N = T * k;
  const int E = static_cast<int>(counts.extent(0));
  work.ensure(N, E);
  auto rank = work.rank, keep = work.keep, total = work.total, start = work.start, group = work.group;
  const bool has_base = base.extent(0) > 0;
  // 1. rank of each assignment among all assignments to its expert, in token order.
  rank_within_expert(space, idx, false, keep, work, rank, total);
  if (policy == DropPolicy::position) {
    // 2. kept: base + rank < capacity. Every earlier assignment to the
    //    expert is kept too, so the kept rank is the rank.
    Kokkos::parallel_for(
        "moka::keep_position", Kokkos::RangePolicy<Exec>(space, 0, N), KOKKOS_LAMBDA(int i) {
          const int e = idx(i / k, i % k);
          if (e >= 0 && (has_base ? base(e) : 0) + rank(i) >= capacity) rank(i) = -1;
        });
    Kokkos::parallel_for(
        "moka::kept_counts", Kokkos::RangePolicy<Exec>(space, 0, E), KOKKOS_LAMBDA(int e) {
          const long room = capacity - (has_base ? base(e) : 0);
          counts(e) = static_cast<int>(room <= 0 ? 0 : (total(e) < room ? total(e) : room));
        });
  } else {
    // 2. score policy: rank by score inside the expert's group (ties by
    //    token order), then the kept rank in token order.
    Kokkos::parallel_scan(
        "moka::offsets_all", Kokkos::RangePolicy<Exec>(space, 0, E), KOKKOS_LAMBDA(int e, int& partial, bool final) {
          if (final) start(e) = partial;
          partial += total(e);
          if (final && e == E - 1) start(E) = partial;
        });
    Kokkos::parallel_for(
        "moka::group", Kokkos::RangePolicy<Exec>(space, 0, N), KOKKOS_LAMBDA(int i) {
          const int e = idx(i / k, i % k);
          if (e >= 0) group(start(e) + rank(i)) = i;
        });
    Kokkos::parallel_for(
        "moka::keep_score", Kokkos::RangePolicy<Exec>(space, 0, N), KOKKOS_LAMBDA(int i) {
          const int t = i / k, j = i % k, e = idx(t, j);
          if (e < 0) {
            keep(i) = 0;
            return;
          }
          const S s = score(t, j);
          long r    = 0;
          for (int g = start(e); g < start(e + 1); ++g) {
            const int o = group(g);
            const S so  = score(o / k, o % k);
            if (so > s || (so == s && o < i)) ++r;
          }
          if (has_base) r += base(e);
          keep(i) = r < capacity ? 1 : 0;
        });
    rank_within_expert(space, idx, true, keep, work, rank, counts);
  }
  // 3. offsets of the kept rows, and the slots.
  Kokkos::parallel_scan(
      "moka::offsets", Kokkos::RangePolicy<Exec>(space, 0, E), KOKKOS_LAMBDA(int e, int& partial, bool final) {
        if (final) offsets(e) = partial;
        partial += counts(e);
        if (final && e == E - 1) offsets(E) = partial;
      });
  auto h = Kokkos::create_mirror_view(offsets);
  Kokkos::deep_copy(space, h, offsets);
  space.fence();
  h_offsets.assign(h.data(), h.data() + E + 1);
  const int kept = h_offsets[E];
  Kokkos::parallel_for(
      "moka::slots", Kokkos::RangePolicy<Exec>(space, 0, N), KOKKOS_LAMBDA(int i) {
        const int t = i / k, j = i % k;
        const int r = idx(t, j) < 0 ? -1 : rank(i);
        slot(t, j) = r < 0 ? -1 : offsets(idx(t, j)) + r;
      });
  return kept;
}

/// dst[i] = bf16(src[i]) for i < n (round to nearest even). Eight elements
/// per thread (one 16-byte bf16 store) where both arrays are aligned to
/// them, the last n mod 8 one each: with one element per thread an H200
/// converted at 13% of its memory bandwidth (ncu: 1.26 ms for A's W1,
/// 134M elements), which the EP path pays twice per step for its rows.
template <class Exec, class S>
void convert_to_bf16(const Exec& space, const char* label, const S* src, bf16* dst, std::size_t n) {
  constexpr int W         = 8;
  const bool aligned      = reinterpret_cast<std::uintptr_t>(src) % (sizeof(S) * W) == 0 &&
                       reinterpret_cast<std::uintptr_t>(dst) % (sizeof(bf16) * W) == 0;
  const std::size_t packs = aligned ? n / W : 0;
  if (packs > 0)
    Kokkos::parallel_for(
        label, Kokkos::RangePolicy<Exec>(space, 0, packs), KOKKOS_LAMBDA(std::size_t p) {
          const auto a = load_pack<W>(src + p * W);
          Pack<bf16, W> o;
          for (int i = 0; i < W; ++i) o.v[i] = bf16(float(a.v[i]));
          store_pack<W>(dst + p * W, o);
        });
  if (packs * W < n)
    Kokkos::parallel_for(
        label, Kokkos::RangePolicy<Exec>(space, packs * W, n),
        KOKKOS_LAMBDA(std::size_t i) { dst[i] = bf16(float(src[i])); });
}

// ----------------------------------------------------- dispatch / combine
/// The expert of chunk \p q: the last e < L with chunk_start(e) <= q.
template <class V>
KOKKOS_INLINE_FUNCTION int chunk_expert(const V& chunk_start, int L, long q) {
  int lo = 0, hi = L;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (chunk_start(mid) <= q) lo = mid;
    else hi = mid;
  }
  return lo;
}

/// Elements of T in a 16-byte pack (the widest load the row kernels use).
template <class T>
constexpr int pack_of = 16 / sizeof(T) > 1 ? int(16 / sizeof(T)) : 1;

/// The pack width of a row kernel that reads rows of TS and writes rows of
/// S: f(std::integral_constant<int, P>) with P the widest that \p fit(P)
/// accepts of 16 bytes of the narrower type (bf16 rows into fp32: 8 columns
/// a thread, two 16-byte stores of S), 16 bytes of S, and 1. With 8-byte
/// bf16 loads the combine and the undispatch left too few bytes in flight:
/// on an H200 (A: 16384 tokens, d 2048, top-2) the combine went 88 -> 77 us
/// and the undispatch with the gate's part 129 -> 107 us at 8 columns.
template <class TS, class S, class Fit, class F>
void with_row_packs(const Fit& fit, F&& f) {
  constexpr int W  = pack_of<TS> > pack_of<S> ? pack_of<TS> : pack_of<S>;
  constexpr int W2 = pack_of<S>;  // rows that fit only 16-byte packs of S (bf16 d = 36: 4 columns)
  if (fit(W)) f(std::integral_constant<int, W>{});
  else if (W2 != W && fit(W2)) f(std::integral_constant<int, W2>{});
  else f(std::integral_constant<int, 1>{});
}

template <int W, class Exec, class S, class D, class M>
void gather_rows_packs(const Exec& space, const mat<S, M>& x, const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot,
                       const mat<D, M>& xs) {
  const long T = static_cast<long>(x.extent(0)), d = static_cast<long>(x.extent(1));
  const long lx = x.stride(0), ls = xs.stride(0);
  const int k = static_cast<int>(slot.extent(1));
  const S* X = x.data();
  D* XS      = xs.data();
  Kokkos::parallel_for(
      "moka::dispatch", impl::row_major_2d(space, T, d / W), KOKKOS_LAMBDA(long t, long cw) {
        const auto v = load_pack<W>(X + t * lx + cw * W);
        Pack<D, W> o;
        for (int i = 0; i < W; ++i) o.v[i] = D(v.v[i]);
        for (int j = 0; j < k; ++j) {
          const int r = slot(t, j);
          if (r >= 0) store_pack<W>(XS + r * ls + cw * W, o);
        }
      });
}

/// xs(slot(t,j),:) = x(t,:) for every kept assignment (slot >= 0); xs of
/// the same type or bf16. By token: each element of x is read once and
/// written to its k rows (a gather by row read x once per row: k times from
/// memory when x is larger than L2; 81% of DRAM bandwidth on an H200, which
/// was the re-reads).
template <class Exec, class S, class D, class M>
void gather_rows(const Exec& space, const mat<S, M>& x, const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot,
                 const mat<D, M>& xs) {
  const long d = static_cast<long>(x.extent(1));
  constexpr int W = pack_of<D>;
  if (packs_fit(x, d, W) && packs_fit(xs, d, W)) gather_rows_packs<W>(space, x, slot, xs);
  else gather_rows_packs<1>(space, x, slot, xs);
}

// ------------------------------------------------------ padded row layout
/// Moves every kept slot entry into the padded layout: row r of slot s
/// (offsets(s) <= r < offsets(s + 1)) becomes s pad + (r - offsets(s)).
/// The slot of a row is found by bisection over the \p slots + 1 offsets
/// (empty slots included).
template <class Exec, class M>
void pad_slot_rows(const Exec& space, const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot,
                   const Kokkos::View<int*, M>& offsets, int slots, long pad) {
  Kokkos::parallel_for(
      "moka::pad_slot_rows", impl::row_major_2d(space, long(slot.extent(0)), long(slot.extent(1))),
      KOKKOS_LAMBDA(long t, long j) {
        const int r = slot(t, j);
        if (r < 0) return;
        int lo = 0, hi = slots;  // the last s with offsets(s) <= r
        while (hi - lo > 1) {
          const int mid = (lo + hi) / 2;
          if (offsets(mid) <= r) lo = mid;
          else hi = mid;
        }
        slot(t, j) = static_cast<int>(lo * pad + (r - offsets(lo)));
      });
}

template <int W, class Exec, class T, class M>
void zero_padding_rows_packs(const Exec& space, const mat<T, M>& rows, const Kokkos::View<int*, M>& offsets,
                             int slots, long pad, long from) {
  const long span = pad - from, ld = rows.stride(0), d = static_cast<long>(rows.extent(1));
  T* R = rows.data();
  Kokkos::parallel_for(
      "moka::zero_padding_rows", impl::row_major_2d(space, slots * span, d / W), KOKKOS_LAMBDA(long i, long cw) {
        const long s = i / span, q = from + i % span;
        if (q < offsets(s + 1) - offsets(s)) return;
        Pack<T, W> z;
        for (int c = 0; c < W; ++c) z.v[c] = T(0.f);
        store_pack<W>(R + (s * pad + q) * ld + cw * W, z);
      });
}

/// Zeroes the padding rows of the padded layout: rows s pad + q with
/// count(s) <= q < pad, count(s) = offsets(s + 1) - offsets(s) (the
/// unpadded offsets); only rows q >= \p from (the smallest count) are visited.
template <class Exec, class T, class M>
void zero_padding_rows(const Exec& space, const mat<T, M>& rows, const Kokkos::View<int*, M>& offsets, int slots,
                       long pad, long from) {
  if (pad <= from) return;
  const long d = static_cast<long>(rows.extent(1));
  constexpr int W = pack_of<T>;
  if (packs_fit(rows, d, W)) zero_padding_rows_packs<W>(space, rows, offsets, slots, pad, from);
  else zero_padding_rows_packs<1>(space, rows, offsets, slots, pad, from);
}

/// out(t,:) = [out(t,:) if accumulate] + sum_j [slot >= 0] w(t,j) (src(slot(t,j),:)
/// [+ bias(row_group(slot(t,j)),:)]) [+ gd(t,:) gwt], j in order (deterministic); w empty
/// means weights of 1, bias empty no bias, gd empty no gate term (gwt: the
/// gate weights transposed, E x d). src may be bf16 (S arithmetic).
/// Combine and undispatch are this kernel.
template <int W, bool Gate, class Exec, class TS, class S, class M>
void sum_slot_rows_packs(const Exec& space, const char* label, const mat<TS, M>& src,
                         const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot, const mat<S, M>& w, bool accumulate,
                         const mat<S, M>& out, const mat<S, M>& bias, const Kokkos::View<int*, M>& row_group,
                         const mat<S, M>& gd, const mat<S, M>& gwt) {
  const long T = static_cast<long>(out.extent(0)), d = static_cast<long>(out.extent(1));
  const int k  = static_cast<int>(slot.extent(1));
  const long ls = src.stride(0), lo = out.stride(0), lb = bias.data() ? long(bias.stride(0)) : 0;
  const long lgw = gwt.data() ? long(gwt.stride(0)) : 0;
  const int E    = gd.data() ? static_cast<int>(gd.extent(1)) : 0;
  const bool weighted = w.data() != nullptr;
  const TS* SRC = src.data();
  const S* B    = bias.data();
  const S* GW   = gwt.data();
  S* O          = out.data();
  Kokkos::parallel_for(
      label, impl::row_major_2d(space, T, d / W), KOKKOS_LAMBDA(long t, long cw) {
        Pack<S, W> acc;
        if (accumulate) acc = load_pack<W>(O + t * lo + cw * W);
        else
          for (int i = 0; i < W; ++i) acc.v[i] = 0;
        if (Gate)
          for (int e = 0; e < E; ++e) {  // the gate's part: dlogits(t,:) W_gate^T
            const S g    = gd(t, e);
            const auto v = load_pack<W>(GW + e * lgw + cw * W);
            for (int i = 0; i < W; ++i) acc.v[i] += g * v.v[i];
          }
        for (int j = 0; j < k; ++j) {
          const int r = slot(t, j);
          if (r < 0) continue;
          const S wt   = weighted ? w(t, j) : S(1);
          const auto v = load_pack<W>(SRC + r * ls + cw * W);
          if (B) {
            const auto bv = load_pack<W>(B + row_group(r) * lb + cw * W);
            for (int i = 0; i < W; ++i) acc.v[i] += wt * (static_cast<S>(v.v[i]) + bv.v[i]);
          } else {
            for (int i = 0; i < W; ++i) acc.v[i] += wt * static_cast<S>(v.v[i]);
          }
        }
        store_pack<W>(O + t * lo + cw * W, acc);
      });
}

/// The undispatch with the gate's part of dx: out(t,:) = gd(t,:) gwt +
/// sum_j [slot >= 0] src(slot(t,j),:), TT tokens a thread, so that each
/// pack of the gate weights loaded serves TT tokens (one token a thread
/// read E packs of gwt from cache per pack written). H200, ncu, bf16 rows
/// into fp32 dx: D's 16 experts 170 us one token a thread
/// (sum_slot_rows_packs), 126 at TT = 2, 173 at TT = 4; A's 8: 107, 101,
/// 160. The same sums in the same order as sum_slot_rows_packs<W, true>.
#ifdef KOKKOS_ENABLE_CUDA
template <class Exec>
constexpr bool two_tokens_undispatch = std::is_same<Exec, Kokkos::Cuda>::value;
#else
template <class Exec>
constexpr bool two_tokens_undispatch = false;
#endif

template <int W, int TT, class Exec, class TS, class S, class M>
void undispatch_gate_packs(const Exec& space, const char* label, const mat<TS, M>& src,
                           const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot, const mat<S, M>& out,
                           const mat<S, M>& gd, const mat<S, M>& gwt) {
  const long T = static_cast<long>(out.extent(0)), d = static_cast<long>(out.extent(1));
  const int k  = static_cast<int>(slot.extent(1));
  const int E  = static_cast<int>(gd.extent(1));
  const long ls = src.stride(0), lo = out.stride(0), lgw = gwt.stride(0);
  const TS* SRC = src.data();
  const S* GW   = gwt.data();
  S* O          = out.data();
  Kokkos::parallel_for(
      label, impl::row_major_2d(space, (T + TT - 1) / TT, d / W), KOKKOS_LAMBDA(long tb, long cw) {
        const long t0 = tb * TT;
        const int nt  = T - t0 < TT ? static_cast<int>(T - t0) : TT;
        Pack<S, W> acc[TT];
        for (int u = 0; u < TT; ++u)
          for (int i = 0; i < W; ++i) acc[u].v[i] = 0;
        for (int e = 0; e < E; ++e) {
          const auto v = load_pack<W>(GW + e * lgw + cw * W);
          for (int u = 0; u < TT; ++u) {
            const S g = gd(u < nt ? t0 + u : t0, e);
            for (int i = 0; i < W; ++i) acc[u].v[i] += g * v.v[i];
          }
        }
        // The TT tokens' rows of choice j are loaded together (no store in
        // between for the compiler to order them after); stored at the end.
        for (int j = 0; j < k; ++j) {
          int r[TT];
          for (int u = 0; u < TT; ++u) r[u] = u < nt ? slot(t0 + u, j) : -1;
          Pack<TS, W> v[TT];
          for (int u = 0; u < TT; ++u)
            if (r[u] >= 0) v[u] = load_pack<W>(SRC + r[u] * ls + cw * W);
          for (int u = 0; u < TT; ++u)
            if (r[u] >= 0)
              for (int i = 0; i < W; ++i) acc[u].v[i] += static_cast<S>(v[u].v[i]);
        }
        for (int u = 0; u < nt; ++u) store_pack<W>(O + (t0 + u) * lo + cw * W, acc[u]);
      });
}

template <class Exec, class TS, class S, class M>
void sum_slot_rows(const Exec& space, const char* label, const mat<TS, M>& src,
                   const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot, const mat<S, M>& w, bool accumulate,
                   const mat<S, M>& out, const mat<S, M>& bias = {}, const Kokkos::View<int*, M>& row_group = {},
                   const mat<S, M>& gd = {}, const mat<S, M>& gwt = {}) {
  const long d = static_cast<long>(out.extent(1));
  const int E  = gd.data() ? static_cast<int>(gd.extent(1)) : 0;
  MOKA_REQUIRE(E <= gate_small_experts, "moka::impl::sum_slot_rows: a gate part of ", E, " experts (at most ",
               gate_small_experts, ")");
  // The gate's loop only in the kernel instance that has one: compiled into
  // every instance it slowed the combine on an H200 from 89 to 103 us (A).
  // It runs over E at run time: unrolled to a fixed 8 or 16 with its loads
  // clamped in bounds, the undispatch took 160 us against 129.
  auto run = [&](auto gate) {
    constexpr bool Gate = decltype(gate)::value;
    auto fit = [&](int p) {
      return packs_fit(src, d, p) && packs_fit(out, d, p) && (!bias.data() || packs_fit(bias, d, p)) &&
             (!gwt.data() || packs_fit(gwt, d, p));
    };
    // The undispatch with the gate's part, 2 tokens a thread on CUDA (see
    // undispatch_gate_packs); host backends keep one token a thread (2 cores,
    // OpenMP, bench_cpu.deck: 0.98 ms a step at 2 tokens, 1.14 at 4, 0.67-0.84 at 1).
    if constexpr (Gate && impl::two_tokens_undispatch<Exec>) {
      if (!w.data() && !bias.data() && !accumulate) {
        with_row_packs<TS, S>(
            fit, [&](auto p) { undispatch_gate_packs<decltype(p)::value, 2>(space, label, src, slot, out, gd, gwt); });
        return;
      }
    }
    with_row_packs<TS, S>(fit, [&](auto p) {
      sum_slot_rows_packs<decltype(p)::value, Gate>(space, label, src, slot, w, accumulate, out, bias, row_group,
                                                    gd, gwt);
    });
  };
  if (E == 0) run(std::false_type{});
  else run(std::true_type{});
}

/// y(t,:) = sum_j [slot >= 0] w(t,j) (ys(slot(t,j),:) [+ bias(row_group(slot(t,j)),:)]),
/// j in order (deterministic); ys fp32 / fp64 or bf16 (the expert outputs of
/// one bf16 rank, b2 added here).
template <class Exec, class TS, class S, class M>
void combine_rows(const Exec& space, const mat<TS, M>& ys, const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot,
                  const mat<S, M>& w, const mat<S, M>& y, const mat<S, M>& bias = {},
                  const Kokkos::View<int*, M>& row_group = {}) {
  sum_slot_rows(space, "moka::combine", ys, slot, w, false, y, bias, row_group);
}

/// dx(t,:) += sum_j [slot >= 0] dxs(slot(t,j),:) (dxs of the layer's type or bf16);
/// with \p gd: dx(t,:) = gd(t,:) gwt + that sum, the gate's part of dx
/// (gd: the gradient of the logits, gwt: the gate weights transposed)
/// summed in the same pass instead of a GEMM writing dx first (the gate
/// kernels' small gates: impl::gate_small_experts).
template <class Exec, class TS, class S, class M>
void scatter_add_rows(const Exec& space, const mat<TS, M>& dxs,
                      const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot, const mat<S, M>& dx,
                      const mat<S, M>& gd = {}, const mat<S, M>& gwt = {}) {
  sum_slot_rows(space, "moka::undispatch", dxs, slot, mat<S, M>(), gd.data() == nullptr, dx, mat<S, M>(), {}, gd, gwt);
}

template <int W, int KC, class Exec, class TY, class S, class M>
void combine_backward_packs(const Exec& space, const mat<S, M>& dy, const mat<TY, M>& ys,
                            const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot, const mat<S, M>& score,
                            const mat<S, M>& dscore, const mat<S, M>& dys, const mat<bf16, M>& dys_b,
                            const mat<S, M>& bias, const Kokkos::View<int*, M>& row_group) {
  using team_policy = Kokkos::TeamPolicy<Exec>;
  const int T = static_cast<int>(dy.extent(0)), k = static_cast<int>(slot.extent(1));
  const long d = static_cast<long>(dy.extent(1));
  const long lg = dy.stride(0), ly = ys.stride(0), lo = dys.data() ? long(dys.stride(0)) : 0;
  const long lb = dys_b.data() ? long(dys_b.stride(0)) : 0, lbi = bias.data() ? long(bias.stride(0)) : 0;
  const S* G   = dy.data();
  const TY* YS = ys.data();
  const S* BI  = bias.data();
  S* O         = dys.data();
  bf16* OB     = dys_b.data();
  int team = 1, lanes = 1;
#ifdef KOKKOS_ENABLE_CUDA
  if (std::is_same<Exec, Kokkos::Cuda>::value) {  // about 8 packs a lane
    lanes = row_lanes(d / W, 8);
    team  = 128 / lanes;
  }
#endif
  Kokkos::parallel_for(
      "moka::combine_backward", team_policy(space, (T + team - 1) / team, team, lanes),
      KOKKOS_LAMBDA(const typename team_policy::member_type& m) {
        const int t = m.league_rank() * m.team_size() + m.team_rank();
        if (t >= T) return;  // a whole thread (all its lanes)
        for (int j0 = 0; j0 < k; j0 += KC) {
          const int nj = k - j0 < KC ? k - j0 : KC;
          int r[KC];
          S w[KC];
          long e[KC];
          for (int u = 0; u < KC; ++u) {
            r[u] = u < nj ? slot(t, j0 + u) : -1;
            w[u] = r[u] >= 0 ? score(t, j0 + u) : S(0);
            e[u] = BI && r[u] >= 0 ? long(row_group(r[u])) : 0;
          }
          GateSums<S, KC> acc;
          Kokkos::parallel_reduce(
              Kokkos::ThreadVectorRange(m, d / W),
              [&](long cw, GateSums<S, KC>& a) {
                const auto g = load_pack<W>(G + t * lg + cw * W);
                Pack<TY, W> y[KC];  // the choices' rows loaded together
                for (int u = 0; u < KC; ++u)
                  if (r[u] >= 0) y[u] = load_pack<W>(YS + r[u] * ly + cw * W);
                for (int u = 0; u < KC; ++u) {
                  if (r[u] < 0) continue;
                  Pack<S, W> o, bv;
                  if (BI) bv = load_pack<W>(BI + e[u] * lbi + cw * W);
                  Pack<bf16, W> ob;
                  for (int q = 0; q < W; ++q) {
                    a.v[u] += g.v[q] * (BI ? static_cast<S>(y[u].v[q]) + bv.v[q] : static_cast<S>(y[u].v[q]));
                    o.v[q]  = w[u] * g.v[q];
                    ob.v[q] = bf16(float(o.v[q]));
                  }
                  if (O) store_pack<W>(O + r[u] * lo + cw * W, o);
                  if (OB) store_pack<W>(OB + r[u] * lb + cw * W, ob);
                }
              },
              acc);
          Kokkos::parallel_for(Kokkos::ThreadVectorRange(m, nj),
                               [&](int u) { dscore(t, j0 + u) = r[u] >= 0 ? acc.v[u] : S(0); });
        }
      });
}

/// Combine backward in one pass, a thread per token (on CUDA a group of
/// 4-32 lanes over the row's packs, the choices' dot products summed by
/// shuffles; up to 4 choices a pass over dy(t,:)), reading dy(t,:) once
/// and ys(r,:) coalesced: dscore(t,j) = dy(t,:) . (ys(r,:) [+ bias(row_group(r),:)])
/// (ys fp32 / fp64 or bf16, as in combine_rows) and the gradient
/// of the expert row, dys(r,:) = score(t,j) dy(t,:) (and its bf16 copy
/// when \p dys_b is allocated; only that copy when \p dys is not: one rank
/// in bf16, where nothing reads the fp32 rows). Every kept row r belongs to exactly one
/// (t, j); dropped assignments get dscore 0.
template <class Exec, class TY, class S, class M>
void combine_backward(const Exec& space, const mat<S, M>& dy, const mat<TY, M>& ys,
                      const Kokkos::View<int**, Kokkos::LayoutRight, M>& slot, const mat<S, M>& score,
                      const mat<S, M>& dscore, const mat<S, M>& dys, const mat<bf16, M>& dys_b,
                      const mat<S, M>& bias = {}, const Kokkos::View<int*, M>& row_group = {}) {
  const long d = static_cast<long>(dy.extent(1));
  auto fit     = [&](int p) {
    return packs_fit(dy, d, p) && packs_fit(ys, d, p) && (!dys.data() || packs_fit(dys, d, p)) &&
           (!dys_b.data() || packs_fit(dys_b, d, p)) && (!bias.data() || packs_fit(bias, d, p));
  };
  with_row_packs<TY, S>(fit, [&](auto p) {
    combine_backward_packs<decltype(p)::value, 4>(space, dy, ys, slot, score, dscore, dys, dys_b, bias, row_group);
  });
}

template <int W, class Exec, class S, class M>
void add_row_bias_packs(const Exec& space, long rows, const mat<S, M>& y, const mat<S, M>& bias,
                        const Kokkos::View<int*, M>& row_group) {
  const long d = static_cast<long>(y.extent(1)), ly = y.stride(0), lb = bias.stride(0);
  S* Y       = y.data();
  const S* B = bias.data();
  Kokkos::parallel_for(
      "moka::expert_bias2", impl::row_major_2d(space, rows, d / W), KOKKOS_LAMBDA(long r, long cw) {
        auto v       = load_pack<W>(Y + r * ly + cw * W);
        const auto b = load_pack<W>(B + row_group(r) * lb + cw * W);
        for (int i = 0; i < W; ++i) v.v[i] += b.v[i];
        store_pack<W>(Y + r * ly + cw * W, v);
      });
}

/// y(r,:) += bias(row_group(r),:) for r < rows (the b2 of each expert row).
template <class Exec, class S, class M>
void add_row_bias(const Exec& space, long rows, const mat<S, M>& y, const mat<S, M>& bias,
                  const Kokkos::View<int*, M>& row_group) {
  const long d = static_cast<long>(y.extent(1));
  constexpr int W = pack_of<S>;
  if (packs_fit(y, d, W) && packs_fit(bias, d, W)) add_row_bias_packs<W>(space, rows, y, bias, row_group);
  else add_row_bias_packs<1>(space, rows, y, bias, row_group);
}

// ----------------------------------------------- bf16 expert activation
// fp32 math on bf16 data, W columns (16 bytes) per load and store; the
// pre-activation is stored without b1 and both directions add it. The
// activation and whether there are biases are template arguments: each
// kernel is one straight body over its W elements (no switch per element,
// which kept the elements' math from interleaving: ncu found the runtime
// forms bound by instruction issue, not memory, on an H200).

/// Calls f with the activation as a std::integral_constant (the kernels'
/// template argument) and the bias flag as a std::bool_constant.
template <class F>
void with_activation(Activation act, bool bias, F&& f) {
  auto b = [&](auto a) {
    if (bias) f(a, std::true_type{});
    else f(a, std::false_type{});
  };
  switch (act) {
    case Activation::gelu_erf: b(std::integral_constant<Activation, Activation::gelu_erf>{}); break;
    case Activation::gelu_tanh: b(std::integral_constant<Activation, Activation::gelu_tanh>{}); break;
    case Activation::relu: b(std::integral_constant<Activation, Activation::relu>{}); break;
    case Activation::silu: b(std::integral_constant<Activation, Activation::silu>{}); break;
    case Activation::swiglu: b(std::integral_constant<Activation, Activation::swiglu>{}); break;
  }
}

/// Host backends' activation over rows [r0, r1) of fp32 / fp64 data, in
/// place of the pre-activation's bias: hpre(r,:) += b1(row_expert(r),:) when
/// \p Bias, then h(r,c) = act(hpre(r,c)) [times hpre(r,dff+c) for swiglu].
/// A row per iteration, its columns in a loop the compiler vectorizes (the
/// 2D policy's tiles do not).
template <Activation A, bool Bias, class Exec, class S, class M>
void activation_rows_host(const Exec& space, long r0, long r1, int dff, const Kokkos::View<int*, M>& row_expert,
                          const mat<S, M>& hpre, const mat<S, M>& b1, const mat<S, M>& h) {
  constexpr bool glu = A == Activation::swiglu;
  Kokkos::parallel_for(
      "moka::expert_activation", Kokkos::RangePolicy<Exec>(space, r0, r1), KOKKOS_LAMBDA(long r) {
        S* x   = &hpre(r, 0);
        S* out = &h(r, 0);
        if (Bias) {
          const S* bb = &b1(row_expert(r), 0);
          for (long c = 0; c < (glu ? 2L * dff : long(dff)); ++c) x[c] += bb[c];
        }
        activation_row<A>(x, glu ? x + dff : nullptr, out, dff);
      });
}

/// Host backends' activation backward over rows [r0, r1): dhpre(r,c) =
/// dh(r,c) act'(hpre(r,c)) [times hpre(r,dff+c), and dhpre(r,dff+c) =
/// dh(r,c) act(hpre(r,c)), for swiglu]; hpre holds the biases already.
template <Activation A, class Exec, class S, class M>
void activation_backward_rows_host(const Exec& space, long r0, long r1, int dff, const mat<S, M>& dh,
                                   const mat<S, M>& hpre, const mat<S, M>& dhpre) {
  constexpr bool glu = A == Activation::swiglu;
  Kokkos::parallel_for(
      "moka::expert_activation_backward", Kokkos::RangePolicy<Exec>(space, r0, r1), KOKKOS_LAMBDA(long r) {
        const S* x = &hpre(r, 0);
        S* out     = &dhpre(r, 0);
        activation_grad_row<A>(&dh(r, 0), x, glu ? x + dff : nullptr, out, glu ? out + dff : nullptr, dff);
      });
}

/// The same two on device backends: one thread per element of the rows
/// [r0, r1) (fp32 / fp64 data; the bf16 path has its own kernels below).
template <Activation A, bool Bias, class Exec, class S, class M>
void activation_rows_2d(const Exec& space, long r0, long r1, int dff, const Kokkos::View<int*, M>& row_expert,
                        const mat<S, M>& hpre, const mat<S, M>& b1, const mat<S, M>& h) {
  Kokkos::parallel_for(
      "moka::expert_activation", impl::row_major_2d(space, r1 - r0, long(dff)), KOKKOS_LAMBDA(long i, long c) {
        const long r = r0 + i;
        if (Bias) {
          const int e = row_expert(r);
          hpre(r, c) += b1(e, c);
          if (A == Activation::swiglu) hpre(r, dff + c) += b1(e, dff + c);
        }
        const S a = activate(A, hpre(r, c));
        h(r, c)   = A == Activation::swiglu ? a * hpre(r, dff + c) : a;
      });
}
template <Activation A, class Exec, class S, class M>
void activation_backward_rows_2d(const Exec& space, long r0, long r1, int dff, const mat<S, M>& dh,
                                 const mat<S, M>& hpre, const mat<S, M>& dhpre) {
  Kokkos::parallel_for(
      "moka::expert_activation_backward", impl::row_major_2d(space, r1 - r0, long(dff)),
      KOKKOS_LAMBDA(long i, long c) {
        const long r = r0 + i;
        if (A == Activation::swiglu) {
          const S a = hpre(r, c), u = hpre(r, dff + c);
          dhpre(r, c)       = dh(r, c) * u * activate_grad(A, a);
          dhpre(r, dff + c) = dh(r, c) * activate(A, a);
        } else {
          dhpre(r, c) = dh(r, c) * activate_grad(A, hpre(r, c));
        }
      });
}

/// One element of the bf16 activation backward, from the upstream gradient
/// g, the activation's input x (b1 added) and, for swiglu, the linear
/// half v (b1 added): o0 = g act'(x) [v], and for swiglu o1 = g act(x)
/// (the linear half's gradient). The chunk and row kernels share it.
template <Activation A>
KOKKOS_FORCEINLINE_FUNCTION void activation_backward_element(float g, float x, float v, bf16& o0, bf16& o1) {
  if (A == Activation::swiglu) {
    o0 = bf16(g * v * activate_grad(A, x));
    o1 = bf16(g * activate(A, x));
  } else {
    o0 = bf16(g * activate_grad(A, x));
  }
}

/// Rows a thread of the row-blocked activation kernels takes (packs of W
/// columns; one row when the columns do not fit packs). H200, ncu, A / D:
/// 8 rows gave the forward the same time (287 / 291 us) and the backward
/// slightly more (403 / 411 us against 399 / 407).
template <int W>
constexpr int act_rows = W > 1 ? 4 : 1;

/// f(r0, n, c) for every block of act_rows<W> rows (r0, n of them: fewer at
/// the end) and pack of W columns (c) of a rows x dff range: the 2D
/// policy's index arithmetic once per block.
template <int W, class Exec, class F>
void for_row_blocks(const Exec& space, const char* label, long rows, int dff, const F& f) {
  constexpr int R = act_rows<W>;
  Kokkos::parallel_for(
      label, impl::row_major_2d(space, (rows + R - 1) / R, long(dff / W)), KOKKOS_LAMBDA(long rb, long cw) {
        const long r0 = rb * R;
        f(r0, rows - r0 < R ? int(rows - r0) : R, cw * W);
      });
}

/// h(r,c) = act(hpre(r,c) + b1(e,c)), times hpre(r,dff+c) + b1(e,dff+c) for
/// swiglu, e = row_expert(r). One thread per (R consecutive rows, W
/// columns): its R loads are issued before the math (more bytes in flight
/// per thread), and the 2D policy's index arithmetic is spent once per R
/// rows (ncu found one row per thread bound by instruction issue).
template <Activation A, bool Bias, int W, class Exec, class S, class M>
void activation_bf16_packs(const Exec& space, long rows, int dff, const Kokkos::View<int*, M>& row_expert,
                           const mat<bf16, M>& hpre, const mat<S, M>& b1, const mat<bf16, M>& h) {
  constexpr int R = act_rows<W>;
  const long lp = hpre.stride(0), lh = h.stride(0);
  const bf16* P = hpre.data();
  bf16* H       = h.data();
  for_row_blocks<W>(
      space, "moka::expert_activation_bf16", rows, dff, KOKKOS_LAMBDA(long r0, int n, long c) {
        Pack<bf16, W> a[R], u[R];
        for (int j = 0; j < R; ++j)
          if (j < n) {
            a[j] = load_pack<W>(P + (r0 + j) * lp + c);
            if (A == Activation::swiglu) u[j] = load_pack<W>(P + (r0 + j) * lp + dff + c);
          }
        for (int j = 0; j < R; ++j) {
          if (j >= n) break;
          float x[W], g[W];
          for (int i = 0; i < W; ++i) x[i] = float(a[j].v[i]);
          if (A == Activation::swiglu)
            for (int i = 0; i < W; ++i) g[i] = float(u[j].v[i]);
          if (Bias) {
            const int e = row_expert(r0 + j);
            for (int i = 0; i < W; ++i) {
              x[i] += float(b1(e, c + i));
              if (A == Activation::swiglu) g[i] += float(b1(e, dff + c + i));
            }
          }
          Pack<bf16, W> o;
          for (int i = 0; i < W; ++i)
            o.v[i] = bf16(A == Activation::swiglu ? activate(A, x[i]) * g[i] : activate(A, x[i]));
          store_pack<W>(H + (r0 + j) * lh + c, o);
        }
      });
}

template <class Exec, class S, class M>
void activation_bf16(const Exec& space, Activation act, bool bias, long rows, int dff,
                     const Kokkos::View<int*, M>& row_expert, const mat<bf16, M>& hpre, const mat<S, M>& b1,
                     const mat<bf16, M>& h) {
  const bool packs = packs_fit(hpre, hpre.extent(1), 8) && packs_fit(h, dff, 8);
  with_activation(act, bias, [&](auto a, auto b) {
    constexpr Activation Act = decltype(a)::value;
    constexpr bool Bias      = decltype(b)::value;
    if (packs) activation_bf16_packs<Act, Bias, 8>(space, rows, dff, row_expert, hpre, b1, h);
    else activation_bf16_packs<Act, Bias, 1>(space, rows, dff, row_expert, hpre, b1, h);
  });
}

/// dhpre(r,c) = dh(r,c) act'(a) [u], dhpre(r,dff+c) = dh(r,c) act(a) for
/// swiglu (a, u: the two halves of the pre-activation plus b1), in bf16,
/// and work(q,:) = the column sums of chunk q of what was written (the
/// first pass of the b1 gradient; without biases none). One thread per
/// (chunk of an expert's rows, W columns) walks the chunk's rows; the
/// threads of a block read a row's columns coalesced.
template <Activation A, bool Bias, int W, class Exec, class S, class M>
void activation_backward_bf16_packs(const Exec& space, long chunks, int chunk, int dff,
                                    const Kokkos::View<int*, M>& chunk_start, const Kokkos::View<int*, M>& offsets,
                                    const mat<bf16, M>& dh, const mat<bf16, M>& hpre, const mat<S, M>& b1,
                                    const mat<bf16, M>& dhpre, const mat<S, M>& work) {
  constexpr bool glu = A == Activation::swiglu;
  const int L        = static_cast<int>(chunk_start.extent(0)) - 1;
  const long lg = dh.stride(0), lp = hpre.stride(0), ld = dhpre.stride(0);
  const bf16* G      = dh.data();
  const bf16* P      = hpre.data();
  bf16* D            = dhpre.data();
  Kokkos::parallel_for(
      "moka::expert_activation_backward_bf16", impl::row_major_2d(space, chunks, long(dff / W)),
      KOKKOS_LAMBDA(long q, long cw) {
        const int e    = chunk_expert(chunk_start, L, q);
        const long b   = offsets(e) + (q - chunk_start(e)) * chunk;
        const long end = b + chunk < offsets(e + 1) ? b + chunk : long(offsets(e + 1));
        const long c   = cw * W;
        float ba[W], bu[W], s0[W], s1[W];
        for (int i = 0; i < W; ++i) {
          ba[i] = Bias ? float(b1(e, c + i)) : 0.f;
          bu[i] = Bias && glu ? float(b1(e, dff + c + i)) : 0.f;
          s0[i] = s1[i] = 0.f;
        }
        for (long r = b; r < end; ++r) {
          const auto g = load_pack<W>(G + r * lg + c);
          const auto a = load_pack<W>(P + r * lp + c);
          Pack<bf16, W> o0;
          if (glu) {
            const auto u = load_pack<W>(P + r * lp + dff + c);
            Pack<bf16, W> o1;
            for (int i = 0; i < W; ++i) {
              activation_backward_element<A>(float(g.v[i]), float(a.v[i]) + ba[i], float(u.v[i]) + bu[i], o0.v[i],
                                             o1.v[i]);
              if (Bias) s0[i] += float(o0.v[i]), s1[i] += float(o1.v[i]);
            }
            store_pack<W>(D + r * ld + dff + c, o1);
          } else {
            bf16 unused;
            for (int i = 0; i < W; ++i) {
              activation_backward_element<A>(float(g.v[i]), float(a.v[i]) + ba[i], 0.f, o0.v[i], unused);
              if (Bias) s0[i] += float(o0.v[i]);
            }
          }
          store_pack<W>(D + r * ld + c, o0);
        }
        if (Bias)
          for (int i = 0; i < W; ++i) {
            work(q, c + i) = s0[i];
            if (glu) work(q, dff + c + i) = s1[i];
          }
      });
}

/// Whether the bf16 activation backward's rows (dh, and hpre and dhpre of
/// one or two halves) fit packs of 8 columns; the chunk and row kernels run
/// 8-column packs then, one column a thread otherwise.
template <class M>
bool activation_backward_packs_fit(int dff, const mat<bf16, M>& dh, const mat<bf16, M>& hpre,
                                   const mat<bf16, M>& dhpre) {
  return packs_fit(dh, dff, 8) && packs_fit(hpre, hpre.extent(1), 8) && packs_fit(dhpre, dhpre.extent(1), 8);
}

template <class Exec, class S, class M>
void activation_backward_bf16(const Exec& space, Activation act, bool bias, long chunks, int chunk, int dff,
                              const Kokkos::View<int*, M>& chunk_start, const Kokkos::View<int*, M>& offsets,
                              const mat<bf16, M>& dh, const mat<bf16, M>& hpre, const mat<S, M>& b1,
                              const mat<bf16, M>& dhpre, const mat<S, M>& work) {
  const bool packs = activation_backward_packs_fit(dff, dh, hpre, dhpre);
  with_activation(act, bias, [&](auto a, auto b) {
    constexpr Activation Act = decltype(a)::value;
    constexpr bool Bias      = decltype(b)::value;
    if (packs)
      activation_backward_bf16_packs<Act, Bias, 8>(space, chunks, chunk, dff, chunk_start, offsets, dh, hpre, b1, dhpre,
                                                   work);
    else
      activation_backward_bf16_packs<Act, Bias, 1>(space, chunks, chunk, dff, chunk_start, offsets, dh, hpre, b1, dhpre,
                                                   work);
  });
}

/// The activation backward without biases (no column sums, so no chunks):
/// dhpre from dh and hpre as activation_backward_bf16 computes it, rows
/// [0, rows), in place allowed (dhpre may be hpre's or dh's buffer). One
/// thread per (R consecutive rows, W columns) like the forward: its R rows'
/// loads issued before any store, so more bytes are in flight than in the
/// chunk kernel's walk, where a store in place orders each row's loads
/// after the previous row's store.
template <Activation A, int W, class Exec, class M>
void activation_backward_bf16_rows_packs(const Exec& space, long rows, int dff, const mat<bf16, M>& dh,
                                         const mat<bf16, M>& hpre, const mat<bf16, M>& dhpre) {
  constexpr bool glu = A == Activation::swiglu;
  constexpr int R    = act_rows<W>;
  const long lg = dh.stride(0), lp = hpre.stride(0), ld = dhpre.stride(0);
  const bf16* G = dh.data();
  const bf16* P = hpre.data();
  bf16* D       = dhpre.data();
  for_row_blocks<W>(
      space, "moka::expert_activation_backward_bf16", rows, dff, KOKKOS_LAMBDA(long r0, int n, long c) {
        Pack<bf16, W> g[R], a[R], u[R];
        for (int j = 0; j < R; ++j)
          if (j < n) {
            g[j] = load_pack<W>(G + (r0 + j) * lg + c);
            a[j] = load_pack<W>(P + (r0 + j) * lp + c);
            if (glu) u[j] = load_pack<W>(P + (r0 + j) * lp + dff + c);
          }
        for (int j = 0; j < R; ++j) {
          if (j >= n) break;
          Pack<bf16, W> o0, o1;
          for (int i = 0; i < W; ++i)
            activation_backward_element<A>(float(g[j].v[i]), float(a[j].v[i]), glu ? float(u[j].v[i]) : 0.f, o0.v[i],
                                           o1.v[i]);
          store_pack<W>(D + (r0 + j) * ld + c, o0);
          if (glu) store_pack<W>(D + (r0 + j) * ld + dff + c, o1);
        }
      });
}

template <class Exec, class M>
void activation_backward_bf16_rows(const Exec& space, Activation act, long rows, int dff, const mat<bf16, M>& dh,
                                   const mat<bf16, M>& hpre, const mat<bf16, M>& dhpre) {
  const bool packs = activation_backward_packs_fit(dff, dh, hpre, dhpre);
  with_activation(act, false, [&](auto a, auto) {
    constexpr Activation Act = decltype(a)::value;
    if (packs) activation_backward_bf16_rows_packs<Act, 8>(space, rows, dff, dh, hpre, dhpre);
    else activation_backward_bf16_rows_packs<Act, 1>(space, rows, dff, dh, hpre, dhpre);
  });
}

// ---------------------------------------------------------- column sums
/// Second pass of expert_column_sums: out(e, c) += the sum of work(q, c)
/// over expert e's chunks, in chunk order.
template <class Exec, class S, class M>
void expert_column_sums_finish(const Exec& space, const Kokkos::View<int*, M>& chunk_start, const mat<S, M>& work,
                               const mat<S, M>& out) {
  Kokkos::parallel_for(
      "moka::column_sums", impl::row_major_2d(space, long(out.extent(0)), long(out.extent(1))),
      KOKKOS_LAMBDA(long e, long c) {
        S acc = 0;
        for (long q = chunk_start(e); q < chunk_start(e + 1); ++q) acc += work(q, c);
        out(e, c) += acc;
      });
}

/// out(e, c) += sum of src(r, c) over the rows r of expert e
/// (offsets(e) <= r < offsets(e + 1)), for every expert and column. Two
/// passes with a fixed order (deterministic): sums over chunks of
/// `chunk` rows, then over each expert's chunks. \p chunk_start [L + 1]
/// (host and device copies) numbers each expert's chunks.
template <class Exec, class SrcView, class S, class M>
void expert_column_sums(const Exec& space, const SrcView& src, const Kokkos::View<int*, M>& offsets,
                        const Kokkos::View<int*, M>& chunk_start, long chunks, int chunk, const mat<S, M>& work,
                        const mat<S, M>& out) {
  const int L = static_cast<int>(out.extent(0));
  const long n = static_cast<long>(out.extent(1));
  if constexpr (Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible) {
    // Host: a chunk per iteration, its rows streamed in order into the
    // chunk's row of partial sums (the same sums in the same order as one
    // (chunk, column) per thread, which walks a column across rows).
    Kokkos::parallel_for(
        "moka::column_sums_chunks", Kokkos::RangePolicy<Exec>(space, 0, chunks), KOKKOS_LAMBDA(long q) {
          const int e    = chunk_expert(chunk_start, L, q);
          const long b   = offsets(e) + (q - chunk_start(e)) * chunk;
          const long end = b + chunk < offsets(e + 1) ? b + chunk : offsets(e + 1);
          S* w           = &work(q, 0);
          for (long c = 0; c < n; ++c) w[c] = 0;
          for (long r = b; r < end; ++r) {
            const auto* x = &src(r, 0);
            for (long c = 0; c < n; ++c) w[c] += static_cast<S>(x[c]);
          }
        });
    expert_column_sums_finish(space, chunk_start, work, out);
    return;
  }
  Kokkos::parallel_for(
      "moka::column_sums_chunks", impl::row_major_2d(space, chunks, n), KOKKOS_LAMBDA(long q, long c) {
        const int e = chunk_expert(chunk_start, L, q);
        const long b = offsets(e) + (q - chunk_start(e)) * chunk;
        const long end = b + chunk < offsets(e + 1) ? b + chunk : offsets(e + 1);
        S acc = 0;
        for (long r = b; r < end; ++r) acc += static_cast<S>(src(r, c));
        work(q, c) = acc;
      });
  expert_column_sums_finish(space, chunk_start, work, out);
}

/// expert_column_sums of a bf16 matrix with W columns (16 bytes) per
/// thread: one thread per (chunk, W columns) walks the chunk's rows, the
/// threads of a block read a row's columns coalesced (one bf16 per thread
/// reads a fraction of the bandwidth). Same chunks and order as
/// expert_column_sums.
template <int W, class Exec, class S, class M>
void expert_column_sums_bf16_packs(const Exec& space, const mat<bf16, M>& src, const Kokkos::View<int*, M>& offsets,
                                   const Kokkos::View<int*, M>& chunk_start, long chunks, int chunk,
                                   const mat<S, M>& work, const mat<S, M>& out) {
  const int L = static_cast<int>(out.extent(0));
  const long n = static_cast<long>(out.extent(1)), ls = src.stride(0);
  const bf16* P = src.data();
  Kokkos::parallel_for(
      "moka::column_sums_chunks_bf16", impl::row_major_2d(space, chunks, n / W), KOKKOS_LAMBDA(long q, long cw) {
        const int e    = chunk_expert(chunk_start, L, q);
        const long b   = offsets(e) + (q - chunk_start(e)) * chunk;
        const long end = b + chunk < offsets(e + 1) ? b + chunk : long(offsets(e + 1));
        const long c   = cw * W;
        S acc[W];
        for (int i = 0; i < W; ++i) acc[i] = 0;
        for (long r = b; r < end; ++r) {
          const auto v = load_pack<W>(P + r * ls + c);
          for (int i = 0; i < W; ++i) acc[i] += static_cast<S>(float(v.v[i]));
        }
        for (int i = 0; i < W; ++i) work(q, c + i) = acc[i];
      });
  expert_column_sums_finish(space, chunk_start, work, out);
}

template <class Exec, class S, class M>
void expert_column_sums_bf16(const Exec& space, const mat<bf16, M>& src, const Kokkos::View<int*, M>& offsets,
                             const Kokkos::View<int*, M>& chunk_start, long chunks, int chunk, const mat<S, M>& work,
                             const mat<S, M>& out) {
  const long n = static_cast<long>(out.extent(1));
  if (packs_fit(src, n, 8)) expert_column_sums_bf16_packs<8>(space, src, offsets, chunk_start, chunks, chunk, work, out);
  else expert_column_sums(space, src, offsets, chunk_start, chunks, chunk, work, out);
}

// ------------------------------------------------------------- exchange
/// Rows between a staging buffer and the expert side, by segments seg[3 i
/// .. 3 i + 2] = (staging row, expert row, rows), i < nseg, whose staging
/// rows are increasing and cover [0, rows): expert(e + j,:) = stage(s + j,:)
/// when \p to_expert, else stage(s + j,:) = expert(e + j,:). One thread per
/// (staging row, W columns); the segment by binary search.
template <int W, class Exec, class S, class M>
void move_segments_packs(const Exec& space, bool to_expert, long rows, const Kokkos::View<int*, M>& seg, int nseg,
                         const mat<S, M>& stage, const mat<S, M>& expert) {
  const long d = static_cast<long>(stage.extent(1)), ls = stage.stride(0), le = expert.stride(0);
  S* A = stage.data();
  S* B = expert.data();
  Kokkos::parallel_for(
      "moka::exchange_reorder", impl::row_major_2d(space, rows, d / W), KOKKOS_LAMBDA(long r, long cw) {
        int lo = 0, hi = nseg - 1;  // the last segment starting at or before r
        while (lo < hi) {
          const int mid = (lo + hi + 1) / 2;
          if (seg(3 * mid) <= r) lo = mid;
          else hi = mid - 1;
        }
        const long e = seg(3 * lo + 1) + (r - long(seg(3 * lo)));
        if (to_expert) store_pack<W>(B + e * le + cw * W, load_pack<W>(A + r * ls + cw * W));
        else store_pack<W>(A + r * ls + cw * W, load_pack<W>(B + e * le + cw * W));
      });
}

template <class Exec, class S, class M>
void move_segments(const Exec& space, bool to_expert, long rows, const Kokkos::View<int*, M>& seg, int nseg,
                   const mat<S, M>& stage, const mat<S, M>& expert) {
  if (rows == 0) return;
  const long d = static_cast<long>(stage.extent(1));
  constexpr int W = pack_of<S>;
  if (packs_fit(stage, d, W) && packs_fit(expert, d, W))
    move_segments_packs<W>(space, to_expert, rows, seg, nseg, stage, expert);
  else move_segments_packs<1>(space, to_expert, rows, seg, nseg, stage, expert);
}

/// dst(r,:) = sum over p < parts of src(p rows + r,:), in order of p.
template <class Exec, class S, class M>
void sum_parts(const Exec& space, const mat<S, M>& src, const mat<S, M>& dst, long rows, int parts) {
  const long d = static_cast<long>(dst.extent(1));
  Kokkos::parallel_for(
      "moka::sum_slices", impl::row_major_2d(space, rows, d), KOKKOS_LAMBDA(long r, long c) {
        S acc = src(r, c);
        for (int p = 1; p < parts; ++p) acc += src(p * rows + r, c);
        dst(r, c) = acc;
      });
}

/// row_expert(r) = the expert e with offsets(e) <= r < offsets(e + 1).
template <class Exec, class M>
void row_experts(const Exec& space, const Kokkos::View<int*, M>& offsets, const Kokkos::View<int*, M>& row_expert,
                 long rows) {
  const int n = static_cast<int>(offsets.extent(0)) - 1;
  Kokkos::parallel_for(
      "moka::row_expert", Kokkos::RangePolicy<Exec>(space, 0, rows), KOKKOS_LAMBDA(long r) {
        int lo = 0, hi = n;
        while (hi - lo > 1) {
          const int mid = (lo + hi) / 2;
          if (offsets(mid) <= r) lo = mid;
          else hi = mid;
        }
        row_expert(r) = lo;
      });
}

}  // namespace impl
}  // namespace moka
