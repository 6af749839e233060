// rawgan CUDA kernels: GAN losses, value and gradient w.r.t. the logits, in ONE launch.
//
// rawgan/losses.py (the reference, with the derivations) already runs on CuPy arrays through
// NumPy ufunc dispatch, but as ~10 small CuPy kernels plus host synchronisations (a finite
// check, float() of each mean). This kernel computes the same loss and gradients in a single
// block with no host round trip, so a training step can stay on the device (and inside a
// CUDA graph); the loss is left in a device double for the caller to read when it wants.
//
// kind: 0 bce, 1 minimax, 2 wgan, 3 hinge, 4 lsgan (rawgan.losses.KINDS order).
// gen = 0: discriminator loss of real logits r (nr) and fake logits f (nf)
//          L = mean_i t_r(r_i) + mean_j t_f(f_j), dr_i = dL/dr_i, df_j = dL/df_j
// gen = 1: generator loss of fake logits f only: L = mean_j t_g(f_j), df_j = dL/df_j
// with softplus(l) = max(l, 0) + log1p(exp(-|l|)), s(l) the overflow-free sigmoid:
//   D bce/minimax  t_r = softplus(-r)   dr = -s(-r)/nr    t_f = softplus(f)  df = s(f)/nf
//   D wgan         t_r = -r             dr = -1/nr        t_f = f            df = 1/nf
//   D hinge        t_r = relu(1 - r)    dr = -[r < 1]/nr  t_f = relu(1 + f)  df = [f > -1]/nf
//   D lsgan        t_r = (r - 1)^2 / 2  dr = (r - 1)/nr   t_f = f^2 / 2      df = f/nf
//   G bce          t_g = softplus(-f)   df = -s(-f)/nf    (non-saturating)
//   G minimax      t_g = -softplus(f)   df = -s(f)/nf
//   G wgan, hinge  t_g = -f             df = -1/nf
//   G lsgan        t_g = (f - 1)^2 / 2  df = (f - 1)/nf
// Thread mapping: one block of blockDim.x (a power of two <= 1024) threads, each striding
// over the logits; the per-thread sums (in double) meet in block_sum. loss[0] is written by
// thread 0. NaN or inf logits give a NaN/inf loss (the caller checks the loss, once).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ T softplus(T l) {
    return rg_max(l, T(0)) + rg_log1p(rg_exp(-rg_abs(l)));
}
template <typename T>
__device__ __forceinline__ T sigmoid(T l) {
    const T e = rg_exp(-rg_abs(l));
    return l >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// term and gradient of one REAL logit (discriminator)
template <typename T>
__device__ __forceinline__ T d_real_term(int kind, T r, T n, T& g) {
    switch (kind) {
        case 2: g = T(-1.0 / (double)n); return -r;
        case 3: g = -(T)(r < T(1)) / n; return rg_max(T(1) - r, T(0));
        case 4: g = (r - T(1)) / n; return T(0.5) * (r - T(1)) * (r - T(1));
        default: g = -sigmoid(-r) / n; return softplus(-r);
    }
}
// term and gradient of one FAKE logit (discriminator)
template <typename T>
__device__ __forceinline__ T d_fake_term(int kind, T f, T n, T& g) {
    switch (kind) {
        case 2: g = T(1.0 / (double)n); return f;
        case 3: g = (T)(f > T(-1)) / n; return rg_max(T(1) + f, T(0));
        case 4: g = f / n; return T(0.5) * f * f;
        default: g = sigmoid(f) / n; return softplus(f);
    }
}
// term and gradient of one fake logit (generator)
template <typename T>
__device__ __forceinline__ T g_term(int kind, T f, T n, T& g) {
    switch (kind) {
        case 1: g = -sigmoid(f) / n; return -softplus(f);
        case 2:
        case 3: g = T(-1.0 / (double)n); return -f;
        case 4: g = (f - T(1)) / n; return T(0.5) * (f - T(1)) * (f - T(1));
        default: g = -sigmoid(-f) / n; return softplus(-f);
    }
}

template <typename T>
__device__ __forceinline__ void gan_loss_body(int kind, int gen, const T* r, int nr,
                                              const T* f, int nf, T* dr, T* df,
                                              double* loss) {
    double sr = 0.0, sf = 0.0;
    if (!gen) {
        for (int i = threadIdx.x; i < nr; i += blockDim.x) {
            T g;
            sr += (double)d_real_term(kind, r[i], (T)nr, g);
            dr[i] = g;
        }
    }
    for (int i = threadIdx.x; i < nf; i += blockDim.x) {
        T g;
        sf += (double)(gen ? g_term(kind, f[i], (T)nf, g) : d_fake_term(kind, f[i], (T)nf, g));
        df[i] = g;
    }
    const double tr = block_sum(sr);
    const double tf = block_sum(sf);
    if (threadIdx.x == 0) loss[0] = (gen ? 0.0 : tr / (double)nr) + tf / (double)nf;
}

extern "C" __global__ void gan_loss_f32(int kind, int gen, const float* r, int nr,
                                        const float* f, int nf, float* dr, float* df,
                                        double* loss) {
    gan_loss_body(kind, gen, r, nr, f, nf, dr, df, loss);
}
extern "C" __global__ void gan_loss_f64(int kind, int gen, const double* r, int nr,
                                        const double* f, int nf, double* dr, double* df,
                                        double* loss) {
    gan_loss_body(kind, gen, r, nr, f, nf, dr, df, loss);
}
