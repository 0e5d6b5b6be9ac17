#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace plm {

namespace {

// max(m, v) that ignores NaN in v, the order of maxss: one instruction, no branch.
inline float max_of(float m, float v) { return v > m ? v : m; }

// Maxima of the blocks [b * block, (b + 1) * block) of x, b < n_blocks; true if x holds a NaN.
// Independent running maxima (SSE where there is SSE: every x86-64), so that the loop is not one
// chain of dependent max operations.
bool block_maxima(const float* x, int64_t n_blocks, int64_t block, std::vector<float>& maxima) {
  bool nan = false;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float* p = x + b * block;
    float r = -INFINITY;
    int64_t i = 0;
#if defined(__SSE2__)
    __m128 m0 = _mm_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0, bad = _mm_setzero_ps();
    for (; i + 16 <= block; i += 16) {
      const __m128 a = _mm_loadu_ps(p + i), b1 = _mm_loadu_ps(p + i + 4), c = _mm_loadu_ps(p + i + 8),
                   d = _mm_loadu_ps(p + i + 12);
      bad = _mm_or_ps(bad, _mm_or_ps(_mm_cmpunord_ps(a, b1), _mm_cmpunord_ps(c, d)));
      m0 = _mm_max_ps(a, m0);  // a NaN in the first operand yields the second: NaN is ignored
      m1 = _mm_max_ps(b1, m1);
      m2 = _mm_max_ps(c, m2);
      m3 = _mm_max_ps(d, m3);
    }
    nan |= _mm_movemask_ps(bad) != 0;
    alignas(16) float v[4];
    _mm_store_ps(v, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
    for (float f : v) r = max_of(r, f);
#endif
    for (; i < block; ++i) {
      nan |= p[i] != p[i];
      r = max_of(r, p[i]);
    }
    maxima.push_back(r);
  }
  return nan;
}

}  // namespace

bool top_k_ids(const float* x, int64_t n, int k, std::vector<int32_t>& out) {
  // The k-th largest of >= k block maxima is a lower bound on the k-th largest value (k different
  // blocks reach it): every top-k value is at or above it, and few others are; only the blocks
  // whose maximum reaches it can hold one.
  const int64_t n_blocks = std::min<int64_t>(n, 8 * (int64_t)k), block = n / n_blocks;
  thread_local std::vector<float> maxima, sorted;
  maxima.clear();
  bool nan = block_maxima(x, n_blocks, block, maxima);
  for (int64_t i = n_blocks * block; i < n; ++i) {
    nan |= x[i] != x[i];
    maxima.push_back(x[i]);
  }
  sorted = maxima;
  const size_t at = sorted.size() - (size_t)k;
  std::nth_element(sorted.begin(), sorted.begin() + (std::ptrdiff_t)at, sorted.end());
  const float bound = sorted[at];
  out.clear();
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (!(maxima[(size_t)b] >= bound)) continue;
    for (int64_t i = b * block; i < (b + 1) * block; ++i)
      if (x[i] >= bound) out.push_back((int32_t)i);
  }
  for (int64_t i = n_blocks * block; i < n; ++i)
    if (x[i] >= bound) out.push_back((int32_t)i);
  if (out.size() > (size_t)k) {
    std::nth_element(out.begin(), out.begin() + k, out.end(), [x](int32_t a, int32_t b) { return x[a] > x[b]; });
    out.resize((size_t)k);
  }
  return nan;
}

int32_t sample_top_k(const float* x, int64_t n, int top_k, float temperature, double top_p, double min_p,
                     double u) {
  thread_local std::vector<int32_t> ids;
  // NaN anywhere (seen by the block scan at no extra pass), or a top logit of +-inf, makes the
  // distribution meaningless (numpy's path checks max(x) the same way).
  if (top_k_ids(x, n, top_k, ids)) return kNonFinite;
  float top = -INFINITY;
  for (int32_t i : ids) top = max_of(top, x[i]);
  if (!std::isfinite(top)) return kNonFinite;
  // Sorted by logit, descending (equal logits by id, for determinism).
  std::sort(ids.begin(), ids.end(), [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  size_t keep = ids.size();
  const float vmax = x[ids[0]];
  if (top_p < 1.0) {  // the most likely tokens while the mass before each is < top_p (at least one)
    double z = 0.0;
    for (int32_t i : ids) z += std::exp((double)x[i] - (double)vmax);
    const double log_z = (double)vmax + std::log(z);
    double before = 0.0;
    size_t n_keep = 0;
    for (int32_t i : ids) {
      if (before < top_p) ++n_keep;
      before += std::exp((double)x[i] - log_z);
    }
    keep = std::max<size_t>(1, n_keep);
  }
  if (min_p > 0.0) {  // relative to the most likely token, in float32 as numpy compares them
    const float cut = vmax + (float)std::log(min_p);
    size_t n_keep = 0;
    while (n_keep < keep && x[ids[n_keep]] >= cut) ++n_keep;
    keep = n_keep;  // sorted: the survivors are a prefix; the top one always passes
  }
  if (keep == 1) return ids[0];
  thread_local std::vector<double> cdf;
  cdf.resize(keep);
  double total = 0.0;
  for (size_t j = 0; j < keep; ++j) {
    total += (double)std::exp((x[ids[j]] - vmax) / temperature);
    cdf[j] = total;
  }
  const double target = u * total;
  const size_t pick = (size_t)(std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin());
  return ids[std::min(pick, keep - 1)];
}

}  // namespace plm
