// Thin pybind11 bindings for arkfast._C. Inputs are validated in Python (arkfast/packing.py); here
// only the array type is enforced (contiguous int64, no implicit conversion).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <utility>
#include <vector>

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
}
