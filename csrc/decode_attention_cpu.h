// Decode attention over a paged KV cache on the CPU, reading each shared prefix once per group.
#pragma once

#include <cstdint>

namespace arkfast {

// One decode step of B sequences, one query token each. Shapes (row-major, contiguous):
//   q [B, Hq, D], out [B, Hq, D], lse [B, Hq] (may be null), k_cache / v_cache [num_blocks,
//   block_size, Hkv, D], block_tables [B, width] int32, seq_lens [B] int32.
// Groups, as CSR: group g's members are members[offsets[g] : offsets[g + 1]] (every sequence in
// exactly one group); its first prefix_lens[g] tokens are shared by all members and read once,
// through the first member's table row; each member then reads its own tokens [prefix, seq_len).
// Softmax state is kept online per query row (running max m, sum l, weighted values acc), so the
// prefix and the suffix are one pass over the keys: no partial states to merge.
// Accumulation is in T (float for fp32 caches, double for float64). `level`: the x86-64 ISA level
// to run (1 the baseline, 3 AVX2 + FMA, 4 AVX-512; 0 the best this CPU has, best_cpu_level()).
// Throws std::invalid_argument on an inconsistent plan, a block id outside [0, num_blocks), or a
// level this CPU cannot run.
struct DecodeShape {
  int64_t batch, num_q_heads, num_kv_heads, head_dim, num_blocks, block_size, table_width, num_groups;
};

void paged_decode_attention_cpu(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, const int32_t* offsets,
                                const int32_t* members, const int32_t* prefix_lens, const DecodeShape& shape,
                                float scale, float* out, float* lse, int level = 0);

void paged_decode_attention_cpu(const double* q, const double* k_cache, const double* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, const int32_t* offsets,
                                const int32_t* members, const int32_t* prefix_lens, const DecodeShape& shape,
                                double scale, double* out, double* lse, int level = 0);

// The highest x86-64 ISA level (1, 3 or 4) the kernel has a build for and this CPU runs; 1 off x86.
int best_cpu_level();

}  // namespace arkfast
