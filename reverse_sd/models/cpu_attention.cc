// Multi-head attention for XLA:CPU as typed FFI calls: the forward pass
// softmax(q k^T * scale) v, and its gradients.
//
// Why: XLA:CPU runs attention as separate ops. Its batched q k^T product runs
// one small matrix product after another on one core, and the softmax is
// several passes over the [B, H, Q, T] logits. On CLIP ViT-B/16 that costs
// about 2 s of a 10 s training step for 4% of its FLOPs
// (benchmarks/RESULTS.md). Here each (batch, head) pair is one task: its
// logits, softmax and products stay in the core's caches, and the tasks run
// on XLA's intra-op thread pool (the one the FFI hands to CPU handlers).
//
// Layout: q [B, Q, H, D], k and v [B, T, H, D] (the layout of
// jax.nn.dot_product_attention), float32, no mask. The forward pass also
// returns the log-sum-exp of each logit row, lse [B, H, Q], which the backward
// pass uses to recompute the probabilities instead of storing them.
//
// The matrix products use cpu_kernels.h's register-blocked kernel and the
// exponentials a vector polynomial, written with GCC vector extensions of
// the build's widest vector (16 floats with AVX-512, else 8), so the
// compiler maps them to AVX-512, AVX2/FMA or NEON. Built by
// reverse_sd/models/cpu_kernels.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace reverse_sd;  // NOLINT: the shared vector helpers.

// exp(x) for x <= 0 to float32 accuracy (Cephes' expf polynomial): the
// softmax argument is a logit minus its row's maximum.
typedef int32_t VWi __attribute__((vector_size(kLanes * sizeof(int32_t))));
inline VW ExpW(VW x) {
  const VW lo = SplatW(-87.0f);
  x = x < lo ? lo : x;
  VW fx = x * SplatW(1.44269504088896341f) + SplatW(0.5f);
  VW t = __builtin_convertvector(__builtin_convertvector(fx, VWi), VW);
  fx = t > fx ? t - SplatW(1.0f) : t;  // floor
  x = x - fx * SplatW(0.693359375f) - fx * SplatW(-2.12194440e-4f);
  VW y = SplatW(1.9875691500e-4f);
  y = y * x + SplatW(1.3981999507e-3f);
  y = y * x + SplatW(8.3334519073e-3f);
  y = y * x + SplatW(4.1665795894e-2f);
  y = y * x + SplatW(1.6666665459e-1f);
  y = y * x + SplatW(5.0000001201e-1f);
  y = y * (x * x) + x + SplatW(1.0f);
  VWi e = (__builtin_convertvector(fx, VWi) + 127) << 23;
  VW scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return y * scale;
}

int64_t RoundUp8(int64_t x) { return (x + 7) / 8 * 8; }

struct Shape {
  int64_t batch, queries, keys, heads, dim;
};

// Copies head h of batch b of x [B, rows, H, D] into dst [rows, D] * scale.
void GatherHead(const float* x, const Shape& s, int64_t rows, int64_t b,
                int64_t h, float scale, float* dst) {
  const int64_t row_stride = s.heads * s.dim;
  const float* src = x + (b * rows * s.heads + h) * s.dim;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < s.dim; ++d)
      dst[r * s.dim + d] = src[r * row_stride + d] * scale;
}

// dst [D, ld] = (head h of batch b of x [B, rows, H, D])^T, columns from
// `rows` to ld zero.
void GatherHeadT(const float* x, const Shape& s, int64_t rows, int64_t b,
                 int64_t h, int64_t ld, float* dst) {
  const int64_t row_stride = s.heads * s.dim;
  const float* src = x + (b * rows * s.heads + h) * s.dim;
  for (int64_t d = 0; d < s.dim; ++d) {
    float* out = dst + d * ld;
    for (int64_t r = 0; r < rows; ++r) out[r] = src[r * row_stride + d];
    for (int64_t r = rows; r < ld; ++r) out[r] = 0.0f;
  }
}

// Writes src [rows, D] to head h of batch b of x [B, rows, H, D].
void ScatterHead(const float* src, const Shape& s, int64_t rows, int64_t b,
                 int64_t h, float* x) {
  const int64_t row_stride = s.heads * s.dim;
  float* dst = x + (b * rows * s.heads + h) * s.dim;
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * row_stride, src + r * s.dim, s.dim * sizeof(float));
}

// P[i, :T] = exp(S[i, :T] - max) / sum (in place); returns nothing, writes
// the row's log-sum-exp to lse[i].
void SoftmaxRows(float* S, int64_t rows, int64_t T, int64_t ld, float* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = S + i * ld;
    VW mw = SplatW(-INFINITY);
    int64_t jm = 0;
    for (; jm + kLanes <= T; jm += kLanes) {
      const VW v = LoadW(row + jm);
      mw = v > mw ? v : mw;
    }
    float m = -INFINITY;
    for (int c = 0; c < kLanes; ++c) m = std::max(m, mw[c]);
    for (; jm < T; ++jm) m = std::max(m, row[jm]);
    const VW mv = SplatW(m);
    VW sv = SplatW(0.0f);
    int64_t j = 0;
    for (; j + kLanes <= T; j += kLanes) {
      const VW p = ExpW(LoadW(row + j) - mv);
      StoreW(row + j, p);
      sv += p;
    }
    float sum = SumW(sv);
    for (; j < T; ++j) {
      row[j] = std::exp(row[j] - m);
      sum += row[j];
    }
    const float inv = 1.0f / sum;
    for (j = 0; j < T; ++j) row[j] *= inv;
    lse[i] = m + std::log(sum);
  }
}

