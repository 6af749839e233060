// rawgan CUDA kernels: 2-D convolution, NHWC activations, HWIO weights (kh, kw, C, O).
//
// Notation: x (N, H, W, C) the conv input, y / dy (N, Ho, Wo, O) its output / output
// gradient, strides (sh, sw), top/left paddings (pt, pl) (bottom/right paddings are implied
// by Ho, Wo). Output pixel (i, j) reads input pixel (i*sh - pt + a, j*sw - pl + b) with tap
// (a, b); reads outside the input are the zero padding and are never multiplied: the
// operands below return 0 for them without touching memory, and nothing is materialised.
//
// Three kernels, each a tiled GEMM (main loop and tiling in tile_gemm.cuh):
//
//   conv_fwd    y[m, o]  = act(sum_k A[m, k] W[k, o] (+ bias[o]))      implicit GEMM
//               m = (n, i, j) output pixel, k = (a, b, c) tap x channel,
//               A[m, k] = x[n, i*sh - pt + a, j*sw - pl + b, c]  (address computed per load)
//   conv_dgrad  dx[n, r, s, c] = sum_{a, b, o} dy[n, (r+pt-a)/sh, (s+pl-b)/sw, o] w[a, b, c, o]
//               over the taps with (r + pt - a) % sh == 0 and (s + pl - b) % sw == 0 only:
//               the STRIDE-PHASE decomposition. Input rows r with (r + pt) % sh == ph receive
//               exactly the taps a = ph, ph + sh, ph + 2sh, ... (and likewise for columns), so
//               each of the sh*sw phases (blockIdx.z) is a dense GEMM with no zero taps:
//               M = N * Hp * Wp phase pixels, K = ka * kb * O, B[k, c] = w[a, b, c, o].
//   conv_wgrad  dw[k, o] = sum_m A[m, k] dy[m, o]   (A as in conv_fwd), the reduction over the
//               M = N*Ho*Wo output pixels split S ways (split-K, blockIdx.z); each split writes
//               its own partial (S, K, O) and splitk_reduce adds them in a fixed order
//               (deterministic, no atomics). With S == 1 the kernel writes dw directly.
//
// The transposed convolution reuses these, writing the math once (see cupy_ops.py):
//   conv2d_transpose forward       = conv_dgrad with dy := x  (its kernel w is (kh, kw, O_t, C_t))
//   conv2d_transpose backward-data = conv_fwd   with x := dy
//   conv2d_transpose weight grad   = conv_wgrad with x := dy, dy := x
//
// act: the LeakyReLU fused into the epilogue when act != 0 (BiasLeaky, tile_gemm.cuh), the
// identity otherwise; conv_fwd and conv_dgrad take it, so conv2d and conv2d_transpose forwards
// both fuse. Thread mapping: as tile_gemm.cuh; grid (M tiles, N tiles, phases or splits), 256 threads.
// Tile configurations as gemm.cu (_f32_L/M/S/T, _f64_S/T, _tf32_L/M/S on tensor cores).
#include "common.cuh"
#include "tile_gemm.cuh"

// Geometry of a convolution and the im2col element A(pixel, k) read straight from x.
template <typename T>
struct ConvGeom {
    const T* x; int N, H, W, C, Ho, Wo, kw, sh, sw, pt, pl;
    // output pixel m -> image n and the input position of tap (0, 0)
    __device__ __forceinline__ void pixel(int m, int& n, int& ih0, int& iw0) const {
        const int j = m % Wo, t = m / Wo, i = t % Ho;
        n = t / Ho;
        ih0 = i * sh - pt;
        iw0 = j * sw - pl;
    }
    // k = (a*kw + b)*C + c -> element offset in x, or -1 when the tap reads padding
    __device__ __forceinline__ i64 offset(int n, int ih0, int iw0, int k) const {
        const int c = k % C, tap = k / C, a = tap / kw, b = tap - a * kw;
        const int ih = ih0 + a, iw = iw0 + b;
        if (ih < 0 || ih >= H || iw < 0 || iw >= W) return -1;
        return (((i64)n * H + ih) * W + iw) * C + c;
    }
};

