// The sampler's hot path: top-k sampling over a whole vocabulary in one call. It runs between two
// decode steps, right after the weights of a whole model streamed through the caches, when the
// Python interpreter's own working set is cold: the numpy pipeline (pocketlm/sampling.py, which
// stays the reference and handles the other settings) took ~250 us per token there against 70 us
// in isolation, 6-7 % of a SmolLM2 decode step.
#pragma once
#include <cstdint>
#include <vector>

namespace plm {

// Ids of the k largest of x[0, n) (1 <= k <= n), in no particular order; which of several equal
// values at the k-th place is kept is unspecified. NaN is never chosen; returns true if x holds one.
bool top_k_ids(const float* x, int64_t n, int k, std::vector<int32_t>& out);

// pocketlm.sampling.Sampler's pipeline for 0 < top_k < n and temperature > 0, given the uniform
// draw u in [0, 1): top_k -> top_p -> min_p (both judged at temperature 1) -> softmax at
// `temperature` -> inverse CDF. The same arithmetic as the numpy code: top_p on float64
// probabilities, min_p's threshold and the softmax weights in float32, the CDF in float64.
// Returns kNonFinite if the logits hold a NaN anywhere or their largest value is +-inf (a
// return value, not an exception: the caller raises its own error, and the check costs nothing).
constexpr int32_t kNonFinite = -1;
int32_t sample_top_k(const float* x, int64_t n, int top_k, float temperature, double top_p, double min_p,
                     double u);

}  // namespace plm
