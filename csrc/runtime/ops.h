// The executor's ops, built from the schema in ops.def (the same file Python's lowering reads):
// the OpCode enum, each op's spec (arity, in-place pairs, row-wise flag, named params), and typed
// handles to read a param by name:  param(op, params::attention::window).
#pragma once
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace plm {

enum class OpCode : int {
#define PLM_OP(name, min_in, max_in, n_out, row_wise) name,
#include "runtime/ops.def"
};

struct OpDesc {
  OpCode code;
  std::vector<int> inputs;      // tensor ids; -1 = absent optional input
  std::vector<int> outputs;
  std::vector<int64_t> iparams; // in the schema's order; Program fills omitted defaults
  std::vector<float> fparams;
};

// One param of one op in the schema.
struct ParamSpec {
  OpCode op;
  bool is_float;
  const char* name;
  bool has_default;
  double default_value;
};

namespace schema {
// Every param entry of ops.def, in file order.
enum class Entry : int {
#define PLM_INT(name, param) name##_##param,
#define PLM_INT_OR(name, param, dflt) name##_##param,
#define PLM_FLOAT(name, param) name##_##param,
#define PLM_FLOAT_OR(name, param, dflt) name##_##param,
#include "runtime/ops.def"
};
constexpr ParamSpec kParams[] = {
#define PLM_INT(name, param) {OpCode::name, false, #param, false, 0},
#define PLM_INT_OR(name, param, dflt) {OpCode::name, false, #param, true, dflt},
#define PLM_FLOAT(name, param) {OpCode::name, true, #param, false, 0},
#define PLM_FLOAT_OR(name, param, dflt) {OpCode::name, true, #param, true, dflt},
#include "runtime/ops.def"
};
// Position of an entry among its op's params of its kind: the index into iparams or fparams.
constexpr int position(Entry e) {
  const ParamSpec& p = kParams[(int)e];
  int n = 0;
  for (int i = 0; i < (int)e; ++i) n += kParams[i].op == p.op && kParams[i].is_float == p.is_float;
  return n;
}
// Params with defaults come after the required ones of their op and kind: a program may omit them.
constexpr bool defaults_trail() {
  const int n = (int)(sizeof(kParams) / sizeof(kParams[0]));
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j)
      if (kParams[i].op == kParams[j].op && kParams[i].is_float == kParams[j].is_float &&
          kParams[i].has_default && !kParams[j].has_default)
        return false;
  return true;
}
static_assert(defaults_trail(), "ops.def: a required param after one with a default");
}  // namespace schema

// A named param of one op: its op and its position in iparams / fparams.
struct IntParam {
  OpCode op;
  int index;
};
struct FloatParam {
  OpCode op;
  int index;
};

// params::<op>::<param>, e.g. params::attention::window.
namespace params {
#define PLM_INT(name, param) \
  namespace name { constexpr IntParam param{OpCode::name, schema::position(schema::Entry::name##_##param)}; }
#define PLM_INT_OR(name, param, dflt) PLM_INT(name, param)
#define PLM_FLOAT(name, param) \
  namespace name { constexpr FloatParam param{OpCode::name, schema::position(schema::Entry::name##_##param)}; }
#define PLM_FLOAT_OR(name, param, dflt) PLM_FLOAT(name, param)
#include "runtime/ops.def"
}  // namespace params

// After Program validation every op holds all its params, so these never read out of range.
// (A handle of another op's param is a bug: debug builds assert.)
inline int64_t param(const OpDesc& op, IntParam p) {
  assert(op.code == p.op);
  return op.iparams[(size_t)p.index];
}
inline float param(const OpDesc& op, FloatParam p) {
  assert(op.code == p.op);
  return op.fparams[(size_t)p.index];
}

// act_levels of a matmul op (matmul, matmul_multi, matmul_swiglu, matmul_geglu; ops.def).
inline IntParam act_levels_param(OpCode code) {
  switch (code) {
    case OpCode::matmul: return params::matmul::act_levels;
    case OpCode::matmul_multi: return params::matmul_multi::act_levels;
    case OpCode::matmul_swiglu: return params::matmul_swiglu::act_levels;
    default: assert(code == OpCode::matmul_geglu); return params::matmul_geglu::act_levels;
  }
}

struct InplacePair {
  int output, input;
};

struct OpSpec {
  const char* name;
  int min_inputs, max_inputs;  // max -1: variadic
  int n_outputs;               // -1: variadic
  bool row_wise;
  std::vector<InplacePair> inplace;
  std::vector<const ParamSpec*> ints, floats;  // in order
};

const OpSpec& op_spec(OpCode code);
const char* op_name(OpCode code);
OpCode opcode_from_name(const std::string& name);  // throws UnsupportedError

}  // namespace plm
