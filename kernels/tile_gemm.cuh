// rawgan CUDA kernels: the tiled GEMM main loop shared by gemm.cu (dense layers) and conv.cu
// (implicit-GEMM convolutions).
//
//   acc[m, n] = sum_{k in [kbeg, kend)} A(m, k) * B(n, k)
//
// Both operands are read as "rows x K" matrices through an OPERAND class (A is M x K, B is
// N x K, i.e. B^T), so one loop serves plain row-major matrices, transposed ones and
// convolutions whose A(m, k) is computed from (output pixel m, kernel tap k) on the fly.
// An operand class provides
//   static constexpr bool KCONTIG   true: V consecutive k of one row are contiguous in memory
//                                   false: V consecutive rows of one k are contiguous
//   void load(int r, int k, T (&v)[V]) const
//                                   the V elements from (r, k) along k (KCONTIG) or along r;
//                                   zeros outside the matrix (the zero padding of a conv
//                                   lives here, nothing is materialised).
// V = 16 bytes / sizeof(T): a float4 or double2 load when the operand says it is aligned.
//
// Tiling (BM x BN x BK, per-thread TM x TN):
//   * a block of NT = (BM / TM) * (BN / TN) threads computes a BM x BN tile of C;
//     thread (ty, tx) = (tid / (BN / TN), tid % (BN / TN)) owns the TM x TN register block
//     rows ty*TM .. ty*TM+TM-1, columns tx*TN .. tx*TN+TN-1;
//   * the K loop walks BK-wide slabs: A's BM x BK slab and B's BN x BK slab are staged in
//     shared memory as As[k][m], Bs[k][n] (k-major, so the inner product reads TM and TN
//     consecutive values: vectorisable shared loads, broadcast across the warp);
//   * double buffering with a register stage: while slab t is multiplied out of shared
//     buffer t % 2, slab t + 1 is already loading from global memory into registers; it is
//     stored into buffer (t + 1) % 2 after the FMAs, then ONE __syncthreads per slab;
//   * each slab costs BK * TM * TN FMAs per thread against (TM + TN) * BK shared loads:
//     8x8 register blocks give 64 FMAs per 16 loads.
// Configurations (cupy_ops picks one per call; all 256 threads, BK = 8): float L 128x128
// (8x8 per thread), M 128x64 (8x4), S 64x64 (4x4), T 256x4 (4x1, thin outputs); double S
// and T; float L/M/S on TF32 tensor cores (tile_mainloop_tf32 below). Shared memory:
// 2 buffers * BK * (BM + BN + 2 pad) * sizeof(T): 17 KB for float L, 33 KB for the double
// T tile (256 rows), under the 48 KB of static shared memory a block may have.
#pragma once
#include "common.cuh"

// Register stage of one operand slab: ROWS x BK values as VECS vectors of V, PER per thread.
template <typename T, int ROWS, int BK, int NT>
struct SlabRegs {
    enum { V = Vec16<T>::n, VECS = ROWS * BK / V, PER = (VECS + NT - 1) / NT };
    T r[PER][V];
};

// Global -> registers: vector number v = tid + i*NT of the slab. KCONTIG: row v / (BK/V),
// k offset (v % (BK/V)) * V; otherwise k v / (ROWS/V), row offset (v % (ROWS/V)) * V.
template <typename T, int ROWS, int BK, int NT, class OP>
__device__ __forceinline__ void slab_fetch(const OP& op, int r0, int k0,
                                           SlabRegs<T, ROWS, BK, NT>& s) {
    typedef SlabRegs<T, ROWS, BK, NT> R;
#pragma unroll
    for (int i = 0; i < R::PER; ++i) {
        const int v = (int)threadIdx.x + i * NT;
        if (R::VECS % NT == 0 || v < R::VECS) {
            int r, k;
            if (OP::KCONTIG) { r = v / (BK / R::V); k = (v % (BK / R::V)) * R::V; }
            else { k = v / (ROWS / R::V); r = (v % (ROWS / R::V)) * R::V; }
            op.load(r0 + r, k0 + k, s.r[i]);
        }
    }
}

