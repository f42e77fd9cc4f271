// A CPU run of every CUDA launch's partition (csrc/cuda/partition.h, the functions the
// kernels call), built and driven by tests/test_partition.py. One case per input line;
// for each it walks every block and thread as the kernel does and checks that
//   - every element is written exactly once and nothing outside [0, numel) is touched,
//   - every 16-byte pack starts on a 16-byte boundary,
//   - the parameters a block uses are those of each element's own (n, c),
//   - each element's parameter-gradient terms land in a slot of its own (n, c),
//   - every partial slot is written once, and the finish reads each slot once, for the
//     output of the slot's own channel (or sample and channel).
// Prints "OK" or "FAIL <reason>" per line.
//
//   flat  n misalign size max_blocks [force64]   n elements from misalign elements past
//                                                a 16-byte boundary (int64 path forced)
//   flatbig n size max_blocks                    n >= 2^31: the first and last tiles only
//   row   N R C inner size mx mg mo bwd          NCHW-like rows, misalignments in elements
//   chan  N R C size cvec aligned                channels innermost, cvec the pack width
//   rowlaunch N R C inner size                   prints "OK group per_block threads blocks"
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/partition.h"

using namespace fusedact::part;

namespace {

struct Fail { std::string why; };

[[noreturn]] void fail(const std::string& why) { throw Fail{why}; }

void mark(std::vector<int>& count, int64_t i, const char* what) {
  if (i < 0 || i >= static_cast<int64_t>(count.size()))
    fail(std::string(what) + " touches element " + std::to_string(i) + " outside [0, " + std::to_string(count.size()) +
         ")");
  ++count[i];
}

void all_once(const std::vector<int>& count, const char* what) {
  for (size_t i = 0; i < count.size(); ++i)
    if (count[i] != 1)
      fail(std::string(what) + " " + std::to_string(i) + " done " + std::to_string(count[i]) + " times");
}

template <typename I>
void flat_tile(const Flat<I>& f, I tile, int64_t misalign, std::vector<int>& count) {
  for (int t = 0; t < kThreads; ++t) {
    for (int k = 0; k < f.ppt; ++k) {
      const I p = f.pack(tile, k, t, kThreads);
      if (p < 0) continue;
      const int64_t s = f.pack_start(p);
      if (f.vec > 1 && (misalign + s) % f.vec != 0) fail("a pack is not 16-byte aligned");
      for (int v = 0; v < f.vec; ++v) mark(count, s + v, "a pack");
    }
    const I e = f.extra(tile, t);
    if (e >= 0) mark(count, e, "a scalar");
  }
}

void flat(int64_t n, int64_t misalign, int size, int64_t max_blocks, bool force64) {
  const int vec = 16 / size;
  const int head = head_to_align16(static_cast<uintptr_t>(misalign * size), size);
  if ((misalign + head) % vec != 0) fail("head_to_align16 does not reach a boundary");
  const FlatLaunch l = flat_launch(n, head, vec, max_blocks);
  std::vector<int> count(n, 0);
  if (l.int32 && !force64) {
    if (l.blocks != l.tiles) fail("int32 launch without one block per tile");
    const Flat<int32_t> f = Flat<int32_t>::make(static_cast<int32_t>(n), head, vec, kFlatPacks);
    if (f.tiles(kThreads) != l.tiles) fail("tile counts differ");
    for (int64_t b = 0; b < l.blocks; ++b) flat_tile<int32_t>(f, static_cast<int32_t>(b), misalign, count);
  } else {
    const int64_t blocks = l.int32 ? (l.tiles < max_blocks ? l.tiles : max_blocks) : l.blocks;
    const Flat<int64_t> f = Flat<int64_t>::make(n, head, vec, kFlatPacks);
    for (int64_t b = 0; b < blocks; ++b)  // the kernel's grid-stride loop
      for (int64_t tile = b; tile < f.tiles(kThreads); tile += blocks) flat_tile<int64_t>(f, tile, misalign, count);
  }
  all_once(count, "element");
}

// n >= 2^31: the launch must take the int64 path, and its last tiles end exactly at n.
void flatbig(int64_t n, int size, int64_t max_blocks) {
  const int vec = 16 / size;
  const FlatLaunch l = flat_launch(n, 0, vec, max_blocks);
  if (l.int32) fail("int32 indexing chosen for n >= 2^31");
  if (l.blocks > max_blocks) fail("more blocks than max_blocks");
  const Flat<int64_t> f = Flat<int64_t>::make(n, 0, vec, kFlatPacks);
  const int64_t per = int64_t(kThreads) * kFlatPacks * vec;
  const int64_t tiles = f.tiles(kThreads);
  // elements [first, n) of the last two tiles, and tile 0
  const int64_t first = (tiles - 2) * per;
  std::vector<int> last(n - first, 0), head(per, 0);
  for (int64_t tile : {tiles - 2, tiles - 1})
    for (int t = 0; t < kThreads; ++t) {
      for (int k = 0; k < kFlatPacks; ++k) {
        const int64_t p = f.pack(tile, k, t, kThreads);
        if (p < 0) continue;
        for (int v = 0; v < vec; ++v) mark(last, f.pack_start(p) + v - first, "a pack of a last tile");
      }
      const int64_t e = f.extra(tile, t);
      if (e >= 0) fail("a scalar outside tile 0");
    }
  for (int t = 0; t < kThreads; ++t) {
    const int64_t e = f.extra(0, t);  // the tail scalars, run by tile 0
    if (e >= 0) mark(last, e - first, "a tail scalar");
    for (int k = 0; k < kFlatPacks; ++k) {
      const int64_t p = f.pack(0, k, t, kThreads);
      if (p >= 0)
        for (int v = 0; v < vec; ++v) mark(head, f.pack_start(p) + v, "a pack of tile 0");
    }
  }
  all_once(last, "element (from the end)");
  all_once(head, "element of tile 0");
}

// The finish reads: each slot once per parameter, for its own output.
void finish(int64_t N, int64_t K, int64_t C, bool per_sample) {
  std::vector<int> reads(N * K * C, 0);
  const int64_t outputs = per_sample ? N * C : C;
  for (int64_t b = 0; b < outputs; ++b) {
    const int64_t items = finish_items(N, K, per_sample);
    for (int64_t i = 0; i < items; ++i) {
      const int64_t s = finish_slot(K, C, per_sample, b, i);
      mark(reads, s, "the finish");
      if (s % C != b % C) fail("the finish reads another channel's slot");
      if (per_sample && s / (K * C) != b / C) fail("the finish reads another sample's slot");
    }
  }
  all_once(reads, "slot read");
}

void check_slot(int64_t slot, int64_t K, int64_t C, int64_t n, int64_t c) {
  if (slot % C != c || slot / (K * C) != n) fail("a gradient term lands in the slot of another (n, c)");
}

void row(int64_t N, int64_t R, int64_t C, int64_t inner, int size, int64_t mx, int64_t mg, int64_t mo, bool bwd) {
  const int vec = 16 / size;
  const RowLaunch l = row_launch(N, R, C, inner, vec);
  if (l.group % 32 || l.group < 32 || (l.group & (l.group - 1))) fail("group not a power-of-two of warps");
  if (l.threads % l.group || l.threads > kThreads || l.threads / l.group != l.per_block) fail("block not whole groups");
  if (l.blocks * l.per_block < l.units || (l.blocks - 1) * l.per_block >= l.units)
    fail("blocks do not cover the units");
  const int64_t numel = N * R * C * inner;
  std::vector<int> count(numel, 0), writes(N * l.K * C, 0);
  for (int64_t b = 0; b < l.blocks; ++b) {
    // the backward's sum: which group leader adds each warp, and for which unit
    std::vector<int> summed(l.threads / 32, 0);
    std::vector<int64_t> warp_unit(l.threads / 32, -2);
    for (int tid = 0; tid < l.threads; ++tid) {
      int t;
      const int64_t u = row_unit(l, b, tid, t);
      if (t < 0 || t >= l.group) fail("a thread index outside its group");
      if (warp_unit[tid / 32] == -2) warp_unit[tid / 32] = u;
      if (warp_unit[tid / 32] != u) fail("a warp spans two units");
      if (t == 0) {
        const int w0 = row_group_warp0(l, tid);
        for (int w = w0; w < w0 + l.group / 32; ++w) {
          if (w < 0 || w >= l.threads / 32) fail("the group sum reads a warp outside the block");
          ++summed[w];
          int t2;
          if (row_unit(l, b, w * 32, t2) != u) fail("the group sum adds another unit's warp");
        }
      }
      if (u < 0) continue;
      const RowBlock rb = row_block(l, R, C, inner, u);
      auto head_at = [&](int64_t m) { return head_to_align16(static_cast<uintptr_t>((m + rb.off) * size), size); };
      const int head = head_at(mx);
      const bool packed = head_at(mo) == head && (!bwd || head_at(mg) == head);
      const Flat<int32_t> f = row_segment(rb, head, packed, vec);
      if (f.tiles(l.group) != 1) fail("a segment needs more than one tile");
      auto elem = [&](int64_t local, const char* what) {
        if (local < 0 || local >= rb.len) fail(std::string(what) + " outside its segment");
        const int64_t i = rb.off + local;
        mark(count, i, what);
        const int64_t c = (i / inner) % C, n = i / (R * C * inner);
        if (c != rb.c || n != rb.n) fail("a thread uses another channel's parameters");
        if (bwd) check_slot(rb.slot, l.K, C, n, c);
      };
      for (int k = 0; k < f.ppt; ++k) {
        const int64_t p = f.pack(0, k, t, l.group);
        if (p < 0) continue;
        const int64_t s = f.pack_start(p);
        if (f.vec > 1 && (mx + rb.off + s) % vec != 0) fail("a pack is not 16-byte aligned");
        for (int v = 0; v < f.vec; ++v) elem(s + v, "a pack");
      }
      const int64_t e = f.extra(0, t);
      if (e >= 0) elem(e, "a scalar");
      if (bwd && t == 0) mark(writes, rb.slot, "a slot write");
    }
    for (int w = 0; w < l.threads / 32; ++w)
      if (summed[w] != 1) fail("a warp's sum is added " + std::to_string(summed[w]) + " times");
  }
  all_once(count, "element");
  if (bwd) {
    all_once(writes, "slot");
    finish(N, l.K, C, false);
    if (N > 1) finish(N, l.K, C, true);
  }
}

void chan(int64_t N, int64_t R, int64_t C, int size, int cvec, bool aligned) {
  const int vec = channels_vec(C, cvec, aligned);
  if (vec > 1 && (C % vec || !aligned)) fail("packs along C where they do not fit");
  const ChannelsLaunch l = channels_launch(N, R, C, vec);
  if (l.tx * l.ty != kThreads || l.tx > 32) fail("bad block shape");
  const int64_t numel = N * R * C;
  std::vector<int> count(numel, 0), writes(N * l.K * C, 0);
  for (int64_t bx = 0; bx < l.grid_x; ++bx)
    for (int64_t by = 0; by < l.grid_y; ++by)
      for (int tx = 0; tx < l.tx; ++tx) {
        const ChannelsThread t0 = channels_thread(l, R, bx, by, tx, 0);
        for (int ty = 0; ty < l.ty; ++ty) {
          const ChannelsThread th = channels_thread(l, R, bx, by, tx, ty);
          if (th.c0 >= C) continue;
          if (th.c0 + vec > C) fail("a pack runs past the last channel");
          for (int64_t r = th.r_begin; r < th.r_end; r += l.ty) {
            const int64_t i = channels_index(R, C, th.n, r, th.c0);
            if (vec > 1 && i % vec) fail("a pack is not 16-byte aligned");
            for (int e = 0; e < vec; ++e) {
              mark(count, i + e, "a channel pack");
              const int64_t c = (i + e) % C, n = (i + e) / (R * C);
              if (c != th.c0 + e || n != th.n) fail("a thread uses another channel's parameters");
              // its sums are reduced over ty and written by thread (tx, 0)
              check_slot(channels_slot(l, C, t0.n, t0.k, t0.c0 + e), l.K, C, n, c);
            }
          }
        }
        if (t0.c0 < C)
          for (int e = 0; e < vec; ++e) mark(writes, channels_slot(l, C, t0.n, t0.k, t0.c0 + e), "a slot write");
      }
  all_once(count, "element");
  all_once(writes, "slot");
  finish(N, l.K, C, false);
  if (N > 1) finish(N, l.K, C, true);
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    std::string kind;
    in >> kind;
    try {
      if (kind == "flat") {
        int64_t n, m, mb;
        int size, force64 = 0;
        in >> n >> m >> size >> mb >> force64;
        flat(n, m, size, mb, force64 != 0);
      } else if (kind == "flatbig") {
        int64_t n, mb;
        int size;
        in >> n >> size >> mb;
        flatbig(n, size, mb);
      } else if (kind == "row") {
        int64_t N, R, C, inner, mx, mg, mo;
        int size, bwd;
        in >> N >> R >> C >> inner >> size >> mx >> mg >> mo >> bwd;
        row(N, R, C, inner, size, mx, mg, mo, bwd != 0);
      } else if (kind == "rowlaunch") {
        int64_t N, R, C, inner;
        int size;
        in >> N >> R >> C >> inner >> size;
        const RowLaunch l = row_launch(N, R, C, inner, 16 / size);
        std::cout << "OK " << l.group << " " << l.per_block << " " << l.threads << " " << l.blocks << "\n";
        continue;
      } else if (kind == "chan") {
        int64_t N, R, C;
        int size, cvec, aligned;
        in >> N >> R >> C >> size >> cvec >> aligned;
        chan(N, R, C, size, cvec, aligned != 0);
      } else {
        throw Fail{"unknown case kind " + kind};
      }
      std::cout << "OK\n";
    } catch (const Fail& f) {
      std::cout << "FAIL " << f.why << "\n";
    }
  }
  return 0;
}
