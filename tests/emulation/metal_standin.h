// Stand-in for the Metal Shading Language, so that g++ (C++20) compiles the kernel bodies in
// metal/ unchanged and runs them on the CPU.
//
// Every thread of a threadgroup runs as one OS thread. SIMD-group functions (simd_sum,
// simd_shuffle, ...) exchange values through a per-SIMD-group slot array guarded by a
// std::barrier, and threadgroup_barrier waits on a barrier over the whole threadgroup.
// Threadgroups run one after another. A thread that returns from the kernel leaves both
// barriers, so SIMD-group functions then combine only the lanes still running, as on a GPU.
//
// Limits of the emulation:
// - Address-space qualifiers (device, constant, thread, threadgroup) are empty macros. A
//   `threadgroup` array declared inside a body would become a private per-thread array, so
//   tests/emulation/emulator.py rejects bodies that declare one.
// - half and float16_t are _Float16 (IEEE binary16 with round-to-nearest-even conversions,
//   like Metal's half). bfloat16 is not emulated.
// - The SIMD width is 32, as on Apple GPUs, and SIMD-group reductions add lanes in lane
//   order, so float results may differ from a GPU in the last bits.

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

// ---- Scalar and vector types -------------------------------------------------------------

using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using half = _Float16;
using float16_t = _Float16;

template <typename S>
struct emulated_vec2 {
  S x, y;
};

template <typename S>
struct emulated_vec3 {
  S x, y, z;
};

template <typename S>
struct emulated_vec4 {
  S x, y, z, w;
};

using uint2 = emulated_vec2<uint>;
using uint3 = emulated_vec3<uint>;
using uint4 = emulated_vec4<uint>;
using int2 = emulated_vec2<int>;
using int3 = emulated_vec3<int>;
using int4 = emulated_vec4<int>;
using float2 = emulated_vec2<float>;
using float3 = emulated_vec3<float>;
using float4 = emulated_vec4<float>;
using half2 = emulated_vec2<half>;
using half4 = emulated_vec4<half>;

// ---- Thread runtime ----------------------------------------------------------------------

namespace metal_emulation {

constexpr int kSimdWidth = 32;
constexpr std::size_t kSlotBytes = 16;

// Thread attributes that a generated kernel signature can ask for.
struct ThreadIds {
  uint3 thread_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threadgroup_position_in_grid;
  uint3 threads_per_threadgroup;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint thread_index_in_threadgroup;
  uint simdgroup_index_in_threadgroup;
  uint thread_index_in_simdgroup;
  uint threads_per_simdgroup;
  uint simdgroups_per_threadgroup;
  uint thread_execution_width;
};

struct SimdGroupState {
  explicit SimdGroupState(int lane_count) : barrier(lane_count) {
    for (auto& flag : active) {
      flag.store(false);
    }
  }
  std::barrier<> barrier;
  std::array<std::array<unsigned char, kSlotBytes>, kSimdWidth> slots{};
  std::array<std::atomic<bool>, kSimdWidth> active;
};

struct ThreadgroupState {
  explicit ThreadgroupState(int thread_count) : barrier(thread_count) {}
  std::barrier<> barrier;
};

struct LaneContext {
  SimdGroupState* simd = nullptr;
  ThreadgroupState* group = nullptr;
  uint lane = 0;
};

inline thread_local LaneContext current_lane;

inline uint ceil_div(uint a, uint b) { return (a + b - 1) / b; }

// Runs `body(ids)` once for every thread of `grid`, as Metal's dispatchThreads does: the
// threadgroup size is clipped to the grid (as MLX does before dispatching), edge threadgroups
// hold only the threads inside the grid, and threadgroups run one after another.
template <typename Body>
void dispatch_threads(uint3 grid, uint3 requested_group, Body&& body) {
  const uint3 group{std::min(requested_group.x, grid.x), std::min(requested_group.y, grid.y),
                    std::min(requested_group.z, grid.z)};
  const uint group_threads = group.x * group.y * group.z;
  if (group_threads == 0) {
    return;
  }
  const uint3 groups{ceil_div(grid.x, group.x), ceil_div(grid.y, group.y),
                     ceil_div(grid.z, group.z)};
  const uint simd_count = ceil_div(group_threads, kSimdWidth);

  for (uint gz = 0; gz < groups.z; ++gz) {
    for (uint gy = 0; gy < groups.y; ++gy) {
      for (uint gx = 0; gx < groups.x; ++gx) {
        // Collect the threads of this threadgroup that lie inside the grid.
        std::vector<ThreadIds> launched;
        std::vector<int> lanes_per_simd(simd_count, 0);
        for (uint index = 0; index < group_threads; ++index) {
          const uint3 local{index % group.x, (index / group.x) % group.y,
                            index / (group.x * group.y)};
          const uint3 global{gx * group.x + local.x, gy * group.y + local.y,
                             gz * group.z + local.z};
          if (global.x >= grid.x || global.y >= grid.y || global.z >= grid.z) {
            continue;
          }
          ThreadIds ids{};
          ids.thread_position_in_grid = global;
          ids.thread_position_in_threadgroup = local;
          ids.threadgroup_position_in_grid = uint3{gx, gy, gz};
          ids.threads_per_threadgroup = group;
          ids.threadgroups_per_grid = groups;
          ids.threads_per_grid = grid;
          ids.thread_index_in_threadgroup = index;
          ids.simdgroup_index_in_threadgroup = index / kSimdWidth;
          ids.thread_index_in_simdgroup = index % kSimdWidth;
          ids.threads_per_simdgroup = kSimdWidth;
          ids.simdgroups_per_threadgroup = simd_count;
          ids.thread_execution_width = kSimdWidth;
          launched.push_back(ids);
          lanes_per_simd[index / kSimdWidth] += 1;
        }
        if (launched.empty()) {
          continue;
        }

        ThreadgroupState group_state(static_cast<int>(launched.size()));
        std::deque<SimdGroupState> simd_states;
        for (uint s = 0; s < simd_count; ++s) {
          simd_states.emplace_back(std::max(lanes_per_simd[s], 1));
        }
        for (const ThreadIds& ids : launched) {
          simd_states[ids.simdgroup_index_in_threadgroup]
              .active[ids.thread_index_in_simdgroup]
              .store(true);
        }

        std::vector<std::thread> workers;
        workers.reserve(launched.size());
        for (const ThreadIds& ids : launched) {
          workers.emplace_back([&, ids] {
            SimdGroupState& simd = simd_states[ids.simdgroup_index_in_threadgroup];
            current_lane = LaneContext{&simd, &group_state, ids.thread_index_in_simdgroup};
            body(ids);
            // The thread has returned: later SIMD-group functions and barriers go on without it.
            simd.active[ids.thread_index_in_simdgroup].store(false);
            simd.barrier.arrive_and_drop();
            group_state.barrier.arrive_and_drop();
          });
        }
        for (auto& worker : workers) {
          worker.join();
        }
      }
    }
  }
}

// Publishes `value` to the SIMD group, waits for every running lane, then calls
// `read(slots, active)` and waits again so no lane overwrites a slot that is still read.
template <typename V, typename Read>
auto simd_exchange(V value, Read read) {
  static_assert(sizeof(V) <= kSlotBytes, "SIMD-group value is larger than an emulator slot");
  LaneContext& lane = current_lane;
  std::memcpy(lane.simd->slots[lane.lane].data(), &value, sizeof(V));
  lane.simd->barrier.arrive_and_wait();
  auto result = read(lane.simd->slots, lane.simd->active, lane.lane);
  lane.simd->barrier.arrive_and_wait();
  return result;
}

template <typename V>
V load_slot(const std::array<unsigned char, kSlotBytes>& slot) {
  V value;
  std::memcpy(&value, slot.data(), sizeof(V));
  return value;
}

template <typename V, typename Combine>
V simd_reduce(V value, Combine combine) {
  return simd_exchange(value, [&](const auto& slots, const auto& active, uint) {
    bool first = true;
    V total{};
    for (int l = 0; l < kSimdWidth; ++l) {
      if (!active[l].load()) {
        continue;
      }
      const V lane_value = load_slot<V>(slots[l]);
      total = first ? lane_value : combine(total, lane_value);
      first = false;
    }
    return total;
  });
}

template <typename V>
V simd_read_lane(V value, int source_lane) {
  return simd_exchange(value, [&](const auto& slots, const auto& active, uint) {
    if (source_lane < 0 || source_lane >= kSimdWidth || !active[source_lane].load()) {
      return value;
    }
    return load_slot<V>(slots[source_lane]);
  });
}

}  // namespace metal_emulation