// Registers -> shared slab S[BK][LD] (k-major).
template <typename T, int ROWS, int BK, int NT, int LD, bool KCONTIG>
__device__ __forceinline__ void slab_stash(T (*S)[LD], const SlabRegs<T, ROWS, BK, NT>& s) {
    typedef SlabRegs<T, ROWS, BK, NT> R;
#pragma unroll
    for (int i = 0; i < R::PER; ++i) {
        const int v = (int)threadIdx.x + i * NT;
        if (R::VECS % NT == 0 || v < R::VECS) {
            if (KCONTIG) {
                const int r = v / (BK / R::V), k = (v % (BK / R::V)) * R::V;
#pragma unroll
                for (int j = 0; j < R::V; ++j) S[k + j][r] = s.r[i][j];
            } else {
                const int k = v / (ROWS / R::V), r = (v % (ROWS / R::V)) * R::V;
#pragma unroll
                for (int j = 0; j < R::V; ++j) S[k][r + j] = s.r[i][j];
            }
        }
    }
}

// The slab pipeline shared by both main loops. Every thread of the block must call it (it
// synchronises). kbeg is a multiple of BK; slabs past kend must read zeros or belong to this
// call (cupy_ops makes split-K chunks multiples of BK, so a slab never straddles two splits).
// ``slab(A, B)`` multiplies out one staged slab, A[k][m] (BK x BM) and B[k][n] (BK x BN).
template <typename T, int BM, int BN, int BK, int NT, class OA, class OB, class F>
__device__ __forceinline__ void slab_pipeline(const OA& opa, const OB& opb, int m0, int n0,
                                              int kbeg, int kend, const F& slab) {
    enum { PAD = Vec16<T>::n };
    // +PAD columns: the KCONTIG (transposing) stores of neighbouring threads fall in
    // different banks; PAD = one vector keeps every row 16-byte aligned.
    __shared__ __align__(16) T As[2][BK][BM + PAD];
    __shared__ __align__(16) T Bs[2][BK][BN + PAD];
    const int nk = (kend - kbeg + BK - 1) / BK;
    if (nk <= 0) return;  // uniform across the block

    SlabRegs<T, BM, BK, NT> ra;
    SlabRegs<T, BN, BK, NT> rb;
    slab_fetch<T, BM, BK, NT>(opa, m0, kbeg, ra);
    slab_fetch<T, BN, BK, NT>(opb, n0, kbeg, rb);
    slab_stash<T, BM, BK, NT, BM + PAD, OA::KCONTIG>(As[0], ra);
    slab_stash<T, BN, BK, NT, BN + PAD, OB::KCONTIG>(Bs[0], rb);
    __syncthreads();

    for (int t = 0; t < nk; ++t) {
        const int cur = t & 1;
        const bool more = t + 1 < nk;
        if (more) {  // issue the next slab's global loads before this slab's FMAs
            slab_fetch<T, BM, BK, NT>(opa, m0, kbeg + (t + 1) * BK, ra);
            slab_fetch<T, BN, BK, NT>(opb, n0, kbeg + (t + 1) * BK, rb);
        }
        slab(As[cur], Bs[cur]);
        if (more) {  // buffer cur^1 was last read in slab t-1, before the previous barrier
            slab_stash<T, BM, BK, NT, BM + PAD, OA::KCONTIG>(As[cur ^ 1], ra);
            slab_stash<T, BN, BK, NT, BN + PAD, OB::KCONTIG>(Bs[cur ^ 1], rb);
        }
        __syncthreads();
    }
}

// The FMA main loop: thread (ty, tx) multiplies out its TM x TN register block of each slab.
template <typename T, int BM, int BN, int BK, int TM, int TN, class OA, class OB>
__device__ __forceinline__ void tile_mainloop(const OA& opa, const OB& opb, int m0, int n0,
                                              int kbeg, int kend, T (&acc)[TM][TN]) {
    enum { NT = (BM / TM) * (BN / TN), PAD = Vec16<T>::n };
    const int tx = threadIdx.x % (BN / TN), ty = threadIdx.x / (BN / TN);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    slab_pipeline<T, BM, BN, BK, NT>(
        opa, opb, m0, n0, kbeg, kend, [&](const T (*As)[BM + PAD], const T (*Bs)[BN + PAD]) {
#pragma unroll
            for (int k = 0; k < BK; ++k) {
                T a[TM], b[TN];
#pragma unroll
                for (int i = 0; i < TM; ++i) a[i] = As[k][ty * TM + i];
#pragma unroll
                for (int j = 0; j < TN; ++j) b[j] = Bs[k][tx * TN + j];
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] = rg_fma(a[i], b[j], acc[i][j]);
            }
        });
}

// ---------------------------------------------------------------------------------------
// Plain matrix operands
// ---------------------------------------------------------------------------------------

