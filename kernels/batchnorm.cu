// rawgan CUDA kernels: batch normalization over every axis but the channel (last) one.
//
// x is (M, C) row-major: M = N for dense inputs, M = N*H*W for NHWC images. Per channel c,
// with m = M rows (the same formulas and rounding order as numpy_ops.batchnorm_*):
//   forward (training):
//     mean = sum_r x[r, c] / m
//     var  = sum_r (x[r, c] - mean)^2 / m                 two passes, as NumPy: no
//                                                          catastrophic cancellation
//     inv_std = 1 / sqrt(var + eps)
//     moving_mean = momentum * moving_mean + (1 - momentum) * mean      (in place)
//     moving_var  = momentum * moving_var  + (1 - momentum) * var       (in place)
//     y = (x - mean) * (gamma * inv_std) + beta           (one fma: bn_affine)
//   forward (inference): mean = moving_mean, inv_std = 1 / sqrt(moving_var + eps); same y.
//   fused LeakyReLU (act != 0): bn_apply writes z = leaky(y, slope) instead of y, and the
//   backward takes dz = dL/dz, turning it into dy = dz * (y > 0 ? 1 : slope) as it reads it,
//   with y RECOMPUTED from x by bn_affine (bitwise the forward's y: the same fma). The
//   LeakyReLU after a batch norm (three of them in the DCGAN generator) then costs no pass
//   over memory of its own, forward or backward.
//   backward, xhat = (x - mean) * inv_std:
//     dbeta = sum_r dy;   dgamma = sum_r dy * xhat
//     training:  dx = (dy - (xhat * dgamma/m + dbeta/m)) * (gamma * inv_std)
//     inference: dx = dy * (gamma * inv_std)
//
// Launch sequence (cupy_ops.batchnorm_forward / _backward):
//   bn_sum_partial      (32, 8) blocks, grid (ceil(C/32), S)   S row splits of each channel
//   bn_mean_final       1 thread per channel                   mean
//   bn_sqdev_partial    as bn_sum_partial                      sum (x - mean)^2
//   bn_var_final        1 thread per channel                   inv_std, moving statistics
//   bn_apply            grid-stride, 1 thread per element      y
// and bn_bwd_partial (both sums in one read of x and dy) -> bn_bwd_final -> bn_bwd_dx.
// Partials are reduced in a fixed order: deterministic.
#include "common.cuh"

// y = (x - mean) * scale + beta, scale = gamma * inv_std, as one explicit fma, so that the
// backward's recomputation is bitwise the forward's.
template <typename T>
__device__ __forceinline__ T bn_affine(T x, T mean, T scale, T beta) {
    return rg_fma(x - mean, scale, beta);
}
// dL/dy from the gradient g arriving at channel c of row element x: g itself, or, with the
// LeakyReLU folded in (act != 0), g * leaky'(y) with y = bn_affine(x, ...).
template <typename T>
struct BnGrad {
    const T* gamma; const T* beta; int act; T slope;
    __device__ __forceinline__ T operator()(T g, T x, int c, T mean, T inv_std) const {
        return act ? rg_leaky_grad(g, bn_affine(x, mean, gamma[c] * inv_std, beta[c]), slope)
                   : g;
    }
};

template <typename T>
struct BnSum {
    const T* x; int C;
    __device__ __forceinline__ void operator()(int r, int c, T (&acc)[1]) const {
        acc[0] += x[(i64)r * C + c];
    }
};
template <typename T>
struct BnSqDev {
    const T* x; const T* mean; int C;
    __device__ __forceinline__ void operator()(int r, int c, T (&acc)[1]) const {
        const T d = x[(i64)r * C + c] - mean[c];
        acc[0] += d * d;
    }
};
// acc[0] += dy (-> dbeta), acc[1] += dy * xhat (-> dgamma); dy = grad(incoming gradient)
template <typename T>
struct BnBwd {
    const T* dy; const T* x; const T* mean; const T* inv_std; int C; BnGrad<T> grad;
    __device__ __forceinline__ void operator()(int r, int c, T (&acc)[2]) const {
        const i64 i = (i64)r * C + c;
        const T xv = x[i];
        const T g = grad(dy[i], xv, c, mean[c], inv_std[c]);
        acc[0] += g;
        acc[1] += g * ((xv - mean[c]) * inv_std[c]);
    }
};

// mean[c] = (sum of the S partials) / m
template <typename T>
__device__ __forceinline__ void bn_mean_final_body(const T* part, int S, int C, T m, T* mean) {
    RG_GRID_LOOP(c, C) {
        T s = part[c];
        for (int k = 1; k < S; ++k) s += part[(i64)k * C + c];
        mean[c] = s / m;
    }
}

// var = partial sums / m; inv_std; moving statistics updated in place (training only).
template <typename T>
__device__ __forceinline__ void bn_var_final_body(const T* part, int S, int C, T m, T eps,
                                                  T momentum, T one_minus_momentum,
                                                  const T* mean, T* moving_mean,
                                                  T* moving_var, T* inv_std) {
    RG_GRID_LOOP(c, C) {
        T s = part[c];
        for (int k = 1; k < S; ++k) s += part[(i64)k * C + c];
        const T var = s / m;
        inv_std[c] = T(1) / rg_sqrt(var + eps);
        moving_mean[c] = moving_mean[c] * momentum + one_minus_momentum * mean[c];
        moving_var[c] = moving_var[c] * momentum + one_minus_momentum * var;
    }
}

