// Calls llmserve::parallel_for back to back, each call cut into more chunks than the one
// before, and checks after every call that all of its chunks ran to the end. Usage:
//   parallel_for_stress THREADS CALLS   (prints how many calls returned early)
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

namespace llmserve {
void parallel_for(int64_t n, int64_t min_per_chunk, const std::function<void(int64_t, int64_t)>& fn);
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  at::set_num_threads(std::atoi(argv[1]));  // the team's size, taken on its first call
  const int64_t calls = std::atoll(argv[2]);
  std::vector<int64_t> few(2), many(64);
  int64_t early = 0;
  for (int64_t call = 1; call <= calls; ++call) {
    llmserve::parallel_for(few.size(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) few[i] = call;
    });
    llmserve::parallel_for(many.size(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        volatile double work = 0;
        for (int k = 0; k < 200; ++k) work = work + k;
        many[i] = call;
      }
    });
    for (int64_t value : many) {
      if (value != call) {
        ++early;
        break;
      }
    }
  }
  std::printf("%lld\n", static_cast<long long>(early));
  return 0;
}
