// The pocketlm._core extension: one module, one binding file per subsystem.
#include <nanobind/nanobind.h>
#include "common.h"

namespace nb = nanobind;

void bind_bundle(nb::module_& m);
void bind_kernels(nb::module_& m);
void bind_executor(nb::module_& m);

namespace {
PyObject* g_bundle_error = nullptr;
PyObject* g_context_error = nullptr;
PyObject* g_unsupported_error = nullptr;
}  // namespace

NB_MODULE(_core, m) {
  // C++ errors become pocketlm.errors exceptions with the C++ message.
  nb::module_ errors = nb::module_::import_("pocketlm.errors");
  g_bundle_error = errors.attr("BundleError").ptr();
  g_context_error = errors.attr("ContextOverflowError").ptr();
  g_unsupported_error = errors.attr("UnsupportedModelError").ptr();
  Py_INCREF(g_bundle_error);
  Py_INCREF(g_context_error);
  Py_INCREF(g_unsupported_error);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const plm::BundleError& e) {
      PyErr_SetString(g_bundle_error, e.what());
    } catch (const plm::ContextOverflowError& e) {
      PyErr_SetString(g_context_error, e.what());
    } catch (const plm::UnsupportedError& e) {
      PyErr_SetString(g_unsupported_error, e.what());
    }
  });
  bind_bundle(m);
  bind_kernels(m);
  bind_executor(m);
}
