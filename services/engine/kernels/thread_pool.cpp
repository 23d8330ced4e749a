#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#define LLMSERVE_PAUSE() _mm_pause()
#else
#define LLMSERVE_PAUSE() std::this_thread::yield()
#endif

namespace llmserve {
namespace {

using Clock = std::chrono::steady_clock;

// The OS's id of the calling thread, which a priority can be set by (Linux); else -1.
int64_t thread_id() {
#if defined(__linux__)
  return static_cast<int64_t>(syscall(SYS_gettid));
#else
  return -1;
#endif
}

// Work is cut into chunks taken from a shared counter, so a thread the OS preempts holds up
// at most the chunk it is in (a static split would stall the whole call until it runs again).
class Team {
 public:
  // Spin time after each call before sleeping: LLMSERVE_SPIN_US (default 300).
  explicit Team(int num_threads) : num_threads_(std::max(1, num_threads)) {
    const char* spin = std::getenv("LLMSERVE_SPIN_US");
    spin_ = std::chrono::microseconds(spin ? std::atoll(spin) : 300);
    ids_ = std::vector<std::atomic<int64_t>>(num_threads_ - 1);
    for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this, i] {
      ids_[i - 1].store(thread_id());
      work();
    });
  }

  ~Team() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int num_threads() const { return num_threads_; }

  // The OS's ids of the worker threads (the caller is the team's other thread).
  std::vector<int64_t> worker_ids() const {
    std::vector<int64_t> ids;
    for (const auto& id : ids_) {
      while (id.load() == 0) std::this_thread::yield();  // a worker not yet started
      ids.push_back(id.load());
    }
    return ids;
  }

  void run(int64_t n, int64_t min_per_chunk, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t chunks = std::min<int64_t>({4 * num_threads_, kMaxChunks,
                                              (n + min_per_chunk - 1) / min_per_chunk});
    // Small, or the team is busy with another thread's call: run on the calling thread.
    if (num_threads_ == 1 || chunks <= 1 || busy_.exchange(true)) {
      if (n > 0) fn(0, n);
      return;
    }
    job_ = &fn;
    job_n_ = n;
    done_.store(0);
    const uint32_t generation = generation_.load() + 1;  // wraps: only equality matters
    // Published with the job: a thread that claims one of these chunks sees job_ and job_n_.
    next_.store(uint64_t{generation} << 32 | static_cast<uint64_t>(chunks) << 16,
                std::memory_order_release);
    generation_.store(generation);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    take_chunks(generation);
    while (done_.load(std::memory_order_acquire) < chunks) LLMSERVE_PAUSE();
    busy_.store(false);
  }

 private:
  static constexpr int64_t kMaxChunks = 0xffff;

  // Runs chunks of `generation`'s job until none is left (or a newer job has begun). The
  // generation, the chunk count and the next index are one word, so a claim is checked
  // against the job it claims from: a thread that read the word as the previous job ended
  // can never take a chunk number of the next one (which would run that chunk twice and
  // count it twice, letting the call return while a chunk is still being computed).
  void take_chunks(uint32_t generation) {
    while (true) {
      uint64_t next = next_.load(std::memory_order_acquire);
      if (static_cast<uint32_t>(next >> 32) != generation) return;
      const int64_t chunks = static_cast<int64_t>((next >> 16) & kMaxChunks);
      const int64_t index = static_cast<int64_t>(next & kMaxChunks);
      if (index >= chunks) return;
      if (!next_.compare_exchange_weak(next, next + 1, std::memory_order_acq_rel)) continue;
      // The chunk is ours, and its job cannot change before every chunk is marked done.
      const int64_t begin = job_n_ * index / chunks;
      const int64_t end = job_n_ * (index + 1) / chunks;
      if (begin < end) (*job_)(begin, end);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void work() {
    uint32_t seen = 0;  // the constructor returns before the first call
    while (true) {
      const auto spin_until = Clock::now() + spin_;
      while (generation_.load(std::memory_order_acquire) == seen && Clock::now() < spin_until)
        LLMSERVE_PAUSE();
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = generation_.load();
      if (stopping_) return;
      take_chunks(seen);
    }
  }

  const int num_threads_;
  std::chrono::microseconds spin_;
  std::vector<std::thread> workers_;
  std::vector<std::atomic<int64_t>> ids_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<uint64_t> next_{0};  // generation << 32 | chunks << 16 | next chunk index
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> busy_{false};
  std::atomic<bool> stopping_{false};
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
};

std::atomic<int> requested_threads{0};

Team& team() {
  // Sized on first use: set_num_threads if called before, else torch's intra-op threads.
  static Team instance(requested_threads.load() > 0 ? requested_threads.load()
                                                    : at::get_num_threads());
  return instance;
}

void set_num_threads(int64_t num_threads) {
  TORCH_CHECK(num_threads > 0, "num_threads must be positive");
  requested_threads.store(static_cast<int>(num_threads));
  TORCH_CHECK(team().num_threads() == num_threads,
              "the kernels' threads were already started with ", team().num_threads());
}

std::vector<int64_t> worker_thread_ids() { return team().worker_ids(); }

}  // namespace

void parallel_for(int64_t n, int64_t min_per_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  team().run(n, std::max<int64_t>(1, min_per_chunk), fn);
}

}  // namespace llmserve

TORCH_LIBRARY_FRAGMENT(llmserve, m) {
  m.def("set_num_threads(int num_threads) -> ()");
  m.def("worker_thread_ids() -> int[]");
}

TORCH_LIBRARY_IMPL(llmserve, CatchAll, m) {
  m.impl("set_num_threads", &llmserve::set_num_threads);
  m.impl("worker_thread_ids", &llmserve::worker_thread_ids);
}
