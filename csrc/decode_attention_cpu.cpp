// Decode attention over a paged KV cache on the CPU; see decode_attention_cpu.h for the contract.
//
// Per (group, KV head): the group's query rows (members x Hq/Hkv, pre-scaled), up to 16 at a time in
// the lanes of one vector, meet the shared prefix key by key, so each prefix key and value is loaded
// once for those rows (once for the group when it has at most 16 rows, the debate case: 5 agents x
// GQA 3); then each member's rows continue over its own tokens. The softmax is online (Milakov &
// Gimelshein 2018): per row a running max m, sum l = sum_j e^(s_j - m) and acc = sum_j e^(s_j - m) v_j;
// a chunk of keys with max m' > m rescales l and acc by e^(m - m') first. At the end o = acc / l and
// lse = m + log(l) (natural log); a row with no keys gives o = 0, lse = -inf.
#include "decode_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
// One build runs everywhere: the kernel is compiled for the x86-64 levels v4 (AVX-512), v3 (AVX2 and
// FMA) and the baseline, and each call runs the widest level the CPU has (or the one asked for). The
// levels are spelled as the feature lists the kernel uses, which every GCC >= 6 and clang know (the
// "arch=x86-64-v3" names need GCC 11 / 12), and exactly those features are checked at run time.
#define ARKFAST_X86_LEVELS 1
#define ARKFAST_V3_FEATURES "avx,avx2,bmi,bmi2,fma"
#define ARKFAST_V4_FEATURES ARKFAST_V3_FEATURES ",avx512f,avx512bw,avx512cd,avx512dq,avx512vl"
#endif

