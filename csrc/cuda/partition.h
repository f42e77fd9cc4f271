// Who touches what in the CUDA kernels: the launch geometry, which block and thread
// reads and writes which element, which partial-sum slot a block writes and which slots
// the finish reads. Written once, as __host__ __device__ functions of plain integers,
// used by the kernels (activations_cuda.cu) and by a CPU simulation of every launch
// (tests/cpp/partition_sim.cpp, run by tests/test_partition.py), so a change to the
// geometry is proven to write every element once, and every slot once, without a GPU.
//
// Layouts, as channel_layout.h describes them: a flat run of n elements, or the
// channel geometry [N][R][C][inner] (inner > 1: NCHW-like rows, one channel per run;
// inner == 1: channels_last and (N, L, C), channels innermost). Partial slots of the
// parameter gradients: partial[((n * K + k) * C + c) * NP + j], K slots per (n, c).
#pragma once

#include <cstdint>

#include "../activation_math.h"  // FUSEDACT_HOST_DEVICE

namespace fusedact {
namespace part {

constexpr int kThreads = 256;
// Flat kernels: 16-byte packs in flight per thread, all loaded before any is computed.
// 4 spilled (the SASS check: values live across the IEEE division's slow-path call).
constexpr int kFlatPacks = 2;
// Row segments (inner > 1): packs per thread, so a segment is kThreads * kRowPacks packs
// (2048 fp32, 4096 bf16/fp16 elements: a 64x64 map is one full segment in bf16).
constexpr int kRowPacks = 2;
// Channels kernel (inner == 1): rows each thread walks; a block covers blockDim.y times
// this many rows.
constexpr int kChannelRowSteps = 8;
// Below this many elements the flat kernels index with int32 and launch one tile per
// block (no grid-stride loop): the last tile's indices stay below 2^31.
constexpr int64_t kInt32Limit = (int64_t(1) << 31) - 1 - int64_t(kThreads) * kFlatPacks * 16;

FUSEDACT_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// q = b / d and b % d for a block or unit index b < 2^31 (the grid limit), in 32-bit
// arithmetic: a 64-bit division is a subroutine call in device code, and the register
// convention of the call made ptxas spill. A divisor of 2^32 or more acts as 2^32 - 1:
// either way the quotient is 0 and the remainder b.
FUSEDACT_HOST_DEVICE int64_t divmod_block(int64_t b, int64_t d, int64_t& rem) {
  const uint32_t bb = static_cast<uint32_t>(b);
  const uint32_t dd = d > int64_t(UINT32_MAX) ? UINT32_MAX : static_cast<uint32_t>(d);
  rem = bb % dd;
  return bb / dd;
}

// Elements from address addr (of an element of `size` bytes) to the next 16-byte
// boundary: 0 .. 16 / size - 1.
FUSEDACT_HOST_DEVICE int head_to_align16(uintptr_t addr, int size) {
  return static_cast<int>(((16 - addr % 16) % 16) / size);
}

// ---- a flat run of n elements, in tiles of threads * ppt packs of vec elements:
// head scalars [0, head) up to the first 16-byte boundary, packs [head, head + packs *
// vec), tail scalars up to n. Thread t of a tile takes packs (tile * ppt + k) * threads
// + t for k < ppt (a warp reads consecutive packs), and in tile 0 one head or tail
// scalar (head + tail < 2 vec <= threads).
template <typename I>
struct Flat {
  I n, head, packs;
  int vec, ppt;