// conv_fwd's A: (M x K), M = N*Ho*Wo, K = kh*kw*C; vectors along k (channels) when C % V == 0.
template <typename T>
struct OpIm2col {
    enum { V = Vec16<T>::n };
    static constexpr bool KCONTIG = true;
    ConvGeom<T> g; int M, K; bool vec;
    __device__ __forceinline__ void load(int r, int k, T (&v)[V]) const {
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = T(0);
        if (r >= M || k >= K) return;
        int n, ih0, iw0;
        g.pixel(r, n, ih0, iw0);
        if (vec) {  // C % V == 0 and k % V == 0: the V channels share one tap
            const i64 off = g.offset(n, ih0, iw0, k);
            if (off >= 0) vload(g.x + off, v);
            return;
        }
#pragma unroll
        for (int q = 0; q < V; ++q) {
            if (k + q < K) {
                const i64 off = g.offset(n, ih0, iw0, k + q);
                if (off >= 0) v[q] = g.x[off];
            }
        }
    }
};

// conv_wgrad's A^T: (K x M) read as rows r = k (tap x channel), reduction index = pixel m;
// vectors along r (channels) when C % V == 0.
template <typename T>
struct OpIm2colT {
    enum { V = Vec16<T>::n };
    static constexpr bool KCONTIG = false;
    ConvGeom<T> g; int R, P; bool vec;  // R = kh*kw*C rows, P = N*Ho*Wo pixels
    __device__ __forceinline__ void load(int r, int m, T (&v)[V]) const {
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = T(0);
        if (m >= P || r >= R) return;
        int n, ih0, iw0;
        g.pixel(m, n, ih0, iw0);
        if (vec) {  // r % V == 0, C % V == 0: one tap
            const i64 off = g.offset(n, ih0, iw0, r);
            if (off >= 0) vload(g.x + off, v);
            return;
        }
#pragma unroll
        for (int q = 0; q < V; ++q) {
            if (r + q < R) {
                const i64 off = g.offset(n, ih0, iw0, r + q);
                if (off >= 0) v[q] = g.x[off];
            }
        }
    }
};

// One stride phase (ph, pw) of the backward-data gather.
//   input rows of the phase:  r = rf + u*sh, u in [0, Hp), rf = (ph - pt) mod sh
//   their taps:               a = ph + ta*sh, ta in [0, ka), ka = ceil((kh - ph) / sh)
//   the output row they read: i = (r + pt - a) / sh = i0(r) - ta, i0(r) = (r + pt - ph) / sh
// (exact divisions: r + pt = ph (mod sh) and r + pt >= ph). Likewise for columns.
struct Phase {
    int ph, pw, rf, cf, Hp, Wp, ka, kb;
    __device__ __forceinline__ void init(int p, int H, int W, int kh, int kw, int sh, int sw,
                                         int pt, int pl) {
        ph = p / sw;
        pw = p - ph * sw;
        rf = ((ph - pt) % sh + sh) % sh;
        cf = ((pw - pl) % sw + sw) % sw;
        Hp = rf < H ? (H - 1 - rf) / sh + 1 : 0;
        Wp = cf < W ? (W - 1 - cf) / sw + 1 : 0;
        ka = ph < kh ? (kh - 1 - ph) / sh + 1 : 0;
        kb = pw < kw ? (kw - 1 - pw) / sw + 1 : 0;
    }
};

// conv_dgrad's A: (Mp x Kp), row = phase pixel (n, u, v), k = (ta*kb + tb)*O + o;
// A = dy[n, i0 - ta, j0 - tb, o] (0 outside dy). Vectors along o when O % V == 0.
template <typename T>
struct OpDgradA {
    enum { V = Vec16<T>::n };
    static constexpr bool KCONTIG = true;
    const T* dy; Phase ph; int Mp, Kp, Ho, Wo, O, sh, sw, pt, pl; bool vec;
    __device__ __forceinline__ void row(int r, int& n, int& i0, int& j0) const {
        const int v = r % ph.Wp, t = r / ph.Wp, u = t % ph.Hp;
        n = t / ph.Hp;
        i0 = (ph.rf + u * sh + pt - ph.ph) / sh;
        j0 = (ph.cf + v * sw + pl - ph.pw) / sw;
    }
    __device__ __forceinline__ i64 offset(int n, int i0, int j0, int k) const {
        const int o = k % O, tap = k / O, ta = tap / ph.kb, tb = tap - ta * ph.kb;
        const int i = i0 - ta, j = j0 - tb;
        if (i < 0 || i >= Ho || j < 0 || j >= Wo) return -1;
        return (((i64)n * Ho + i) * Wo + j) * O + o;
    }
    __device__ __forceinline__ void load(int r, int k, T (&v)[V]) const {
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = T(0);
        if (r >= Mp || k >= Kp) return;
        int n, i0, j0;
        row(r, n, i0, j0);
        if (vec) {
            const i64 off = offset(n, i0, j0, k);
            if (off >= 0) vload(dy + off, v);
            return;
        }
#pragma unroll
        for (int q = 0; q < V; ++q) {
            if (k + q < Kp) {
                const i64 off = offset(n, i0, j0, k + q);
                if (off >= 0) v[q] = dy[off];
            }
        }
    }
};

