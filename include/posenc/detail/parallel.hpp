// SPDX-License-Identifier: MIT
// A task loop over OpenMP threads (serial without OpenMP) with one workspace per thread and
// exceptions carried out of the parallel region.
#pragma once

#include <algorithm>
#include <exception>
#include <optional>

#include "posenc/tensor.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace posenc::detail {

/// Number of threads a call will use: `requested` if positive, else the OpenMP default; never
/// more than `tasks`, never less than 1.
inline int thread_count(int requested, Index tasks) {
#ifdef _OPENMP
  const int available = requested > 0 ? requested : omp_get_max_threads();
#else
  const int available = 1;
  (void)requested;
#endif
  return static_cast<int>(std::clamp<Index>(std::min<Index>(available, tasks), 1, 1 << 16));
}

/// Runs `body(task, workspace)` for task = 0 .. tasks-1 on `threads` threads, dynamically
/// scheduled. Each thread builds its own workspace with `make_workspace()`. Each thread limits
/// its own OpenMP ICV to one thread while it runs tasks, so Eigen products inside encoder stages
/// (which consult omp_get_max_threads) never fork a nested team. The first exception thrown by
/// any task is rethrown after the loop.
template <class MakeWorkspace, class Body>
void parallel_tasks(Index tasks, int threads, MakeWorkspace&& make_workspace, Body&& body) {
  if (tasks <= 0) return;
#ifdef _OPENMP
  if (threads == 1) {
    // No region for one thread: libgomp allocates (and frees) a one-thread team per region,
    // and the steady state must not allocate. Limit this thread's ICV instead, restored after.
    const int previous = omp_get_max_threads();
    omp_set_num_threads(1);
    try {
      auto workspace = make_workspace();
      for (Index task = 0; task < tasks; ++task) body(task, workspace);
    } catch (...) {
      omp_set_num_threads(previous);
      throw;
    }
    omp_set_num_threads(previous);
    return;
  }
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    omp_set_num_threads(1);  // affects this implicit task only (nthreads-var is task-local)
    std::optional<decltype(make_workspace())> workspace;
    try {
      workspace.emplace(make_workspace());
    } catch (...) {
#pragma omp critical(posenc_parallel_error)
      if (!error) error = std::current_exception();
    }
#pragma omp for schedule(dynamic, 1)
    for (Index task = 0; task < tasks; ++task) {
      if (!workspace) continue;
      try {
        body(task, *workspace);
      } catch (...) {
#pragma omp critical(posenc_parallel_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  (void)threads;
  auto workspace = make_workspace();
  for (Index task = 0; task < tasks; ++task) body(task, workspace);
#endif
}

}  // namespace posenc::detail