  static FUSEDACT_HOST_DEVICE Flat make(I n, int head, int vec, int ppt) {
    Flat f;
    f.n = n;
    f.vec = vec;
    f.ppt = ppt;
    f.head = vec == 1 ? I(0) : (I(head) < n ? I(head) : n);
    f.packs = (n - f.head) / vec;
    return f;
  }
  FUSEDACT_HOST_DEVICE I tiles(int threads) const {
    const I per = I(threads) * ppt;
    const I t = (packs + per - 1) / per;
    return t > 0 ? t : I(1);
  }
  // Pack k of thread t in a tile: its index, or -1 past the last pack.
  FUSEDACT_HOST_DEVICE I pack(I tile, int k, int t, int threads) const {
    const I p = (tile * ppt + k) * threads + t;
    return p < packs ? p : I(-1);
  }
  FUSEDACT_HOST_DEVICE I pack_start(I p) const { return head + p * vec; }
  // The head or tail scalar of thread t, or -1.
  FUSEDACT_HOST_DEVICE I extra(I tile, int t) const {
    const I tail = n - head - packs * vec;
    if (tile != 0 || I(t) >= head + tail) return I(-1);
    return I(t) < head ? I(t) : head + packs * vec + (I(t) - head);
  }
};

// The flat launch: int32 and one tile per block below kInt32Limit elements, else int64
// with a grid-stride loop over the tiles of at most max_blocks blocks.
struct FlatLaunch {
  int64_t tiles, blocks;
  bool int32;
};

FUSEDACT_HOST_DEVICE FlatLaunch flat_launch(int64_t n, int head, int vec, int64_t max_blocks) {
  const Flat<int64_t> f = Flat<int64_t>::make(n, head, vec, kFlatPacks);
  FlatLaunch l;
  l.tiles = f.tiles(kThreads);
  l.int32 = n <= kInt32Limit;
  l.blocks = l.int32 ? l.tiles : (l.tiles < max_blocks ? l.tiles : max_blocks);
  return l;
}

// ---- rows (inner > 1): the work is units, one per (n, r, c, segment s) of a run of
// `inner` elements; the segment is a Flat of one tile, walked by a group of `group`
// threads (whole warps, a power of two). A block holds per_block = threads / group
// groups: one for a run of a segment or more, several for short runs (7x7 and 14x14
// maps: one warp a run, 8 runs a block, where one block a run would leave 7 of 8 warps
// of the block, and the block scheduler, idle). K = R * segs slots per (n, c).
struct RowLaunch {
  int64_t seg_len, segs, units, blocks, K;
  int threads, group, per_block;
};

FUSEDACT_HOST_DEVICE RowLaunch row_launch(int64_t N, int64_t R, int64_t C, int64_t inner, int vec) {
  RowLaunch l;
  l.seg_len = int64_t(kThreads) * kRowPacks * vec;
  l.segs = ceil_div(inner, l.seg_len);
  l.units = N * R * C * l.segs;
  l.K = R * l.segs;
  // A short run gets a smaller group: the fewest whole warps, rounded up to a power of
  // two, whose threads cover its packs.
  const int64_t packs = ceil_div(inner < l.seg_len ? inner : l.seg_len, vec);
  const int64_t threads_needed = ceil_div(packs, kRowPacks);
  int group = 32;
  while (group < threads_needed && group < kThreads) group *= 2;
  l.group = group;
  // As many groups a block as fit in kThreads, but no more than there are units.
  int per_block = kThreads / group;
  while (per_block > 1 && per_block / 2 >= l.units) per_block /= 2;
  l.per_block = per_block;
  l.threads = group * per_block;
  l.blocks = ceil_div(l.units, per_block);
  return l;
}

// Thread tid of block b: its unit (or -1: past the last unit, idle but in the block's
// reduction) and its index t in the unit's group.
FUSEDACT_HOST_DEVICE int64_t row_unit(const RowLaunch& l, int64_t b, int tid, int& t) {
  t = tid % l.group;
  const int64_t u = b * l.per_block + tid / l.group;
  return u < l.units ? u : int64_t(-1);
}

// The backward's group sum: each warp reduces its lanes by shuffles, then the group's
// thread 0 adds the sums of warps [w0, w0 + group / 32) in order.
FUSEDACT_HOST_DEVICE int row_group_warp0(const RowLaunch& l, int tid) { return tid / l.group * (l.group / 32); }

struct RowBlock {
  int64_t n, c, off, len, slot;  // off: the segment's first element; slot: its (n, k, c)
};

// Unit u (< 2^31: the launcher checks) of the row launch.
FUSEDACT_HOST_DEVICE RowBlock row_block(const RowLaunch& l, int64_t R, int64_t C, int64_t inner, int64_t u) {
  int64_t s, c, r;
  const int64_t row = divmod_block(u, l.segs, s);
  const int64_t nr = divmod_block(row, C, c);
  const int64_t n = divmod_block(nr, R, r);
  const int64_t begin = s * l.seg_len;
  RowBlock rb;
  rb.n = n;
  rb.c = c;
  rb.off = row * inner + begin;
  rb.len = inner - begin < l.seg_len ? inner - begin : l.seg_len;
  rb.slot = (n * l.K + r * l.segs + s) * C + c;
  return rb;
}

// A segment walked in packs when x, g and out are equally far from a 16-byte boundary
// (heads equal), else in scalars: ppt * vec elements per thread either way. Indexed in
// int32 from the segment's start (a segment is at most kThreads * kRowPacks * 16
// elements): 64-bit indices live across the division's slow-path call made ptxas spill.
FUSEDACT_HOST_DEVICE Flat<int32_t> row_segment(const RowBlock& rb, int head, bool packed, int vec) {
  const int32_t len = static_cast<int32_t>(rb.len);
  return packed ? Flat<int32_t>::make(len, head, vec, kRowPacks) : Flat<int32_t>::make(len, 0, 1, kRowPacks * vec);
}

// ---- channels innermost (inner == 1): thread (tx, ty) of block (bx, by) takes the
// channel pack cp = by * blockDim.x + tx (channels cp * vec .. + vec) and rows
// k * rows + ty + i * blockDim.y of sample n, with (n, k) = (bx / K, bx % K). vec > 1
// needs C % vec == 0 and every pointer 16-byte aligned.
FUSEDACT_HOST_DEVICE int channels_vec(int64_t C, int vec, bool aligned) { return aligned && C % vec == 0 ? vec : 1; }

struct ChannelsLaunch {
  int64_t K, rows, grid_x, grid_y;
  int vec, tx, ty;  // block shape
};

FUSEDACT_HOST_DEVICE ChannelsLaunch channels_launch(int64_t N, int64_t R, int64_t C, int vec) {
  ChannelsLaunch l;
  l.vec = vec;
  const int64_t cpacks = ceil_div(C, vec);
  int tx = 1;
  while (tx < 32 && tx < cpacks) tx *= 2;  // up to a warp along C: coalesced rows
  l.tx = tx;
  l.ty = kThreads / tx;
  l.rows = int64_t(l.ty) * kChannelRowSteps;
  l.K = ceil_div(R, l.rows);
  l.grid_x = N * l.K;
  l.grid_y = ceil_div(cpacks, tx);
  return l;
}

struct ChannelsThread {
  int64_t n, k, c0;        // c0: the first of its vec channels; c0 >= C: none
  int64_t r_begin, r_end;  // rows r_begin, r_begin + ty, ... < r_end
};

FUSEDACT_HOST_DEVICE ChannelsThread channels_thread(const ChannelsLaunch& l, int64_t R, int64_t bx, int64_t by, int tx,
                                                    int ty) {
  ChannelsThread t;
  t.n = divmod_block(bx, l.K, t.k);
  t.c0 = (by * l.tx + tx) * l.vec;
  t.r_begin = t.k * l.rows + ty;
  const int64_t end = (t.k + 1) * l.rows;
  t.r_end = end < R ? end : R;
  return t;
}

FUSEDACT_HOST_DEVICE int64_t channels_index(int64_t R, int64_t C, int64_t n, int64_t r, int64_t c) {
  return (n * R + r) * C + c;
}

FUSEDACT_HOST_DEVICE int64_t channels_slot(const ChannelsLaunch& l, int64_t C, int64_t n, int64_t k, int64_t c) {
  return (n * l.K + k) * C + c;
}

// ---- the finish: output b (channel c, or (n, c) when per_sample) sums `items` slots,
// the i-th at finish_slot(...).
FUSEDACT_HOST_DEVICE int64_t finish_items(int64_t N, int64_t K, bool per_sample) { return per_sample ? K : N * K; }

FUSEDACT_HOST_DEVICE int64_t finish_slot(int64_t K, int64_t C, bool per_sample, int64_t b, int64_t i) {
  const int64_t c = b % C;
  const int64_t n0 = per_sample ? b / C : 0;
  return (n0 * K + i) * C + c;
}

}  // namespace part
}  // namespace fusedact