namespace arkfast {
namespace {

[[noreturn]] void invalid(const std::string& what) { throw std::invalid_argument(what); }

// Checks the plan once per call (cheap next to the attention itself): group offsets, each sequence in
// exactly one group, prefix and sequence lengths within the table. Block ids are checked as read.
void check_plan(const int32_t* seq_lens, const int32_t* offsets, const int32_t* members,
                const int32_t* prefix_lens, const DecodeShape& s) {
  if (s.block_size <= 0 || s.head_dim <= 0 || s.num_kv_heads <= 0 || s.num_q_heads % s.num_kv_heads) {
    invalid("block_size, head_dim and KV heads must be positive and divide the query heads");
  }
  const int64_t capacity = s.table_width * s.block_size;
  for (int64_t b = 0; b < s.batch; ++b) {
    if (seq_lens[b] < 0 || seq_lens[b] > capacity) {
      invalid("seq_lens[" + std::to_string(b) + "] = " + std::to_string(seq_lens[b]) + " is outside [0, " +
              std::to_string(capacity) + "] (table width x block size)");
    }
  }
  if (s.num_groups < 0 || offsets[0] != 0 || offsets[s.num_groups] != s.batch) {
    invalid("group offsets must run from 0 to the batch size");
  }
  std::vector<char> seen(static_cast<size_t>(s.batch), 0);
  for (int64_t g = 0; g < s.num_groups; ++g) {
    if (offsets[g + 1] < offsets[g]) invalid("group offsets must be non-decreasing");
    for (int32_t i = offsets[g]; i < offsets[g + 1]; ++i) {
      const int32_t b = members[i];
      if (b < 0 || b >= s.batch || seen[b]) {
        invalid("group members must list every sequence exactly once (bad member " + std::to_string(b) + ")");
      }
      seen[b] = 1;
      if (prefix_lens[g] < 0 || prefix_lens[g] > seq_lens[b]) {
        invalid("prefix_lens[" + std::to_string(g) + "] = " + std::to_string(prefix_lens[g]) +
                " must be in [0, seq_lens[b]] for every member b (sequence " + std::to_string(b) + " has " +
                std::to_string(seq_lens[b]) + ")");
      }
    }
  }
}

// W query rows of T in one GCC vector, lowered to what the clone's ISA has (16 fp32 rows: one zmm on
// AVX-512, two ymm on AVX2, four xmm otherwise).
template <typename T, int W>
struct LanesOf {
  typedef T type __attribute__((vector_size(W * sizeof(T))));
};
template <typename T, int W>
using Lanes = typename LanesOf<T, W>::type;
template <int W>
using LanesI = typename LanesOf<int32_t, W>::type;

// e^x lane by lane, for the softmax. fp32: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2 (ln2 split
// in two, so n ln2 is exact in fp32 for |n| <= 128; n rounded to nearest by adding and removing 1.5 x
// 2^23), e^r by Cephes' degree-5 minimax polynomial (relative error ~1e-7, about 1 ulp), then 2^n built
// in the exponent bits; written in vector operations because std::exp does not vectorise. Inputs here
// are s - max <= 0 or -inf; below -87.3 (where e^x leaves fp32's normal range) the result is 0.
// float64 (the caches of a float64 model, tests of the maths): the correctly rounded exp per lane.
template <typename T, int W>
inline __attribute__((always_inline)) Lanes<T, W> exp_lanes(Lanes<T, W> x) {
  if constexpr (std::is_same_v<T, float>) {
    const Lanes<T, W> c = x < -87.3f ? -87.3f : x;
    const Lanes<T, W> n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const Lanes<T, W> r = c - n * 0.693359375f + n * 2.12194440e-4f;
    Lanes<T, W> p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const LanesI<W> bits = (__builtin_convertvector(n, LanesI<W>) + 127) << 23;
    const Lanes<T, W> e = p * reinterpret_cast<const Lanes<T, W>&>(bits);
    return x < -87.3f ? 0.0f : e;
  } else {
    for (int w = 0; w < W; ++w) x[w] = std::exp(x[w]);
    return x;
  }
}

constexpr int kChunk = 16;  // keys scored together: the max, and the rescale of the accumulators, per chunk

// Rows [0, nr) (nr <= W) of q (pre-scaled, row-major [nr, D]) attend to tokens [t0, t1) read through
// `table` (one row of the block tables), KV head h; their online-softmax states m [nr], l [nr], acc [nr,
// D] (row-major) are read, updated and written back. Inside, everything is vectorised across the rows,
// one lane a row: the queries transposed to qt [D] x W lanes, a key's score for all rows is D FMAs of
// qt[d] with the broadcast k[d], the max and the exps are lane-wise, and P V is D FMAs of the weights
// with the broadcast v[d] into acct [D] x W lanes. No horizontal sums, no transposed K.
template <typename T, int D, int W>
inline __attribute__((always_inline)) void attend_rows(const T* q, int nr, T* m, T* l, T* acc, const T* k_cache,
                                                       const T* v_cache, const int32_t* table, int64_t t0,
                                                       int64_t t1, int64_t h, const DecodeShape& s) {
  using V = Lanes<T, W>;
  const int64_t bs = s.block_size, stride = s.num_kv_heads * D;  // elements per token
  const T neg_inf = -std::numeric_limits<T>::infinity();
  V qt[D], acct[D], vm, vl;
  for (int d = 0; d < D; ++d) {
    qt[d] = V{};
    acct[d] = V{};
  }
  vm = V{} + neg_inf;
  vl = V{};
  for (int w = 0; w < nr; ++w) {
    for (int d = 0; d < D; ++d) {
      qt[d][w] = q[w * D + d];
      acct[d][w] = acc[w * D + d];
    }
    vm[w] = m[w];
    vl[w] = l[w];
  }
  const T* keys[kChunk];
  for (int64_t blk = t0 / bs; blk * bs < t1; ++blk) {
    const int32_t id = table[blk];
    if (id < 0 || id >= s.num_blocks) {
      invalid("block table entry " + std::to_string(id) + " (table column " + std::to_string(blk) +
              ") is outside [0, " + std::to_string(s.num_blocks) + ")");
    }
    const int64_t block_end = std::min(t1, (blk + 1) * bs);
    for (int64_t j0 = std::max(t0, blk * bs); j0 < block_end; j0 += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, block_end - j0));
      const int64_t base = (static_cast<int64_t>(id) * bs + (j0 - blk * bs)) * stride + h * D;
      // Keys past n repeat the first (in bounds, finite when written); their scores are dropped.
      for (int j = 0; j < kChunk; ++j) keys[j] = k_cache + base + (j < n ? j : 0) * stride;
      V sc[kChunk];
      for (int j = 0; j < kChunk; ++j) sc[j] = V{};
      for (int d = 0; d < D; ++d) {
        for (int j = 0; j < kChunk; ++j) sc[j] += qt[d] * keys[j][d];
      }
      V mx = vm;
      for (int j = 0; j < n; ++j) mx = mx > sc[j] ? mx : sc[j];
      // The running max moves from m to mx: what was summed so far is rescaled by e^(m - mx) (0 where
      // m = -inf, before the first key; mx is finite, the chunk has >= 1 key).
      const V corr = exp_lanes<T, W>(vm - mx);
      vl *= corr;
      for (int d = 0; d < D; ++d) acct[d] *= corr;
      const T* vb = v_cache + base;
      for (int j = 0; j < n; ++j) {
        const V p = exp_lanes<T, W>(sc[j] - mx);
        const T* vj = vb + j * stride;
        vl += p;
        for (int d = 0; d < D; ++d) acct[d] += p * vj[d];
      }
      vm = mx;
    }
  }
  for (int w = 0; w < nr; ++w) {
    for (int d = 0; d < D; ++d) acc[w * D + d] = acct[d][w];
    m[w] = vm[w];
    l[w] = vl[w];
  }
}

