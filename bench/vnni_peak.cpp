// Peak int8 dot-product throughput of this CPU (AVX-512 VNNI vpdpbusd), per core and for N threads:
// the compute roofline for prefill (docs/performance.md). 12 independent accumulators hide the
// instruction's latency; the loop has nothing else. Build and run:
//   g++ -O2 -mavx512f -mavx512vnni -pthread bench/vnni_peak.cpp -o /tmp/vnni_peak && /tmp/vnni_peak 2
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

static double run(long iters) {
  __m512i a0 = _mm512_set1_epi32(0), a1 = _mm512_set1_epi32(1), a2 = _mm512_set1_epi32(2),
          a3 = _mm512_set1_epi32(3), a4 = _mm512_set1_epi32(4), a5 = _mm512_set1_epi32(5),
          a6 = _mm512_set1_epi32(6), a7 = _mm512_set1_epi32(7), a8 = _mm512_set1_epi32(8),
          a9 = _mm512_set1_epi32(9), a10 = _mm512_set1_epi32(10), a11 = _mm512_set1_epi32(11);
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(5);
  for (long it = 0; it < iters; ++it) {
    a0 = _mm512_dpbusd_epi32(a0, a, b); a1 = _mm512_dpbusd_epi32(a1, a, b);
    a2 = _mm512_dpbusd_epi32(a2, a, b); a3 = _mm512_dpbusd_epi32(a3, a, b);
    a4 = _mm512_dpbusd_epi32(a4, a, b); a5 = _mm512_dpbusd_epi32(a5, a, b);
    a6 = _mm512_dpbusd_epi32(a6, a, b); a7 = _mm512_dpbusd_epi32(a7, a, b);
    a8 = _mm512_dpbusd_epi32(a8, a, b); a9 = _mm512_dpbusd_epi32(a9, a, b);
    a10 = _mm512_dpbusd_epi32(a10, a, b); a11 = _mm512_dpbusd_epi32(a11, a, b);
  }
  __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                               _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7)));
  s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)));
  return (double)_mm512_reduce_add_epi32(s);
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const long iters = 20'000'000;
  // 12 vpdpbusd per iteration, 64 u8 x s8 multiply-adds each = 128 integer ops.
  const double ops = (double)iters * 12 * 64 * 2 * threads;
  double best = 0;
  for (int rep = 0; rep < 7; ++rep) {
    std::vector<std::thread> pool;
    auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) pool.emplace_back([&] { volatile double s = run(iters); (void)s; });
    for (auto& th : pool) th.join();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, ops / s);
    std::printf("rep %d: %.1f GOP/s\n", rep, ops / s / 1e9);
  }
  std::printf("best, %d thread(s): %.1f GOP/s int8 (vpdpbusd)\n", threads, best / 1e9);
}