// ---- The metal namespace -----------------------------------------------------------------

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) {
  metal_emulation::current_lane.group->barrier.arrive_and_wait();
}

inline void simdgroup_barrier(mem_flags) {
  metal_emulation::current_lane.simd->barrier.arrive_and_wait();
}

template <typename V>
V simd_sum(V value) {
  return metal_emulation::simd_reduce(value, [](V a, V b) { return V(a + b); });
}

template <typename V>
V simd_max(V value) {
  return metal_emulation::simd_reduce(value, [](V a, V b) { return a < b ? b : a; });
}

template <typename V>
V simd_min(V value) {
  return metal_emulation::simd_reduce(value, [](V a, V b) { return b < a ? b : a; });
}

template <typename V>
V simd_shuffle(V value, ushort source_lane) {
  return metal_emulation::simd_read_lane(value, int(source_lane));
}

template <typename V>
V simd_broadcast(V value, ushort source_lane) {
  return metal_emulation::simd_read_lane(value, int(source_lane));
}

// Lanes whose source lane + delta is past the SIMD group keep their own value.
template <typename V>
V simd_shuffle_down(V value, ushort delta) {
  const int source = int(metal_emulation::current_lane.lane) + int(delta);
  return metal_emulation::simd_read_lane(value, source);
}

template <typename V>
V simd_shuffle_up(V value, ushort delta) {
  const int source = int(metal_emulation::current_lane.lane) - int(delta);
  return metal_emulation::simd_read_lane(value, source);
}

using std::abs;
using std::ceil;
using std::cos;
using std::exp;
using std::exp2;
using std::floor;
using std::fma;
using std::isinf;
using std::isnan;
using std::log;
using std::log2;
using std::max;
using std::min;
using std::pow;
using std::round;
using std::sin;
using std::sqrt;
using std::tanh;

inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }

template <typename V>
V clamp(V v, V lo, V hi) {
  return std::min(std::max(v, lo), hi);
}

namespace fast {
using std::exp;
using std::log;
using std::sqrt;
using std::tanh;
using metal::rsqrt;
}  // namespace fast

namespace precise {
using std::exp;
using std::log;
using std::sqrt;
using std::tanh;
using metal::rsqrt;
}  // namespace precise

}  // namespace metal

using namespace metal;

// ---- Address-space qualifiers ------------------------------------------------------------
// Defined last, after every standard header, because `thread` and `device` must not reach
// library code. Nothing below this point may use std::thread.

#define device
#define constant
#define thread
#define threadgroup