// (R x K) matrix, element (r, k) at p[r * ld + k]: rows contiguous along k.
// vec: ld % V == 0 and p 16-byte aligned (then every (r, k) with k % V == 0 is aligned).
template <typename T>
struct OpRowK {
    enum { V = Vec16<T>::n };
    static constexpr bool KCONTIG = true;
    const T* p; int R, K, ld; bool vec;
    __device__ __forceinline__ void load(int r, int k, T (&v)[V]) const {
        if (r < R && vec && k + V <= K) { vload(p + (i64)r * ld + k, v); return; }
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = (r < R && k + j < K) ? p[(i64)r * ld + k + j] : T(0);
    }
};

// (R x K) matrix stored transposed, element (r, k) at p[k * ld + r]: contiguous along r.
template <typename T>
struct OpColK {
    enum { V = Vec16<T>::n };
    static constexpr bool KCONTIG = false;
    const T* p; int R, K, ld; bool vec;
    __device__ __forceinline__ void load(int r, int k, T (&v)[V]) const {
        if (k < K && vec && r + V <= R) { vload(p + (i64)k * ld + r, v); return; }
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = (k < K && r + j < R) ? p[(i64)k * ld + r + j] : T(0);
    }
};

// ---------------------------------------------------------------------------------------
// The same tile on TF32 tensor cores (float only, sm_80+; cupy_ops.TF32 selects it).
//
// The slabs are fetched and staged exactly as above (BK = 8, As[k][m], Bs[k][n]); the FMAs
// become mma.sync m16n8k8 (rg_mma_tf32): the 8 warps of the block tile the BM x BN tile as
// (BM / WM) x (BN / WN) warp tiles, each warp WM x WN = (WM / 16) x (WN / 8) mma tiles, and
// one BK = 8 slab is one mma K step. Operands are rounded to TF32 (rg_tf32) as they leave
// shared memory; products and sums are float. acc[TM][TN], TM = 2 WM / 16, TN = 2 WN / 8:
// acc[2 i + h][2 j + e] is the mma fragment element of row g + 8 h, column 2 t + e of mma
// tile (i, j) (g = lane / 4, t = lane % 4; see rg_mma_tf32).
// ---------------------------------------------------------------------------------------
template <int BM, int BN, int WM, int WN, class OA, class OB>
__device__ __forceinline__ void tile_mainloop_tf32(const OA& opa, const OB& opb, int m0, int n0,
                                                   int kbeg, int kend,
                                                   float (&acc)[2 * WM / 16][2 * WN / 8]) {
    enum { BK = 8, NT = 256, PAD = 4, MI = WM / 16, NJ = WN / 8 };
    static_assert((BM / WM) * (BN / WN) == NT / 32, "8 warps tile the block");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wm0 = (warp / (BN / WN)) * WM, wn0 = (warp % (BN / WN)) * WN;
#pragma unroll
    for (int i = 0; i < 2 * MI; ++i)
#pragma unroll
        for (int j = 0; j < 2 * NJ; ++j) acc[i][j] = 0.f;
    slab_pipeline<float, BM, BN, BK, NT>(
        opa, opb, m0, n0, kbeg, kend,
        [&](const float (*As)[BM + PAD], const float (*Bs)[BN + PAD]) {
            u32 a[MI][4], b[NJ][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                const int r = wm0 + i * 16 + g;
                a[i][0] = rg_tf32(As[t][r]);
                a[i][1] = rg_tf32(As[t][r + 8]);
                a[i][2] = rg_tf32(As[t + 4][r]);
                a[i][3] = rg_tf32(As[t + 4][r + 8]);
            }
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const int c = wn0 + j * 8 + g;
                b[j][0] = rg_tf32(Bs[t][c]);
                b[j][1] = rg_tf32(Bs[t + 4][c]);
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    float d[4] = {acc[2 * i][2 * j], acc[2 * i][2 * j + 1],
                                  acc[2 * i + 1][2 * j], acc[2 * i + 1][2 * j + 1]};
                    rg_mma_tf32(d, a[i], b[j]);
                    acc[2 * i][2 * j] = d[0];
                    acc[2 * i][2 * j + 1] = d[1];
                    acc[2 * i + 1][2 * j] = d[2];
                    acc[2 * i + 1][2 * j + 1] = d[3];
                }
        });
}

