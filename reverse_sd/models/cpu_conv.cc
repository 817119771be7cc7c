// Gradients of a 2-D NHWC x HWIO convolution for XLA:CPU as typed FFI calls.
//
// Why: XLA:CPU runs a strided convolution's gradients at a third to a half of
// its forward speed, and models/conv.py's per-tap matrix products copy a
// strided slice of the input for every kernel tap. These kernels read the
// input and the output gradient in place:
//
//   kernel gradient  dK[i, j, :, :] = sum over output pixels p of
//                    x[pixel(p, i, j), :] (outer) dy[p, :]
//     A 6 x 16 block of dK[i, j] stays in registers while the loop runs over
//     the pixels of a group of images; each thread sums its own images into
//     its own dK, and the partial sums are added at the end.
//   input gradient   dx[pixel(p, i, j), :] += dK[i, j] dy[p, :]
//     One register-blocked product per (image, tap, output row), added into
//     the strided input row it came from; threads own whole images.
//
// pixel(p, i, j) = (stride_h * oy + i - pad_top, stride_w * ox + j - pad_left)
// for output pixel p = (oy, ox); taps that fall in the padding are skipped.
// float32 only. Built by reverse_sd/models/cpu_kernels.py.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

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

// dk[(i, j), ci:ci+MR, co:co+8*NV] += sum over images [n0, n1) of the taps.
template <int MR, int NV>
void KernelGradTile(const ConvShape& s, const float* x, const float* dy,
                    int64_t n0, int64_t n1, int64_t i, int64_t j, int64_t ci,
                    int64_t co, float* dk) {
  float* out = dk + ((i * s.kw + j) * s.ci + ci) * s.co + co;
  V8 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = Load(out + r * s.co + 8 * c);
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
        V8 b[NV];
        for (int c = 0; c < NV; ++c) b[c] = Load(dp + 8 * c);
        for (int r = 0; r < MR; ++r) {
          const V8 a = Splat(xp[r]);
          for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) Store(out + r * s.co + 8 * c, acc[r][c]);
}

// The same for output channels [co, s.co) one at a time (s.co % 8 != 0).
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
  for (; co + 16 <= s.co; co += 16)
    KernelGradTile<MR, 2>(s, x, dy, n0, n1, i, j, ci, co, dk);
  for (; co + 8 <= s.co; co += 8)
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
      if (s.co % 8)
        KernelGradScalar(s, x, dy, n0, n1, i, j, s.co / 8 * 8, dk);
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
