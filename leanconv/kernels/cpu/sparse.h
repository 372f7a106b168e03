// A sparse 1x1 projection on a band, vectorized over PIXELS (the drop-in sparse counterpart of
// band_gemm in kernels.h): every output channel multiplies only its own inputs, so the MACs are
// exactly the connections (a topological projection at density 1/4 does 1/4 of the dense MACs;
// a block-sparse GEMM over channel vectors would do about 1/2, the union of 16-32 outputs' windows).
//
// The band (P x K, NHWC rows) is transposed into a planar buffer (K x ld, one row per input
// channel); outputs go in groups of R: the group's union of inputs with a dense R-wide weight row
// per input (zeros where an output is not connected), so one load of an input vector feeds R FMAs
// with broadcast weights. The planar result (N x ld) is transposed back to NHWC with the epilogue
// (bias, residual, ReLU). The transposes are 16 x 16 blocks of two-source shuffles.
//
// The plan (int32, built in Python by leanconv.methods.topo.cpu.sparse_plan):
//   [R, G, rows (G*R: output channel of each slot, -1 for none), ptr (G + 1: offsets of each
//   group's inputs), idx (ptr[G]: input rows of the planar band)]
// and the weights (float, ptr[G] x R: weight of input j of group g for slot r at (ptr[g] + j) * R + r).
#pragma once
#include "kernels.h"

#include <type_traits>

namespace leanconv_cpu {

typedef int32_t v16i __attribute__((vector_size(64)));

struct SparsePlan {
  int64_t R = 0, G = 0;
  const int32_t* rows = nullptr;  // G * R
  const int32_t* ptr = nullptr;   // G + 1
  const int32_t* idx = nullptr;   // ptr[G]
  const float* w = nullptr;       // ptr[G] * R
};

// The plan's views into its tensors (checked against K inputs and N outputs).
inline SparsePlan sparse_plan_of(const at::Tensor& index, const at::Tensor& weights, int64_t K, int64_t N) {
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1 && index.is_contiguous() && index.numel() >= 2,
              "leanconv cpu sparse: the plan must be a contiguous int32 vector");
  const int32_t* p = index.data_ptr<int32_t>();
  SparsePlan s;
  s.R = p[0];
  s.G = p[1];
  TORCH_CHECK((s.R == 1 || s.R == 2 || s.R == 4) && s.G * s.R >= N && index.numel() >= 2 + s.G * s.R + s.G + 1,
              "leanconv cpu sparse: bad plan header");
  s.rows = p + 2;
  s.ptr = s.rows + s.G * s.R;
  s.idx = s.ptr + s.G + 1;
  const int64_t total = s.ptr[s.G];
  TORCH_CHECK(index.numel() == 2 + s.G * s.R + s.G + 1 + total, "leanconv cpu sparse: plan length");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.numel() == total * s.R,
              "leanconv cpu sparse: the weights do not match the plan");
  for (int64_t j = 0; j < total; ++j) TORCH_CHECK(s.idx[j] >= 0 && s.idx[j] < K, "leanconv cpu sparse: input out of range");
  for (int64_t j = 0; j < s.G * s.R; ++j) TORCH_CHECK(s.rows[j] >= -1 && s.rows[j] < N, "leanconv cpu sparse: output out of range");
  s.w = weights.data_ptr<float>();
  return s;
}

// 16 x 16 transpose in registers: bit k of the row index swapped with bit k of the column index,
// k = 0..3, each stage 16 two-source shuffles.
__attribute__((always_inline)) inline void transpose16(v16 (&m)[16]) {
#define LEANCONV_STAGE(B)                                                                      \
  {                                                                                            \
    v16i lo, hi;                                                                               \
    for (int j = 0; j < 16; ++j) {                                                             \
      lo[j] = (j & B) ? 16 + j - B : j;                                                        \
      hi[j] = (j & B) ? 16 + j : j + B;                                                        \
    }                                                                                          \
    for (int i = 0; i < 16; ++i) {                                                             \
      if (i & B) continue;                                                                     \
      const v16 a = m[i], b = m[i + B];                                                        \
      m[i] = __builtin_shuffle(a, b, lo);                                                      \
      m[i + B] = __builtin_shuffle(a, b, hi);                                                  \
    }                                                                                          \
  }
  LEANCONV_STAGE(1)
  LEANCONV_STAGE(2)
  LEANCONV_STAGE(4)
  LEANCONV_STAGE(8)
#undef LEANCONV_STAGE
}

// at (K x ld) = a (P x K)^T; columns [P, pend) zeroed (the kernel reads them: garbage there could be
// denormals, which cost a microcode assist per FMA). A last block of fewer than 16 pixels goes
// through the register transpose too, zero-filled: it writes zeros up to column P16 + 16 (at most
// 15 past P: the caller leaves room, and anything it had written there must be zeros).
// Pixel p of a at a + p * lda (default K: consecutive pixels; a strided conv's column phase: s K).
inline void to_planar(const float* a, int64_t P, int64_t K, float* at, int64_t ld, int64_t pend, int64_t lda = -1) {
  if (lda < 0) lda = K;
  const int64_t P16 = P / 16 * 16, K16 = K / 16 * 16;
  auto block = [&](int64_t p, int64_t rows) {
    for (int64_t k = 0; k < K16; k += 16) {
      v16 m[16];
      for (int i = 0; i < 16; ++i) m[i] = i < rows ? load<v16>(a + (p + i) * lda + k) : v16{};
      transpose16(m);
      for (int i = 0; i < 16; ++i) store<v16>(at + (k + i) * ld + p, m[i]);
    }
    for (int64_t k = K16; k < K; ++k)
      for (int i = 0; i < 16; ++i) at[k * ld + p + i] = i < rows ? a[(p + i) * lda + k] : 0.0f;
  };
  for (int64_t p = 0; p < P16; p += 16) block(p, 16);
  if (P16 < P) block(P16, P - P16);
  const int64_t done = P16 < P ? P16 + 16 : P;
  if (pend > done)
    for (int64_t k = 0; k < K; ++k) std::fill(at + k * ld + done, at + k * ld + pend, 0.0f);
}

