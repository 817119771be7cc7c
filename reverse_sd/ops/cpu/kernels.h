// Shared pieces of reverse_sd's XLA:CPU FFI kernels (conv.cc):
// float vectors of 8 lanes (V8) and of the widest width
// the build has (VW: 16 lanes with AVX-512), as GCC vector extensions so the
// compiler maps them to AVX2/FMA, AVX-512 or NEON; a register-blocked
// matrix product (6 rows by two VW vectors); and a parallel loop on XLA's
// intra-op pool.

#ifndef REVERSE_SD_OPS_CPU_KERNELS_H_
#define REVERSE_SD_OPS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace reverse_sd {

namespace ffi = xla::ffi;

typedef float V8 __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));

inline V8 Load(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }
inline V8 Splat(float x) { return V8{x, x, x, x, x, x, x, x}; }

// The widest float vector the library is compiled for: 16 lanes with
// AVX-512 (cpu_kernels.py builds with it where the CPU has it), else 8.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float VW __attribute__((vector_size(kLanes * sizeof(float))));

inline VW LoadW(const float* p) {
  VW v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void StoreW(float* p, VW v) { std::memcpy(p, &v, sizeof(v)); }
#if defined(__AVX512F__)
inline VW SplatW(float x) { return (VW)_mm512_set1_ps(x); }
#else
inline VW SplatW(float x) { return VW{x, x, x, x, x, x, x, x}; }
#endif

// The lanes of v added in a fixed order.
inline float SumW(VW v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Splat and load for either vector type (V8 or VW).
template <typename V>
inline V SplatAs(float x);
template <>
inline V8 SplatAs<V8>(float x) { return Splat(x); }
#if defined(__AVX512F__)
template <>
inline VW SplatAs<VW>(float x) { return SplatW(x); }
#endif
template <typename V>
inline V LoadAs(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
inline void StoreAs(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[MR, L*NV] (+)= A[MR, K] B[K, L*NV] with V a vector of L floats; A
// row-major (lda), or with kTransA stored transposed, A^T [K, MR] (lda its
// row stride). kAcc adds to C.
template <typename V, int MR, int NV, bool kTransA, bool kAcc>
inline void Micro(int64_t K, const float* A, int64_t lda, const float* B,
                  int64_t ldb, float* C, int64_t ldc) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c)
      acc[r][c] = kAcc ? LoadAs<V>(C + r * ldc + L * c) : SplatAs<V>(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int c = 0; c < NV; ++c) b[c] = LoadAs<V>(B + k * ldb + L * c);
    for (int r = 0; r < MR; ++r) {
      const V a = SplatAs<V>(kTransA ? A[k * lda + r] : A[r * lda + k]);
      for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) StoreAs<V>(C + r * ldc + L * c, acc[r][c]);
}

template <int MR, bool kTransA, bool kAcc>
void RowBlock(int64_t N, int64_t K, const float* A, int64_t lda,
              const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= N; j += 2 * kLanes)
    Micro<VW, MR, 2, kTransA, kAcc>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j + kLanes <= N; j += kLanes)
    Micro<VW, MR, 1, kTransA, kAcc>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j + 8 <= N; j += 8)
    Micro<V8, MR, 1, kTransA, kAcc>(K, A, lda, B + j, ldb, C + j, ldc);
  for (; j < N; ++j) {
    for (int r = 0; r < MR; ++r) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        s += (kTransA ? A[k * lda + r] : A[r * lda + k]) * B[k * ldb + j];
      C[r * ldc + j] = kAcc ? C[r * ldc + j] + s : s;
    }
  }
}

// C[M, N] = op(A) B (kAcc: C += op(A) B) with op(A) = A [M, K] or, with
// kTransA, A^T for A stored [K, M]. Row-major with leading dimensions.
template <bool kTransA, bool kAcc>
void Gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int kMR = 6;
  auto a_rows = [&](int64_t i) { return kTransA ? A + i : A + i * lda; };
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR)
    RowBlock<kMR, kTransA, kAcc>(N, K, a_rows(i), lda, B, ldb, C + i * ldc, ldc);
  const float* a = a_rows(i);
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: RowBlock<5, kTransA, kAcc>(N, K, a, lda, B, ldb, c, ldc); break;
    case 4: RowBlock<4, kTransA, kAcc>(N, K, a, lda, B, ldb, c, ldc); break;
    case 3: RowBlock<3, kTransA, kAcc>(N, K, a, lda, B, ldb, c, ldc); break;
    case 2: RowBlock<2, kTransA, kAcc>(N, K, a, lda, B, ldb, c, ldc); break;
    case 1: RowBlock<1, kTransA, kAcc>(N, K, a, lda, B, ldb, c, ldc); break;
    default: break;
  }
}

// Per-thread scratch, grown as needed and reused across calls.
inline float* Scratch(std::vector<float>& buffer, size_t size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

// Runs fn(0..n-1) on the caller and up to pool.num_threads() - 1 pool
// threads. Work items are claimed from a shared counter, so a pool thread
// that starts late (or never, if the pool is busy) only finds no work left;
// the caller waits for the items, not for the threads.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  const int64_t threads = std::min<int64_t>(pool.num_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto work = [state, n, f]() {
    for (;;) {
      const int64_t i = state->next.fetch_add(1);
      if (i >= n) return;
      (*f)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace reverse_sd

#endif  // REVERSE_SD_OPS_CPU_KERNELS_H_
