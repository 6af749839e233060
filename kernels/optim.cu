// rawgan CUDA kernels: optimizer updates, MULTI-TENSOR: one launch updates every parameter
// of a model (a DCGAN step has ~20 parameter arrays; one launch each would be ~20 launches).
//
// Layout (built once per parameter set by cupy_ops and cached on the device):
//   ptrs[s * nt + t]   device address of slot s of tensor t (s = 0 param, 1 grad, 2.. state)
//   sizes[t]           element count of tensor t
//   chunk_tensor[b], chunk_start[b]
//                      block b updates elements [chunk_start, chunk_start + chunk) of tensor
//                      chunk_tensor[b] (clipped to its size): every block has a similar amount
//                      of work whatever the tensor sizes (apex's multi_tensor_apply scheme).
// Thread mapping: grid = number of chunks, 1-D blocks striding over their chunk.
//
// Update rules (Keras 3 forms, rawgan/optim.py; the same operation order, so float32 results
// match NumPy's to rounding):
//   Adam     m += (1 - b1) (g - m);  v += (1 - b2) (g^2 - v)
//            p -= alpha * m / (sqrt(v) + eps),   alpha = lr sqrt(1 - b2^t) / (1 - b1^t) (host;
//            read from device memory *alpha_ptr when that is not null, so a captured CUDA
//            graph takes each step's bias correction without being re-captured)
//   SGD      momentum 0: p -= lr g
//            else v = mu v - lr g;  p += v  (nesterov: p += mu v - lr g)
//   RMSprop  a = rho a + (1 - rho) g^2;  p -= lr g / (sqrt(a) + eps)
//   then, when clip > 0 (WGAN weight clipping): p = min(max(p, -clip), clip).
//   zero     p = 0 (every gradient of a model in one launch: Sequential.zero_grad)
// Scalars arrive already cast to T (as NumPy casts Python floats against a float32 array).
#include "common.cuh"

struct Chunk {
    i64 start, end;
    int t;
    __device__ __forceinline__ Chunk(const i64* sizes, const int* chunk_tensor,
                                     const i64* chunk_start, int chunk) {
        t = chunk_tensor[blockIdx.x];
        start = chunk_start[blockIdx.x];
        end = rg_min(start + (i64)chunk, sizes[t]);
    }
};

template <typename T>
__device__ __forceinline__ T clip_value(T p, T clip) {
    return clip > T(0) ? rg_min(rg_max(p, -clip), clip) : p;
}

template <typename T>
__device__ __forceinline__ void adam_body(const u64* ptrs, int nt, const i64* sizes,
                                          const int* chunk_tensor, const i64* chunk_start,
                                          int chunk, T alpha, const T* alpha_ptr,
                                          T one_minus_b1, T one_minus_b2, T eps, T clip) {
    const Chunk ck(sizes, chunk_tensor, chunk_start, chunk);
    if (alpha_ptr) alpha = *alpha_ptr;
    T* p = reinterpret_cast<T*>(ptrs[ck.t]);
    const T* g = reinterpret_cast<const T*>(ptrs[nt + ck.t]);
    T* m = reinterpret_cast<T*>(ptrs[2 * nt + ck.t]);
    T* v = reinterpret_cast<T*>(ptrs[3 * nt + ck.t]);
    for (i64 i = ck.start + threadIdx.x; i < ck.end; i += blockDim.x) {
        const T gi = g[i];
        T mi = m[i], vi = v[i];
        mi += one_minus_b1 * (gi - mi);
        vi += one_minus_b2 * (gi * gi - vi);
        m[i] = mi;
        v[i] = vi;
        p[i] = clip_value(p[i] - alpha * mi / (rg_sqrt(vi) + eps), clip);
    }
}

// ptrs slots: p, g, and v (only read when momentum != 0)
template <typename T>
__device__ __forceinline__ void sgd_body(const u64* ptrs, int nt, const i64* sizes,
                                         const int* chunk_tensor, const i64* chunk_start,
                                         int chunk, T lr, T momentum, int nesterov, T clip) {
    const Chunk ck(sizes, chunk_tensor, chunk_start, chunk);
    T* p = reinterpret_cast<T*>(ptrs[ck.t]);
    const T* g = reinterpret_cast<const T*>(ptrs[nt + ck.t]);
    T* vel = momentum != T(0) ? reinterpret_cast<T*>(ptrs[2 * nt + ck.t]) : nullptr;
    for (i64 i = ck.start + threadIdx.x; i < ck.end; i += blockDim.x) {
        const T gi = g[i];
        T pi = p[i];
        if (vel) {
            const T vi = vel[i] * momentum - lr * gi;
            vel[i] = vi;
            pi += nesterov ? momentum * vi - lr * gi : vi;
        } else {
            pi -= lr * gi;
        }
        p[i] = clip_value(pi, clip);
    }
}

