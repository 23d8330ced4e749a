// The threads our kernels split work over: one process-wide team that spins briefly between
// calls and then sleeps, whichever thread calls. (OpenMP keeps a team per calling thread and,
// once a process has more OpenMP threads than cores, stops spinning between parallel regions,
// which doubled a decode step run from a service's engine thread.)
#pragma once

#include <cstdint>
#include <functional>

namespace llmserve {

// Runs fn(begin, end) over [0, n) cut into contiguous chunks (at most ceil(n / min_per_chunk),
// and 4 per thread), which the team's threads take in turn; returns when all are done. Which
// thread runs a chunk varies from call to call; what a chunk computes must not depend on it.
void parallel_for(int64_t n, int64_t min_per_chunk, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace llmserve
