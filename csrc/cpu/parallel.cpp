// llmkern's parallel_for, on one of two backends (set_parallel_backend; both sized by torch.set_num_threads):
//
// - "openmp" (the default): at::parallel_for, torch's own OpenMP threads. Kernels and torch's ops share one team, so
//   neither's idle threads spin on the cores the other needs (a training step interleaves both).
// - "pool": a small pool whose workers share each call's parts with the calling thread. An OpenMP region ends in a
//   barrier, so when the OS deschedules one of the team's threads (an HTTP event loop, a client on the same cores),
//   the caller waits for it, at each of a decode step's ~60 regions. Here parts are claimed from a counter: the
//   caller runs every part no worker has claimed, and waits only for parts already running. A worker spins for a
//   while after its last part (a decode step's regions come microseconds apart), then sleeps. `llmkern
//   serve` runs on it.
#include "kernels/parallel.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LLMKERN_PAUSE() _mm_pause()
#else
#define LLMKERN_PAUSE() std::this_thread::yield()
#endif

namespace llmkern {
namespace {

// A worker's wait for the next call before it sleeps: long enough to span the gaps between a step's regions, short
// enough that it sleeps through the Python between steps, whose cores the HTTP event loop and local clients want.
// Serving demo-target on 2 cores with decode steps in C++ (llmkern::decoder_step), two servers side by side: 150 us
// against 1000 gave 1.085-1.106x the output tokens/s at concurrency 16 and 1.05-1.06x lower batch-1 TPOT; 300 us
// was as fast, 40 us 0.93x. (With steps in Python, whose regions came ~0.1 ms apart, 1 ms had beaten 0.2.)
constexpr auto kSpin = std::chrono::microseconds(150);
thread_local bool t_in_parallel = false;  // nested calls run inline

class Pool {
 public:
  // Runs fn on parts of [begin, end), `parts` of them (<= 1 + workers), chunk elements each (the last shorter).
  void run(int64_t begin, int64_t end, int64_t chunk, int64_t parts, const std::function<void(int64_t, int64_t)>& fn) {
    grow(parts - 1);
    fn_.store(&fn, std::memory_order_relaxed);
    begin_.store(begin, std::memory_order_relaxed);
    end_.store(end, std::memory_order_relaxed);
    chunk_.store(chunk, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = (state_.load(std::memory_order_relaxed) >> kEpochShift) + 1;
    state_.store(epoch << kEpochShift | uint64_t(parts) << kPartBits);  // publishes the job: part 0 is next
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    work(epoch);
    while (done_.load(std::memory_order_acquire) < parts) LLMKERN_PAUSE();  // parts other threads are running
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

  // After fork() the child has none of the parent's workers: it starts a new pool.
  static Pool*& instance() {
    static Pool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { instance() = new Pool(); });  // the old one is leaked on purpose
      return new Pool();
    }();
    return pool;
  }

 private:
  // state_ = epoch << 32 | parts << 16 | the next part to claim. The part count shares the claimed word: a worker
  // late for a job must not pair that job's claim counter with the next job's part count.
  static constexpr int kPartBits = 16, kEpochShift = 32;
  static constexpr uint64_t kPartMask = (uint64_t(1) << kPartBits) - 1;

  // Claims and runs parts of job `epoch` until none is left (or the job is no longer current).
  void work(uint64_t epoch) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t part = int64_t(s & kPartMask);
      if (s >> kEpochShift != epoch || part >= int64_t(s >> kPartBits & kPartMask)) return;
      // The job's fields are read before the claim: a successful claim proves the job was not yet fully claimed,
      // so the caller had not yet moved on to the next job's fields.
      const auto* fn = fn_.load(std::memory_order_relaxed);
      const int64_t begin = begin_.load(std::memory_order_relaxed), end = end_.load(std::memory_order_relaxed);
      const int64_t chunk = chunk_.load(std::memory_order_relaxed);
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      t_in_parallel = true;
      try {
        (*fn)(begin + part * chunk, std::min(end, begin + (part + 1) * chunk));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      t_in_parallel = false;
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }

  void grow(int64_t workers) {
    while (int64_t(num_workers_) < workers) {
      std::thread([this] { loop(); }).detach();  // never joined: the pool lives as long as the process
      ++num_workers_;
    }
  }

  void loop() {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "llmkern-pool");  // names it in top, perf and /proc/<pid>/task
#endif
    uint64_t seen = 0;
    for (;;) {
      auto deadline = std::chrono::steady_clock::now() + kSpin;
      uint64_t epoch = state_.load(std::memory_order_acquire) >> kEpochShift;
      for (int i = 0; epoch == seen; ++i) {
        LLMKERN_PAUSE();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) break;
        epoch = state_.load(std::memory_order_acquire) >> kEpochShift;
      }
      if (epoch == seen) {  // seq_cst with run()'s store and load of sleeping_: no wake-up is lost
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return (state_.load() >> kEpochShift) != seen; });
        sleeping_.fetch_sub(1);
        epoch = state_.load() >> kEpochShift;
      }
      seen = epoch;
      work(epoch);
    }
  }

  std::atomic<uint64_t> state_{0};
  std::atomic<const std::function<void(int64_t, int64_t)>*> fn_{nullptr};
  std::atomic<int64_t> begin_{0}, end_{0}, chunk_{0}, done_{0};
  std::atomic<int> sleeping_{0};
  std::exception_ptr error_;
  std::mutex mutex_;  // guards sleeping workers' wake-up and error_
  std::condition_variable wake_;
  int num_workers_ = 0;
};

std::mutex g_caller;  // one caller at a time uses the pool; others run inline
std::atomic<bool> g_use_pool{false};
std::atomic<int> g_pool_threads{0};  // 0: torch's thread count

}  // namespace

std::string parallel_backend() { return g_use_pool.load() ? "pool" : "openmp"; }

void set_parallel_backend(const std::string& name, int64_t pool_threads) {
  if (name != "openmp" && name != "pool")
    throw std::invalid_argument("parallel backend: expected 'openmp' or 'pool', got '" + name + "'");
  if (pool_threads < 0 || pool_threads > 4096)  // parts are counted in 16 bits
    throw std::invalid_argument("num_threads: expected 0..4096, got " + std::to_string(pool_threads));
  g_pool_threads.store(int(pool_threads));
  g_use_pool.store(name == "pool");
}

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (!g_use_pool.load(std::memory_order_relaxed)) return at::parallel_for(begin, end, grain, fn);
  if (begin >= end) return;
  const int64_t n = end - begin, threads = max_threads();
  const int64_t parts = std::min(threads, grain > 0 ? (n + grain - 1) / grain : n);
  if (parts <= 1 || t_in_parallel) return fn(begin, end);  // before the lock: a nested call's thread may own it
  std::unique_lock<std::mutex> lock(g_caller, std::try_to_lock);
  if (!lock.owns_lock()) return fn(begin, end);
  const int64_t chunk = (n + parts - 1) / parts;
  Pool::instance()->run(begin, end, chunk, (n + chunk - 1) / chunk, fn);
}

int max_threads() {
  const int pool = g_use_pool.load(std::memory_order_relaxed) ? g_pool_threads.load(std::memory_order_relaxed) : 0;
  return pool > 0 ? pool : at::get_num_threads();
}

}  // namespace llmkern