// y (P x N) = epilogue(yt (N x ld)^T). A last block of fewer than 16 pixels is transposed whole:
// it reads yt up to column P16 + 16 (at most 15 past P; the caller's buffer must hold them).
inline void from_planar(const float* yt, int64_t ld, int64_t P, int64_t N, float* y, const Epilogue& e) {
  const int64_t P16 = P / 16 * 16, N16 = N / 16 * 16;
  auto scalar = [&](int64_t p, int64_t n) {
    float o = yt[n * ld + p] + e.bias[n];
    if (e.res) o += (e.rs ? e.rs[n] : 1.0f) * e.res[p * N + n];
    y[p * N + n] = e.relu && o < 0.0f ? 0.0f : o;
  };
  // cols: 16 (a compile-time count: the transposed block stays in registers) or the tail's count
  auto block = [&](int64_t p, auto cols) {
    for (int64_t n = 0; n < N16; n += 16) {
      v16 m[16];
      for (int i = 0; i < 16; ++i) m[i] = load<v16>(yt + (n + i) * ld + p);
      transpose16(m);
      const v16 b = load<v16>(e.bias + n);
      const v16 s = e.rs ? load<v16>(e.rs + n) : v16{} + 1.0f;
      for (int i = 0; i < 16; ++i) {
        if (i >= cols) break;
        v16 o = m[i] + b;
        if (e.res) o += s * load<v16>(e.res + (p + i) * N + n);
        if (e.relu) o = o > 0.0f ? o : v16{};
        store<v16>(y + (p + i) * N + n, o);
      }
    }
    for (int64_t n = N16; n < N; ++n)
      for (int i = 0; i < cols; ++i) scalar(p + i, n);
  };
  for (int64_t p = 0; p < P16; p += 16) block(p, std::integral_constant<int, 16>{});
  if (P16 < P) block(P16, (int)(P - P16));
}

// yt rows of one group's outputs, pixels [p0, p0 + 16 U) (output row stride ldo): R * U
// accumulators, one load of each input vector per R FMAs. Input j starts at at + offset(j) + p0:
// a planar row (sparse_rows), or a (channel, tap) shift of the padded planes (cpu:topo's conv).
template <int R, int U, typename Offset>
inline void group_block(const float* at, Offset offset, const float* w, int64_t m, const int32_t* rows, float* yt,
                        int64_t ldo, int64_t p0) {
  v16 acc[R][U] = {};
  for (int64_t j = 0; j < m; ++j) {
    const float* x = at + offset(j) + p0;
    v16 xv[U];
    for (int u = 0; u < U; ++u) xv[u] = load<v16>(x + 16 * u);
    for (int r = 0; r < R; ++r) {
      const float s = w[j * R + r];
      for (int u = 0; u < U; ++u) acc[r][u] += s * xv[u];
    }
  }
  for (int r = 0; r < R; ++r) {
    if (rows[r] < 0) continue;
    float* o = yt + rows[r] * ldo + p0;
    for (int u = 0; u < U; ++u) store<v16>(o + 16 * u, acc[r][u]);
  }
}

// yt (N x ld) = the plan's projection of at (K x ld), pixels [0, P) rounded up to 16 U (ld >= that).
// Pixel blocks outer: consecutive groups read overlapping inputs, so a block's inputs stay in L1.
template <int R, int U>
inline void sparse_rows(const float* at, int64_t ld, int64_t P, const SparsePlan& s, float* yt) {
  for (int64_t p0 = 0; p0 < P; p0 += 16 * U) {
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t a = s.ptr[g];
      const int32_t* idx = s.idx + a;
      group_block<R, U>(at, [idx, ld](int64_t j) { return idx[j] * ld; }, s.w + a * R, s.ptr[g + 1] - a,
                        s.rows + g * R, yt, ld, p0);
    }
  }
}

constexpr int64_t SPARSE_PIXELS = 64;  // 16 U: pixels per block (U = 4 vectors)

inline thread_local Buffer planar_buffer;

// y (P x N, row stride N) = epilogue(sparse projection of a (P x K)): band_gemm's sparse counterpart.
inline void sparse_band(const float* a, int64_t P, int64_t K, const SparsePlan& s, int64_t N, float* y,
                        const Epilogue& e) {
  // rows of the planar buffers SPARSE_PIXELS * k + 16 floats apart (an odd number of cache lines
  // when k is even): a power-of-two stride would map every row's block to the same few L1 sets
  const int64_t blocks = (P + SPARSE_PIXELS - 1) / SPARSE_PIXELS;
  const int64_t ld = (blocks + (blocks & 1)) * SPARSE_PIXELS + 16;
  float* at = planar_buffer.get((K + N) * ld + 16);  // + 16: from_planar's last block may read past
  float* yt = at + K * ld;
  to_planar(a, P, K, at, ld, blocks * SPARSE_PIXELS);
  if (s.R == 1) sparse_rows<1, 4>(at, ld, P, s, yt);
  else if (s.R == 2) sparse_rows<2, 4>(at, ld, P, s, yt);
  else sparse_rows<4, 4>(at, ld, P, s, yt);
  from_planar(yt, ld, P, N, y, e);
}

}  // namespace leanconv_cpu
