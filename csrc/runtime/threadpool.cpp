#include "runtime/threadpool.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define PLM_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define PLM_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define PLM_CPU_RELAX() ((void)0)
#endif

namespace plm {

namespace {

// How long an idle worker spins before it sleeps. Ops of one decode step follow each
// other within microseconds; the gap between steps (sampling, Python) is longer.
constexpr auto kSpinBudget = std::chrono::microseconds(100);

// The claim word: generation (24 bits) | n_tasks (20 bits) | next task (20 bits).
// Every thread overshoots the task count at most once per job, so next task stays
// below n_tasks + kMaxThreads < 2^20.
constexpr int kTaskBits = 20;
constexpr uint64_t kTaskMask = (uint64_t(1) << kTaskBits) - 1;
constexpr int kJobTasks = (1 << 19);  // tasks per job
constexpr uint64_t kGenerationOne = uint64_t(1) << (2 * kTaskBits);

inline uint64_t generation_of(uint64_t claim) { return claim >> (2 * kTaskBits); }
inline int tasks_of(uint64_t claim) { return (int)((claim >> kTaskBits) & kTaskMask); }
inline int index_of(uint64_t claim) { return (int)(claim & kTaskMask); }

}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads) {
  if (n_threads < 1 || n_threads > kMaxThreads)
    throw std::invalid_argument("n_threads must be in 1.." + std::to_string(kMaxThreads) +
                                ", got " + std::to_string(n_threads));
  workers_.reserve(n_threads - 1);
  for (int t = 1; t < n_threads; ++t) workers_.emplace_back([this, t] { worker_main(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // Spinning workers read stop_ on every spin, sleeping ones in their wait predicate (under
    // this mutex): each returns. No new generation is published: a worker's late claim could
    // consume it.
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

uint64_t ThreadPool::run_tasks(int thread_id) {
  for (;;) {
    uint64_t claim = claim_.fetch_add(1, std::memory_order_acq_rel);
    if (index_of(claim) >= tasks_of(claim)) return generation_of(claim);
    // A claimed task keeps the caller waiting, so fn_ and ctx_ are this job's.
    fn_(ctx_, task_offset_ + index_of(claim), thread_id);
    done_.fetch_add(1, std::memory_order_release);
  }
}

void ThreadPool::run(int n_tasks, TaskFn fn, void* ctx) {
  if (n_tasks <= 0) return;
  if (n_threads_ == 1 || n_tasks == 1) {  // not worth a wake-up
    for (int t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
    return;
  }
  fn_ = fn;
  ctx_ = ctx;
  for (int offset = 0; offset < n_tasks; offset += kJobTasks) {
    const int job_tasks = std::min(kJobTasks, n_tasks - offset);
    task_offset_ = offset;
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = generation_of(claim_.load(std::memory_order_relaxed)) + 1;
    // seq_cst pairs with the sleeper's increment-then-check in worker_main: either we
    // see its sleepers_ increment and notify, or it sees the new generation.
    claim_.store(gen * kGenerationOne | (uint64_t)job_tasks << kTaskBits, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    run_tasks(0);
    // Wait only for tasks other threads claimed and are still running.
    for (int spins = 0; done_.load(std::memory_order_acquire) != job_tasks; ++spins) {
      if (spins < 1024) PLM_CPU_RELAX();
      else std::this_thread::yield();
    }
  }
}

void ThreadPool::worker_main(int thread_id) {
  uint64_t seen = 0;  // generation whose tasks this worker has run out of
  for (;;) {
    auto start = std::chrono::steady_clock::now();
    for (int spins = 1;; ++spins) {
      if (stop_.load(std::memory_order_acquire)) return;  // the destructor
      if (generation_of(claim_.load(std::memory_order_acquire)) != seen) break;
      PLM_CPU_RELAX();
      if ((spins & 63) == 0) {
        // Let a thread that shares this core (e.g. the caller, when another process
        // holds the other cores) make progress; sleep once the budget is spent.
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() - start > kSpinBudget) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          while (generation_of(claim_.load(std::memory_order_seq_cst)) == seen && !stop_.load())
            wake_.wait(lock);
          sleepers_.fetch_sub(1, std::memory_order_relaxed);
          break;
        }
      }
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = run_tasks(thread_id);
  }
}

}  // namespace plm
