"""CPU checks of the CUDA attention kernel's index arithmetic (no GPU needed).

``csrc/cuda/attention_tiling.h`` holds every index formula of ``teacher_attention.cu``: the key/query
tile schedule with its short tail tile, the shared-memory swizzle, and which row/chunk each lane
hands to ``ldmatrix``. The header is compiled here with the host C++ compiler and its values are
checked against an independent model of the hardware (``ldmatrix`` and ``mma.sync.m16n8k16``
fragment layouts as the PTX ISA defines them):

- every (query, key) pair with query, key < N is attended exactly once, the tail tile computes at
  most 15 masked keys, and every query row < N is stored exactly once;
- the swizzle is a bijection and every 8-row ``ldmatrix`` phase is free of bank conflicts;
- the Q, K and V fragments the kernel loads are the elements ``mma`` needs for ``Q K^T`` and ``P V``,
  and reusing the ``Q K^T`` accumulators as the A operand of ``P V`` (the kernel's packing) is exact;
- an emulation of the kernel's tile loop (online softmax in base 2 with the tail masks) matches
  softmax attention.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "cuda" / "attention_tiling.h"
KERNEL = ROOT / "csrc" / "cuda" / "teacher_attention.cu"
SEQ_LENS = (1, 5, 15, 16, 17, 63, 64, 65, 96, 197, 257, 261, 1025)
HEAD_DIMS = (64, 128)
QUERY_TILES = (64, 128)  # rows per CTA (4 or 8 warps of 16 rows)

# Host driver: prints the header's values as whitespace-separated records.
DRIVER = r"""
#include <cstdio>
#include <initializer_list>
#include "attention_tiling.h"
using namespace leap_kernels::cuda::attn;
int main() {
  std::printf("const %d %d %d %d\n", kBlockN, kKeyChunk, kWarpRows, kChunkElems);
  const int seq[] = {SEQ_LENS};
  for (int n : seq) {
    std::printf("ktiles %d %d\n", n, num_key_tiles(n));
    for (int j = 0; j < num_key_tiles(n); ++j)
      std::printf("tile %d %d %d %d %d %d %d\n", n, j, key_tile_start(j), key_tile_keys(n, j),
                  key_tile_chunks(n, j), (int)key_tile_masked(n, j), key_tile_rows(n, j));
    for (int bm : {64, 128}) std::printf("qtiles %d %d %d\n", n, bm, num_query_tiles(n, bm));
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int w = 0; w < 8; ++w) std::printf("qrow %d %d %d\n", w, lane, q_frag_row(w, lane));
    for (int i = 0; i < 8; ++i)
      std::printf("lanemap %d %d %d %d %d %d %d %d\n", lane, i, q_frag_chunk(i, lane), k_frag_row(i, lane),
                  k_frag_chunk(i, lane), v_frag_row(i, lane), v_frag_chunk(i, lane), 0);
    for (int i = 0; i < 4; ++i) std::printf("cfrag %d %d %d %d\n", lane, i, c_frag_row(lane, i), c_frag_col(lane, i));
  }
  for (int d : {64, 128})
    for (int r = 0; r < 128; ++r)
      for (int c = 0; c < d / 8; ++c) std::printf("smem %d %d %d %d\n", d, r, c, smem_offset(r, c, d));
  return 0;
}
"""


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """The header's values, from a host build of it."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build csrc/cuda/attention_tiling.h")
    work = tmp_path_factory.mktemp("attn_layout")
    src = work / "driver.cpp"
    src.write_text(DRIVER.replace("SEQ_LENS", ", ".join(map(str, SEQ_LENS))))
    exe = work / "driver"
    command = [cxx, "-std=c++17", "-O0", "-Wall", "-Werror", f"-I{HEADER.parent}", str(src), "-o", str(exe)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"building attention_tiling.h on the host failed:\n{build.stderr}"
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    data = {"tiles": {}, "ktiles": {}, "qtiles": {}, "qrow": {}, "lanemap": {}, "cfrag": {}, "smem": {}}
    for line in out.splitlines():
        tag, *vals = line.split()
        v = list(map(int, vals))
        if tag == "const":
            data["const"] = dict(zip(("block_n", "key_chunk", "warp_rows", "chunk_elems"), v))
        elif tag == "ktiles":
            data["ktiles"][v[0]] = v[1]
        elif tag == "tile":
            data["tiles"][(v[0], v[1])] = dict(zip(("start", "keys", "chunks", "masked", "rows"), v[2:]))
        elif tag == "qtiles":
            data["qtiles"][(v[0], v[1])] = v[2]
        elif tag == "qrow":
            data["qrow"][(v[0], v[1])] = v[2]
        elif tag == "lanemap":
            lane, i = v[0], v[1]
            data["lanemap"][(lane, i)] = dict(zip(("q_chunk", "k_row", "k_chunk", "v_row", "v_chunk"), v[2:7]))
        elif tag == "cfrag":
            data["cfrag"][(v[0], v[1])] = (v[2], v[3])
        elif tag == "smem":
            data["smem"][(v[0], v[1], v[2])] = v[3]
    return data


# ----------------------------------------------------------------------------- PTX model
# Fragment layouts of mma.sync.aligned.m16n8k16 with 16-bit A/B and fp32 C (PTX ISA,
# "Matrix Fragments for mma.m16n8k16"); lane = 4 * group + tig. Half h of a 32-bit register j is
# element 2j + h of the fragment.


def ptx_a(lane: int, e: int) -> tuple[int, int]:
    """(row, col) of A (16x16) held by `lane` as element e (0..7)."""
    group, tig = divmod(lane, 4)
    return group + 8 * ((e // 2) % 2), 2 * tig + (e % 2) + 8 * (e // 4)


def ptx_b(lane: int, e: int) -> tuple[int, int]:
    """(k, n) of B (16x8) held by `lane` as element e (0..3)."""
    group, tig = divmod(lane, 4)
    return 2 * tig + (e % 2) + 8 * (e // 2), group


def ptx_c(lane: int, e: int) -> tuple[int, int]:
    """(row, col) of C (16x8 fp32) held by `lane` as register e (0..3)."""
    group, tig = divmod(lane, 4)
    return group + 8 * (e // 2), 2 * tig + (e % 2)


def ldmatrix_x4(smem: np.ndarray, addrs: list[int], trans: bool) -> np.ndarray:
    """(32 lanes, 4 registers, 2 halves): lanes 8i..8i+7 give the row addresses of matrix i; each
    row is 8 consecutive elements. Without .trans lane l gets row l/4, columns 2(l%4), +1 of each
    matrix; with .trans it gets column l/4, rows 2(l%4), +1."""
    mats = [np.stack([smem[a : a + 8] for a in addrs[8 * i : 8 * i + 8]]) for i in range(4)]
    out = np.empty((32, 4, 2), dtype=smem.dtype)
    for lane in range(32):
        r, c = divmod(lane, 4)
        for j, mat in enumerate(mats):
            out[lane, j] = (mat[2 * c, r], mat[2 * c + 1, r]) if trans else (mat[r, 2 * c], mat[r, 2 * c + 1])
    return out


def mma(a_regs: np.ndarray, b_regs: np.ndarray) -> np.ndarray:
    """C (per lane, 4 registers) = A B for per-lane fragments a (32, 4, 2) and b (32, 2, 2)."""
    a = np.zeros((16, 16))
    b = np.zeros((16, 8))
    for lane in range(32):
        for e in range(8):
            a[ptx_a(lane, e)] = a_regs[lane, e // 2, e % 2]
        for e in range(4):
            b[ptx_b(lane, e)] = b_regs[lane, e // 2, e % 2]
    c = a @ b
    return np.array([[c[ptx_c(lane, e)] for e in range(4)] for lane in range(32)])


def to_smem(tile: np.ndarray, layout, d: int) -> np.ndarray:
    """A (rows, d) tile in the kernel's swizzled shared-memory layout."""
    smem = np.full(tile.shape[0] * d, np.nan)
    for r in range(tile.shape[0]):
        for c in range(d // 8):
            off = layout["smem"][(d, r, c)]
            smem[off : off + 8] = tile[r, 8 * c : 8 * c + 8]
    return smem


# ----------------------------------------------------------------------------- tile schedule


def test_constants_match_kernel_source(layout):
    const = layout["const"]
    assert const == {"block_n": 64, "key_chunk": 16, "warp_rows": 16, "chunk_elems": 8}
    src = KERNEL.read_text()
    # The kernel dispatches the tail tile on 1..4 chunks and masks it: the schedule below assumes that.
    for kc in (1, 2, 3):
        assert f"attend_tile<T, D, {kc}, true>" in src
    assert "attend_tile<T, D, 4, false>" in src and "key_tile_masked(n, j)" in src


@pytest.mark.parametrize("n", SEQ_LENS)
def test_key_tiles_cover_every_key_once(layout, n):
    tiles = [layout["tiles"][(n, j)] for j in range(layout["ktiles"][n])]
    seen = np.zeros(n, dtype=int)
    for j, tile in enumerate(tiles):
        computed = np.arange(tile["start"], tile["start"] + 16 * tile["chunks"])
        assert tile["rows"] == 16 * tile["chunks"] <= 64
        real = computed[computed < n]
        assert len(real) == tile["keys"] >= 1  # every tile has a real key: the running max stays finite
        masked = computed[computed >= n]
        assert bool(tile["masked"]) == (len(masked) > 0)
        assert len(masked) < 16  # the tail pays at most one partial 16-key chunk
        if j < len(tiles) - 1:
            assert tile["chunks"] == 4 and not tile["masked"]
        seen[real] += 1
    assert (seen == 1).all()
    assert sum(t["chunks"] for t in tiles) == math.ceil(n / 16)


def test_tail_tile_sizes(layout):
    # (N, tiles, chunks of the last tile, real keys of the last tile)
    expected = {
        1: (1, 1, 1),
        5: (1, 1, 5),
        64: (1, 4, 64),
        65: (2, 1, 1),
        197: (4, 1, 5),
        257: (5, 1, 1),
        261: (5, 1, 5),
        1025: (17, 1, 1),
        96: (2, 2, 32),
    }
    for n, (count, chunks, keys) in expected.items():
        assert layout["ktiles"][n] == count
        last = layout["tiles"][(n, count - 1)]
        assert (last["chunks"], last["keys"]) == (chunks, keys)


@pytest.mark.parametrize("bm", QUERY_TILES)
@pytest.mark.parametrize("n", SEQ_LENS)
def test_query_pairs_covered_once(layout, n, bm):
    """Emulate the grid: every (query, key) pair attended once, every query row < N stored once."""
    warps = bm // 16
    pairs = np.zeros((n, n), dtype=int)
    stored = np.zeros(n, dtype=int)
    for qt in range(layout["qtiles"][(n, bm)]):
        for w in range(warps):
            rows = qt * bm + w * 16 + np.arange(16)
            rows = rows[rows < n]  # rows >= n are computed but never stored
            for j in range(layout["ktiles"][n]):
                tile = layout["tiles"][(n, j)]
                keys = np.arange(tile["start"], tile["start"] + 16 * tile["chunks"])
                pairs[np.ix_(rows, keys[keys < n])] += 1  # keys >= n get -inf logits
            stored[rows] += 1
    assert (pairs == 1).all()
    assert (stored == 1).all()


# ----------------------------------------------------------------------------- shared memory


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_swizzle_is_a_bijection(layout, d):
    offs = sorted(layout["smem"][(d, r, c)] for r in range(128) for c in range(d // 8))
    assert offs == list(range(0, 128 * d, 8))
    for r in range(128):  # a row stays in its own d elements
        assert {layout["smem"][(d, r, c)] // d for c in range(d // 8)} == {r}


def _banks(offsets: list[int]) -> list[int]:
    return [(2 * off // 4 + w) % 32 for off in offsets for w in range(4)]  # 16-bit elements, 4-byte banks


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_ldmatrix_phases_conflict_free(layout, d):
    lm = layout["lanemap"]
    smem = layout["smem"]
    checks = []  # the 32 lane addresses of every ldmatrix.x4 the kernel issues
    for w in range(8):
        for kk in range(d // 16):
            checks.append([smem[(d, layout["qrow"][(w, lane)], lm[(lane, kk)]["q_chunk"])] for lane in range(32)])
    for kc in range(4):
        for kk in range(d // 16):
            checks.append([smem[(d, lm[(lane, kc)]["k_row"], lm[(lane, kk)]["k_chunk"])] for lane in range(32)])
        for dp in range(d // 16):
            checks.append([smem[(d, lm[(lane, kc)]["v_row"], lm[(lane, dp)]["v_chunk"])] for lane in range(32)])
    for addrs in checks:
        for i in range(4):  # one 8x8 matrix per phase
            assert len(set(_banks(addrs[8 * i : 8 * i + 8]))) == 32


# ----------------------------------------------------------------------------- fragments


def test_accumulator_layout_matches_ptx(layout):
    for lane in range(32):
        for e in range(4):
            assert layout["cfrag"][(lane, e)] == ptx_c(lane, e)


def _q_fragments(layout, smem_q, d, w):
    lm = layout["lanemap"]
    return [
        ldmatrix_x4(
            smem_q,
            [layout["smem"][(d, layout["qrow"][(w, lane)], lm[(lane, kk)]["q_chunk"])] for lane in range(32)],
            trans=False,
        )
        for kk in range(d // 16)
    ]


def _k_fragments(layout, smem_k, d, kc, kk):
    lm = layout["lanemap"]
    return ldmatrix_x4(
        smem_k,
        [layout["smem"][(d, lm[(lane, kc)]["k_row"], lm[(lane, kk)]["k_chunk"])] for lane in range(32)],
        trans=False,
    )


def _v_fragments(layout, smem_v, d, kc, dp):
    lm = layout["lanemap"]
    return ldmatrix_x4(
        smem_v,
        [layout["smem"][(d, lm[(lane, kc)]["v_row"], lm[(lane, dp)]["v_chunk"])] for lane in range(32)],
        trans=True,
    )


def _pack_p(s_tiles, kc):
    """The kernel's A operand of P V for key chunk kc from the S accumulators (32, 4) of n-tiles 2kc, 2kc+1."""
    lo, hi = s_tiles[2 * kc], s_tiles[2 * kc + 1]
    return np.stack([lo[:, 0:2], lo[:, 2:4], hi[:, 0:2], hi[:, 2:4]], axis=1)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_fragments_compute_qk_and_pv(layout, d):
    """S = Q K^T and O = P V for one warp and one 64-key tile, assembled from the kernel's fragments."""
    rng = np.random.default_rng(d)
    bm, w = 128, 5  # a warp other than 0: its rows start at 80
    q = rng.integers(-8, 8, size=(bm, d)).astype(float)  # small integers: exact sums
    k = rng.integers(-8, 8, size=(64, d)).astype(float)
    v = rng.integers(-8, 8, size=(64, d)).astype(float)
    smem_q, smem_k, smem_v = to_smem(q, layout, d), to_smem(k, layout, d), to_smem(v, layout, d)

    qf = _q_fragments(layout, smem_q, d, w)
    for kk in range(d // 16):  # each Q element where mma's A layout wants it
        for lane in range(32):
            for e in range(8):
                row, col = ptx_a(lane, e)
                assert qf[kk][lane, e // 2, e % 2] == q[16 * w + row, 16 * kk + col]

    s_tiles = [np.zeros((32, 4)) for _ in range(8)]
    for kk in range(d // 16):
        for kc in range(4):
            b = _k_fragments(layout, smem_k, d, kc, kk)
            s_tiles[2 * kc] += mma(qf[kk], b[:, 0:2])
            s_tiles[2 * kc + 1] += mma(qf[kk], b[:, 2:4])
    s_ref = q[16 * w : 16 * w + 16] @ k.T
    for nt in range(8):
        for lane in range(32):
            for e in range(4):
                row, col = layout["cfrag"][(lane, e)]
                assert s_tiles[nt][lane, e] == s_ref[row, 8 * nt + col]

    p = rng.integers(-4, 4, size=(16, 64)).astype(float)  # any P, laid out as the S accumulators
    p_tiles = [
        np.array([[p[ptx_c(lane, e)[0], 8 * nt + ptx_c(lane, e)[1]] for e in range(4)] for lane in range(32)])
        for nt in range(8)
    ]
    o_tiles = [np.zeros((32, 4)) for _ in range(d // 8)]
    for kc in range(4):
        pa = _pack_p(p_tiles, kc)
        for dp in range(d // 16):
            b = _v_fragments(layout, smem_v, d, kc, dp)
            o_tiles[2 * dp] += mma(pa, b[:, 0:2])
            o_tiles[2 * dp + 1] += mma(pa, b[:, 2:4])
    o_ref = p @ v
    for dt in range(d // 8):
        for lane in range(32):
            for e in range(4):
                row, col = layout["cfrag"][(lane, e)]
                assert o_tiles[dt][lane, e] == o_ref[row, 8 * dt + col]


# ----------------------------------------------------------------------------- the tile loop


def _emulate_attention(layout, q, k, v, scale):
    """The kernel's key loop for all query rows at once, in float64: tiles of the schedule, tail
    keys at -inf before the max, base-2 online softmax, O / l at the end."""
    n = q.shape[0]
    qk_scale_log2 = scale * math.log2(math.e)
    m = np.full(n, -np.inf)
    total = np.zeros(n)
    acc = np.zeros_like(q)
    for j in range(layout["ktiles"][n]):
        tile = layout["tiles"][(n, j)]
        keys = np.arange(tile["start"], tile["start"] + 16 * tile["chunks"])
        kt = np.zeros((len(keys), q.shape[1]))  # zero-filled rows past n, as cp.async leaves them
        vt = np.zeros_like(kt)
        kt[keys < n], vt[keys < n] = k[keys[keys < n]], v[keys[keys < n]]
        s = q @ kt.T
        if tile["masked"]:
            s[:, keys >= n] = -np.inf
        m_new = np.maximum(m, s.max(axis=1) * qk_scale_log2)
        p = np.exp2(s * qk_scale_log2 - m_new[:, None])
        alpha = np.exp2(m - m_new)
        total = total * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + p @ vt
        m = m_new
    return acc / total[:, None]


@pytest.mark.parametrize("n", SEQ_LENS)
def test_tile_loop_matches_softmax_attention(layout, n):
    rng = np.random.default_rng(n)
    d = 16
    q, k, v = (3.0 * rng.standard_normal((n, d)) for _ in range(3))  # peaked rows: the max must rescale
    scale = d**-0.5
    logits = q @ k.T * scale
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    ref = weights / weights.sum(axis=1, keepdims=True) @ v
    np.testing.assert_allclose(_emulate_attention(layout, q, k, v, scale), ref, rtol=1e-10, atol=1e-12)
