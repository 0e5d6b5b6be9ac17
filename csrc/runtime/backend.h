// A backend runs a validated Program (program.h): what it means is the runtime's, how it runs is
// the backend's. The CPU backend (backends/cpu/) is always built; another (Vulkan, an NPU) is a
// new folder under backends/ with this interface, a CMake option, and a case in make_backend.
//
// A Program makes its backend first, asks supports() for every op while validating, then calls
// prepare() once. A State asks workspace_bytes() and reserve() (under the Program's step mutex, so
// run() never allocates) and allocate_kv() for its cache. run() executes one step, under the step
// mutex: one step at a time per backend.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/executor.h"
#include "runtime/kv_cache.h"
#include "runtime/ops.h"

namespace plm {

struct Tensor;
struct StepRows;

// Bytes of the workspace a step runs on, for a State of some max_context.
struct WorkspaceBytes {
  int64_t arena = 0;    // activations, as planned (Program's arena_bytes)
  int64_t scratch = 0;  // the ops' own scratch
};

struct BackendOptions {
  std::string kernels;      // a variant name, "" = the best for this machine
  std::string activations;  // how quantized matmuls see their inputs: "int8" or "int8x2"
  int n_threads = 1;
  // 2:4-sparse weights: "auto" (in place where this CPU's kernel is faster than dense, else expanded
  // into dense x16 weights at load), "in-place" (wherever a kernel reads them: the least memory),
  // "dense" (always expanded)
  std::string sparse_layout = "auto";
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;     // "cpu"
  virtual const char* variant() const = 0;  // the kernels it runs ("avx512", "ref", ...)
  // Whether it runs sparse weights of type `t` (2:4 or bitmask) as they are (options.sparse_layout
  // and its kernels); if not, the Program expands them into dense Q4_0_X16 / I8_X16 / I8 at load.
  virtual bool sparse_in_place(DType t) const = 0;
  // "" when it can run `op` on these inputs (kind, dtype, shape; nullptr for an absent one), else
  // why not: the message of an UnsupportedError.
  virtual std::string supports(OpCode op, const std::vector<const Tensor*>& inputs) const = 0;
  // Once, after every op is validated: sizes the ops' scratch.
  virtual void prepare() = 0;
  // Checked arithmetic: throws std::invalid_argument naming the size that overflows.
  virtual WorkspaceBytes workspace_bytes(int max_context) const = 0;
  // Makes, or grows for a larger max_context, the workspace. Under the Program's step mutex.
  virtual void reserve(int max_context, const WorkspaceBytes& bytes) = 0;
  virtual KVCache allocate_kv(const KVConfig& kv, std::vector<int64_t> capacities, KVType type) const = 0;
  // One forward pass over `rows`; writes the output tensor's rows to out.
  virtual void run(const StepRows& rows, float* out) = 0;
};

// The backend a Program runs on (only "cpu" exists). Throws std::invalid_argument /
// UnsupportedError for bad options.
std::unique_ptr<Backend> make_backend(const Program::Impl& program, const BackendOptions& options);

}  // namespace plm
