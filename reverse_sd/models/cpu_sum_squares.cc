// The sum of squares of any number of float32 arrays, for XLA:CPU as one
// typed FFI call: the gradient's global norm (optim.py) in one pass.
//
// Why: XLA:CPU materialises the squares and then computes the large
// reduction as a tree of reduce-window loops, several passes where one read
// of the gradients is enough.
//
// The arrays are cut into chunks of kChunk floats; each chunk is summed with
// four 8-float accumulators (float32, at most kChunk / 32 terms each) and its
// total kept in double; the chunk totals are added in order, so the result
// does not depend on the thread count. float32 only. Built by
// reverse_sd/models/cpu_kernels.py.

#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace reverse_sd;  // NOLINT: the shared vector helpers.

constexpr int64_t kChunk = 1 << 14;

double ChunkSumSquares(const float* x, int64_t n) {
  V8 acc[4] = {Splat(0.0f), Splat(0.0f), Splat(0.0f), Splat(0.0f)};
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    for (int a = 0; a < 4; ++a) {
      const V8 v = Load(x + k + 8 * a);
      acc[a] += v * v;
    }
  }
  for (; k + 8 <= n; k += 8) {
    const V8 v = Load(x + k);
    acc[0] += v * v;
  }
  const V8 sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  double total = 0.0;
  for (int lane = 0; lane < 8; ++lane) total += sum[lane];
  for (; k < n; ++k) total += static_cast<double>(x[k]) * x[k];
  return total;
}

ffi::Error SumSquaresImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                          ffi::ResultBuffer<ffi::F32> out) {
  struct Chunk {
    const float* data;
    int64_t size;
  };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < args.size(); ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> buffer = args.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    if (buffer->element_type() != ffi::F32)
      return ffi::Error::InvalidArgument(
          "rsd_sum_squares: every operand must be float32.");
    const float* data = buffer->typed_data<float>();
    const int64_t size = static_cast<int64_t>(buffer->element_count());
    for (int64_t k = 0; k < size; k += kChunk)
      chunks.push_back({data + k, std::min(kChunk, size - k)});
  }
  std::vector<double> totals(chunks.size());
  const int64_t n = static_cast<int64_t>(chunks.size());
  // Work items of about 16 chunks (1 MB), so a pool thread's start-up cost
  // is paid once per megabyte, not once per chunk.
  constexpr int64_t kPerItem = 16;
  ParallelFor(pool, (n + kPerItem - 1) / kPerItem, [&](int64_t item) {
    const int64_t end = std::min(n, (item + 1) * kPerItem);
    for (int64_t c = item * kPerItem; c < end; ++c)
      totals[c] = ChunkSumSquares(chunks[c].data, chunks[c].size);
  });
  double total = 0.0;
  for (double t : totals) total += t;
  *out->typed_data() = static_cast<float>(total);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsdSumSquares, SumSquaresImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());  // []
