// Intel MKL's sgemm as an XLA:CPU FFI call, for benchmarks/mkl_dots.py only.
// Not part of reverse_sd: benchmarks/mkl_dots.sh builds it against the `mkl`
// and `intel-openmp` wheels in a scratch environment (see RESULTS.md for
// why the project does not depend on them).
//
// out[M, N] = op(a) @ op(b), row-major, op = transpose where asked:
// a is [M, K] ([K, M] with trans_a), b is [K, N] ([N, K] with trans_b).
// MKL threads the product itself (Intel OpenMP, OMP_NUM_THREADS threads).

#include <cstdint>

#include "xla/ffi/api/ffi.h"

extern "C" void cblas_sgemm(int layout, int trans_a, int trans_b, int m,
                            int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta,
                            float* c, int ldc);

namespace {

namespace ffi = xla::ffi;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

ffi::Error MatmulImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      bool trans_a, bool trans_b,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto a_dims = a.dimensions();
  const auto b_dims = b.dimensions();
  const auto out_dims = out->dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2 || out_dims.size() != 2) {
    return ffi::Error::InvalidArgument("mkl_dots: operands must be 2-D");
  }
  const int64_t m = out_dims[0], n = out_dims[1];
  const int64_t k = trans_a ? a_dims[0] : a_dims[1];
  if ((trans_a ? a_dims[1] : a_dims[0]) != m ||
      (trans_b ? b_dims[1] : b_dims[0]) != k ||
      (trans_b ? b_dims[0] : b_dims[1]) != n) {
    return ffi::Error::InvalidArgument("mkl_dots: shapes do not match");
  }
  cblas_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans,
              trans_b ? kTrans : kNoTrans, m, n, k, 1.0f, a.typed_data(),
              a_dims[1], b.typed_data(), b_dims[1], 0.0f,
              out->typed_data(), n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdMklMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
