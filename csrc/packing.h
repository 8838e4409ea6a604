#pragma once
// Best-fit-decreasing bin packing of sequence lengths into fixed-capacity rows.
#include <cstdint>
#include <vector>

namespace arkfast {

// The result in compressed-sparse-row form, B = number of bins:
//   items[offsets[b] : offsets[b + 1]]  the indices packed into bin b, in insertion order  [n], [B + 1]
//   bin_of[i]                           the bin holding index i                            [n]
//   totals[b]                           the sum of the lengths in bin b (<= capacity)      [B]
// Bins are numbered in the order they were opened.
struct BinPacking {
  std::vector<int64_t> items;
  std::vector<int64_t> offsets;
  std::vector<int64_t> bin_of;
  std::vector<int64_t> totals;
};

// Best-fit-decreasing: visit items by length descending, ties by index ascending; put each into the
// open bin with the least remaining space that still fits it (ties: the bin opened first), else open
// a new bin. O(n log n) (O(n log64 capacity) when capacity <= 4n). Throws std::invalid_argument
// unless capacity > 0 and 0 <= lengths[i] <= capacity (the Python caller checks these first, naming
// the bad value). Touches no Python state, so it may run with the GIL released.
BinPacking best_fit_decreasing(const int64_t* lengths, int64_t n, int64_t capacity);

}  // namespace arkfast
