// A small persistent thread pool for the executor's data-parallel ops.
//
// n_threads - 1 worker threads plus the calling thread (thread id 0) run the tasks
// of one parallel_for at a time. Tasks are claimed from one atomic word, so the caller
// never waits for a worker that has not started: a descheduled worker (another
// process holding the core) costs nothing, its share is taken by the others. Between
// calls workers spin briefly (ops follow each other within microseconds during a
// decode step), yielding the core now and then, then sleep on a condition variable so
// an idle session does not burn a core. parallel_for never allocates.
//
// One pool serves one caller at a time: parallel_for is not reentrant and must not
// be called from two threads at once (the executor's Program serialises the steps of
// its States, which share one pool).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace plm {

class ThreadPool {
 public:
  static constexpr int kMaxThreads = 64;

  explicit ThreadPool(int n_threads);  // 1..kMaxThreads, else std::invalid_argument
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int n_threads() const { return n_threads_; }

  // Calls fn(task, thread_id) once for every task in [0, n_tasks),
  // spread over the threads (tasks are claimed dynamically); returns when all are done.
  // thread_id is in [0, n_threads) and identifies per-thread scratch. fn must not throw.
  template <class F>
  void parallel_for(int n_tasks, F&& fn) {
    using Fn = std::remove_reference_t<F>;
    run(n_tasks, [](void* ctx, int task, int tid) { (*static_cast<Fn*>(ctx))(task, tid); },
        const_cast<void*>(static_cast<const void*>(&fn)));
  }

 private:
  using TaskFn = void (*)(void* ctx, int task, int thread_id);
  void run(int n_tasks, TaskFn fn, void* ctx);
  void worker_main(int thread_id);
  // Claims and runs tasks until the job of the claim word runs out; returns its generation.
  uint64_t run_tasks(int thread_id);

  int n_threads_;
  std::vector<std::thread> workers_;

  // The current job; written by the caller before it publishes claim_, read by a thread
  // only after it claimed one of the job's tasks (the caller waits for every claimed task).
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int task_offset_ = 0;  // a parallel_for of more than kJobTasks tasks runs as several jobs

  // claim_ = generation << 40 | n_tasks << 20 | next task; fetch_add(1) claims a task.
  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<int> done_{0};      // tasks of the current job finished
  alignas(64) std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace plm
