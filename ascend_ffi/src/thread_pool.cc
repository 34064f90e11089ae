#include "thread_pool.h"

#include <unistd.h>

#include <chrono>
#include <cstdlib>

namespace xyjax {

namespace {
// How long Run polls for the other lanes before it sleeps on the condition variable.
constexpr std::chrono::microseconds kSpin{500};
// How long an idle worker polls for the next Run before it sleeps.
constexpr std::chrono::microseconds kIdleSpin{2000};
}  // namespace

int ThreadPool::DefaultLanes() {
  if (const char* env = std::getenv("XYJAX_ATTENTION_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && n > 0) return n > 1024 ? 1024 : static_cast<int>(n);
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

ThreadPool& ThreadPool::Shared() {
  // Leaked on purpose: workers may still be parked when static destructors run at exit.
  static std::mutex mu;
  static ThreadPool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (pool == nullptr || owner != getpid()) {  // a forked child inherits no worker threads
    pool = new ThreadPool(DefaultLanes());
    owner = getpid();
  }
  return *pool;
}

ThreadPool::ThreadPool(int lanes) : lanes_(lanes < 1 ? 1 : lanes) {
  workers_.reserve(lanes_ - 1);
  for (int lane = 1; lane < lanes_; ++lane) workers_.emplace_back([this, lane] { Work(lane); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::Work(int lane) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t generation = generation_.load(std::memory_order_acquire);
    const auto until = std::chrono::steady_clock::now() + kIdleSpin;
    while (generation == seen && !stop_.load(std::memory_order_relaxed) && std::chrono::steady_clock::now() < until) {
      std::this_thread::yield();
      generation = generation_.load(std::memory_order_acquire);
    }
    if (generation == seen) {
      // Announce the sleep before the last look at generation_; Run bumps generation_ before it reads
      // sleepers_ (both sequentially consistent), so one of the two sees the other.
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return stop_.load() || (generation = generation_.load()) != seen; });
      sleepers_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen = generation;
    if (lane < active_) (*fn_)(lane);
    // Every worker reports every Run (an inactive one too), so none can lag into the next Run's fn_.
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);   // Run checks pending_ under mu_ before it waits
      done_.notify_one();
    }
  }
}

void ThreadPool::Run(int n, const std::function<void(int)>& fn) {
  if (n > lanes_) n = lanes_;
  if (n <= 1) {
    fn(0);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  fn_ = &fn;
  active_ = n;
  pending_.store(lanes_ - 1, std::memory_order_relaxed);
  generation_.fetch_add(1);   // publishes fn_ and active_
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    wake_.notify_all();
  }
  fn(0);
  // The others are at most one work item behind: spin a little before sleeping.
  const auto until = std::chrono::steady_clock::now() + kSpin;
  while (pending_.load(std::memory_order_acquire) != 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::yield();
  }
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  fn_ = nullptr;
}

}  // namespace xyjax