// Rows [0, R) in chunks of 16, 8 or 4 lanes (the narrowest that holds what is left: GQA's few rows per
// sequence do not pay for 16 lanes).
template <typename T, int D>
inline __attribute__((always_inline)) void attend(const T* q, int64_t R, T* m, T* l, T* acc, const T* k_cache,
                                                  const T* v_cache, const int32_t* table, int64_t t0, int64_t t1,
                                                  int64_t h, const DecodeShape& s) {
  for (int64_t r = 0; r < R;) {
    const int nr = static_cast<int>(std::min<int64_t>(16, R - r));
    if (nr > 8) {
      attend_rows<T, D, 16>(q + r * D, nr, m + r, l + r, acc + r * D, k_cache, v_cache, table, t0, t1, h, s);
    } else if (nr > 4) {
      attend_rows<T, D, 8>(q + r * D, nr, m + r, l + r, acc + r * D, k_cache, v_cache, table, t0, t1, h, s);
    } else {
      attend_rows<T, D, 4>(q + r * D, nr, m + r, l + r, acc + r * D, k_cache, v_cache, table, t0, t1, h, s);
    }
    r += nr;
  }
}

template <typename T, int D>
inline __attribute__((always_inline)) void run_d(const T* q, const T* k_cache, const T* v_cache,
                                               const int32_t* block_tables, const int32_t* seq_lens,
                                               const int32_t* offsets, const int32_t* members,
                                               const int32_t* prefix_lens, const DecodeShape& s, T scale, T* out,
                                               T* lse) {
  const int64_t Hq = s.num_q_heads, Hkv = s.num_kv_heads, gqa = Hq / Hkv;
  int64_t most = 0;
  for (int64_t g = 0; g < s.num_groups; ++g) most = std::max<int64_t>(most, offsets[g + 1] - offsets[g]);
  const int64_t max_rows = most * gqa;
  std::vector<T> qbuf(max_rows * D), acc(max_rows * D), m(max_rows), l(max_rows);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t g = 0; g < s.num_groups; ++g) {
    const int32_t* mem = members + offsets[g];
    const int64_t M = offsets[g + 1] - offsets[g], R = M * gqa, prefix = prefix_lens[g];
    if (M == 0) continue;
    for (int64_t h = 0; h < Hkv; ++h) {
      // Row i * gqa + j is member i's query head h * gqa + j: a member's rows are contiguous.
      for (int64_t i = 0; i < M; ++i) {
        const T* src = q + (static_cast<int64_t>(mem[i]) * Hq + h * gqa) * D;
        for (int64_t e = 0; e < gqa * D; ++e) qbuf[i * gqa * D + e] = src[e] * scale;
      }
      std::fill_n(m.begin(), R, neg_inf);
      std::fill_n(l.begin(), R, T(0));
      std::fill_n(acc.begin(), R * D, T(0));
      if (prefix > 0) {
        attend<T, D>(qbuf.data(), R, m.data(), l.data(), acc.data(), k_cache, v_cache,
                     block_tables + static_cast<int64_t>(mem[0]) * s.table_width, 0, prefix, h, s);
      }
      for (int64_t i = 0; i < M; ++i) {
        const int64_t b = mem[i];
        if (seq_lens[b] > prefix) {
          attend<T, D>(qbuf.data() + i * gqa * D, gqa, m.data() + i * gqa, l.data() + i * gqa,
                       acc.data() + i * gqa * D, k_cache, v_cache, block_tables + b * s.table_width, prefix,
                       seq_lens[b], h, s);
        }
        for (int64_t j = 0; j < gqa; ++j) {
          const int64_t r = i * gqa + j, hq = h * gqa + j;
          T* o = out + (b * Hq + hq) * D;
          const T inv = l[r] > 0 ? T(1) / l[r] : T(0);
          for (int64_t d = 0; d < D; ++d) o[d] = acc[r * D + d] * inv;
          if (lse != nullptr) lse[b * Hq + hq] = l[r] > 0 ? m[r] + std::log(l[r]) : neg_inf;
        }
      }
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void run(const T* q, const T* k_cache, const T* v_cache,
                                               const int32_t* block_tables, const int32_t* seq_lens,
                                               const int32_t* offsets, const int32_t* members,
                                               const int32_t* prefix_lens, const DecodeShape& s, T scale, T* out,
                                               T* lse) {
  check_plan(seq_lens, offsets, members, prefix_lens, s);
  switch (s.head_dim) {
#define ARKFAST_HEAD_DIM(D)                                                                                \
  case D:                                                                                                  \
    return run_d<T, D>(q, k_cache, v_cache, block_tables, seq_lens, offsets, members, prefix_lens, s, scale, \
                       out, lse);
    ARKFAST_HEAD_DIM(16)
    ARKFAST_HEAD_DIM(32)
    ARKFAST_HEAD_DIM(64)
    ARKFAST_HEAD_DIM(128)
    ARKFAST_HEAD_DIM(256)
#undef ARKFAST_HEAD_DIM
    default:
      invalid("head_dim must be 16, 32, 64, 128 or 256, got " + std::to_string(s.head_dim));
  }
}

#ifdef ARKFAST_X86_LEVELS
template <typename T>
__attribute__((target(ARKFAST_V4_FEATURES))) void run_v4(const T* q, const T* k, const T* v, const int32_t* bt,
                                                       const int32_t* sl, const int32_t* of, const int32_t* mb,
                                                       const int32_t* pl, const DecodeShape& s, T sc, T* o, T* lse) {
  run(q, k, v, bt, sl, of, mb, pl, s, sc, o, lse);
}
template <typename T>
__attribute__((target(ARKFAST_V3_FEATURES))) void run_v3(const T* q, const T* k, const T* v, const int32_t* bt,
                                                       const int32_t* sl, const int32_t* of, const int32_t* mb,
                                                       const int32_t* pl, const DecodeShape& s, T sc, T* o, T* lse) {
  run(q, k, v, bt, sl, of, mb, pl, s, sc, o, lse);
}
#endif

template <typename T>
void dispatch(const T* q, const T* k, const T* v, const int32_t* bt, const int32_t* sl, const int32_t* of,
              const int32_t* mb, const int32_t* pl, const DecodeShape& s, T sc, T* o, T* lse, int level) {
  const int best = best_cpu_level();
  if (level == 0) level = best;
  if (level != 1 && level != 3 && level != 4) {
    invalid("level must be 0 (the best), 1, 3 or 4, got " + std::to_string(level));
  }
  if (level > best) {
    invalid("this CPU runs x86-64 level " + std::to_string(best) + " at most, asked for " + std::to_string(level));
  }
#ifdef ARKFAST_X86_LEVELS
  if (level == 4) return run_v4(q, k, v, bt, sl, of, mb, pl, s, sc, o, lse);
  if (level == 3) return run_v3(q, k, v, bt, sl, of, mb, pl, s, sc, o, lse);
#endif
  run(q, k, v, bt, sl, of, mb, pl, s, sc, o, lse);
}

}  // namespace

int best_cpu_level() {
#ifdef ARKFAST_X86_LEVELS
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
  if (v4) return 4;
  if (v3) return 3;
#endif
  return 1;
}

void paged_decode_attention_cpu(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, const int32_t* offsets,
                                const int32_t* members, const int32_t* prefix_lens, const DecodeShape& shape,
                                float scale, float* out, float* lse, int level) {
  dispatch(q, k_cache, v_cache, block_tables, seq_lens, offsets, members, prefix_lens, shape, scale, out, lse,
           level);
}

void paged_decode_attention_cpu(const double* q, const double* k_cache, const double* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, const int32_t* offsets,
                                const int32_t* members, const int32_t* prefix_lens, const DecodeShape& shape,
                                double scale, double* out, double* lse, int level) {
  dispatch(q, k_cache, v_cache, block_tables, seq_lens, offsets, members, prefix_lens, shape, scale, out, lse,
           level);
}

}  // namespace arkfast
