// The op table, built once from ops.def.
#include "runtime/ops.h"

#include "common.h"

namespace plm {

namespace {

std::vector<OpSpec> make_specs() {
  std::vector<OpSpec> specs;
#define PLM_OP(name, min_in, max_in, n_out, row_wise) \
  specs.push_back(OpSpec{#name, min_in, max_in, n_out, row_wise != 0, {}, {}, {}});
#define PLM_INPLACE(name, out, in) specs[(size_t)OpCode::name].inplace.push_back({out, in});
#include "runtime/ops.def"
  for (const ParamSpec& p : schema::kParams) {
    auto& list = p.is_float ? specs[(size_t)p.op].floats : specs[(size_t)p.op].ints;
    list.push_back(&p);
  }
  return specs;
}

const std::vector<OpSpec>& specs() {
  static const std::vector<OpSpec> table = make_specs();
  return table;
}

}  // namespace

const OpSpec& op_spec(OpCode code) { return specs()[(size_t)code]; }

const char* op_name(OpCode code) {
  const size_t i = (size_t)code;
  return i < specs().size() ? specs()[i].name : "?";
}

OpCode opcode_from_name(const std::string& name) {
  for (size_t i = 0; i < specs().size(); ++i)
    if (name == specs()[i].name) return (OpCode)i;
  throw UnsupportedError("unknown executor op '" + name + "'");
}

}  // namespace plm