template <typename T>
__device__ __forceinline__ void rmsprop_body(const u64* ptrs, int nt, const i64* sizes,
                                             const int* chunk_tensor, const i64* chunk_start,
                                             int chunk, T lr, T rho, T one_minus_rho, T eps,
                                             T clip) {
    const Chunk ck(sizes, chunk_tensor, chunk_start, chunk);
    T* p = reinterpret_cast<T*>(ptrs[ck.t]);
    const T* g = reinterpret_cast<const T*>(ptrs[nt + ck.t]);
    T* a = reinterpret_cast<T*>(ptrs[2 * nt + ck.t]);
    for (i64 i = ck.start + threadIdx.x; i < ck.end; i += blockDim.x) {
        const T gi = g[i];
        const T ai = a[i] * rho + one_minus_rho * gi * gi;
        a[i] = ai;
        p[i] = clip_value(p[i] - lr * gi / (rg_sqrt(ai) + eps), clip);
    }
}

// ptrs slot: p only. p = min(max(p, -clip), clip)
template <typename T>
__device__ __forceinline__ void clip_body(const u64* ptrs, int nt, const i64* sizes,
                                          const int* chunk_tensor, const i64* chunk_start,
                                          int chunk, T clip) {
    const Chunk ck(sizes, chunk_tensor, chunk_start, chunk);
    T* p = reinterpret_cast<T*>(ptrs[ck.t]);
    for (i64 i = ck.start + threadIdx.x; i < ck.end; i += blockDim.x) p[i] = clip_value(p[i], clip);
}

// ptrs slot: p only. p = 0
template <typename T>
__device__ __forceinline__ void zero_body(const u64* ptrs, int nt, const i64* sizes,
                                          const int* chunk_tensor, const i64* chunk_start,
                                          int chunk) {
    const Chunk ck(sizes, chunk_tensor, chunk_start, chunk);
    T* p = reinterpret_cast<T*>(ptrs[ck.t]);
    for (i64 i = ck.start + threadIdx.x; i < ck.end; i += blockDim.x) p[i] = T(0);
}

#define RG_MT_ARGS const u64 *ptrs, int nt, const i64 *sizes, const int *chunk_tensor,        \
                   const i64 *chunk_start, int chunk
#define RG_MT_PASS ptrs, nt, sizes, chunk_tensor, chunk_start, chunk

#define RG_OPTIM_KERNELS(SUF, T)                                                             \
    extern "C" __global__ void adam_mt_##SUF(RG_MT_ARGS, T alpha, const T* alpha_ptr,        \
                                             T one_minus_b1, T one_minus_b2, T eps, T clip) { \
        adam_body(RG_MT_PASS, alpha, alpha_ptr, one_minus_b1, one_minus_b2, eps, clip);      \
    }                                                                                        \
    extern "C" __global__ void zero_mt_##SUF(RG_MT_ARGS) { zero_body<T>(RG_MT_PASS); }       \
    extern "C" __global__ void sgd_mt_##SUF(RG_MT_ARGS, T lr, T momentum, int nesterov,      \
                                            T clip) {                                        \
        sgd_body(RG_MT_PASS, lr, momentum, nesterov, clip);                                  \
    }                                                                                        \
    extern "C" __global__ void rmsprop_mt_##SUF(RG_MT_ARGS, T lr, T rho, T one_minus_rho,    \
                                                T eps, T clip) {                             \
        rmsprop_body(RG_MT_PASS, lr, rho, one_minus_rho, eps, clip);                         \
    }                                                                                        \
    extern "C" __global__ void clip_mt_##SUF(RG_MT_ARGS, T clip) {                           \
        clip_body(RG_MT_PASS, clip);                                                         \
    }

RG_OPTIM_KERNELS(f32, float)
RG_OPTIM_KERNELS(f64, double)
