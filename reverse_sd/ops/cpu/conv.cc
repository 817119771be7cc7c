// Gradients of a 2-D NHWC x HWIO convolution for XLA:CPU as typed FFI calls.
//
// Why: XLA:CPU runs a strided convolution's gradients at a third to a half of
// its forward speed, and a per-tap matrix product would copy a
// strided slice of the input for every kernel tap. These kernels read the
// input and the output gradient in place:
//
//   kernel gradient  dK[i, j, :, :] = sum over output pixels p of
//                    x[pixel(p, i, j), :] (outer) dy[p, :]
//     A block of 6 x 2 vectors of dK[i, j] stays in registers while the
//     loop runs over the pixels of a group of images; each thread sums its
//     own images into its own dK, and the partial sums are added at the end.
//   input gradient   dx[pixel(p, i, j), :] += dK[i, j] dy[p, :]
//     One register-blocked product per (image, tap, output row), added into
//     the strided input row it came from; threads own whole images.
//
// pixel(p, i, j) = (stride_h * oy + i - pad_top, stride_w * ox + j - pad_left)
// for output pixel p = (oy, ox); taps that fall in the padding are skipped.
// float32 only. Built by reverse_sd/ops/cpu/kernels.py.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

using namespace reverse_sd;  // NOLINT: the shared vector helpers.

int64_t FloorDiv(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

struct ConvShape {
  int64_t n, h, w, ci;     // input
  int64_t oh, ow, co;      // output
  int64_t kh, kw;          // kernel
  int64_t sh, sw, pt, pl;  // strides, top and left padding
  // The output columns [lo, hi) whose tap column j lies inside the input.
  void Columns(int64_t j, int64_t* lo, int64_t* hi) const {
    *lo = std::max<int64_t>(0, FloorDiv(pl - j + sw - 1, sw));
    *hi = std::min<int64_t>(ow, FloorDiv(w - 1 - j + pl, sw) + 1);
  }
};

// dk[(i, j), ci:ci+MR, co:co+kLanes*NV] += sum over images [n0, n1) of the
// taps.
template <int MR, int NV>
void KernelGradTile(const ConvShape& s, const float* x, const float* dy,
                    int64_t n0, int64_t n1, int64_t i, int64_t j, int64_t ci,
                    int64_t co, float* dk) {
  float* out = dk + ((i * s.kw + j) * s.ci + ci) * s.co + co;
  VW acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c)
      acc[r][c] = LoadW(out + r * s.co + kLanes * c);
  int64_t lo, hi;
  s.Columns(j, &lo, &hi);
  const int64_t x_step = s.sw * s.ci;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oy = 0; oy < s.oh; ++oy) {
      const int64_t row = s.sh * oy + i - s.pt;
      if (row < 0 || row >= s.h) continue;
      const float* xp =
          x + ((n * s.h + row) * s.w + s.sw * lo + j - s.pl) * s.ci + ci;
      const float* dp = dy + ((n * s.oh + oy) * s.ow + lo) * s.co + co;
      for (int64_t ox = lo; ox < hi; ++ox, xp += x_step, dp += s.co) {
        VW b[NV];
        for (int c = 0; c < NV; ++c) b[c] = LoadW(dp + kLanes * c);
        for (int r = 0; r < MR; ++r) {
          const VW a = SplatW(xp[r]);
          for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c)
      StoreW(out + r * s.co + kLanes * c, acc[r][c]);
}

// The same for output channels [co, s.co) one at a time (s.co % kLanes != 0).
void KernelGradScalar(const ConvShape& s, const float* x, const float* dy,
                      int64_t n0, int64_t n1, int64_t i, int64_t j,
                      int64_t co, float* dk) {
  int64_t lo, hi;
  s.Columns(j, &lo, &hi);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t oy = 0; oy < s.oh; ++oy) {
      const int64_t row = s.sh * oy + i - s.pt;
      if (row < 0 || row >= s.h) continue;
      for (int64_t ox = lo; ox < hi; ++ox) {
        const float* xp =
            x + ((n * s.h + row) * s.w + s.sw * ox + j - s.pl) * s.ci;
        const float* dp = dy + ((n * s.oh + oy) * s.ow + ox) * s.co;
        for (int64_t c = 0; c < s.ci; ++c) {
          float* out = dk + ((i * s.kw + j) * s.ci + c) * s.co;
          for (int64_t o = co; o < s.co; ++o) out[o] += xp[c] * dp[o];
        }
      }
    }
  }
}

