// The GPU's Lowp math (csrc/activation_math.h: ex2.approx and rcp.approx for float16 and
// bfloat16 data) run on the CPU through the header's own op code, with each
// approximation replaced by a model of its documented error: the exact value times
// (1 + error), flushed to zero below float's normal range as the .ftz instructions do.
// Driven by tests/test_lowp.py, which runs every half value at each corner of the error
// bounds and checks SPEC's 2 ulp.
//
//   lowp_sim EX2_ERROR RCP_ERROR OP DIR [params]    float32 inputs on stdin, outputs on stdout
//   lowp_sim precise - OP DIR [params]               the same op with Precise (the CPU's math)
//     OP DIR: swish fwd|bwd BETA, silu fwd|bwd, mish fwd|bwd, acon_c fwd P1 P2 BETA
//     (bwd: dx at g = 1, Lowp); swish bwdp BETA, acon_c bwdp P1 P2 BETA: the backward
//     with parameter gradients at g = 1 under LowpRcp (only its reciprocal
//     approximated; EX2_ERROR unused), writing dx then each dy/dparam per element
#define FUSEDACT_LOWP_MODEL 1
#include "activation_math.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace fusedact {
namespace math {
namespace lowp_model {
double ex2_error = 0.0, rcp_error = 0.0;
}  // namespace lowp_model
}  // namespace math
}  // namespace fusedact

using namespace fusedact::math;

bool g_precise = false;

template <class Op>
void forward(const Op& op, std::vector<float>& v) {
  for (float& x : v) x = g_precise ? op.template forward<Precise>(x) : op.template forward<Lowp>(x);
}

template <class Op>
std::vector<float> with_params(const Op& op, const std::vector<float>& v) {
  std::vector<float> out;
  out.reserve(v.size() * (1 + Op::kParams));
  for (float x : v) {
    float dp[Op::kParams];
    out.push_back(g_precise ? op.template backward<Precise>(1.0f, x, dp) : op.template backward<LowpRcp>(1.0f, x, dp));
    for (float d : dp) out.push_back(d);
  }
  return out;
}

template <class Op>
void run(const Op& op, bool bwd, std::vector<float>& v) {
  if (!bwd) return forward(op, v);
  for (float& x : v) x = g_precise ? op.template backward<Precise>(1.0f, x) : op.template backward<Lowp>(1.0f, x);
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: lowp_sim EX2_ERROR RCP_ERROR OP fwd|bwd [params]\n");
    return 2;
  }
  g_precise = std::strcmp(argv[1], "precise") == 0;
  lowp_model::ex2_error = std::atof(argv[1]);
  lowp_model::rcp_error = std::atof(argv[2]);
  const std::string op = argv[3];
  const bool bwd = std::strcmp(argv[4], "bwd") == 0;
  auto param = [&](int i) { return argc > 5 + i ? static_cast<float>(std::atof(argv[5 + i])) : 0.0f; };
  std::vector<float> v;
  float buf[4096];
  size_t got;
  while ((got = std::fread(buf, sizeof(float), 4096, stdin)) > 0) v.insert(v.end(), buf, buf + got);
  if (std::strcmp(argv[4], "bwdp") == 0 && op == "swish") {
    v = with_params(Swish<float>{param(0)}, v);
  } else if (std::strcmp(argv[4], "bwdp") == 0 && op == "acon_c") {
    v = with_params(AconC<float>{param(0), param(1), param(2)}, v);
  } else if (op == "swish") {
    run(Swish<float>{param(0)}, bwd, v);
  } else if (op == "silu") {
    run(Silu<float>{}, bwd, v);
  } else if (op == "mish") {
    run(Mish<float>{}, bwd, v);
  } else if (op == "acon_c" && !bwd) {
    forward(AconC<float>{param(0), param(1), param(2)}, v);
  } else {
    std::fprintf(stderr, "unknown case %s %s\n", op.c_str(), argv[4]);
    return 2;
  }
  std::fwrite(v.data(), sizeof(float), v.size(), stdout);
  return 0;
}
