// Shared by leanconv's C++ CPU kernels (every method's source includes it; all are built into one
// extension): 16-float vectors, the band GEMM micro-kernel with its fused epilogue, the per-thread
// band buffer, and the registration of each source's Python functions (one PYBIND11_MODULE, in
// module.cpp, binds what every source registered). Vectorized with GCC vector extensions: a v16 is
// one zmm under -mavx512f, two ymm under -mavx2; the ISA is chosen by the loader's flags.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

namespace leanconv_cpu {

// Each source registers the functions it binds: `static leanconv_cpu::Register r([](py::module_& m) {...});`
using Binder = void (*)(pybind11::module_&);
inline std::vector<Binder>& binders() {
  static std::vector<Binder> all;
  return all;
}
struct Register {
  explicit Register(Binder f) { binders().push_back(f); }
};

typedef float v16 __attribute__((vector_size(64)));

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// ---------------------------------------------------------------------------------- projection GEMM
// y[p, n] = epilogue(sum_k a[p, k] * w[k, n]) on a band: a (P x K, row stride K) is the depthwise
// band buffer, w is packed in panels of NR columns ((N / NR) x K x NR, zero-padded), so one
// MR x NR block of y is MR * NV accumulator vectors fed by one broadcast per row and NV loads per k.
// MKL's sgemm runs at half this CPU's AVX-512 rate here (AVX2 code on AMD), so the band GEMM is ours.
#ifdef __AVX512F__
constexpr int64_t NV = 2, MR = 12;  // 24 zmm accumulators
#else
constexpr int64_t NV = 1, MR = 6;   // 6 accumulator vectors: 12 ymm (a v16 is two ymm under AVX2)
#endif
constexpr int64_t NR = 16 * NV;

struct Epilogue {
  const float* bias;   // (N,)
  const float* rs;     // (N,) or null: residual scale
  const float* res;    // band's residual rows (P x N) or null
  bool relu;
};

// One ROWS x NR block of y over k-slice [0, K) of a and wp (the caller offsets both): starts from
// zero (first) or from the partial sums stored in y, and stores partial sums (not last) or the
// finished block with its epilogue (last).
template <int64_t ROWS>
inline void gemm_block(const float* a, int64_t lda, const float* wp, int64_t K, float* y, int64_t ldy,
                       int64_t n0, int64_t ncols, const Epilogue& e, int64_t p0, bool first, bool last) {
  v16 acc[ROWS][NV];
  for (int64_t r = 0; r < ROWS; ++r) {
    const float* yr = y + r * ldy + n0;
    if (first) {
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = v16{};
    } else if (ncols == NR) {
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = load<v16>(yr + 16 * v);
    } else {
      float tmp[NR] = {};
      for (int64_t j = 0; j < ncols; ++j) tmp[j] = yr[j];
      for (int64_t v = 0; v < NV; ++v) acc[r][v] = load<v16>(tmp + 16 * v);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    v16 b[NV];
    for (int64_t v = 0; v < NV; ++v) b[v] = load<v16>(wp + k * NR + 16 * v);
    for (int64_t r = 0; r < ROWS; ++r) {
      // a scalar operand: GCC splats it as a broadcast load (an FMA's {1to16} memory operand).
      // Not `v16{} + s`: without -ffast-math that is a real add, and a register broadcast (a
      // shuffle on port 5, one of the two 512-bit FMA ports), per row and k
      const float x = a[r * lda + k];
      for (int64_t v = 0; v < NV; ++v) acc[r][v] += x * b[v];
    }
  }
  for (int64_t r = 0; r < ROWS; ++r) {
    float* yr = y + r * ldy + n0;
    const float* rr = e.res && last ? e.res + (p0 + r) * ldy + n0 : nullptr;
    if (!last) {  // partial sums
      if (ncols == NR) {
        for (int64_t v = 0; v < NV; ++v) store<v16>(yr + 16 * v, acc[r][v]);
      } else {
        float tmp[NR];
        for (int64_t v = 0; v < NV; ++v) store<v16>(tmp + 16 * v, acc[r][v]);
        for (int64_t j = 0; j < ncols; ++j) yr[j] = tmp[j];
      }
    } else if (ncols == NR) {
      for (int64_t v = 0; v < NV; ++v) {
        v16 o = acc[r][v] + load<v16>(e.bias + n0 + 16 * v);
        if (rr) o += (e.rs ? load<v16>(e.rs + n0 + 16 * v) : v16{} + 1.0f) * load<v16>(rr + 16 * v);
        if (e.relu) o = o > 0.0f ? o : v16{};
        store<v16>(yr + 16 * v, o);
      }
    } else {  // the last panel of an N that is not a multiple of NR
      float tmp[NR];
      for (int64_t v = 0; v < NV; ++v) store<v16>(tmp + 16 * v, acc[r][v]);
      for (int64_t j = 0; j < ncols; ++j) {
        float o = tmp[j] + e.bias[n0 + j];
        if (rr) o += (e.rs ? e.rs[n0 + j] : 1.0f) * rr[j];
        yr[j] = e.relu && o < 0.0f ? 0.0f : o;
      }
    }
  }
}

template <int64_t R>
inline void gemm_tail(int64_t rows, const float* a, int64_t lda, const float* wp, int64_t K, float* y, int64_t ldy,
                      int64_t n0, int64_t ncols, const Epilogue& e, int64_t p0, bool first, bool last) {
  if constexpr (R > 0) {
    if (rows == R) return gemm_block<R>(a, lda, wp, K, y, ldy, n0, ncols, e, p0, first, last);
    gemm_tail<R - 1>(rows, a, lda, wp, K, y, ldy, n0, ncols, e, p0, first, last);
  }
}

// k-slice of the GEMM: KC x NR floats of a packed panel (32 KiB with AVX-512) stay in L1 while
// every row block of the band passes over them; longer K goes in slices, partial sums in y
constexpr int64_t KC = 256;

// y (P x N, row stride N) = epilogue(a (P x K) @ w), w packed by pack_projection.
inline void band_gemm(const float* a, int64_t P, int64_t K, const float* wp, int64_t N, float* y, const Epilogue& e) {
  const int64_t panels = (N + NR - 1) / NR;
  // slices of equal length, none longer than KC
  const int64_t slices = (K + KC - 1) / KC, kc = (K + slices - 1) / slices;
  if (slices == 1 && panels > 1 && panels * K * NR * (int64_t)sizeof(float) <= (32 << 10)) {
    // the whole packed projection fits L1 (K = N = 64: 16 KiB): each row block of a (MR x K) is
    // read from L2 once and passes over every panel, and each output row is stored in one go
    // (panel by panel, a was read once per panel and y's rows stored in NR-column pieces)
    int64_t p = 0;
    for (; p + MR <= P; p += MR)
      for (int64_t j = 0; j < panels; ++j)
        gemm_block<MR>(a + p * K, K, wp + j * K * NR, K, y + p * N, N, j * NR, std::min(NR, N - j * NR), e, p, true, true);
    if (p < P)
      for (int64_t j = 0; j < panels; ++j)
        gemm_tail<MR - 1>(P - p, a + p * K, K, wp + j * K * NR, K, y + p * N, N, j * NR, std::min(NR, N - j * NR), e, p, true, true);
    return;
  }
  for (int64_t j = 0; j < panels; ++j) {
    const int64_t n0 = j * NR, ncols = std::min(NR, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const float* wj = wp + j * K * NR + k0 * NR;
      const int64_t kn = std::min(kc, K - k0);
      const bool first = k0 == 0, last = k0 + kn >= K;
      int64_t p = 0;
      for (; p + MR <= P; p += MR) gemm_block<MR>(a + p * K + k0, K, wj, kn, y + p * N, N, n0, ncols, e, p, first, last);
      if (p < P) gemm_tail<MR - 1>(P - p, a + p * K + k0, K, wj, kn, y + p * N, N, n0, ncols, e, p, first, last);
    }
  }
}

struct Buffer {  // one per thread, grown on demand, 64-byte aligned
  float* data = nullptr;
  size_t size = 0;
  float* get(size_t n) {
    if (n > size) {
      std::free(data);
      size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(data != nullptr, "leanconv cpu kernel: out of memory for a band buffer");
      size = n;
    }
    return data;
  }
  ~Buffer() { std::free(data); }
};

inline thread_local Buffer band_buffer;

inline at::Tensor nhwc(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// (ceil(N / NR), K, NR): the projection (K, N) in panels of NR columns, zero-padded, for band_gemm.
inline at::Tensor pack_projection(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "leanconv cpu: the projection must be (K, N) float32");
  const int64_t K = w.size(0), N = w.size(1), panels = (N + NR - 1) / NR;
  at::Tensor padded = at::zeros({K, panels * NR}, w.options());
  padded.narrow(1, 0, N).copy_(w);
  return padded.view({K, panels, NR}).permute({1, 0, 2}).contiguous();
}

}  // namespace leanconv_cpu
