#include <nanobind/nanobind.h>
namespace nb = nanobind;
void bind_executor(nb::module_& m) {}
