// The backends this build has. The CPU backend is always built; another is a folder next to
// cpu/, a CMake option that adds its sources and defines PLM_<NAME>, and a case here.
#include "backends/cpu/cpu_backend.h"
#include "runtime/backend.h"

namespace plm {

std::unique_ptr<Backend> make_backend(const Program::Impl& program, const BackendOptions& options) {
  return std::make_unique<cpu::CpuBackend>(program, options);
}

}  // namespace plm
