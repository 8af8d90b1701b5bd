// Checks of kernels/thread_pool.h, compiled and run by tests/test_thread_pool.py (g++ -pthread). Prints one
// "ok <name>" line per check that passed; exits non-zero (with a message) at the first that fails.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "thread_pool.h"

static void fail(const std::string& what) {
  std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  std::exit(1);
}

// every index of [0, n) runs exactly once, for many n and many jobs in a row
static void each_index_once() {
  for (int rep = 0; rep < 50; ++rep) {
    for (int64_t n = 0; n <= 70; ++n) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      for (auto& h : hits) h.store(0);
      dpr_pool::parallel_for(n, [&](int64_t i) { hits[static_cast<size_t>(i)].fetch_add(1); });
      for (int64_t i = 0; i < n; ++i)
        if (hits[static_cast<size_t>(i)].load() != 1) fail("index " + std::to_string(i) + " of n=" + std::to_string(n));
    }
  }
  std::puts("ok each_index_once");
}

// parts really run on several threads (the pool is not serial)
static void uses_several_threads() {
  std::atomic<int> inside{0}, most{0};
  dpr_pool::parallel_for(4, [&](int64_t) {
    const int now = inside.fetch_add(1) + 1;
    int m = most.load();
    while (now > m && !most.compare_exchange_weak(m, now)) {
    }
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
    while (inside.load() < 4 && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    inside.fetch_sub(1);
  });
  if (most.load() < 2) fail("all parts ran on one thread");
  std::puts("ok uses_several_threads");
}

// a loop inside a part runs serially on that thread, and completes
static void nested_runs_serially() {
  std::atomic<int64_t> sum{0};
  dpr_pool::parallel_for(3, [&](int64_t i) {
    dpr_pool::parallel_for(5, [&](int64_t j) { sum.fetch_add(i * 10 + j); });
  });
  if (sum.load() != (0 + 10 + 20) * 5 + 3 * (0 + 1 + 2 + 3 + 4)) fail("nested sum");
  std::puts("ok nested_runs_serially");
}

// concurrent callers: each gets all of its parts run (the loser of the pool runs serially)
static void concurrent_callers() {
  std::vector<std::thread> callers;
  std::atomic<int> bad{0};
  for (int c = 0; c < 8; ++c) {
    callers.emplace_back([&, c] {
      for (int rep = 0; rep < 200; ++rep) {
        const int64_t n = 1 + (c * 7 + rep) % 9;
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        for (auto& h : hits) h.store(0);
        dpr_pool::parallel_for(n, [&](int64_t i) { hits[static_cast<size_t>(i)].fetch_add(1); });
        for (auto& h : hits)
          if (h.load() != 1) bad.fetch_add(1);
      }
    });
  }
  for (auto& t : callers) t.join();
  if (bad.load()) fail("concurrent callers: " + std::to_string(bad.load()) + " parts not run exactly once");
  std::puts("ok concurrent_callers");
}

// an exception from one part reaches the caller after every other part has run; the pool stays usable
static void exception_is_rethrown() {
  std::atomic<int> ran{0};
  bool caught = false;
  try {
    dpr_pool::parallel_for(6, [&](int64_t i) {
      ran.fetch_add(1);
      if (i == 3) throw std::runtime_error("part 3");
    });
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "part 3";
  }
  if (!caught) fail("exception not rethrown");
  if (ran.load() != 6) fail("not every part ran before the rethrow");
  std::atomic<int> again{0};
  dpr_pool::parallel_for(4, [&](int64_t) { again.fetch_add(1); });
  if (again.load() != 4) fail("pool unusable after an exception");
  std::puts("ok exception_is_rethrown");
}

static double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// idle workers sleep: after a job, the process uses (almost) no CPU while the caller sleeps (OpenMP's
// workers would spin here)
static void idle_workers_sleep() {
  std::atomic<int64_t> sink{0};
  dpr_pool::parallel_for(4, [&](int64_t i) { sink.fetch_add(i); });
  const double c0 = cpu_seconds();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const double used = cpu_seconds() - c0;
  if (used > 0.05) fail("idle pool used " + std::to_string(used) + " s of CPU in 0.2 s");
  std::puts("ok idle_workers_sleep");
}

// a child forked after the pool has workers gets a working pool of its own
static void works_after_fork() {
  dpr_pool::parallel_for(4, [](int64_t) {});
  const pid_t pid = fork();
  if (pid < 0) fail("fork");
  if (pid == 0) {
    alarm(20);                 // a hang in the child is a failure, not a stuck test
    std::atomic<int> n{0};
    dpr_pool::parallel_for(4, [&](int64_t) { n.fetch_add(1); });
    std::_Exit(n.load() == 4 ? 0 : 3);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("child after fork: status " + std::to_string(status));
  std::puts("ok works_after_fork");
}

int main() {
  each_index_once();
  uses_several_threads();
  nested_runs_serially();
  concurrent_callers();
  exception_is_rethrown();
  idle_workers_sleep();
  works_after_fork();
  return 0;
}
