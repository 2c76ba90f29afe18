// stitch_emu.h: run CUDA C kernels on the cpu, unchanged (compiled with g++ -DST_EMULATE=1).
//
// Every CUDA thread is a fiber (ucontext) of one OS thread. A launch runs its blocks one at a
// time, each block's threads in turn (in thread order, or reversed: ``st_emu_set_order``), a
// thread running until it reaches a barrier; a barrier releases when every thread it waits for
// has arrived. A cooperative launch runs every block at once, so ``grid.sync()`` is a barrier
// over all of them. Warp shuffles exchange through a warp's shared slots between two warp
// barriers. Shared memory is per block, filled with 0xFF bytes (NaN / -1) before the block
// starts, and scratch buffers are poisoned the same way by the runtime: a thread that reads a
// value before the barrier that orders its write reads poison, and the result differs from
// the reference -- a missing barrier shows up as a wrong result, in at least one of the two
// thread orders.
//
// Strict where CUDA is undefined: a barrier that not every thread of its block (or grid)
// reaches, a thread that exits while others wait, a shuffle with a partial mask, a block size
// that is not whole warps, and a grid barrier outside a cooperative launch are all errors
// (the launch returns non-zero; ``st_emu_last_error()`` says why).
#pragma once
#include <ucontext.h>
#include <sys/mman.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

namespace st_emu {

constexpr size_t kStack = 64 * 1024;

struct Barrier {
  int arrived = 0;
  int expected = 0;
  unsigned gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  unsigned tid = 0, bid = 0;
  Barrier* waiting = nullptr;
  unsigned wait_gen = 0;
  bool done = false;
};

struct Block {
  Barrier bar;
  std::vector<Barrier> warp_bars;
  std::vector<uint64_t> slots;  // one 8-byte slot per thread, for shuffles
  std::vector<unsigned char> smem;
  int live = 0;
};

struct State {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<Block> blocks;
  Barrier grid_bar;
  Fiber* current = nullptr;
  Block* block = nullptr;
  std::function<void()> body;
  bool cooperative = false;
  bool reverse = false;
  std::string error;
  std::vector<char*> stacks;  // reused from launch to launch
};

inline State& state() {
  static State s;
  return s;
}

}  // namespace st_emu

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace st_emu {

inline void fail(const std::string& why) {
  State& s = state();
  if (s.error.empty()) s.error = why;
  // back to the scheduler for good: this fiber is never resumed
  s.current->waiting = &s.grid_bar;
  s.current->wait_gen = s.grid_bar.gen;
  swapcontext(&s.current->ctx, &s.main);
}

inline void arrive(Barrier& b) {
  State& s = state();
  unsigned gen = b.gen;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    b.gen++;
  } else {
    s.current->waiting = &b;
    s.current->wait_gen = gen;
  }
  swapcontext(&s.current->ctx, &s.main);  // let the others run up to this barrier
}

inline void trampoline() {
  State& s = state();
  s.body();
  Fiber* f = s.current;
  f->done = true;
  Block& blk = s.blocks[s.cooperative ? f->bid : 0];
  blk.live--;
  if (blk.bar.arrived > 0 && s.error.empty())
    s.error = "thread " + std::to_string(f->tid) + " of block " + std::to_string(f->bid) +
              " exited while other threads of its block wait at __syncthreads()";
  if (s.grid_bar.arrived > 0 && s.error.empty())
    s.error = "a thread exited while others wait at grid.sync()";
  swapcontext(&f->ctx, &s.main);
}

inline char* stack_at(size_t k) {
  State& s = state();
  while (s.stacks.size() <= k) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return nullptr;
    s.stacks.push_back((char*)p);
  }
  return s.stacks[k];
}

// Run fibers [first, first + n) (threads of the blocks in s.blocks) until all are done.
inline bool run_fibers(size_t n) {
  State& s = state();
  for (;;) {
    bool progress = false, left = false;
    for (size_t i = 0; i < n; ++i) {
      Fiber& f = s.fibers[s.reverse ? n - 1 - i : i];
      if (f.done) continue;
      left = true;
      if (f.waiting && f.waiting->gen == f.wait_gen) continue;
      f.waiting = nullptr;
      s.current = &f;
      s.block = &s.blocks[s.cooperative ? f.bid : 0];
      threadIdx.x = f.tid;
      blockIdx.x = f.bid;
      swapcontext(&s.main, &f.ctx);
      progress = true;
      if (!s.error.empty()) return false;
    }
    if (!left) return true;
    if (!progress) {
      s.error = "deadlock: some threads wait at a barrier that the others never reach";
      return false;
    }
  }
}