template <int MR>
void KernelGradRows(const ConvShape& s, const float* x, const float* dy,
                    int64_t n0, int64_t n1, int64_t i, int64_t j, int64_t ci,
                    float* dk) {
  int64_t co = 0;
  for (; co + 2 * kLanes <= s.co; co += 2 * kLanes)
    KernelGradTile<MR, 2>(s, x, dy, n0, n1, i, j, ci, co, dk);
  for (; co + kLanes <= s.co; co += kLanes)
    KernelGradTile<MR, 1>(s, x, dy, n0, n1, i, j, ci, co, dk);
}

// dk (zeroed by the caller) += the kernel gradient of images [n0, n1).
void KernelGradImages(const ConvShape& s, const float* x, const float* dy,
                      int64_t n0, int64_t n1, float* dk) {
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      int64_t ci = 0;
      for (; ci + 6 <= s.ci; ci += 6)
        KernelGradRows<6>(s, x, dy, n0, n1, i, j, ci, dk);
      switch (s.ci - ci) {
        case 5: KernelGradRows<5>(s, x, dy, n0, n1, i, j, ci, dk); break;
        case 4: KernelGradRows<4>(s, x, dy, n0, n1, i, j, ci, dk); break;
        case 3: KernelGradRows<3>(s, x, dy, n0, n1, i, j, ci, dk); break;
        case 2: KernelGradRows<2>(s, x, dy, n0, n1, i, j, ci, dk); break;
        case 1: KernelGradRows<1>(s, x, dy, n0, n1, i, j, ci, dk); break;
        default: break;
      }
      if (s.co % kLanes)
        KernelGradScalar(s, x, dy, n0, n1, i, j, s.co / kLanes * kLanes, dk);
    }
  }
}

