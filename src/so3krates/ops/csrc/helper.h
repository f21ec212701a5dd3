// The pair-message kernel's helper thread (included by pair_messages.cpp, one translation unit).
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

// MKL's thread-local thread count, where torch links MKL (libtorch_cpu exports it); null elsewhere (weak).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
extern "C" int MKL_Get_Max_Threads() __attribute__((weak));

namespace {

// A second thread for whole-graph calls of a caller that runs torch on one thread (small molecules: every
// other operation of an evaluation is faster on one thread, benchmarks/results/thresholds.md) but lets the
// kernel use two (set_kernel_threads). Written by hand because torch's pool cannot give it cheaply: under
// OMP_WAIT_POLICY=PASSIVE, each parallel region wakes a sleeping OpenMP thread (3BPA, the kernel on two
// OpenMP threads: 1.26-1.33 ms per evaluation against 1.18 on one). This thread waits for work actively
// for kSpin after each task, so that it is awake for the next of an evaluation's kernel calls and large
// matrix products (products), and then sleeps on a condition variable: it holds a core only while
// evaluations follow each other.
constexpr auto kSpin = std::chrono::microseconds(300);
// The caller's time in its own parts and waiting for the helper's are summed over kWindow tasks; where it
// waited longer than it worked (running both parts itself had been faster: the helper's core is shared with
// another busy process), the caller runs both parts itself for the next kSkipRuns tasks, twice as many after
// each further such window (at most kMaxSkipRuns, ~0.3 s of 3BPA evaluations of 17 tasks), as many again
// after a window where the helper kept up. The same parts either way, so the same numbers.
constexpr int64_t kWindow = 32, kSkipRuns = 256, kMaxSkipRuns = 4096;

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Helper {
 public:
  Helper() { std::thread([this] { serve(); }).detach(); }

  // Runs mine() here and theirs() on the helper thread at once; returns when both have returned. Where
  // another caller has the helper, both run here, one after the other (the same numbers: each part adds
  // into rows of its own). So does a call whose helper has not taken theirs() by the time mine() returns
  // (asleep, or its core busy with another process): the caller does not wait for a helper that is late.
  template <typename Mine, typename Theirs>
  void run(Mine&& mine, Theirs&& theirs) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || skip_left_ > 0) {
      if (busy.owns_lock()) {
        --skip_left_;
        skipped_.fetch_add(1, std::memory_order_relaxed);
      }
      mine();
      theirs();
      return;
    }
    const std::function<void()> task = theirs;
    const auto start = std::chrono::steady_clock::now();
    std::exception_ptr error;
    task_ = &task;
    error_ = &error;
    const uint64_t n = posted_.load(std::memory_order_relaxed) + 1;
    {
      std::lock_guard<std::mutex> lock(sleep_);
      posted_.store(n, std::memory_order_release);
    }
    wake_.notify_one();
    std::exception_ptr mine_error;
    try {
      mine();
    } catch (...) {
      mine_error = std::current_exception();
    }
    uint64_t unclaimed = n - 1;
    if (claimed_.compare_exchange_strong(unclaimed, n, std::memory_order_acq_rel)) {
      if (mine_error) std::rethrow_exception(mine_error);
      theirs();  // the helper has not started it: it never will (its claim of n fails)
      return;
    }
    const auto mine_done = std::chrono::steady_clock::now();
    while (done_.load(std::memory_order_acquire) != n) relax();
    worked_ += mine_done - start;
    waited_ += std::chrono::steady_clock::now() - mine_done;
    if (++window_ == kWindow) {
      if (waited_ > worked_) {  // both parts here had been faster
        skip_left_ = skip_runs_;
        skip_runs_ = std::min(2 * skip_runs_, kMaxSkipRuns);
      } else {
        skip_runs_ = kSkipRuns;
      }
      window_ = 0;
      worked_ = waited_ = std::chrono::steady_clock::duration::zero();
    }
    if (mine_error) std::rethrow_exception(mine_error);
    if (error) std::rethrow_exception(error);
  }

  // chunk(k) for k < n, taken one at a time by the caller and the helper from a shared counter, so that a
  // helper slower than the caller (its core busy elsewhere) takes fewer; returns when all have returned.
  // The chunks must not depend on which thread runs them (columns of their own, say).
  template <typename Chunk>
  void run_chunks(int64_t n, const Chunk& chunk) {
    std::atomic<int64_t> next{0};
    const auto take = [&] {
      for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n;
           k = next.fetch_add(1, std::memory_order_relaxed))
        chunk(k);
    };
    run(take, take);  // a late helper: the caller's second take() finds nothing left
  }

  // Tasks run here because of the helper's record (kWindow) so far; and, for tests, a delay before each of
  // its tasks (a slow helper) that also clears its record. Returns the delay before.
  int64_t skipped() const { return skipped_.load(std::memory_order_relaxed); }
  int64_t test_delay(int64_t microseconds) {
    std::lock_guard<std::mutex> busy(busy_);
    window_ = 0, skip_left_ = 0, skip_runs_ = kSkipRuns;
    worked_ = waited_ = std::chrono::steady_clock::duration::zero();
    return delay_us_.exchange(microseconds);
  }
  // Threads of the matrix-product library's calls on the helper thread (MKL's where torch links it, else
  // OpenMP's), once it has started.
  int64_t library_threads() const {
    int64_t threads;
    while ((threads = library_threads_.load(std::memory_order_acquire)) == 0) std::this_thread::yield();
    return threads;
  }

  // Wakes the helper where it sleeps, so that it waits actively for the kernel calls that follow: called as
  // an evaluation starts, ~0.1 ms before its first kernel call; waking it only at that call cost ethanol
  // (36 pairs) more than its second part saved. Not while its callers leave it out (kWindow).
  void call() {
    if (skip_left_.load(std::memory_order_relaxed) > 0) return;  // not needed: let it sleep
    {
      std::lock_guard<std::mutex> lock(sleep_);
      if (!asleep_) return;
      ++calls_;
    }
    wake_.notify_one();
  }

 private:
  void serve() {
    // The matrix-product library's calls on this thread: one thread. MKL takes MKL_NUM_THREADS before
    // omp_set_num_threads, and with MKL_NUM_THREADS=2 (as job scripts set it) each product of this thread
    // opened a team of two: 3BPA 0.92 ms per evaluation against 0.72 without it.
    omp_set_num_threads(1);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(1);
    library_threads_.store(MKL_Get_Max_Threads != nullptr ? MKL_Get_Max_Threads() : omp_get_max_threads());
    uint64_t seen = 0;
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      while (posted_.load(std::memory_order_acquire) == seen) {
        if (std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(sleep_);
          asleep_ = true;
          const uint64_t calls = calls_;
          wake_.wait(lock, [&] { return posted_.load(std::memory_order_acquire) != seen || calls_ != calls; });
          asleep_ = false;
          start = std::chrono::steady_clock::now();  // woken by call(): wait actively again
        }
        relax();
      }
      seen = posted_.load(std::memory_order_acquire);
      uint64_t unclaimed = seen - 1;
      if (!claimed_.compare_exchange_strong(unclaimed, seen, std::memory_order_acq_rel)) continue;  // caller's
      if (const int64_t delay = delay_us_.load(std::memory_order_relaxed); delay > 0)
        std::this_thread::sleep_for(std::chrono::microseconds(delay));
      try {
        (*task_)();
      } catch (...) {
        *error_ = std::current_exception();
      }
      done_.store(seen, std::memory_order_release);
    }
  }

  // Task n is posted, claimed (by the helper, or by the caller where the helper is late) and done by the
  // helper, in that order; each task is claimed once.
  std::atomic<uint64_t> posted_{0}, claimed_{0}, done_{0};
  const std::function<void()>* task_ = nullptr;
  std::exception_ptr* error_ = nullptr;
  std::mutex busy_, sleep_;
  // The helper's record (kWindow): guarded by busy_.
  int64_t window_ = 0, skip_runs_ = kSkipRuns;
  std::atomic<int64_t> skip_left_{0};  // written under busy_, read by call() without it
  std::atomic<int64_t> skipped_{0}, delay_us_{0}, library_threads_{0};
  std::chrono::steady_clock::duration worked_{}, waited_{};
  std::condition_variable wake_;
  bool asleep_ = false;  // guarded by sleep_, as calls_
  uint64_t calls_ = 0;
};

// The helper of this process, started on first use. After fork() the child has the object but not its thread:
// a child that calls the kernel starts a helper of its own. Never destroyed (the thread may wait on it when the
// process exits).
Helper& helper() {
  static std::mutex guard;
  static Helper* helper = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(guard);
  if (helper == nullptr || owner != getpid()) {
    helper = new Helper();
    owner = getpid();
  }
  return *helper;
}

// Threads the whole-graph calls of this thread may use while torch runs on one (set_kernel_threads): 1 or 2.
thread_local int64_t kernel_threads = 1;

// Whether a call on this thread may hand work to the helper: the caller allows two threads and torch runs on
// one (on more, the work splits among torch's threads).
inline bool helper_allowed() { return kernel_threads > 1 && at::get_num_threads() == 1; }

}  // namespace
