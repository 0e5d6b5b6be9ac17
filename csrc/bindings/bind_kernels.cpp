#include <nanobind/nanobind.h>
namespace nb = nanobind;
void bind_kernels(nb::module_& m) {}
