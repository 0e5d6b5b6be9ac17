// Single-thread throughput of matmul vs matmul2 (not part of the build or tests).
// Build and run from the repo root (x86), linking the kernel objects of a CMake build (each
// compiled with its own -m flags there):
//   cmake -S . -B /tmp/kb -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$PWD/.venv/bin/python && ninja -C /tmp/kb
//   O=/tmp/kb/CMakeFiles/_core.dir
//   g++ -std=c++17 -O3 -DPLM_X86=1 -Icsrc bench/kernels/bench_matmul2.cpp $O/csrc/kernels/x86/*.o \
//       $O/csrc/kernels/ref/kernels_ref.cpp.o $O/csrc/kernels/dispatch.cpp.o $O/avx2_vnni*/*.o -pthread -o /tmp/bench_matmul2
//   /tmp/bench_matmul2 [variant] [N] [K]
// Timings: alternating rounds, best round of each. T=1 reports GB/s of weight bytes, both with one matrix (cache-resident: "hot") and
// rotating over copies larger than the L3 ("cold"); T=64 reports GFLOP/s (2*N*K*T).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/kernels.h"

using namespace plm;
using namespace plm::kernels;

namespace {

std::vector<uint8_t> random_weight(DType dt, int N, int K, std::mt19937& rng) {
  std::vector<uint8_t> buf(tensor_bytes(dt, N, K));
  for (auto& b : buf) b = (uint8_t)rng();
  const auto& tr = traits(dt);
  const fp16_t scale = fp32_to_fp16(0.01f), minv = fp32_to_fp16(-0.05f);
  if (dt == DType::I8) {
    float* rs = reinterpret_cast<float*>(buf.data() + (size_t)N * K);
    for (int n = 0; n < N; ++n) rs[n] = 0.01f;
  } else {
    const size_t nblocks = (size_t)N * (K / tr.block_elems);
    const bool asym = dt == DType::Q4_1 || dt == DType::Q4_1_G64 || dt == DType::Q4_1_G128;
    for (size_t b = 0; b < nblocks; ++b) {
      std::memcpy(buf.data() + b * tr.block_bytes, &scale, 2);
      if (asym) std::memcpy(buf.data() + b * tr.block_bytes + 2, &minv, 2);
    }
  }
  return buf;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Seconds per call of fa(i) and fb(i), measured in alternating rounds (so that load
// from other processes hits both alike); the minimum round of each is kept.
template <class Fa, class Fb>
std::pair<double, double> time_pair(Fa&& fa, Fb&& fb, double budget) {
  fa(0);
  fb(0);  // warm-up
  double best_a = 1e30, best_b = 1e30;
  const double t_end = now() + budget;
  int i = 1, rounds = 0;
  while (now() < t_end || rounds < 5) {
    const int reps = 8;
    double t0 = now();
    for (int r = 0; r < reps; ++r) fa(i++);
    best_a = std::min(best_a, (now() - t0) / reps);
    t0 = now();
    for (int r = 0; r < reps; ++r) fb(i++);
    best_b = std::min(best_b, (now() - t0) / reps);
    ++rounds;
  }
  return {best_a, best_b};
}

}  // namespace

int main(int argc, char** argv) {
  const std::string variant = argc > 1 ? argv[1] : best_kernels().name;
  const int N = argc > 2 ? std::atoi(argv[2]) : 4864, K = argc > 3 ? std::atoi(argv[3]) : 896;
  const KernelTable* kt = kernels_by_name(variant);
  if (!kt) { std::fprintf(stderr, "variant %s not available\n", variant.c_str()); return 1; }
  std::mt19937 rng(1);
  std::printf("variant %s, N=%d K=%d, single thread\n", kt->name, N, K);
  std::printf("%-6s | %28s | %28s | %28s\n", "dtype", "T=1 hot GB/s (mm, mm2, ratio)",
              "T=1 cold GB/s (mm, mm2, ratio)", "T=64 GFLOP/s (mm, mm2, ratio)");
  for (DType dt : {DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::I8}) {
    const size_t wbytes = row_bytes(dt, K) * (size_t)N;
    const int copies = (int)std::max<size_t>(1, (96u << 20) / tensor_bytes(dt, N, K));
    std::vector<std::vector<uint8_t>> ws;
    for (int c = 0; c < copies; ++c) ws.push_back(random_weight(dt, N, K, rng));
    auto view = [&](int c) {
      WeightView w{dt, N, K, ws[c].data(), row_bytes(dt, K), nullptr};
      if (dt == DType::I8) w.row_scales = reinterpret_cast<const float*>(ws[c].data() + (size_t)N * K);
      return w;
    };
    const int Tmax = 64;
    std::vector<float> x((size_t)Tmax * K), y((size_t)Tmax * N);
    std::normal_distribution<float> nd;
    for (auto& v : x) v = nd(rng);
    std::vector<BlockQ8A> xq((size_t)Tmax * K / 32);
    std::vector<BlockQ8A2> xq2((size_t)Tmax * K / 32);
    for (int t = 0; t < Tmax; ++t) {
      kt->quantize_act(x.data() + (size_t)t * K, xq.data() + (size_t)t * K / 32, K);
      kt->quantize_act2(x.data() + (size_t)t * K, xq2.data() + (size_t)t * K / 32, K);
    }
    double r[3][2];
    for (int mode = 0; mode < 3; ++mode) {
      const int T = mode == 2 ? 64 : 1;
      const bool cold = mode == 1;
      auto mm = [&](int i) {
        const WeightView w = view(cold ? i % copies : 0);
        kt->matmul[(int)dt](w, x.data(), K, xq.data(), T, y.data(), N, 0, N);
      };
      auto mm2 = [&](int i) {
        const WeightView w = view(cold ? i % copies : 0);
        kt->matmul2[(int)dt](w, x.data(), K, xq2.data(), T, y.data(), N, 0, N);
      };
      const auto [s1, s2] = time_pair(mm, mm2, T == 1 ? 1.0 : 2.0);
      const double work = T == 1 ? wbytes / 1e9 : 2.0 * N * K * T / 1e9;
      r[mode][0] = work / s1;
      r[mode][1] = work / s2;
    }
    std::printf("%-6s | %8.1f %8.1f %8.2f   | %8.1f %8.1f %8.2f   | %8.1f %8.1f %8.2f\n", traits(dt).name,
                r[0][0], r[0][1], r[0][1] / r[0][0], r[1][0], r[1][1], r[1][1] / r[1][0], r[2][0], r[2][1],
                r[2][1] / r[2][0]);
  }
  // activation quantization cost, per 896-element row
  {
    std::vector<float> x(K);
    std::normal_distribution<float> nd;
    for (auto& v : x) v = nd(rng);
    std::vector<BlockQ8A> a(K / 32);
    std::vector<BlockQ8A2> a2(K / 32);
    const auto [t1, t2] = time_pair([&](int) { kt->quantize_act(x.data(), a.data(), K); },
                                    [&](int) { kt->quantize_act2(x.data(), a2.data(), K); }, 0.3);
    std::printf("quantize_act %.0f ns, quantize_act2 %.0f ns per row of K=%d\n", t1 * 1e9, t2 * 1e9, K);
  }
  return 0;
}