// inference statistics: mean = moving_mean (a copy), inv_std = 1 / sqrt(moving_var + eps)
template <typename T>
__device__ __forceinline__ void bn_infer_stats_body(const T* moving_mean, const T* moving_var,
                                                    int C, T eps, T* mean, T* inv_std) {
    RG_GRID_LOOP(c, C) {
        mean[c] = moving_mean[c];
        inv_std[c] = T(1) / rg_sqrt(moving_var[c] + eps);
    }
}

// y = (x - mean) * (gamma * inv_std) + beta;  with act != 0, leaky(y, slope) instead
template <typename T>
__device__ __forceinline__ void bn_apply_body(const T* x, const T* mean, const T* inv_std,
                                              const T* gamma, const T* beta, T* y, i64 n,
                                              int C, int act, T slope) {
    RG_GRID_LOOP(i, n) {
        const int c = (int)(i % C);
        const T v = bn_affine(x[i], mean[c], gamma[c] * inv_std[c], beta[c]);
        y[i] = act ? rg_leaky(v, slope) : v;
    }
}

// dbeta[c], dgamma[c] from the partials laid out [2][S][C]
template <typename T>
__device__ __forceinline__ void bn_bwd_final_body(const T* part, int S, int C, T* dgamma,
                                                  T* dbeta) {
    RG_GRID_LOOP(c, C) {
        T sb = part[c], sg = part[(i64)S * C + c];
        for (int k = 1; k < S; ++k) {
            sb += part[(i64)k * C + c];
            sg += part[(i64)(S + k) * C + c];
        }
        dbeta[c] = sb;
        dgamma[c] = sg;
    }
}

template <typename T>
__device__ __forceinline__ void bn_bwd_dx_body(const T* dy, const T* x, const T* mean,
                                               const T* inv_std, const T* gamma,
                                               const T* dgamma, const T* dbeta, T* dx, i64 n,
                                               int C, T m, int training,
                                               const BnGrad<T>& grad) {
    RG_GRID_LOOP(i, n) {
        const int c = (int)(i % C);
        const T scale = gamma[c] * inv_std[c];
        const T xv = x[i];
        const T g = grad(dy[i], xv, c, mean[c], inv_std[c]);
        if (training) {
            const T xhat = (xv - mean[c]) * inv_std[c];
            dx[i] = (g - (xhat * (dgamma[c] / m) + dbeta[c] / m)) * scale;
        } else {
            dx[i] = g * scale;
        }
    }
}

#define RG_BN_KERNELS(SUF, T)                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                        \
    bn_sum_partial_##SUF(const T* x, int M, int C, int rows_per, T* part) {                  \
        const BnSum<T> f = {x, C};                                                           \
        colreduce_partial<T, 1>(M, C, rows_per, part, f);                                    \
    }                                                                                        \
    extern "C" __global__ void bn_mean_final_##SUF(const T* part, int S, int C, T m,         \
                                                   T* mean) {                                \
        bn_mean_final_body(part, S, C, m, mean);                                             \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                        \
    bn_sqdev_partial_##SUF(const T* x, const T* mean, int M, int C, int rows_per, T* part) { \
        const BnSqDev<T> f = {x, mean, C};                                                   \
        colreduce_partial<T, 1>(M, C, rows_per, part, f);                                    \
    }                                                                                        \
    extern "C" __global__ void bn_var_final_##SUF(                                           \
        const T* part, int S, int C, T m, T eps, T momentum, T one_minus_momentum,           \
        const T* mean, T* moving_mean, T* moving_var, T* inv_std) {                          \
        bn_var_final_body(part, S, C, m, eps, momentum, one_minus_momentum, mean,            \
                          moving_mean, moving_var, inv_std);                                 \
    }                                                                                        \
    extern "C" __global__ void bn_infer_stats_##SUF(const T* moving_mean,                    \
                                                    const T* moving_var, int C, T eps,       \
                                                    T* mean, T* inv_std) {                   \
        bn_infer_stats_body(moving_mean, moving_var, C, eps, mean, inv_std);                 \
    }                                                                                        \
    extern "C" __global__ void bn_apply_##SUF(const T* x, const T* mean, const T* inv_std,   \
                                              const T* gamma, const T* beta, T* y, i64 n,    \
                                              int C, int act, T slope) {                     \
        bn_apply_body(x, mean, inv_std, gamma, beta, y, n, C, act, slope);                   \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                        \
    bn_bwd_partial_##SUF(const T* dy, const T* x, const T* mean, const T* inv_std, int M,    \
                         int C, int rows_per, T* part, const T* gamma, const T* beta,        \
                         int act, T slope) {                                                 \
        const BnBwd<T> f = {dy, x, mean, inv_std, C, {gamma, beta, act, slope}};             \
        colreduce_partial<T, 2>(M, C, rows_per, part, f);                                    \
    }                                                                                        \
    extern "C" __global__ void bn_bwd_final_##SUF(const T* part, int S, int C, T* dgamma,    \
                                                  T* dbeta) {                                \
        bn_bwd_final_body(part, S, C, dgamma, dbeta);                                        \
    }                                                                                        \
    extern "C" __global__ void bn_bwd_dx_##SUF(                                              \
        const T* dy, const T* x, const T* mean, const T* inv_std, const T* gamma,            \
        const T* dgamma, const T* dbeta, T* dx, i64 n, int C, T m, int training,             \
        const T* beta, int act, T slope) {                                                   \
        const BnGrad<T> grad = {gamma, beta, act, slope};                                    \
        bn_bwd_dx_body(dy, x, mean, inv_std, gamma, dgamma, dbeta, dx, n, C, m, training,    \
                       grad);                                                                \
    }

RG_BN_KERNELS(f32, float)
RG_BN_KERNELS(f64, double)