Shape GetShape(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], qd[3]};
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                       ffi::Buffer<ffi::F32>& v) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument(
        "rsd_attention: q, k, v must be [B, T, H, D].");
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i])
      return ffi::Error::InvalidArgument("rsd_attention: k and v differ.");
  if (qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3])
    return ffi::Error::InvalidArgument(
        "rsd_attention: q's batch, heads or head size differ from k's.");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                       ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       float scale, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse) {
  if (ffi::Error e = CheckShapes(q, k, v); e.failure()) return e;
  const Shape s = GetShape(q, k);
  const int64_t Q = s.queries, T = s.keys, D = s.dim, Tp = RoundUp8(T);
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  ParallelFor(pool, s.batch * s.heads, [&](int64_t task) {
    thread_local std::vector<float> buffer;
    const int64_t b = task / s.heads, h = task % s.heads;
    float* qs = Scratch(buffer, Q * D + D * Tp + T * D + Q * Tp + Q * D);
    float* kt = qs + Q * D;
    float* vc = kt + D * Tp;
    float* logits = vc + T * D;
    float* o = logits + Q * Tp;
    GatherHead(qp, s, Q, b, h, scale, qs);
    GatherHeadT(kp, s, T, b, h, Tp, kt);
    GatherHead(vp, s, T, b, h, 1.0f, vc);
    Gemm<false, false>(Q, Tp, D, qs, D, kt, Tp, logits, Tp);
    SoftmaxRows(logits, Q, T, Tp, lp + (b * s.heads + h) * Q);
    Gemm<false, false>(Q, D, T, logits, Tp, vc, D, o, D);
    ScatterHead(o, s, Q, b, h, op);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                        ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, float scale,
                        ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  if (ffi::Error e = CheckShapes(q, k, v); e.failure()) return e;
  const Shape s = GetShape(q, k);
  const int64_t Q = s.queries, T = s.keys, D = s.dim, Tp = RoundUp8(T);
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* outp = out.typed_data();
  const float* lsep = lse.typed_data();
  const float* doutp = dout.typed_data();
  float* dqp = dq->typed_data();
  float* dkp = dk->typed_data();
  float* dvp = dv->typed_data();
  ParallelFor(pool, s.batch * s.heads, [&](int64_t task) {
    thread_local std::vector<float> buffer;
    const int64_t b = task / s.heads, h = task % s.heads;
    float* qs = Scratch(buffer, 3 * Q * D + 2 * D * Tp + 2 * T * D +
                                    2 * Q * Tp + Q + T * D);
    float* dos = qs + Q * D;     // dout [Q, D]
    float* os = dos + Q * D;     // out [Q, D]
    float* kt = os + Q * D;      // k^T [D, Tp]
    float* vt = kt + D * Tp;     // v^T [D, Tp]
    float* ks = vt + D * Tp;     // k * scale [T, D]
    float* probs = ks + T * D;   // [Q, Tp]
    float* dlog = probs + Q * Tp;  // dP, then dS [Q, Tp]
    float* delta = dlog + Q * Tp;  // rowsum(dout * out) [Q]
    float* res = delta + Q;        // a [T, D] (or [Q, D]) result
    GatherHead(qp, s, Q, b, h, scale, qs);
    GatherHead(doutp, s, Q, b, h, 1.0f, dos);
    GatherHead(outp, s, Q, b, h, 1.0f, os);
    GatherHeadT(kp, s, T, b, h, Tp, kt);
    GatherHeadT(vp, s, T, b, h, Tp, vt);
    GatherHead(kp, s, T, b, h, scale, ks);
    const float* row_lse = lsep + (b * s.heads + h) * Q;
    // P = exp(q k^T * scale - lse).
    Gemm<false, false>(Q, Tp, D, qs, D, kt, Tp, probs, Tp);
    for (int64_t i = 0; i < Q; ++i) {
      float* row = probs + i * Tp;
      const VW l = SplatW(row_lse[i]);
      int64_t j = 0;
      for (; j + kLanes <= T; j += kLanes)
        StoreW(row + j, ExpW(LoadW(row + j) - l));
      for (; j < T; ++j) row[j] = std::exp(row[j] - row_lse[i]);
      for (; j < Tp; ++j) row[j] = 0.0f;
    }
    // dP = dout v^T; dS = P * (dP - rowsum(dout * out)).
    Gemm<false, false>(Q, Tp, D, dos, D, vt, Tp, dlog, Tp);
    for (int64_t i = 0; i < Q; ++i) {
      const float* a = dos + i * D;
      const float* o = os + i * D;
      VW accw = SplatW(0.0f);
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) accw += LoadW(a + d) * LoadW(o + d);
      float acc = SumW(accw);
      for (; d < D; ++d) acc += a[d] * o[d];
      delta[i] = acc;
    }
    for (int64_t i = 0; i < Q; ++i) {
      float* dr = dlog + i * Tp;
      const float* pr = probs + i * Tp;
      const VW di = SplatW(delta[i]);
      int64_t j = 0;
      for (; j + kLanes <= Tp; j += kLanes)
        StoreW(dr + j, LoadW(pr + j) * (LoadW(dr + j) - di));
      for (; j < Tp; ++j) dr[j] = pr[j] * (dr[j] - delta[i]);
    }
    // dv = P^T dout; dk = dS^T (q * scale); dq = dS (k * scale).
    Gemm<true, false>(T, D, Q, probs, Tp, dos, D, res, D);
    ScatterHead(res, s, T, b, h, dvp);
    Gemm<true, false>(T, D, Q, dlog, Tp, qs, D, res, D);
    ScatterHead(res, s, T, b, h, dkp);
    Gemm<false, false>(Q, D, T, dlog, Tp, ks, D, res, D);
    ScatterHead(res, s, Q, b, h, dqp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
