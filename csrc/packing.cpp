#include "packing.h"

#include <algorithm>
#include <functional>
#include <set>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace arkfast {
namespace {

// The visit order: indices by (length descending, index ascending), and their lengths in that order
// (kept alongside so the packing loop reads lengths sequentially instead of gathering them).
struct Order {
  std::vector<int64_t> index;   // [n]
  std::vector<int64_t> length;  // [n], non-increasing
};

Order decreasing_order(const int64_t* lengths, int64_t n, int64_t capacity, bool counting) {
  Order order{std::vector<int64_t>(n), std::vector<int64_t>(n)};
  if (counting) {
    // Counting sort over the length values: O(n + capacity) and stable, so equal lengths keep
    // ascending index order. Bucket c holds length capacity - c, i.e. lengths descend.
    std::vector<int64_t> start(capacity + 2, 0);
    for (int64_t i = 0; i < n; ++i) ++start[capacity - lengths[i] + 1];
    for (int64_t c = 1; c <= capacity + 1; ++c) start[c] += start[c - 1];
    for (int64_t c = 0; c <= capacity; ++c) {
      std::fill(order.length.begin() + start[c], order.length.begin() + start[c + 1], capacity - c);
    }
    for (int64_t i = 0; i < n; ++i) order.index[start[capacity - lengths[i]]++] = i;
  } else {
    std::vector<std::pair<int64_t, int64_t>> keys(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = {-lengths[i], i};
    std::sort(keys.begin(), keys.end());
    for (int64_t k = 0; k < n; ++k) {
      order.length[k] = -keys[k].first;
      order.index[k] = keys[k].second;
    }
  }
  return order;
}

// The set of integers in [0, universe) with successor queries, as a 64-ary tree of bitmaps:
// bit j of levels[l + 1] is set iff word j of levels[l] is non-zero. O(log64 universe) per call.
class BitTree {
 public:
  explicit BitTree(int64_t universe) {
    int64_t words = (universe + 63) / 64;
    while (true) {
      levels_.emplace_back(std::max<int64_t>(words, 1), 0);
      if (words <= 1) break;
      words = (words + 63) / 64;
    }
  }
  void insert(int64_t x) {
    for (auto& level : levels_) {
      const uint64_t before = level[x >> 6];
      level[x >> 6] = before | (uint64_t{1} << (x & 63));
      if (before != 0) return;  // the levels above already mark this word
      x >>= 6;
    }
  }
  void erase(int64_t x) {
    for (auto& level : levels_) {
      level[x >> 6] &= ~(uint64_t{1} << (x & 63));
      if (level[x >> 6] != 0) return;
      x >>= 6;
    }
  }
  // The smallest member >= x, or -1.
  int64_t next(int64_t x) const {
    size_t l = 0;
    while (true) {  // climb until a word has a member at or after x's position
      if (l == levels_.size() || (x >> 6) >= static_cast<int64_t>(levels_[l].size())) return -1;
      const uint64_t bits = levels_[l][x >> 6] & (~uint64_t{0} << (x & 63));
      if (bits != 0) {
        x = (x & ~int64_t{63}) | __builtin_ctzll(bits);
        break;
      }
      x = (x >> 6) + 1;
      ++l;
    }
    while (l > 0) {  // descend to the lowest member under that word
      --l;
      x = (x << 6) | __builtin_ctzll(levels_[l][x]);
    }
    return x;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// Open bins with room left, for capacity up to a few million: bucket r holds the bins with r free
// slots as a min-heap of bin ids, and a BitTree marks the non-empty buckets. The best fit for `len`
// is the earliest bin of the first non-empty bucket at or after `len`.
class BucketIndex {
 public:
  explicit BucketIndex(int64_t capacity) : nonempty_(capacity + 1), heaps_(capacity + 1) {}
  bool take(int64_t len, int64_t* remaining, int64_t* bin) {
    const int64_t r = nonempty_.next(len);
    if (r < 0) return false;
    auto& heap = heaps_[r];
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    *remaining = r;
    *bin = heap.back();
    heap.pop_back();
    if (heap.empty()) nonempty_.erase(r);
    return true;
  }
  void put(int64_t remaining, int64_t bin) {
    auto& heap = heaps_[remaining];
    if (heap.empty()) nonempty_.insert(remaining);
    heap.push_back(bin);
    std::push_heap(heap.begin(), heap.end(), std::greater<>());
  }

 private:
  BitTree nonempty_;
  std::vector<std::vector<int64_t>> heaps_;
};

// The same for any capacity: an ordered set of (remaining, bin id).
class SetIndex {
 public:
  bool take(int64_t len, int64_t* remaining, int64_t* bin) {
    auto it = open_.lower_bound({len, -1});
    if (it == open_.end()) return false;
    std::tie(*remaining, *bin) = *it;
    open_.erase(it);
    return true;
  }
  void put(int64_t remaining, int64_t bin) { open_.emplace(remaining, bin); }

 private:
  std::set<std::pair<int64_t, int64_t>> open_;
};

// Packs the items in visit order: returns the bin of the k-th visited item [n] and fills out.totals.
// Full bins (no room left) leave the index, and `first_full` remembers the earliest of them: best
// fit puts a zero-length item there (remaining 0 is the least remaining space), so the index never
// holds a full bin.
template <class Index>
std::vector<int64_t> assign(const std::vector<int64_t>& visit_lengths, int64_t capacity, Index& open,
                            BinPacking& out) {
  std::vector<int64_t> visit_bin(visit_lengths.size());
  int64_t first_full = -1;
  for (size_t k = 0; k < visit_lengths.size(); ++k) {
    const int64_t len = visit_lengths[k];
    int64_t bin, remaining;
    if (len == 0 && first_full >= 0) {
      bin = first_full;
    } else {
      if (!open.take(std::max<int64_t>(len, 1), &remaining, &bin)) {
        bin = static_cast<int64_t>(out.totals.size());
        remaining = capacity;
        out.totals.push_back(0);
      }
      remaining -= len;
      if (remaining > 0) {
        open.put(remaining, bin);
      } else if (first_full < 0 || bin < first_full) {
        first_full = bin;
      }
    }
    out.totals[bin] += len;
    visit_bin[k] = bin;
  }
  return visit_bin;
}

}  // namespace

BinPacking best_fit_decreasing(const int64_t* lengths, int64_t n, int64_t capacity) {
  // The Python caller validates with messages naming the bad value; this re-check (one sequential
  // pass) only keeps a direct call from indexing out of bounds.
  if (capacity <= 0) throw std::invalid_argument("capacity must be positive");
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 0 || lengths[i] > capacity) {
      throw std::invalid_argument("lengths must lie in [0, capacity]");
    }
  }
  BinPacking out;
  // Per-value tables (counting sort, buckets: O(capacity) memory and set-up) when they cost no more
  // than the items themselves; else comparison sort and an ordered set.
  const bool small_capacity = capacity <= 4 * n;
  const Order order = decreasing_order(lengths, n, capacity, small_capacity);
  std::vector<int64_t> visit_bin;  // [n]
  if (small_capacity) {
    BucketIndex open(capacity);
    visit_bin = assign(order.length, capacity, open, out);
  } else {
    SetIndex open;
    visit_bin = assign(order.length, capacity, open, out);
  }

  // Group by bin, keeping insertion (visit) order inside each bin: a stable counting sort on the bin.
  const int64_t num_bins = static_cast<int64_t>(out.totals.size());
  out.offsets.assign(num_bins + 1, 0);
  for (int64_t k = 0; k < n; ++k) ++out.offsets[visit_bin[k] + 1];
  for (int64_t b = 0; b < num_bins; ++b) out.offsets[b + 1] += out.offsets[b];
  std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  out.items.resize(n);
  out.bin_of.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    out.items[cursor[visit_bin[k]]++] = order.index[k];
    out.bin_of[order.index[k]] = visit_bin[k];
  }
  return out;
}

}  // namespace arkfast
