"""The CUDA kernels' index logic, tested on the CPU: csrc/cuda/partition.h holds every
launch geometry and every block/thread -> element and block -> slot mapping as
__host__ __device__ functions that the kernels call; tests/cpp/partition_sim.cpp walks
every block and thread of a launch with them and checks that each element is written
once, nothing outside is touched, packs are 16-byte aligned, each element's parameters
and gradient slot are its own channel's, each slot is written once and the finish reads
each slot once. A retuned geometry is proven here before a GPU runs it; the mutation
test shows that the simulation catches off-by-one partitions."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTITION = ROOT / "csrc" / "cuda" / "partition.h"
SIM = ROOT / "tests" / "cpp" / "partition_sim.cpp"
GXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(GXX is None, reason="no g++")


def _const(name: str) -> int:
    m = re.search(rf"constexpr int {name} = (\d+);", PARTITION.read_text())
    return int(m.group(1))


THREADS, FLAT_PACKS, ROW_PACKS = _const("kThreads"), _const("kFlatPacks"), _const("kRowPacks")
# The channels kernel's pack width per element size (activations_cuda.cu's
# channels_vec_size): 16 bytes, 8 for float16.
CHANNEL_VEC = {8: [2], 4: [4], 2: [8, 4]}


def build(csrc: Path, out: Path) -> Path:
    subprocess.run(
        [GXX, "-O2", "-std=c++17", "-I", str(csrc), str(SIM), "-o", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def run(sim: Path, cases: list[str]) -> list[str]:
    r = subprocess.run([str(sim)], input="\n".join(cases) + "\n", capture_output=True, text=True, check=True)
    return r.stdout.splitlines()


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return build(ROOT / "csrc", tmp_path_factory.mktemp("sim") / "partition_sim")


def flat_cases() -> list[str]:
    cases = []
    for size in (2, 4, 8):
        vec = 16 // size
        tile = THREADS * FLAT_PACKS * vec
        ns = {
            1,
            2,
            vec - 1,
            vec,
            vec + 1,
            2 * vec - 1,
            THREADS - 1,
            THREADS * vec + 3,
            tile - 1,
            tile,
            tile + 1,
            2 * tile - vec,
            2 * tile + vec + 1,
            3 * tile + 7,
            5 * tile,
        }
        for n in sorted(ns):
            for m in sorted({0, 1, vec - 1}):
                for max_blocks in (1, 3, 1056):
                    for force64 in (0, 1):
                        if force64 == 0 and max_blocks != 1056:
                            continue  # the int32 path launches one block per tile
                        cases.append(f"flat {n} {m} {size} {max_blocks} {force64}")
    return cases


def flat_big_cases() -> list[str]:
    return [
        f"flatbig {n} {size} 1056" for size in (2, 4, 8) for n in (2**31 - 1, 2**31, 2**31 + 5, 3 * 2**31 + 17, 2**33)
    ]


def row_geometries() -> list[tuple[str, tuple[int, int, int, int]]]:
    """(what, (N, R, C, inner)) as channel_layout.h's acon_args makes them."""
    geos = []
    # short maps (several runs a block, a partly idle last block), a map of exactly one
    # group per size, long maps (several segments), odd sizes
    for n, c, h, w in [
        (2, 3, 7, 7),
        (1, 4, 14, 14),
        (3, 11, 7, 7),
        (2, 9, 14, 14),
        (1, 17, 16, 16),
        (2, 5, 20, 20),
        (2, 2, 64, 64),
        (3, 2, 3, 5),
        (1, 3, 1, 2),
        (2, 1, 56, 56),
        (1, 2, 130, 33),
    ]:
        geos.append((f"NCHW {n}x{c}x{h}x{w}", (1, n, c, h * w)))
        geos.append((f"NCHW per-sample beta {n}x{c}x{h}x{w}", (n, 1, c, h * w)))
    # (N, C, L) with channel_dim=1, and swish's learnable beta: one run of numel
    geos.append(("NCL 4x3x100", (1, 4, 3, 100)))
    for size in (2, 4, 8):
        seg = THREADS * ROW_PACKS * (16 // size)
        for numel in (2, seg - 1, seg, seg + 1, 3 * seg + 5):
            geos.append((f"swish beta numel {numel} ({size} B)", (1, 1, 1, numel)))
    return geos


def row_cases() -> list[str]:
    cases = []
    for what, (N, R, C, inner) in row_geometries():
        for size in (2, 4, 8):
            if "swish beta" in what and f"({size} B)" not in what:
                continue
            vec = 16 // size
            for mx, mg, mo in sorted({(0, 0, 0), (1, 1, 1), (vec - 1, vec - 1, vec - 1), (1, 0, 1), (0, 0, 1)}):
                for bwd in (0, 1):
                    cases.append(f"row {N} {R} {C} {inner} {size} {mx} {mg} {mo} {bwd}")
    return cases


def chan_cases() -> list[str]:
    cases = []
    geos = []
    for n, c, h, w in [
        (2, 64, 7, 7),
        (1, 13, 5, 5),
        (2, 256, 14, 14),
        (3, 8, 1, 1),
        (1, 1000, 2, 3),
        (2, 3, 40, 40),
        (1, 24, 33, 31),
    ]:
        geos.append((1, n * h * w, c))  # channels_last
        geos.append((n, h * w, c))  # channels_last, per-sample beta
    geos += [(1, 4 * 129, 96), (4, 129, 96), (1, 3 * 1000, 5)]  # (N, L, C) with channel_dim=-1
    for N, R, C in geos:
        for size, vecs in CHANNEL_VEC.items():
            for cvec in vecs:
                for aligned in (0, 1):
                    cases.append(f"chan {N} {R} {C} {size} {cvec} {aligned}")
    return cases


@pytest.mark.parametrize("kind", ["flat", "flatbig", "row", "chan"])
def test_every_element_once_every_slot_once(sim, kind):
    cases = {"flat": flat_cases, "flatbig": flat_big_cases, "row": row_cases, "chan": chan_cases}[kind]()
    assert len(cases) >= 15
    out = run(sim, cases)
    assert len(out) == len(cases)
    bad = [f"{c}: {o}" for c, o in zip(cases, out) if o != "OK"]
    assert not bad, "\n".join(bad[:20])


def test_launch_shapes(sim):
    """What the tuning promises, read from the functions the launchers call: the flat
    kernels keep int32 and one tile per block (no grid-stride loop) up to 2^31 - 1 -
    a tile of elements, and a 64x64 bf16 map is one full row segment."""
    src = PARTITION.read_text()
    assert "kInt32Limit = (int64_t(1) << 31) - 1 - int64_t(kThreads) * kFlatPacks * 16" in src
    # run through the simulation's flat path: n just under the limit must be int32
    limit = 2**31 - 1 - THREADS * FLAT_PACKS * 16
    assert run(sim, [f"flatbig {limit + 1} 2 1056"]) == ["OK"]
    assert THREADS * ROW_PACKS * 8 == 64 * 64

    # short maps: one warp a (n, c) run and 8 runs a block, in every dtype (7x7, 14x14);
    # a 28x28 bf16 map (98 packs) takes 2 warps, 4 runs a block; a long map one block
    # of kThreads a segment
    def launch(N, R, C, inner, size):
        out = run(sim, [f"rowlaunch {N} {R} {C} {inner} {size}"])[0].split()
        assert out[0] == "OK"
        return tuple(int(v) for v in out[1:])

    for size in (2, 4):
        assert launch(1, 32, 64, 49, size) == (32, 8, 256, 32 * 64 // 8)
        assert launch(1, 32, 64, 196, size) == (32, 8, 256, 32 * 64 // 8)
    assert launch(1, 32, 64, 28 * 28, 2) == (64, 4, 256, 32 * 64 // 4)
    assert launch(1, 2, 3, 64 * 64, 2) == (256, 1, 256, 6)
    assert launch(1, 1, 3, 49, 2) == (32, 4, 128, 1)  # no more groups than units


# Each mutation is an off-by-one or a wrong index in partition.h that the simulation
# must reject on at least one case.
MUTATIONS = {
    "extra scalar past the tail": ("if (tile != 0 || I(t) >= head + tail)", "if (tile != 0 || I(t) > head + tail)"),
    "one pack too many": ("return p < packs ? p : I(-1);", "return p <= packs ? p : I(-1);"),
    "pack stride off by one": (
        "const I p = (tile * ppt + k) * threads + t;",
        "const I p = (tile * ppt + k) * (threads - 1) + t;",
    ),
    "head ignores alignment": (
        "f.head = vec == 1 ? I(0) : (I(head) < n ? I(head) : n);",
        "f.head = vec == 1 ? I(0) : (I(head) < n ? I(head) + 1 : n);",
    ),
    "row slot collides across segments": (
        "rb.slot = (n * l.K + r * l.segs + s) * C + c;",
        "rb.slot = (n * l.K + r + s) * C + c;",
    ),
    "row segment one element short": (
        "rb.len = inner - begin < l.seg_len ? inner - begin : l.seg_len;",
        "rb.len = inner - begin < l.seg_len ? inner - begin - 1 : l.seg_len;",
    ),
    "channels rows past R": ("t.r_end = end < R ? end : R;", "t.r_end = end < R ? end : R + 1;"),
    "channels K rounds down": ("l.K = ceil_div(R, l.rows);", "l.K = R / l.rows + (R < l.rows);"),
    "channels pack of a partial C": ("return aligned && C % vec == 0 ? vec : 1;", "return aligned ? vec : 1;"),
    "finish skips samples": ("return per_sample ? K : N * K;", "return per_sample ? K : K;"),
    "finish reads the next channel": ("const int64_t c = b % C;", "const int64_t c = (b + 1) % C;"),
    "32-bit block division": ("rem = bb % dd;", "rem = bb % dd + (dd == 7);"),
    "row units overlap across blocks": (
        "const int64_t u = b * l.per_block + tid / l.group;",
        "const int64_t u = b * (l.per_block - (l.per_block > 1)) + tid / l.group;",
    ),
    "row group sum adds a neighbour's warp": (
        "return tid / l.group * (l.group / 32);",
        "return tid / l.group * (l.group / 32) + (l.group == 32 && tid >= 32);",
    ),
    "row group too small": (
        "while (group < threads_needed && group < kThreads) group *= 2;",
        "while (2 * group < threads_needed && group < kThreads) group *= 2;",
    ),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_simulation_catches_a_broken_partition(tmp_path, name):
    old, new = MUTATIONS[name]
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    header = tmp_path / "csrc" / "cuda" / "partition.h"
    text = header.read_text()
    assert text.count(old) == 1, f"mutation {name!r} no longer applies: update it"
    header.write_text(text.replace(old, new))
    sim = build(tmp_path / "csrc", tmp_path / "sim")
    cases = flat_cases()[::3] + row_cases() + chan_cases()
    out = run(sim, cases)
    assert any(o.startswith("FAIL") for o in out), f"mutation {name!r} went unnoticed"
