// One entry point for the CPU ops' OpenMP regions.
#pragma once

#include <omp.h>

#include <cstdint>

namespace rag_engine {

// Runs fn(thread, threads) on `threads` OpenMP threads. One thread runs fn inline:
// GOMP_parallel builds a team even for a single thread (an aligned allocation and a
// futex wake, ~0.5 us of a 1.5 us call). Barriers and `omp for` inside fn are orphaned
// constructs, so they bind to this region, or run as plain code on the inline path.
template <class F>
inline void parallel_region(int64_t threads, F&& fn) {
  if (threads <= 1) {
    fn(int64_t{0}, int64_t{1});
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  fn(static_cast<int64_t>(omp_get_thread_num()), static_cast<int64_t>(omp_get_num_threads()));
}

}  // namespace rag_engine
