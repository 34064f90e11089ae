// A small persistent thread pool for the CPU custom calls: Run(n, fn) calls fn(0..n-1) on n lanes,
// the calling thread being lane 0, and returns when all are done. Lanes usually pull work items
// from an atomic counter inside fn. One Run at a time (concurrent callers queue).
//
// A step calls Run a few hundred times, ~0.1-1 ms apart. Waking a sleeping worker costs tens of
// microseconds on virtual machines (a futex wake-up), which the caller's lane spends waiting at the
// end of every Run; so an idle worker polls for the next Run (yielding its core) for kIdleSpin
// before it sleeps.
#ifndef XYJAX_THREAD_POOL_H_
#define XYJAX_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace xyjax {

class ThreadPool {
 public:
  // The process-wide pool of the custom calls, created on first use with DefaultLanes() lanes
  // (re-created in a forked child, whose copy has no worker threads).
  static ThreadPool& Shared();

  // XYJAX_ATTENTION_THREADS if set to a positive integer, else std::thread::hardware_concurrency().
  static int DefaultLanes();

  explicit ThreadPool(int lanes);
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool();

  int lanes() const { return lanes_; }

  // Calls fn(lane) for lane in [0, min(n, lanes())) concurrently; lane 0 on the calling thread.
  // fn must not throw.
  void Run(int n, const std::function<void(int)>& fn);

 private:
  void Work(int lane);

  const int lanes_;
  std::mutex run_mu_;  // one Run at a time
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::atomic<uint64_t> generation_{0};  // bumped by every Run, after fn_ and active_ are set
  int active_ = 0;   // lanes of the current Run
  std::atomic<int> pending_{0};  // workers that have not finished (or, if inactive, seen) the current Run
  std::atomic<int> sleepers_{0};  // workers blocked on wake_
  std::atomic<bool> stop_{false};
  const std::function<void(int)>* fn_ = nullptr;
  std::vector<std::thread> workers_;
};

}  // namespace xyjax

#endif  // XYJAX_THREAD_POOL_H_
