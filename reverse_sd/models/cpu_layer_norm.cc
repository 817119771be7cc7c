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
// Vectors of the build's widest width (VW: 16 lanes with AVX-512, else 8);
// the row sums keep two accumulators. x is [rows..., D] with any number of
// leading axes; mean and rstd are x.shape[:-1]. float32 only. Built by
// reverse_sd/models/cpu_kernels.py.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace reverse_sd;  // NOLINT: the shared vector helpers.

// sum_j (row[j] - shift)^kPower over a row of D, kPower 1 or 2: two
// vector accumulators, so consecutive adds do not wait on each other.
template <int kPower>
float RowSum(const float* row, int64_t D, float shift) {
  const VW c = SplatW(shift);
  VW a0 = SplatW(0.0f), a1 = SplatW(0.0f);
  int64_t j = 0;
  for (; j + 2 * kLanes <= D; j += 2 * kLanes) {
    const VW u = LoadW(row + j) - c, v = LoadW(row + j + kLanes) - c;
    a0 += kPower == 1 ? u : u * u;
    a1 += kPower == 1 ? v : v * v;
  }
  for (; j + kLanes <= D; j += kLanes) {
    const VW u = LoadW(row + j) - c;
    a0 += kPower == 1 ? u : u * u;
  }
  float s = SumW(a0 + a1);
  for (; j < D; ++j) {
    const float u = row[j] - shift;
    s += kPower == 1 ? u : u * u;
  }
  return s;
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
      const float mu = RowSum<1>(row, D, 0.0f) / D;
      const float rs = 1.0f / std::sqrt(RowSum<2>(row, D, mu) / D + eps);
      mp[i] = mu;
      rp[i] = rs;
      const VW mu_w = SplatW(mu), rs_w = SplatW(rs);
      int64_t j = 0;
      for (; j + kLanes <= D; j += kLanes)
        StoreW(out + j, (LoadW(row + j) - mu_w) * rs_w * LoadW(sp + j) +
                            LoadW(bp + j));
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
      const VW mu_w = SplatW(mu), rs_w = SplatW(rs);
      VW a_w = SplatW(0.0f), b_w = SplatW(0.0f);
      int64_t j = 0;
      for (; j + kLanes <= D; j += kLanes) {
        const VW h = (LoadW(row + j) - mu_w) * rs_w;
        const VW d = LoadW(drow + j);
        const VW g = d * LoadW(sp + j);
        StoreW(xh + j, h);
        StoreW(ds + j, LoadW(ds + j) + d * h);
        StoreW(db + j, LoadW(db + j) + d);
        a_w += g;
        b_w += g * h;
      }
      float a = SumW(a_w), b = SumW(b_w);
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
      const VW a_s = SplatW(a), b_s = SplatW(b);
      j = 0;
      for (; j + kLanes <= D; j += kLanes)
        StoreW(out + j, rs_w * (LoadW(drow + j) * LoadW(sp + j) - a_s -
                                LoadW(xh + j) * b_s));
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