// conv_dgrad's B^T: (C x Kp), element (c, k) = w[a, b, c, o] with a = ph + ta*sh,
// b = pw + tb*sw; contiguous along o (k) in HWIO.
template <typename T>
struct OpDgradB {
    enum { V = Vec16<T>::n };
    static constexpr bool KCONTIG = true;
    const T* w; Phase ph; int C, Kp, O, kw, sh, sw; bool vec;
    __device__ __forceinline__ i64 offset(int c, int k) const {
        const int o = k % O, tap = k / O, ta = tap / ph.kb, tb = tap - ta * ph.kb;
        const int a = ph.ph + ta * sh, b = ph.pw + tb * sw;
        return (((i64)a * kw + b) * C + c) * O + o;
    }
    __device__ __forceinline__ void load(int r, int k, T (&v)[V]) const {
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = T(0);
        if (r >= C || k >= Kp) return;
        if (vec) { vload(w + offset(r, k), v); return; }  // O % V == 0
#pragma unroll
        for (int q = 0; q < V; ++q)
            if (k + q < Kp) v[q] = w[offset(r, k + q)];
    }
};

// ---------------------------------------------------------------------------------------

// y (N*Ho*Wo, O) = act(im2col(x) (M, K) @ w (K, O) + bias). Grid (ceil(M/BM), ceil(O/BN)).
template <class L, typename T>
__device__ __forceinline__ void conv_fwd_body(const T* x, const T* w, const BiasLeaky<T>& epi,
                                              T* y,
                                              int N, int H, int W, int C, int Ho, int Wo,
                                              int O, int kh, int kw, int sh, int sw, int pt,
                                              int pl, int vecA, int vecB) {
    const int M = N * Ho * Wo, K = kh * kw * C;
    const ConvGeom<T> g = {x, N, H, W, C, Ho, Wo, kw, sh, sw, pt, pl};
    const OpIm2col<T> a = {g, M, K, vecA != 0};
    const OpColK<T> b = {w, O, K, O, vecB != 0};  // w as (K x O): element (o, k) at w[k*O + o]
    const int m0 = blockIdx.x * L::BM, n0 = blockIdx.y * L::BN;
    T acc[L::TM][L::TN];
    L::run(a, b, m0, n0, 0, K, acc);
#pragma unroll
    for (int i = 0; i < L::TM; ++i) {
        const int m = m0 + L::row(i);
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < L::TN; ++j) {
            const int o = n0 + L::col(j);
            if (o < O) y[(i64)m * O + o] = epi(acc[i][j], o);
        }
    }
}

// dx (N, H, W, C), one stride phase per blockIdx.z (= ph * sw + pw). Every dx element lies in
// exactly one phase and is written exactly once (zero when its phase has no taps).
// Grid (ceil(max_p Mp / BM), ceil(C / BN), sh * sw).
template <class L, typename T>
__device__ __forceinline__ void conv_dgrad_body(const T* dy, const T* w,
                                                const BiasLeaky<T>& epi, T* dx,
                                                int N, int H, int W, int C, int Ho, int Wo,
                                                int O, int kh, int kw, int sh, int sw, int pt,
                                                int pl, int vecA, int vecB) {
    Phase ph;
    ph.init(blockIdx.z, H, W, kh, kw, sh, sw, pt, pl);
    const int Mp = N * ph.Hp * ph.Wp, Kp = ph.ka * ph.kb * O;
    const int m0 = blockIdx.x * L::BM, n0 = blockIdx.y * L::BN;
    if (m0 >= Mp) return;  // uniform over the block: this phase has fewer pixels
    const OpDgradA<T> a = {dy, ph, Mp, Kp, Ho, Wo, O, sh, sw, pt, pl, vecA != 0};
    const OpDgradB<T> b = {w, ph, C, Kp, O, kw, sh, sw, vecB != 0};
    T acc[L::TM][L::TN];
    L::run(a, b, m0, n0, 0, Kp, acc);
#pragma unroll
    for (int i = 0; i < L::TM; ++i) {
        const int m = m0 + L::row(i);
        if (m >= Mp) continue;
        const int v = m % ph.Wp, t = m / ph.Wp, u = t % ph.Hp, n = t / ph.Hp;
        const int r = ph.rf + u * sh, s = ph.cf + v * sw;
        T* out = dx + (((i64)n * H + r) * W + s) * C;
#pragma unroll
        for (int j = 0; j < L::TN; ++j) {
            const int c = n0 + L::col(j);
            if (c < C) out[c] = epi(acc[i][j], c);
        }
    }
}

