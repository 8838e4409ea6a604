#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "packing.h"
PYBIND11_MODULE(_C, m) { m.doc() = "arkfast host-side hot loops"; }
