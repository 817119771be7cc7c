// LayerNorm over the last axis, and its gradient, for XLA:CPU as typed FFI
// calls.
//
// Why: XLA:CPU computes LayerNorm's gradient as several passes over the
// activations, and the parameter gradients (column sums over every row) as
// split reductions; on CLIP ViT-B/16 it is about ten times the forward's
// time. Here each row is read once per pass while it sits in L1:
//
//   forward   mean, rstd = 1 / sqrt(var + eps) of the row (two passes over
//             the row, so the variance does not cancel), then
//             y = (x - mean) * rstd * scale + bias.
//   backward  xhat = (x - mean) * rstd, g = dy * scale,
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
//             dscale = sum over rows of dy * xhat, dbias = sum of dy. Each
//             thread sums its own rows into its own dscale/dbias; the partial
//             sums are added at the end.
//
// x is [rows..., D] with any number of leading axes; mean and rstd are
// x.shape[:-1]. float32 only. Built by reverse_sd/models/cpu_kernels.py.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace reverse_sd;  // NOLINT: the shared vector helpers.

inline float Sum(V8 v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

struct Rows {
  int64_t rows, dim;
};

ffi::Error GetRows(ffi::Span<const int64_t> dims, int64_t params,
                   Rows* out) {
  if (dims.size() == 0)
    return ffi::Error::InvalidArgument("rsd_layer_norm: x must have rank >= 1.");
  out->dim = dims[dims.size() - 1];
  out->rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) out->rows *= dims[i];
  if (params != out->dim)
    return ffi::Error::InvalidArgument(
        "rsd_layer_norm: scale and bias must be [D], D = x's last axis.");
  return ffi::Error::Success();
}

// Row ranges for the threads: about 32 KiB of activations per task.
int64_t RowsPerTask(const Rows& r) {
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, r.dim));
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       float eps, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd) {
  Rows r;
  if (ffi::Error e = GetRows(x.dimensions(), scale.element_count(), &r);
      e.failure())
    return e;
  if (bias.element_count() != r.dim || mean->element_count() != r.rows ||
      rstd->element_count() != r.rows || y->element_count() != r.rows * r.dim)
    return ffi::Error::InvalidArgument("rsd_layer_norm: operand shapes.");
  const float* xp = x.typed_data();
  const float* sp = scale.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  float* mp = mean->typed_data();
  float* rp = rstd->typed_data();
  const int64_t D = r.dim, per = RowsPerTask(r);
  const int64_t tasks = (r.rows + per - 1) / per;
  ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t end = std::min(r.rows, (task + 1) * per);
    for (int64_t i = task * per; i < end; ++i) {
      const float* row = xp + i * D;
      float* out = yp + i * D;
      V8 acc = Splat(0.0f);
      int64_t j = 0;
      for (; j + 8 <= D; j += 8) acc += Load(row + j);
      float s = Sum(acc);
      for (; j < D; ++j) s += row[j];
      const float mu = s / D;
      const V8 mu8 = Splat(mu);
      acc = Splat(0.0f);
      j = 0;
      for (; j + 8 <= D; j += 8) {
        const V8 c = Load(row + j) - mu8;
        acc += c * c;
      }
      float ss = Sum(acc);
      for (; j < D; ++j) ss += (row[j] - mu) * (row[j] - mu);
      const float rs = 1.0f / std::sqrt(ss / D + eps);
      mp[i] = mu;
      rp[i] = rs;
      const V8 rs8 = Splat(rs);
      j = 0;
      for (; j + 8 <= D; j += 8)
        Store(out + j,
              (Load(row + j) - mu8) * rs8 * Load(sp + j) + Load(bp + j));
      for (; j < D; ++j) out[j] = (row[j] - mu) * rs * sp[j] + bp[j];
    }
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias) {
  Rows r;
  if (ffi::Error e = GetRows(x.dimensions(), scale.element_count(), &r);
      e.failure())
    return e;
  if (mean.element_count() != r.rows || rstd.element_count() != r.rows ||
      dy.element_count() != r.rows * r.dim ||
      dx->element_count() != r.rows * r.dim ||
      dscale->element_count() != r.dim || dbias->element_count() != r.dim)
    return ffi::Error::InvalidArgument("rsd_layer_norm: operand shapes.");
  const float* xp = x.typed_data();
  const float* sp = scale.typed_data();
  const float* mp = mean.typed_data();
  const float* rp = rstd.typed_data();
  const float* dyp = dy.typed_data();
  float* dxp = dx->typed_data();
  const int64_t D = r.dim;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads(), r.rows));
  // Per part: dscale and dbias partial sums, then an xhat row.
  std::vector<float> partial(parts * 3 * D);
  ParallelFor(pool, parts, [&](int64_t t) {
    float* ds = partial.data() + t * 3 * D;
    float* db = ds + D;
    float* xh = db + D;
    std::memset(ds, 0, 2 * D * sizeof(float));
    const int64_t i0 = r.rows * t / parts, i1 = r.rows * (t + 1) / parts;
    for (int64_t i = i0; i < i1; ++i) {
      const float* row = xp + i * D;
      const float* drow = dyp + i * D;
      float* out = dxp + i * D;
      const float mu = mp[i], rs = rp[i];
      const V8 mu8 = Splat(mu), rs8 = Splat(rs);
      V8 a8 = Splat(0.0f), b8 = Splat(0.0f);
      int64_t j = 0;
      for (; j + 8 <= D; j += 8) {
        const V8 h = (Load(row + j) - mu8) * rs8;
        const V8 d = Load(drow + j);
        const V8 g = d * Load(sp + j);
        Store(xh + j, h);
        Store(ds + j, Load(ds + j) + d * h);
        Store(db + j, Load(db + j) + d);
        a8 += g;
        b8 += g * h;
      }
      float a = Sum(a8), b = Sum(b8);
      for (; j < D; ++j) {
        const float h = (row[j] - mu) * rs, d = drow[j], g = d * sp[j];
        xh[j] = h;
        ds[j] += d * h;
        db[j] += d;
        a += g;
        b += g * h;
      }
      a /= D;
      b /= D;
      const V8 a_8 = Splat(a), b_8 = Splat(b);
      j = 0;
      for (; j + 8 <= D; j += 8)
        Store(out + j, rs8 * (Load(drow + j) * Load(sp + j) - a_8 -
                              Load(xh + j) * b_8));
      for (; j < D; ++j) out[j] = rs * (drow[j] * sp[j] - a - xh[j] * b);
    }
  });
  float* dsp = dscale->typed_data();
  float* dbp = dbias->typed_data();
  std::memcpy(dsp, partial.data(), D * sizeof(float));
  std::memcpy(dbp, partial.data() + D, D * sizeof(float));
  for (int64_t t = 1; t < parts; ++t) {
    const float* ds = partial.data() + t * 3 * D;
    for (int64_t j = 0; j < D; ++j) {
      dsp[j] += ds[j];
      dbp[j] += ds[D + j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdLayerNormForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y
                                  .Ret<ffi::Buffer<ffi::F32>>()   // mean
                                  .Ret<ffi::Buffer<ffi::F32>>());  // rstd

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdLayerNormBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias
