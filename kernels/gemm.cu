// rawgan CUDA kernels: dense-layer GEMMs.
//
//   C[m, n] = act(alpha * sum_k op(A)[m, k] * op(B)[k, n]  (+ beta * C[m, n])  (+ bias[n]))
//   act = LeakyReLU(slope) when act != 0 (the fused epilogue, BiasLeaky in tile_gemm.cuh),
//   else the identity
//
// row-major, lda/ldb/ldc the row strides. The three layouts a dense layer needs:
//   gemm_nn  A (M x K),  B (K x N)    y  = x @ w (+ b)           forward
//   gemm_nt  A (M x K),  B (N x K)    dx = dy @ w^T              backward-data
//   gemm_tn  A (K x M),  B (K x N)    dw = x^T @ dy              backward-weights
// Tiling, register blocking, double buffering: see tile_gemm.cuh. Names end in the tile
// configuration (all 256 threads, BK = 8):
//   _f32_L  128 x 128, 8x8 per thread     big problems
//   _f32_M  128 x  64, 8x4 per thread     64-channel convolutions
//   _f32_S   64 x  64, 4x4 per thread     small problems
//   _f32_T  256 x   4, 4x1 per thread     thin outputs (N <= 16: a logit, 1 image channel)
//   _f64_S, _f64_T                        double (register budget: no 8x8 double blocks)
//   _tf32_L/M/S  as _f32_L/M/S on TF32 tensor cores (mma.sync; cupy_ops.TF32 selects them)
// The epilogue: each thread writes the elements its main loop owns (L::row, L::col; see
// tile_gemm.cuh), guarded by m < M, n < N, through BiasLeaky (bias, then the activation).
//
// beta == 0 never READS C, so an uninitialised (NaN-poisoned) output is fine; bias may be
// null. vecA / vecB (host-computed) say the operand's rows are 16-byte aligned, allowing
// float4 / double2 loads; the borders fall back to guarded scalar loads.
#include "common.cuh"
#include "tile_gemm.cuh"

template <class L, class OA, class OB, typename T>
__device__ __forceinline__ void gemm_body(const OA& opa, const OB& opb, int M, int N, int K,
                                          T* C, int ldc, T alpha, T beta,
                                          const BiasLeaky<T>& epi) {
    const int m0 = blockIdx.x * L::BM, n0 = blockIdx.y * L::BN;
    T acc[L::TM][L::TN];
    L::run(opa, opb, m0, n0, 0, K, acc);
#pragma unroll
    for (int i = 0; i < L::TM; ++i) {
        const int m = m0 + L::row(i);
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < L::TN; ++j) {
            const int n = n0 + L::col(j);
            if (n < N) {
                T v = alpha * acc[i][j];
                if (beta != T(0)) v += beta * C[(i64)m * ldc + n];
                C[(i64)m * ldc + n] = epi(v, n);
            }
        }
    }
}

// Grid: (ceil(M / BM), ceil(N / BN)) (M on x: no 65535 limit), block: 256 threads.
#define RG_GEMM_KERNELS(SUF, T, LOOP)                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                        \
    gemm_nn_##SUF(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C,       \
                  int ldc, T alpha, T beta, const T* bias, int vecA, int vecB, int act,      \
                  T slope) {                                                                 \
        const OpRowK<T> a = {A, M, K, lda, vecA != 0};                                       \
        const OpColK<T> b = {B, N, K, ldb, vecB != 0};                                       \
        const BiasLeaky<T> epi = {bias, act, slope};                                         \
        gemm_body<LOOP>(a, b, M, N, K, C, ldc, alpha, beta, epi);                            \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                        \
    gemm_nt_##SUF(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C,       \
                  int ldc, T alpha, T beta, const T* bias, int vecA, int vecB, int act,      \
                  T slope) {                                                                 \
        const OpRowK<T> a = {A, M, K, lda, vecA != 0};                                       \
        const OpRowK<T> b = {B, N, K, ldb, vecB != 0};                                       \
        const BiasLeaky<T> epi = {bias, act, slope};                                         \
        gemm_body<LOOP>(a, b, M, N, K, C, ldc, alpha, beta, epi);                            \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                        \
    gemm_tn_##SUF(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C,       \
                  int ldc, T alpha, T beta, const T* bias, int vecA, int vecB, int act,      \
                  T slope) {                                                                 \
        const OpColK<T> a = {A, M, K, lda, vecA != 0};                                       \
        const OpColK<T> b = {B, N, K, ldb, vecB != 0};                                       \
        const BiasLeaky<T> epi = {bias, act, slope};                                         \
        gemm_body<LOOP>(a, b, M, N, K, C, ldc, alpha, beta, epi);                            \
    }

RG_EACH_TILE(RG_GEMM_KERNELS)