// dw (kh*kw*C, O) = im2col(x)^T @ dy over pixels [z*chunk, min(P, (z+1)*chunk)), written to
// out + z*K*O (out = dw when gridDim.z == 1, else the split-K partial buffer).
// Grid (ceil(K/BM), ceil(O/BN), S).
template <class L, typename T>
__device__ __forceinline__ void conv_wgrad_body(const T* x, const T* dy, T* out, int N, int H,
                                                int W, int C, int Ho, int Wo, int O, int kh,
                                                int kw, int sh, int sw, int pt, int pl,
                                                int chunk, int vecA, int vecB) {
    const int P = N * Ho * Wo, K = kh * kw * C;
    const ConvGeom<T> g = {x, N, H, W, C, Ho, Wo, kw, sh, sw, pt, pl};
    const OpIm2colT<T> a = {g, K, P, vecA != 0};
    const OpColK<T> b = {dy, O, P, O, vecB != 0};  // dy as (P x O): element (o, m) at dy[m*O + o]
    const int m0 = blockIdx.x * L::BM, n0 = blockIdx.y * L::BN;
    const int kbeg = blockIdx.z * chunk, kend = rg_min(P, kbeg + chunk);
    T acc[L::TM][L::TN];
    L::run(a, b, m0, n0, kbeg, kend, acc);
    T* dst = out + (i64)blockIdx.z * K * O;
#pragma unroll
    for (int i = 0; i < L::TM; ++i) {
        const int m = m0 + L::row(i);
        if (m >= K) continue;
#pragma unroll
        for (int j = 0; j < L::TN; ++j) {
            const int o = n0 + L::col(j);
            if (o < O) dst[(i64)m * O + o] = acc[i][j];
        }
    }
}

#define RG_CONV_ARGS                                                                         \
    int N, int H, int W, int C, int Ho, int Wo, int O, int kh, int kw, int sh, int sw, int pt, \
        int pl
#define RG_CONV_PASS N, H, W, C, Ho, Wo, O, kh, kw, sh, sw, pt, pl

#define RG_CONV_KERNELS(SUF, T, LOOP)                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                          \
    conv_fwd_##SUF(const T* x, const T* w, const T* bias, T* y, RG_CONV_ARGS, int vecA,        \
                   int vecB, int act, T slope) {                                               \
        const BiasLeaky<T> epi = {bias, act, slope};                                           \
        conv_fwd_body<LOOP>(x, w, epi, y, RG_CONV_PASS, vecA, vecB);                           \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
    conv_dgrad_##SUF(const T* dy, const T* w, const T* bias, T* dx, RG_CONV_ARGS, int vecA,    \
                     int vecB, int act, T slope) {                                             \
        const BiasLeaky<T> epi = {bias, act, slope};                                           \
        conv_dgrad_body<LOOP>(dy, w, epi, dx, RG_CONV_PASS, vecA, vecB);                       \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
    conv_wgrad_##SUF(const T* x, const T* dy, T* out, RG_CONV_ARGS, int chunk, int vecA,       \
                     int vecB) {                                                               \
        conv_wgrad_body<LOOP>(x, dy, out, RG_CONV_PASS, chunk, vecA, vecB);                    \
    }

RG_EACH_TILE(RG_CONV_KERNELS)

// out[i] = sum_{s < S} part[s*n + i], s in order (deterministic split-K reduction).
// Grid-stride, one thread per element.
template <typename T>
__device__ __forceinline__ void splitk_reduce_body(const T* part, int S, i64 n, T* out) {
    RG_GRID_LOOP(i, n) {
        T s = part[i];
        for (int k = 1; k < S; ++k) s += part[(i64)k * n + i];
        out[i] = s;
    }
}
extern "C" __global__ void splitk_reduce_f32(const float* part, int S, i64 n, float* out) {
    splitk_reduce_body(part, S, n, out);
}
extern "C" __global__ void splitk_reduce_f64(const double* part, int S, i64 n, double* out) {
    splitk_reduce_body(part, S, n, out);
}
