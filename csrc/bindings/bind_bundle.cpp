#include <nanobind/nanobind.h>
namespace nb = nanobind;
void bind_bundle(nb::module_& m) {}
