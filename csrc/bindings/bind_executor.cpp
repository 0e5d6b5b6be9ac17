// _core.Program and _core.State: the planned op list (with the workspace and thread pool its
// States share) and one session's KV cache.
//
//   Program(bundle, tensors, ops, arena_bytes, max_tokens, kv, output, n_threads, kernels="",
//           activations="int8x2", max_seqs=1, sparse_layout="auto")
//     bundle   : _core.Bundle (or pocketlm.bundle.Bundle), or None when every weight is inline
//     tensors  : list of dicts, one per tensor id:
//                {"kind": "weight", "name": str, "rows", "cols"}        (bundle tensor;
//                    rows/cols may be omitted to take the bundle's shape)
//                {"kind": "weight", "rows", "cols", "dtype": int, "data": np.uint8}  (inline)
//                {"kind": "const", "rows", "cols", "data": np.float32}
//                {"kind": "arena", "rows" (-1 = T: the step's rows, -2 = S: its sequences), "cols",
//                 "offset": bytes}
//                {"kind": "tokens"}
//     ops      : list of (name, inputs, outputs, iparams, fparams); inputs and params laid out as
//                csrc/runtime/ops.def declares them (params with defaults may be left off the end)
//     kv       : (n_layers, n_kv_heads, head_dim)
//     output   : tensor id copied out by State.run
//   State(program, max_context, kv_type="f32"); State.run(tokens: int32[T], pos) -> float32[rows, cols]
//   State.copy_kv_from(other, n_positions): a fork's cache (same KV shape, type, capacities, max_context)
//   run_batch(program, [(state, tokens: int32[n], pos[, n_out]), ...]) -> float32[rows, cols]: one step
//     over several sequences (plm::run_batch); an [S, cols] output holds each sequence's last n_out
//     rows (default 1), in order
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "runtime/executor.h"

namespace nb = nanobind;

namespace {

using ByteArray = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;
using FloatArray = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using TokenArray = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutArray = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using OpTuple = std::tuple<std::string, std::vector<int>, std::vector<int>,
                           std::vector<int64_t>, std::vector<float>>;

int64_t get_int(const nb::dict& d, const char* key, size_t index, std::optional<int64_t> dflt = {}) {
  if (!d.contains(key)) {
    if (dflt) return *dflt;
    throw std::invalid_argument("tensor " + std::to_string(index) + ": missing '" + key + "'");
  }
  return nb::cast<int64_t>(d[key]);
}

plm::TensorDesc tensor_from_dict(const nb::dict& d, size_t index) {
  plm::TensorDesc t;
  if (!d.contains("kind")) throw std::invalid_argument("tensor " + std::to_string(index) + ": missing 'kind'");
  std::string kind = nb::cast<std::string>(d["kind"]);
  if (kind == "weight") {
    t.kind = plm::TensorKind::WEIGHT;
    if (d.contains("name")) t.weight_name = nb::cast<std::string>(d["name"]);
    t.rows = get_int(d, "rows", index, 0);
    t.cols = get_int(d, "cols", index, 0);
    if (d.contains("dtype") || d.contains("data")) {  // inline weight
      t.inline_dtype = (int)get_int(d, "dtype", index);
      if (t.inline_dtype < 0)
        throw std::invalid_argument("tensor " + std::to_string(index) + ": bad dtype");
      if (!d.contains("data")) throw std::invalid_argument("tensor " + std::to_string(index) + ": missing 'data'");
      nb::handle data = d["data"];
      if (nb::isinstance<nb::bytes>(data)) {
        nb::bytes b = nb::borrow<nb::bytes>(data);
        const auto* p = static_cast<const uint8_t*>(b.data());
        t.inline_data.assign(p, p + b.size());
      } else {
        ByteArray a = nb::cast<ByteArray>(data);
        t.inline_data.assign(a.data(), a.data() + a.size());
      }
    } else if (t.weight_name.empty()) {
      throw std::invalid_argument("tensor " + std::to_string(index) + ": weight needs 'name' or 'dtype'+'data'");
    }
  } else if (kind == "const") {
    t.kind = plm::TensorKind::CONST;
    t.rows = get_int(d, "rows", index);
    t.cols = get_int(d, "cols", index);
    if (!d.contains("data")) throw std::invalid_argument("tensor " + std::to_string(index) + ": missing 'data'");
    FloatArray a = nb::cast<FloatArray>(d["data"]);
    t.const_data.assign(a.data(), a.data() + a.size());
  } else if (kind == "arena") {
    t.kind = plm::TensorKind::ARENA;
    t.rows = get_int(d, "rows", index);
    t.cols = get_int(d, "cols", index);
    t.arena_offset = get_int(d, "offset", index);
  } else if (kind == "tokens") {
    t.kind = plm::TensorKind::TOKENS;
  } else {
    throw std::invalid_argument("tensor " + std::to_string(index) + ": unknown kind '" + kind + "'");
  }
  return t;
}

// A State plus the Program it runs (kept alive by nb::keep_alive).
struct StateHandle {
  const plm::Program* program;
  plm::State state;
  StateHandle(const plm::Program& p, int max_context, const std::string& kv_type)
      : program(&p), state(p, max_context, kv_type) {}
};

}  // namespace