inline void start_block(Block& b, unsigned threads, size_t smem_bytes) {
  b.bar = Barrier{0, (int)threads, 0};
  b.warp_bars.assign(threads / 32, Barrier{0, 32, 0});
  b.slots.assign(threads, 0);
  b.smem.assign(smem_bytes + 16, 0xFF);  // poison: NaN floats, -1 integers
  b.live = (int)threads;
}

inline int launch(unsigned grid, unsigned block, size_t smem_bytes, bool cooperative,
                  std::function<void()> body) {
  State& s = state();
  s.error.clear();
  if (block == 0 || block % 32 != 0 || block > 1024) {
    s.error = "block of " + std::to_string(block) + " threads: not whole warps (or > 1024)";
    return 1;
  }
  s.body = std::move(body);
  s.cooperative = cooperative;
  gridDim.x = grid;
  blockDim.x = block;
  size_t per_launch = cooperative ? (size_t)grid * block : block;
  s.fibers.assign(per_launch, Fiber{});
  for (size_t k = 0; k < per_launch; ++k)
    if (!stack_at(k)) {
      s.error = "out of memory for fiber stacks";
      return 1;
    }
  unsigned rounds = cooperative ? 1 : grid;
  s.blocks.assign(cooperative ? grid : 1, Block{});
  s.grid_bar = Barrier{0, (int)(cooperative ? (size_t)grid * block : 0), 0};
  for (unsigned r = 0; r < rounds; ++r) {
    for (size_t k = 0; k < s.blocks.size(); ++k) start_block(s.blocks[k], block, smem_bytes);
    for (size_t k = 0; k < per_launch; ++k) {
      Fiber& f = s.fibers[k];
      f = Fiber{};
      f.stack = s.stacks[k];
      f.tid = (unsigned)(k % block);
      f.bid = cooperative ? (unsigned)(k / block) : r;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &s.main;
      makecontext(&f.ctx, trampoline, 0);
    }
    if (!run_fibers(per_launch)) return 1;
  }
  return 0;
}

inline Fiber& self() { return *state().current; }

template <typename T>
inline T shuffle(T v, int src_of_lane_fn_kind, int arg, int width) {
  // kind 0: xor, 1: absolute lane, 2: down
  State& s = state();
  Block& b = *s.block;
  unsigned tid = s.current->tid;
  unsigned lane = tid % 32, base = tid - lane;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.slots[tid] = bits;
  arrive(b.warp_bars[tid / 32]);  // every lane has written its value
  unsigned seg = lane - lane % width, src;
  if (src_of_lane_fn_kind == 0) src = lane ^ (unsigned)arg;
  else if (src_of_lane_fn_kind == 1) src = seg + ((unsigned)arg % width);
  else src = (lane + (unsigned)arg < seg + width) ? lane + (unsigned)arg : lane;
  if (src_of_lane_fn_kind == 0 && src >= seg + width) src = lane;
  uint64_t got = b.slots[base + src];
  arrive(b.warp_bars[tid / 32]);  // every lane has read before any slot is written again
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("a warp shuffle with a partial mask (stitch kernels use full warps)");
}

}  // namespace st_emu

inline void __syncthreads() { st_emu::arrive(st_emu::state().block->bar); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  st_emu::check_mask(mask);
  st_emu::arrive(st_emu::state().block->warp_bars[threadIdx.x / 32]);
}
inline void __threadfence() {}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  st_emu::check_mask(mask);
  return st_emu::shuffle(v, 0, lane_mask, width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  st_emu::check_mask(mask);
  return st_emu::shuffle(v, 1, src, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  st_emu::check_mask(mask);
  return st_emu::shuffle(v, 2, (int)delta, width);
}

namespace cooperative_groups {
struct grid_group {
  void sync() const {
    st_emu::State& s = st_emu::state();
    if (!s.cooperative) st_emu::fail("grid.sync() in a kernel not launched cooperatively");
    st_emu::arrive(s.grid_bar);
  }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups

// One OS thread runs every fiber: atomics are plain read-modify-writes.
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
inline int atomicOr(int* p, int v) { int old = *p; *p = old | v; return old; }

// The launch a generated wrapper makes: 0 when every thread finished, else the error.
inline int st_emu_launch(unsigned grid, unsigned block, size_t smem, bool cooperative,
                         std::function<void()> body) {
  return st_emu::launch(grid, block, smem, cooperative, std::move(body));
}

extern "C" const char* st_emu_last_error() { return st_emu::state().error.c_str(); }
extern "C" void st_emu_set_order(int reverse) { st_emu::state().reverse = reverse != 0; }