// ---------------------------------------------------------------------------------------
// A main loop and its thread -> tile ownership, for the kernels' epilogues:
//   L::run(opa, opb, m0, n0, kbeg, kend, acc)   fills acc[L::TM][L::TN];
//   L::row(i), L::col(j)                          the tile row / column of acc[i][j].
// SimtLoop: the FMA loop above (thread (ty, tx) owns a TM x TN block, rows ty*TM + i).
// Tf32Loop: tile_mainloop_tf32 (rows are NOT increasing in i: epilogues test every i).
// ---------------------------------------------------------------------------------------
template <typename T, int BM_, int BN_, int BK_, int TM_, int TN_>
struct SimtLoop {
    typedef T type;
    enum { BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_ };
    template <class OA, class OB>
    static __device__ __forceinline__ void run(const OA& a, const OB& b, int m0, int n0,
                                               int kbeg, int kend, T (&acc)[TM][TN]) {
        tile_mainloop<T, BM, BN, BK, TM, TN>(a, b, m0, n0, kbeg, kend, acc);
    }
    static __device__ __forceinline__ int row(int i) {
        return (int)(threadIdx.x / (BN / TN)) * TM + i;
    }
    static __device__ __forceinline__ int col(int j) {
        return (int)(threadIdx.x % (BN / TN)) * TN + j;
    }
};

template <int BM_, int BN_, int WM, int WN>
struct Tf32Loop {
    typedef float type;
    enum { BM = BM_, BN = BN_, BK = 8, TM = 2 * WM / 16, TN = 2 * WN / 8 };
    template <class OA, class OB>
    static __device__ __forceinline__ void run(const OA& a, const OB& b, int m0, int n0,
                                               int kbeg, int kend, float (&acc)[TM][TN]) {
        tile_mainloop_tf32<BM, BN, WM, WN>(a, b, m0, n0, kbeg, kend, acc);
    }
    static __device__ __forceinline__ int row(int i) {
        const int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
        return (warp / (BN / WN)) * WM + (i / 2) * 16 + g + 8 * (i % 2);
    }
    static __device__ __forceinline__ int col(int j) {
        const int warp = threadIdx.x / 32, t = threadIdx.x % 4;
        return (warp % (BN / WN)) * WN + (j / 2) * 8 + 2 * t + (j % 2);
    }
};

// The forward epilogue of gemm.cu and conv.cu: v (+ bias[n]), then, when act != 0, the
// LeakyReLU that follows the layer, z = v > 0 ? v : slope * v, applied in registers. This is
// the epilogue FUSION: the pre-activation never makes the round trip through memory that a
// separate leaky_relu_fwd launch costs (a read and a write of the whole output).
// rawgan.nn.Sequential fuses Dense / Conv2D / Conv2DTranspose + LeakyReLU this way.
template <typename T>
struct BiasLeaky {
    const T* bias; int act; T slope;
    __device__ __forceinline__ T operator()(T v, int n) const {
        if (bias) v += bias[n];
        return act ? rg_leaky(v, slope) : v;
    }
};

// The configurations cupy_ops launches (kernel-name suffixes _f32_L ... _tf32_S).
typedef SimtLoop<float, 128, 128, 8, 8, 8> LoopF32L;
typedef SimtLoop<float, 128, 64, 8, 8, 4> LoopF32M;
typedef SimtLoop<float, 64, 64, 8, 4, 4> LoopF32S;
typedef SimtLoop<float, 256, 4, 8, 4, 1> LoopF32T;
typedef SimtLoop<double, 64, 64, 8, 4, 4> LoopF64S;
typedef SimtLoop<double, 256, 4, 8, 4, 1> LoopF64T;
typedef Tf32Loop<128, 128, 64, 32> LoopTf32L;  // 8 warps as 2 x 4, each 64 x 32
typedef Tf32Loop<128, 64, 64, 16> LoopTf32M;   // each 64 x 16
typedef Tf32Loop<64, 64, 32, 16> LoopTf32S;    // each 32 x 16

// X(suffix, element type, loop) for every configuration: gemm.cu and conv.cu instantiate
// their kernels once per entry, so both files always offer the same set.
#define RG_EACH_TILE(X)            \
    X(f32_L, float, LoopF32L)      \
    X(f32_M, float, LoopF32M)      \
    X(f32_S, float, LoopF32S)      \
    X(f32_T, float, LoopF32T)      \
    X(f64_S, double, LoopF64S)     \
    X(f64_T, double, LoopF64T)     \
    X(tf32_L, float, LoopTf32L)    \
    X(tf32_M, float, LoopTf32M)    \
    X(tf32_S, float, LoopTf32S)
