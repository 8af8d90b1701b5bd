// A persistent worker pool for the CPU kernels' parallel loops, whose idle workers sleep.
//
// Why not OpenMP: libgomp's workers spin after every parallel region (GOMP_SPINCOUNT: milliseconds on a
// modern core) before they sleep. The retrieval kernel runs once per batch, and the engine's next stage
// (the user encoder of the next batch, an HTTP event loop) then shares its cores with two spinning threads:
// on the 2-core VM the engine served 64-row batches 1.4x faster with the spin cut (docs/ARCHITECTURE.md,
// "Measurements behind the defaults"). The spin count is a per-process setting, read once, of the one libgomp
// that torch also loads (the same soname), and torch's intra-op loops want the spin (its user encoder ran
// 1.2x slower with it cut). So the kernels that run once per batch use this pool instead, and torch keeps
// its OpenMP as it is.
//
// Semantics: run(n, fn) calls fn(i) once for every i in [0, n) and returns when all have returned; the
// calling thread takes parts too. One job at a time: a call made while another thread's job holds the pool
// runs its parts serially on its own thread (two concurrent searches then use one core each, not 2x the
// threads). An exception thrown by fn is rethrown by run() after every part has finished. After fork() the
// child gets a fresh, empty pool (the parent's workers do not exist there). Host code only; no framework types.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dpr_pool {

class Pool {
 public:
  using Fn = std::function<void(int64_t)>;
  static constexpr int kMaxWorkers = 255;

  static Pool& get() {
    static std::once_flag once;
    std::call_once(once, [] {
      current() = new Pool();
      pthread_atfork(nullptr, nullptr, [] { current() = new Pool(); });   // the old one is left as is (leaked)
    });
    return *current();
  }

  // fn(i) for every i in [0, n), on up to n threads (this one included).
  void run(int64_t n, const Fn& fn) {
    if (n <= 0) return;
    if (n == 1 || inside()) {                 // one part, or a loop inside a part: no hand-off
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::unique_lock<std::mutex> job(busy_, std::try_to_lock);
    if (!job.owns_lock()) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    inside() = true;
    struct Reset {
      ~Reset() { inside() = false; }
    } reset;
    grow(static_cast<int>(std::min<int64_t>(n - 1, kMaxWorkers)));
    {
      std::lock_guard<std::mutex> lk(m_);
      fn_ = &fn;
      n_ = n;
      next_.store(0, std::memory_order_relaxed);
      finished_ = 0;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    work(fn, n);
    std::exception_ptr err;
    {
      std::unique_lock<std::mutex> lk(m_);
      // every part done, and no worker still inside this job (a late one must not read fn_ of the next)
      done_.wait(lk, [&] { return finished_ == n_ && in_job_ == 0; });
      fn_ = nullptr;
      err = error_;
      error_ = nullptr;
    }
    if (err) std::rethrow_exception(err);
  }

 private:
  Pool() = default;

  static bool& inside() {            // this thread is running a part (or a job) of the pool
    static thread_local bool flag = false;
    return flag;
  }

  static Pool*& current() {
    static Pool* p = nullptr;
    return p;
  }

  void grow(int want) {
    std::lock_guard<std::mutex> lk(m_);
    while (count_ < want) {
      std::thread(&Pool::loop, this, generation_).detach();   // never joined: the pool lives as long as the process
      ++count_;
    }
  }

  void loop(uint64_t seen) {
    for (;;) {
      const Fn* fn;
      int64_t n;
      {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (fn_ == nullptr) continue;      // woke after that job had ended
        fn = fn_;
        n = n_;
        ++in_job_;
      }
      inside() = true;
      work(*fn, n, true);
      inside() = false;
    }
  }

  void work(const Fn& fn, int64_t n, bool worker = false) {
    int64_t did = 0;
    std::exception_ptr err;
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n; ++did) {
      try {
        fn(i);
      } catch (...) {
        if (!err) err = std::current_exception();
      }
    }
    std::lock_guard<std::mutex> lk(m_);
    finished_ += did;
    if (err && !error_) error_ = err;
    if (worker) --in_job_;
    if (finished_ == n_ && in_job_ == 0) done_.notify_all();
  }

  std::mutex busy_;                  // held by the thread whose job is running
  std::mutex m_;                     // guards everything below but next_
  std::condition_variable wake_;     // workers: a new job (generation_ changed)
  std::condition_variable done_;     // the caller: finished_ == n_ and no worker inside the job
  uint64_t generation_ = 0;
  const Fn* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};     // the next part to claim
  int64_t finished_ = 0;
  int in_job_ = 0;
  int count_ = 0;
  std::exception_ptr error_;
};

// fn(i) for i in [0, n) on the shared pool.
inline void parallel_for(int64_t n, const Pool::Fn& fn) { Pool::get().run(n, fn); }

}  // namespace dpr_pool