// The convolution's shape from the dimensions of its input x, output dy and
// kernel (whichever of them are the call's operands or its result).
ffi::Error ReadShape(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd,
                     ffi::Span<const int64_t> kernel_dims, int64_t sh,
                     int64_t sw, int64_t pt, int64_t pl, ConvShape* s) {
  if (xd.size() != 4 || yd.size() != 4 || kernel_dims.size() != 4)
    return ffi::Error::InvalidArgument(
        "rsd_conv: expected NHWC input and output, HWIO kernel.");
  *s = ConvShape{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3],
                 kernel_dims[0], kernel_dims[1], sh, sw, pt, pl};
  if (yd[0] != xd[0] || kernel_dims[2] != s->ci || kernel_dims[3] != s->co)
    return ffi::Error::InvalidArgument(
        "rsd_conv: batch or channels of input, output and kernel differ.");
  if (sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("rsd_conv: strides must be >= 1.");
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, int64_t stride_h,
                          int64_t stride_w, int64_t pad_top, int64_t pad_left,
                          ffi::ResultBuffer<ffi::F32> dk) {
  ConvShape s;
  if (ffi::Error e = ReadShape(x.dimensions(), dy.dimensions(),
                               dk->dimensions(), stride_h, stride_w, pad_top,
                               pad_left, &s);
      e.failure())
    return e;
  const float* xp = x.typed_data();
  const float* yp = dy.typed_data();
  float* out = dk->typed_data();
  const int64_t size = s.kh * s.kw * s.ci * s.co;
  const int64_t parts =
      std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), s.n));
  std::vector<float> partial((parts - 1) * size);
  // Images per pass over the kernel's tiles: about 256 output pixels, so a
  // tile's register block is loaded and stored once per 256 pixels.
  const int64_t group =
      std::max<int64_t>(1, 256 / std::max<int64_t>(1, s.oh * s.ow));
  ParallelFor(pool, parts, [&](int64_t t) {
    float* acc = t == 0 ? out : partial.data() + (t - 1) * size;
    std::memset(acc, 0, size * sizeof(float));
    const int64_t n0 = s.n * t / parts, n1 = s.n * (t + 1) / parts;
    for (int64_t n = n0; n < n1; n += group)
      KernelGradImages(s, xp, yp, n, std::min(n + group, n1), acc);
  });
  for (int64_t t = 1; t < parts; ++t) {
    const float* part = partial.data() + (t - 1) * size;
    for (int64_t k = 0; k < size; ++k) out[k] += part[k];
  }
  return ffi::Error::Success();
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy,
                         ffi::Buffer<ffi::F32> kernel, int64_t stride_h,
                         int64_t stride_w, int64_t pad_top, int64_t pad_left,
                         ffi::ResultBuffer<ffi::F32> dx) {
  ConvShape s;
  if (ffi::Error e = ReadShape(dx->dimensions(), dy.dimensions(),
                               kernel.dimensions(), stride_h, stride_w,
                               pad_top, pad_left, &s);
      e.failure())
    return e;
  const float* yp = dy.typed_data();
  const float* kp = kernel.typed_data();
  float* out = dx->typed_data();
  // kt[i, j] = kernel[i, j]^T: [co, ci].
  std::vector<float> kt(s.kh * s.kw * s.co * s.ci);
  for (int64_t tap = 0; tap < s.kh * s.kw; ++tap)
    for (int64_t c = 0; c < s.ci; ++c)
      for (int64_t o = 0; o < s.co; ++o)
        kt[(tap * s.co + o) * s.ci + c] = kp[(tap * s.ci + c) * s.co + o];
  ParallelFor(pool, s.n, [&](int64_t n) {
    float* image = out + n * s.h * s.w * s.ci;
    std::memset(image, 0, s.h * s.w * s.ci * sizeof(float));
    for (int64_t i = 0; i < s.kh; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        int64_t lo, hi;
        s.Columns(j, &lo, &hi);
        if (lo >= hi) continue;
        const float* ktap = kt.data() + (i * s.kw + j) * s.co * s.ci;
        for (int64_t oy = 0; oy < s.oh; ++oy) {
          const int64_t row = s.sh * oy + i - s.pt;
          if (row < 0 || row >= s.h) continue;
          Gemm<false, true>(hi - lo, s.ci, s.co,
                            yp + ((n * s.oh + oy) * s.ow + lo) * s.co, s.co,
                            ktap, s.ci,
                            image + (row * s.w + s.sw * lo + j - s.pl) * s.ci,
                            s.sw * s.ci);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// ---- Forward: y = act(conv(x, K) + bias), one pass over the output. ----
//
// The output pixels (flattened over the batch) go in tiles of kFwdRows.
// A tile's receptive fields are copied once into a panel [kFwdRows][K]
// (K = kh * kw * ci in the kernel's HWI order, so each tap row is one
// contiguous copy; zeros for taps in the padding); then every block of
// output channels is one register-blocked product of the panel with the
// kernel's [K, co] matrix, which starts from the bias and applies the
// activation before its single store.

constexpr int kFwdRows = kLanes == 16 ? 12 : 6;  // Pixels per tile.
constexpr int kFwdCols = 2;                       // Vectors of channels.

// panel[r * K + k] = the k-th input value pixel p0 + r meets; rows
// r >= count are zeros.
void PackTile(const ConvShape& s, const float* x, int64_t p0, int count,
              float* panel) {
  const int64_t plane = s.oh * s.ow;
  const int64_t taps = s.kh * s.kw * s.ci;
  const int64_t tap_row = s.kw * s.ci;
  std::memset(panel + count * taps, 0,
              (kFwdRows - count) * taps * sizeof(float));
  for (int r = 0; r < count; ++r) {
    const int64_t p = p0 + r, n = p / plane, oy = (p % plane) / s.ow,
                  ox = p % s.ow;
    const int64_t col0 = s.sw * ox - s.pl;
    const bool cols_ok = col0 >= 0 && col0 + s.kw <= s.w;
    float* dst = panel + r * taps;
    for (int64_t i = 0; i < s.kh; ++i, dst += tap_row) {
      const int64_t row = s.sh * oy + i - s.pt;
      if (row < 0 || row >= s.h) {
        std::memset(dst, 0, tap_row * sizeof(float));
        continue;
      }
      const float* src = x + ((n * s.h + row) * s.w + col0) * s.ci;
      if (cols_ok) {
        std::memcpy(dst, src, tap_row * sizeof(float));
        continue;
      }
      for (int64_t j = 0; j < s.kw; ++j) {
        const int64_t col = col0 + j;
        if (col < 0 || col >= s.w)
          std::memset(dst + j * s.ci, 0, s.ci * sizeof(float));
        else
          std::memcpy(dst + j * s.ci, src + j * s.ci, s.ci * sizeof(float));
      }
    }
  }
}

// y[r, co:co + NV * kLanes] = act(bias + panel K) for rows r < count.
template <int NV>
void ForwardBlock(int64_t taps, const float* panel, const float* kernel,
                  int64_t co_total, const float* bias, bool relu, int count,
                  float* y) {
  VW acc[kFwdRows][NV];
  for (int c = 0; c < NV; ++c) {
    const VW b = LoadW(bias + kLanes * c);
    for (int r = 0; r < kFwdRows; ++r) acc[r][c] = b;
  }
  for (int64_t k = 0; k < taps; ++k) {
    VW b[NV];
    for (int c = 0; c < NV; ++c)
      b[c] = LoadW(kernel + k * co_total + kLanes * c);
    for (int r = 0; r < kFwdRows; ++r) {
      const VW ar = SplatW(panel[r * taps + k]);
      for (int c = 0; c < NV; ++c) acc[r][c] += ar * b[c];
    }
  }
  const VW zero = SplatW(0.0f);
  for (int r = 0; r < count; ++r) {
    for (int c = 0; c < NV; ++c) {
      VW v = acc[r][c];
      if (relu) v = v > zero ? v : zero;
      StoreW(y + r * co_total + kLanes * c, v);
    }
  }
}

// The output channels [co, co_total) that do not fill a vector.
void ForwardScalar(int64_t taps, const float* panel, const float* kernel,
                   int64_t co, int64_t co_total, const float* bias, bool relu,
                   int count, float* y) {
  for (int r = 0; r < count; ++r) {
    for (int64_t o = co; o < co_total; ++o) {
      float v = bias[o];
      for (int64_t k = 0; k < taps; ++k)
        v += panel[r * taps + k] * kernel[k * co_total + o];
      y[r * co_total + o] = relu && !(v > 0.0f) ? 0.0f : v;
    }
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> kernel,
                       ffi::Buffer<ffi::F32> bias, int64_t stride_h,
                       int64_t stride_w, int64_t pad_top, int64_t pad_left,
                       int64_t relu, ffi::ResultBuffer<ffi::F32> y) {
  ConvShape s;
  if (ffi::Error e = ReadShape(x.dimensions(), y->dimensions(),
                               kernel.dimensions(), stride_h, stride_w,
                               pad_top, pad_left, &s);
      e.failure())
    return e;
  if (bias.dimensions().size() != 1 || bias.dimensions()[0] != s.co)
    return ffi::Error::InvalidArgument(
        "rsd_conv_forward: bias must be [output channels].");
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  const float* bp = bias.typed_data();
  float* out = y->typed_data();
  const int64_t pixels = s.n * s.oh * s.ow;
  const int64_t taps = s.kh * s.kw * s.ci;
  const int64_t tiles = (pixels + kFwdRows - 1) / kFwdRows;
  // Chunks of tiles for the threads: enough for balance, few enough that
  // claiming one costs nothing next to its work.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk =
      std::max<int64_t>(1, std::min<int64_t>(64, tiles / (8 * threads)));
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  ParallelFor(pool, chunks, [&](int64_t part) {
    thread_local std::vector<float> buffer;
    float* panel = Scratch(buffer, taps * kFwdRows);
    const int64_t t1 = std::min(tiles, (part + 1) * chunk);
    for (int64_t t = part * chunk; t < t1; ++t) {
      const int64_t p0 = t * kFwdRows;
      const int count =
          static_cast<int>(std::min<int64_t>(kFwdRows, pixels - p0));
      PackTile(s, xp, p0, count, panel);
      float* yt = out + p0 * s.co;
      int64_t co = 0;
      for (; co + kFwdCols * kLanes <= s.co; co += kFwdCols * kLanes)
        ForwardBlock<kFwdCols>(taps, panel, kp + co, s.co, bp + co,
                               relu != 0, count, yt + co);
      for (; co + kLanes <= s.co; co += kLanes)
        ForwardBlock<1>(taps, panel, kp + co, s.co, bp + co, relu != 0,
                        count, yt + co);
      if (co < s.co)
        ForwardScalar(taps, panel, kp, co, s.co, bp, relu != 0, count, yt);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdConvKernelGrad, KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dk

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdConvInputGrad, InputGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dx

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdConvForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("relu")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
