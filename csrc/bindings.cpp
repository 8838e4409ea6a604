// Thin pybind11 bindings for arkfast._C. Inputs are validated in Python (arkfast/packing.py); here
// only the array type is enforced (contiguous int64, no implicit conversion).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "decode_attention_cpu.h"
#include "packing.h"

namespace py = pybind11;

namespace {

// Hand a vector's buffer to numpy without copying: the array owns the moved-in vector.
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& values) {
  auto* owned = new std::vector<int64_t>(std::move(values));
  py::capsule free_when_done(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>(static_cast<py::ssize_t>(owned->size()), owned->data(), free_when_done);
}

py::tuple best_fit_decreasing(const py::array_t<int64_t, py::array::c_style>& lengths, int64_t capacity) {
  if (lengths.ndim() != 1) throw py::value_error("lengths must be a 1-D array");
  const int64_t* data = lengths.data();
  const int64_t n = static_cast<int64_t>(lengths.shape(0));
  arkfast::BinPacking packed;
  {
    py::gil_scoped_release no_gil;
    packed = arkfast::best_fit_decreasing(data, n, capacity);
  }
  return py::make_tuple(to_numpy(std::move(packed.items)), to_numpy(std::move(packed.offsets)),
                        to_numpy(std::move(packed.bin_of)), to_numpy(std::move(packed.totals)));
}

// Pauses Python's cyclic garbage collector for a scope. The lists built below hold only ints, so
// they can form no cycle; yet each allocation counts towards the collector's thresholds, and with
// 1e5 bins the full collections it triggers cost ~10x the building itself.
class GcPause {
 public:
  GcPause() : was_enabled_(PyGC_Disable()) {}
  ~GcPause() {
    if (was_enabled_) PyGC_Enable();
  }
  GcPause(const GcPause&) = delete;
  GcPause& operator=(const GcPause&) = delete;

 private:
  int was_enabled_;
};

// Split a CSR packing into Python lists: [items[offsets[b]:offsets[b+1]] for b in bins].
py::list bins_to_lists(const py::array_t<int64_t, py::array::c_style>& items,
                       const py::array_t<int64_t, py::array::c_style>& offsets) {
  if (items.ndim() != 1 || offsets.ndim() != 1 || offsets.shape(0) < 1) {
    throw py::value_error("items and offsets must be 1-D, offsets with at least one entry");
  }
  const int64_t* it = items.data();
  const int64_t* off = offsets.data();
  const py::ssize_t num_bins = offsets.shape(0) - 1;
  if (off[0] < 0 || off[num_bins] > items.shape(0)) throw py::value_error("offsets out of range");
  GcPause no_gc;
  py::list bins(num_bins);
  for (py::ssize_t b = 0; b < num_bins; ++b) {
    if (off[b + 1] < off[b]) throw py::value_error("offsets must be non-decreasing");
    PyObject* bin = PyList_New(off[b + 1] - off[b]);
    if (bin == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(bins.ptr(), b, bin);  // owned by `bins` from here on, even if we throw below
    for (int64_t k = off[b]; k < off[b + 1]; ++k) {
      PyObject* index = PyLong_FromLongLong(it[k]);
      if (index == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(bin, k - off[b], index);
    }
  }
  return bins;
}

template <typename T>
using CArray = py::array_t<T, py::array::c_style>;

// Shapes are checked here, against each other, so that no plan can make the kernel read or write
// outside the arrays it is given (block ids are checked inside, as they are read).
template <typename T>
void decode_attention_cpu(const CArray<T>& q, const CArray<T>& k_cache, const CArray<T>& v_cache,
                          const CArray<int32_t>& block_tables, const CArray<int32_t>& seq_lens,
                          const CArray<int32_t>& offsets, const CArray<int32_t>& members,
                          const CArray<int32_t>& prefix_lens, double scale, CArray<T>& out,
                          std::optional<CArray<T>> lse, int level) {
  if (q.ndim() != 3 || k_cache.ndim() != 4 || block_tables.ndim() != 2) {
    throw py::value_error("q must be [B, Hq, D], the caches [num_blocks, block_size, Hkv, D], block_tables [B, W]");
  }
  arkfast::DecodeShape s{q.shape(0), q.shape(1), k_cache.shape(2), q.shape(2), k_cache.shape(0),
                         k_cache.shape(1), block_tables.shape(1), prefix_lens.shape(0)};
  auto same = [](const py::array& a, std::initializer_list<py::ssize_t> shape) {
    if (a.ndim() != static_cast<py::ssize_t>(shape.size())) return false;
    py::ssize_t i = 0;
    for (py::ssize_t n : shape) {
      if (a.shape(i++) != n) return false;
    }
    return true;
  };
  if (!same(v_cache, {s.num_blocks, s.block_size, s.num_kv_heads, s.head_dim}) || k_cache.shape(3) != s.head_dim ||
      block_tables.shape(0) != s.batch || !same(seq_lens, {s.batch}) || !same(members, {s.batch}) ||
      !same(offsets, {s.num_groups + 1}) || !same(out, {s.batch, s.num_q_heads, s.head_dim}) ||
      (lse && !same(*lse, {s.batch, s.num_q_heads}))) {
    throw py::value_error("decode_attention_cpu: inconsistent shapes");
  }
  T* lse_ptr = lse ? lse->mutable_data() : nullptr;
  T* out_ptr = out.mutable_data();
  py::gil_scoped_release no_gil;
  arkfast::paged_decode_attention_cpu(q.data(), k_cache.data(), v_cache.data(), block_tables.data(), seq_lens.data(),
                                      offsets.data(), members.data(), prefix_lens.data(), s, static_cast<T>(scale),
                                      out_ptr, lse_ptr, level);
}

template <typename T>
void def_decode_attention_cpu(py::module_& m, const char* doc) {
  m.def("decode_attention_cpu", &decode_attention_cpu<T>, py::arg("q").noconvert(), py::arg("k_cache").noconvert(),
        py::arg("v_cache").noconvert(), py::arg("block_tables").noconvert(), py::arg("seq_lens").noconvert(),
        py::arg("offsets").noconvert(), py::arg("members").noconvert(), py::arg("prefix_lens").noconvert(),
        py::arg("scale"), py::arg("out").noconvert(), py::arg("lse").noconvert() = py::none(), py::arg("level") = 0, doc);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "arkfast host-side hot loops";
  m.def("best_fit_decreasing", &best_fit_decreasing, py::arg("lengths").noconvert(), py::arg("capacity"),
        R"doc(Best-fit-decreasing packing of ``lengths`` (contiguous int64 [n], each in [0, capacity]).

Returns ``(items [n], offsets [B+1], bin_of [n], totals [B])``, all int64 numpy arrays: bin ``b``
holds ``items[offsets[b]:offsets[b+1]]`` in insertion order. Out-of-range values raise a bare
ValueError: use ``arkfast.packing.pack`` / ``pack_bins``, which name them. Releases the GIL.)doc");
  m.def("bins_to_lists", &bins_to_lists, py::arg("items").noconvert(), py::arg("offsets").noconvert(),
        "Split CSR bins (items [n], offsets [B+1], int64) into a list of lists of Python ints.");
  const char* decode_doc = R"doc(One decode step's attention over a paged KV cache, in place into ``out``.

``q [B, Hq, D]``, ``k_cache``/``v_cache [num_blocks, block_size, Hkv, D]``, ``out [B, Hq, D]``, ``lse
[B, Hq]`` (optional; natural log, -inf for a sequence with no keys): all float32, or all float64.
``block_tables [B, W]``, ``seq_lens [B]``, and the groups as CSR, ``offsets [G + 1]``, ``members [B]``,
``prefix_lens [G]``: int32. Group g's members ``members[offsets[g]:offsets[g + 1]]`` share tokens
``[0, prefix_lens[g])``, read once through the first member's table row. All C-contiguous, no implicit
conversion; an inconsistent plan raises ValueError. ``level``: the x86-64 ISA level to run (1, 3 = AVX2
+ FMA, 4 = AVX-512; 0, the default: ``best_cpu_level()``). Use ``arkfast.engine.cpu_attention``, which builds
the plan and names bad values. Releases the GIL.)doc";
  def_decode_attention_cpu<float>(m, decode_doc);
  def_decode_attention_cpu<double>(m, decode_doc);
  m.def("best_cpu_level", &arkfast::best_cpu_level,
        "The highest x86-64 ISA level (1, 3 = AVX2 + FMA, 4 = AVX-512) decode_attention_cpu runs on this CPU.");
}