void bind_executor(nb::module_& m) {
  nb::class_<plm::Program>(m, "Program",
                           "A validated, planned op list with its weights; shared by sessions.")
      .def(
          "__init__",
          [](plm::Program* self, nb::object bundle, nb::list tensors, nb::list ops,
             int64_t arena_bytes, int max_tokens, std::tuple<int, int, int> kv, int output,
             int n_threads, const std::string& kernels, const std::string& activations, int max_seqs,
             const std::string& sparse_layout) {
            std::shared_ptr<plm::Bundle> b;
            if (!bundle.is_none()) {
              // pocketlm.bundle.Bundle wraps the _core.Bundle as .core
              if (nb::hasattr(bundle, "core")) bundle = bundle.attr("core");
              b = nb::cast<std::shared_ptr<plm::Bundle>>(bundle);
            }
            std::vector<plm::TensorDesc> descs;
            descs.reserve(tensors.size());
            for (size_t i = 0; i < tensors.size(); ++i)
              descs.push_back(tensor_from_dict(nb::cast<nb::dict>(tensors[i]), i));
            std::vector<plm::OpDesc> op_descs;
            op_descs.reserve(ops.size());
            for (size_t i = 0; i < ops.size(); ++i) {
              auto [name, inputs, outputs, iparams, fparams] = nb::cast<OpTuple>(ops[i]);
              plm::OpDesc op;
              try {
                op.code = plm::opcode_from_name(name);
              } catch (const plm::UnsupportedError& e) {
                throw plm::UnsupportedError("op " + std::to_string(i) + ": " + e.what());
              }
              op.inputs = std::move(inputs);
              op.outputs = std::move(outputs);
              op.iparams = std::move(iparams);
              op.fparams = std::move(fparams);
              op_descs.push_back(std::move(op));
            }
            plm::KVConfig kvc{std::get<0>(kv), std::get<1>(kv), std::get<2>(kv)};
            new (self) plm::Program(std::move(b), std::move(descs), std::move(op_descs),
                                    arena_bytes, max_tokens, kvc, output, n_threads, kernels,
                                    activations, max_seqs, sparse_layout);
          },
          nb::arg("bundle").none(), nb::arg("tensors"), nb::arg("ops"), nb::arg("arena_bytes"),
          nb::arg("max_tokens"), nb::arg("kv"), nb::arg("output"), nb::arg("n_threads"),
          nb::arg("kernels") = "", nb::arg("activations") = "int8x2", nb::arg("max_seqs") = 1,
          nb::arg("sparse_layout") = "auto")
      .def_prop_ro("max_tokens", &plm::Program::max_tokens)
      .def_prop_ro("max_seqs", &plm::Program::max_seqs)
      .def_prop_ro("n_threads", &plm::Program::n_threads)
      .def_prop_ro("arena_bytes", &plm::Program::arena_bytes)
      .def_prop_ro("kernel_name", [](const plm::Program& p) { return std::string(p.kernel_name()); })
      .def_prop_ro("activations", [](const plm::Program& p) { return std::string(p.activations()); })
      .def_prop_ro("sparse_expanded", &plm::Program::sparse_expanded)
      .def_prop_ro("output_cols", &plm::Program::output_cols)
      .def_prop_ro("layer_windows", &plm::Program::layer_windows,
                   "per KV layer: its attention window (0 = full attention, -1 = no attention op)")
      .def_prop_ro("shift_unsupported", [](const plm::Program& p) { return p.shift_unsupported(); },
                   "Why State.kv_shift cannot move this program's KV cache ('' when it can).");

  nb::class_<StateHandle>(m, "State", "One session's KV cache for a Program (the arena, scratch and thread pool are the Program's, shared).")
      .def(
          "__init__",
          [](StateHandle* self, const plm::Program& program, int max_context, const std::string& kv_type) {
            // Waits for the Program's step mutex (a State of it may be running a step in another thread).
            nb::gil_scoped_release release;
            new (self) StateHandle(program, max_context, kv_type);
          },
          nb::arg("program"), nb::arg("max_context"), nb::arg("kv_type") = "f32", nb::keep_alive<1, 2>())
      .def_prop_ro("max_context", [](const StateHandle& s) { return s.state.max_context(); })
      .def_prop_ro("kv_capacities", [](const StateHandle& s) { return s.state.kv_capacities(); },
                   "Positions each layer's KV cache holds (fewer than max_context with a window).")
      .def_prop_ro("kv_bytes", [](const StateHandle& s) { return s.state.kv_bytes(); },
                   "Bytes reserved for the KV cache (every layer's capacity; committed as touched).")
      .def(
          "kv_used_bytes", [](const StateHandle& s, int64_t n_positions) { return s.state.kv_used_bytes(n_positions); },
          nb::arg("n_positions"), "Bytes of K and V that positions [0, n_positions) occupy.")
      .def(
          "copy_kv_from",
          [](StateHandle& s, const StateHandle& other, int64_t n_positions) {
            nb::gil_scoped_release release;
            s.state.copy_kv_from(other.state, n_positions);
          },
          nb::arg("other"), nb::arg("n_positions"),
          "Copies the KV entries of positions [0, n_positions) from another State of the same shape.")
      .def_prop_ro("kv_type", [](const StateHandle& s) { return std::string(s.state.kv_type()); })
      .def(
          "kv_export",
          [](const StateHandle& s, int64_t n_positions) {
            const int64_t n = s.state.kv_used_bytes(n_positions);
            uint8_t* buf = new uint8_t[(size_t)n];
            nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
            {
              nb::gil_scoped_release release;
              s.state.kv_export(n_positions, buf, n);
            }
            return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(buf, {(size_t)n}, owner);
          },
          nb::arg("n_positions"), "The KV slots of positions [0, n_positions), packed (a uint8 array; session files).")
      .def(
          "kv_import",
          [](StateHandle& s, int64_t n_positions, nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig> data) {
            nb::gil_scoped_release release;
            s.state.kv_import(n_positions, data.data(), (int64_t)data.shape(0));
          },
          nb::arg("n_positions"), nb::arg("data"), "Restores what kv_export gave (the same State shape).")
      .def(
          "kv_range_bytes", [](const StateHandle& s, int64_t p0, int64_t p1) { return s.state.kv_range_bytes(p0, p1); },
          nb::arg("p0"), nb::arg("p1"), "Bytes of the KV of positions [p0, p1) (kv_export_range).")
      .def(
          "kv_export_range",
          [](const StateHandle& s, int64_t p0, int64_t p1) {
            const int64_t n = s.state.kv_range_bytes(p0, p1);
            uint8_t* buf = new uint8_t[(size_t)n];
            nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
            {
              nb::gil_scoped_release release;
              s.state.kv_export_range(p0, p1, buf, n);
            }
            return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(buf, {(size_t)n}, owner);
          },
          nb::arg("p0"), nb::arg("p1"), "The KV of positions [p0, p1) packed (no ring may have wrapped past them).")
      .def(
          "kv_import_range",
          [](StateHandle& s, int64_t p0, int64_t p1, nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig> data) {
            nb::gil_scoped_release release;
            s.state.kv_import_range(p0, p1, data.data(), (int64_t)data.shape(0));
          },
          nb::arg("p0"), nb::arg("p1"), nb::arg("data"), "Restores what kv_export_range gave at those positions.")
      .def(
          "kv_shift",
          [](StateHandle& s, int64_t keep, int64_t n_discard, int64_t n_positions, int64_t end) {
            nb::gil_scoped_release release;
            s.state.kv_shift(keep, n_discard, n_positions, end);
          },
          nb::arg("keep"), nb::arg("n_discard"), nb::arg("n_positions"), nb::arg("end"),
          "Context shift: drops positions [keep, keep + n_discard) and moves the rest down, keys re-rotated "
          "(executor.h).")
      .def(
          "run",
          [](StateHandle& s, TokenArray tokens, int pos, std::optional<OutArray> out) -> nb::object {
            int n = (int)tokens.shape(0);
            const int64_t rows = s.program->output_rows(n, 1), cols = s.program->output_cols();
            float* dst;
            nb::object result;
            if (out) {
              if ((int64_t)out->shape(0) != rows || (int64_t)out->shape(1) != cols)
                throw std::invalid_argument("out must have shape (" + std::to_string(rows) + ", " +
                                            std::to_string(cols) + ")");
              dst = out->data();
              result = nb::cast(*out);
            } else {
              float* buf = new float[(size_t)(rows * cols)];
              nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<float*>(p); });
              result = nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<2>>(
                  buf, {(size_t)rows, (size_t)cols}, owner));
              dst = buf;
            }
            {
              nb::gil_scoped_release release;
              s.state.run(tokens.data(), n, pos, dst);
            }
            return result;
          },
          nb::arg("tokens"), nb::arg("pos"), nb::arg("out").noconvert().none() = nb::none(),
          "Runs tokens at positions pos.. and returns the output tensor [rows, cols].");

  m.def(
      "run_batch",
      [](const plm::Program& program, nb::list seqs) -> nb::object {
        const size_t n = seqs.size();
        if (n == 0 || n > (size_t)program.max_seqs())
          throw std::invalid_argument("run_batch takes 1.." + std::to_string(program.max_seqs()) +
                                      " sequences (the program's max_seqs), got " + std::to_string(n));
        std::vector<plm::SeqInput> inputs(n);
        std::vector<TokenArray> keep(n);  // the token arrays stay referenced while the step runs
        int64_t n_rows = 0, n_outs = 0;
        for (size_t i = 0; i < n; ++i) {
          // (state, tokens, pos) or (state, tokens, pos, n_out)
          const nb::tuple item = nb::cast<nb::tuple>(seqs[i]);
          if (item.size() != 3 && item.size() != 4)
            throw std::invalid_argument("sequence " + std::to_string(i) + ": expected (state, tokens, pos[, n_out])");
          StateHandle* state = nb::cast<StateHandle*>(item[0]);
          TokenArray tokens = nb::cast<TokenArray>(item[1]);
          const int pos = nb::cast<int>(item[2]);
          const int n_out = item.size() == 4 ? nb::cast<int>(item[3]) : 1;
          if (!state) throw std::invalid_argument("sequence " + std::to_string(i) + ": no State");
          if (state->program != &program)
            throw std::invalid_argument("sequence " + std::to_string(i) + ": the State belongs to another Program");
          keep[i] = tokens;
          inputs[i] = plm::SeqInput{&state->state, keep[i].data(), (int)keep[i].shape(0), pos, n_out};
          n_rows += (int64_t)keep[i].shape(0);
          n_outs += n_out;
        }
        if (n_rows > program.max_tokens())
          throw std::invalid_argument("a step takes at most " + std::to_string(program.max_tokens()) +
                                      " rows (the program's max_tokens), the sequences have " +
                                      std::to_string(n_rows));
        if (n_outs > program.max_seqs())
          throw std::invalid_argument("a step has at most " + std::to_string(program.max_seqs()) +
                                      " output rows (the program's max_seqs), the sequences ask for " +
                                      std::to_string(n_outs));
        const int64_t rows = program.output_rows((int)n_rows, (int)std::max<int64_t>(n_outs, 0)), cols = program.output_cols();
        float* buf = new float[(size_t)(rows * cols)];
        nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<float*>(p); });
        nb::object result = nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<2>>(buf, {(size_t)rows, (size_t)cols}, owner));
        {
          nb::gil_scoped_release release;
          plm::run_batch(program, inputs.data(), (int)n, buf);
        }
        return result;
      },
      nb::arg("program"), nb::arg("seqs"),
      "One step over several sequences: seqs is a list of (State, int32 tokens, pos). Returns the "
      "output rows: one per sequence (the logits of its last token) for a generation program.");
}
