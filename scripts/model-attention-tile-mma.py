#!/usr/bin/env python3
# A lane-level model of attention_tile_mma's fragment arithmetic (kernels/attention.cu): the
# m16n8k16 and ldmatrix.x4.trans register layouts as the PTX ISA defines them, driven by the
# kernel's own indexing (Q fragments, K B fragments, masks, quad max, f16 weights reused as A
# fragments, V through ldmatrix.trans, the write-out), against direct attention. One warp (16
# queries), head_dim 128, keys in tiles of 64. Written before any GPU had run the kernel, to
# check its layouts without one; needs numpy. Usage: python3 scripts/model-attention-tile-mma.py
import numpy as np
rng = np.random.default_rng(1)
HD, KT = 128, 64

def mma(d, a, b):
    # a[lane] = 4 regs, each 2 halves; b[lane] = 2 regs; d[lane] = 4 floats. Build matrices.
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(4):
            row = g + 8 * (r % 2); col = 2 * t + 8 * (r // 2)
            A[row, col], A[row, col + 1] = a[lane][r]
        for r in range(2):
            k = 2 * t + 8 * r
            B[k, g], B[k + 1, g] = b[lane][r]
    D = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e in range(4):
            d[lane][e] += D[g + 8 * (e // 2), 2 * t + e % 2]

def ldmatrix_x4_trans(smem, addr):  # addr[lane] = (row, col) of a 16-byte row start
    out = [[None] * 4 for _ in range(32)]
    mats = []
    for i in range(4):
        M = np.array([smem[addr[8 * i + r][0], addr[8 * i + r][1]:addr[8 * i + r][1] + 8] for r in range(8)])
        mats.append(M)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            out[lane][i] = (mats[i][2 * t, g], mats[i][2 * t + 1, g])
    return out

def run(nq, key_start, key_end, qpos_all):
    Q = rng.standard_normal((16, HD)); Kall = rng.standard_normal((key_end + KT, HD)); Vall = rng.standard_normal((key_end + KT, HD))
    Q[nq:] = 0
    scale = HD ** -0.5
    qa = [[[None] * 4 for _ in range(HD // 16)] for _ in range(32)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for h in range(2):
            qi = g + 8 * h
            for kk in range(HD // 16):
                base = 16 * kk + 2 * t
                qa[lane][kk][h] = (Q[qi, base], Q[qi, base + 1])
                qa[lane][kk][h + 2] = (Q[qi, base + 8], Q[qi, base + 9])
    qpos = [[qpos_all[g + 8 * h] if g + 8 * h < nq else -1 for h in range(2)] for g in range(8)]
    o = [[[0.0] * 4 for _ in range(HD // 8)] for _ in range(32)]
    m = [[-np.inf, -np.inf] for _ in range(32)]; l = [[0.0, 0.0] for _ in range(32)]
    for k0 in range(key_start, key_end, KT):
        sk = np.zeros((KT, HD)); sv = np.zeros((KT, HD))
        n = min(KT, key_end - k0)
        sk[:n] = Kall[k0:k0 + n]; sv[:n] = Vall[k0:k0 + n]
        s = [[[0.0] * 4 for _ in range(KT // 8)] for _ in range(32)]
        for kk in range(HD // 16):
            for j in range(KT // 8):
                b = []
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    b.append([(sk[8 * j + g, 16 * kk + 2 * t], sk[8 * j + g, 16 * kk + 2 * t + 1]),
                              (sk[8 * j + g, 16 * kk + 2 * t + 8], sk[8 * j + g, 16 * kk + 2 * t + 9])])
                d = [s[lane][j] for lane in range(32)]
                mma(d, [qa[lane][kk] for lane in range(32)], b)
        mx = [[-np.inf, -np.inf] for _ in range(32)]
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for j in range(KT // 8):
                for e in range(4):
                    key = k0 + 8 * j + 2 * t + e % 2
                    vis = key < key_end and key <= qpos[g][e // 2]
                    s[lane][j][e] = s[lane][j][e] * scale if vis else -np.inf
                    mx[lane][e // 2] = max(mx[lane][e // 2], s[lane][j][e])
        for h in range(2):  # quad reduce
            new = [max(mx[lane ^ x][h] for x in range(4)) for lane in range(32)]
            for lane in range(32): mx[lane][h] = new[lane]
        corr = [[0, 0] for _ in range(32)]
        for lane in range(32):
            for h in range(2):
                mn = max(m[lane][h], mx[lane][h])
                corr[lane][h] = 1.0 if mn == -np.inf else np.exp(m[lane][h] - mn)
                m[lane][h] = mn; l[lane][h] *= corr[lane][h]
        pa = [[[None, None] for _ in range(KT // 8)] for _ in range(32)]
        for lane in range(32):
            for j in range(KT // 8):
                for h in range(2):
                    s0, s1 = s[lane][j][2 * h], s[lane][j][2 * h + 1]
                    p0 = 0.0 if s0 == -np.inf else np.float16(np.exp(s0 - m[lane][h]))
                    p1 = 0.0 if s1 == -np.inf else np.float16(np.exp(s1 - m[lane][h]))
                    l[lane][h] += float(p0) + float(p1)
                    pa[lane][j][h] = (float(p0), float(p1))
            for nn in range(HD // 8):
                o[lane][nn][0] *= corr[lane][0]; o[lane][nn][1] *= corr[lane][0]
                o[lane][nn][2] *= corr[lane][1]; o[lane][nn][3] *= corr[lane][1]
        for kk in range(KT // 16):
            a = [[pa[lane][2 * kk][0], pa[lane][2 * kk][1], pa[lane][2 * kk + 1][0], pa[lane][2 * kk + 1][1]] for lane in range(32)]
            for nn in range(HD // 16):
                addr = [(16 * kk + L % 8 + 8 * ((L // 8) % 2), 16 * nn + 8 * (L // 16)) for L in range(32)]
                b = ldmatrix_x4_trans(sv, addr)
                mma([o[lane][2 * nn] for lane in range(32)], a, [[b[lane][0], b[lane][1]] for lane in range(32)])
                mma([o[lane][2 * nn + 1] for lane in range(32)], a, [[b[lane][2], b[lane][3]] for lane in range(32)])
    # outputs
    out = np.full((16, HD), np.nan); M = np.full(16, np.nan); Lq = np.full(16, np.nan)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for h in range(2):
            lt = sum(l[lane ^ x][h] for x in range(4))
            qi = g + 8 * h
            for nn in range(HD // 8):
                out[qi, 8 * nn + 2 * t] = o[lane][nn][2 * h]; out[qi, 8 * nn + 2 * t + 1] = o[lane][nn][2 * h + 1]
            M[qi] = m[lane][h]; Lq[qi] = lt
    # reference
    worst = 0
    for qi in range(nq):
        keys = [k for k in range(key_start, key_end) if k <= qpos_all[qi]]
        if not keys:
            assert M[qi] == -np.inf and Lq[qi] == 0; continue
        sc = np.array([Q[qi] @ Kall[k] * scale for k in keys])
        mm = sc.max(); w = np.exp(sc - mm)
        ref = (w[:, None] * Vall[keys]).sum(0) / w.sum()
        got = out[qi] / Lq[qi]
        assert abs(M[qi] - mm) < 1e-9, (M[qi], mm)
        worst = max(worst, np.abs(got - ref).max())
    return worst

# Max |error| of o / l against direct attention: f16 weights (2^-11 relative each) bound it by
# about 2^-11 · max|v - o|; a layout error is off by O(1).
for name, args in [
    ("decode-like cascade, 13 queries", (13, 0, 150, [10**6] * 16)),
    ("prefill tile, causal", (16, 100, 230, list(range(150, 166)))),
    ("rows masked whole or in part", (9, 50, 120, [40, 60, 119, 55, 80, 100, 200, 49, 51] + [0] * 7)),
]:
    worst = run(*args)
    print(f"{name}: max |error| {worst:.1e}")
    assert worst < 2e-3, name
