// A topological k x k conv (any stride, padding and dilation) on CPU with exactly its MACs (but for
// the union of a group's windows), band of output rows by band. NHWC float32 in and out.
//
// Layout: a stride (sh, sw) conv reads input row sh r + dy dh - ph, column sw c + dx dw - pw; the
// input is split into sh * sw phase planes (rows = a mod sh, columns = b mod sw), where every tap is
// a plain shift (sy, sx) of one plane: a stride-1 conv over the planes (stride 1: one plane). The
// batch is one tall image: each plane row holds the W / sw pixels and then a gap of zeros that is
// this row's right padding and the next row's left padding (row length Wq), each image Hq rows with
// zero rows below it that are its bottom and the next image's top padding; output row R of the
// tall image is image R / Hq, row R % Hq (rows past OH: discarded). A band's planes (every input
// channel, its rows with the halo) are transposed into planar rows (sparse.h's to_planar).
//
// Compute, two kernels (both offered; optimize keeps the faster per shape):
// - flat (cpu:topo): bands of one image; pixel blocks of 64 consecutive band positions, every
//   (channel, tap) input a shifted plane (sparse.h's group_block: groups of R outputs, the plan's R).
// - rows (cpu:topo-rows): bands of the tall image; tiles of V vectors of 16 output pixels, V output
//   rows (1 vector per row, or M = 16 / Wq rows per vector on maps narrower than 16), groups of
//   R = 2 outputs: the taps of one input channel that read the same plane columns at consecutive
//   row shifts (a "run": 3x3 stride 1, each column dx) load each input row once and feed it to the
//   up-to-3 output rows it contributes to, (V - 1) M + k loads for k V R FMAs.
// - dense (flat on small maps, stride-1 'same' convs, AVX-512; see conv_dense): no pad rows or
//   columns, taps' lanes outside the image masked.
#include "kernels.h"
#include "sparse.h"

#include <numeric>

using namespace leanconv_cpu;

namespace {


// taps of one input channel on one plane's columns at consecutive row shifts (at most 3)
struct Run {
  int64_t off;  // offset of the first tap's row in the channel's planar band (plane, row, column)
  int kh;
  int tap[3];   // tap index dy * kw + dx of each row shift
};

inline v16 splat(float s) { return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

// acc[r][v] += sum_j w[tap[j] R + r] * x[(v M + j) Wq]: each input row loaded once for the R
// outputs and up to KH output rows it feeds
template <int R, int V, int M, int KH>
inline void run_rows(const float* x, int64_t wq, const float* w, const int* tap, v16 (&acc)[R][V]) {
  v16 wv[KH][R];
  for (int j = 0; j < KH; ++j)
    for (int r = 0; r < R; ++r) wv[j][r] = splat(w[tap[j] * R + r]);
#pragma GCC unroll 128
  for (int i = 0; i < (V - 1) * M + KH; ++i) {
    if (i % M >= KH && i / M < V) continue;  // a row no output of the tile reads (M > KH)
    const v16 xv = load<v16>(x + i * wq);
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
      const int j = i - v * M;
      if (j >= 0 && j < KH)
        for (int r = 0; r < R; ++r) acc[r][v] += wv[j][r] * xv;
    }
  }
}

// yt rows of every output channel, the tile's V vectors at p0 + v * M * wq
template <int R, int V, int M>
void conv_tile(const float* at, const int64_t* coff, const SparsePlan& s, int64_t T, const std::vector<Run>& runs,
               int64_t wq, float* yt, int64_t ldo, int64_t p0) {
  for (int64_t g = 0; g < s.G; ++g) {
    const int64_t a = s.ptr[g] / T, nc = s.ptr[g + 1] / T - a;
    v16 acc[R][V] = {};
    for (int64_t k = 0; k < nc; ++k) {
      const float* x = at + coff[a + k] + p0;
      const float* w = s.w + (a + k) * T * R;
      for (const Run& r : runs) {
        if (r.kh == 3) run_rows<R, V, M, 3>(x + r.off, wq, w, r.tap, acc);
        else if (r.kh == 2) run_rows<R, V, M, 2>(x + r.off, wq, w, r.tap, acc);
        else run_rows<R, V, M, 1>(x + r.off, wq, w, r.tap, acc);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int32_t row = s.rows[g * R + r];
      if (row < 0) continue;
      float* o = yt + row * ldo + p0;
      for (int v = 0; v < V; ++v) store<v16>(o + v * M * wq, acc[r][v]);
    }
  }
}

// flat: pixel blocks of the band, each input a (channel, tap) offset (sparse.h's group_block)
template <int R, int U>
void conv_flat(const float* at, const int64_t* off, const SparsePlan& s, float* yt, int64_t ldo, int64_t P) {
  for (int64_t p0 = 0; p0 < P; p0 += 16 * U) {
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t a = s.ptr[g];
      const int64_t* o = off + a;
      group_block<R, U>(at, [o](int64_t j) { return o[j]; }, s.w + a * R, s.ptr[g + 1] - a, s.rows + g * R, yt,
                        ldo, p0);
    }
  }
}

// a planar row stride of at least n floats that is an odd number of cache lines (see sparse_band)
inline int64_t odd_lines(int64_t n) {
  int64_t lines = (n + 15) / 16;
  return (lines | 1) * 16;
}

inline int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

thread_local Buffer conv_buffer;

#ifdef __AVX512F__
// dense (stride-1 'same' convs, AVX-512): the batch's pixels as one sequence in NHWC order, no pad
// columns or rows and bands over images alike; a tap's input is the plane shifted by ty W + tx, its
// lanes outside the image masked out of the FMA (at no cost). Only the batch's last block
// computes pixels it does not need (the padded layout computes its pad column and row too, and
// rounds each band up to whole blocks: 23% of the work at 7x7, 13% at 14x14).
template <int R, int U>
inline void masked_block(const float* at, const int64_t* off, const int32_t* tap, const __mmask16* mk,
                         const float* w, int64_t m, const int32_t* rows, float* yt, int64_t ldo, int64_t p0) {
  v16 acc[R][U] = {};
  for (int64_t j = 0; j < m; ++j) {
    const float* x = at + off[j] + p0;
    const __mmask16* mt = mk + tap[j];  // this tap's U masks (a loop over taps kept acc in memory)
    v16 xv[U];
    for (int u = 0; u < U; ++u) xv[u] = load<v16>(x + 16 * u);
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(w[j * R + r]);
      // a masked FMA (lanes outside the image keep acc): as fast as a plain one. A masked load
      // instead made GCC keep acc in memory (the load may alias it)
      for (int u = 0; u < U; ++u) acc[r][u] = (v16)_mm512_mask3_fmadd_ps((__m512)xv[u], s, (__m512)acc[r][u], mt[u]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if (rows[r] < 0) continue;
    float* o = yt + rows[r] * ldo + p0;
    for (int u = 0; u < U; ++u) store<v16>(o + 16 * u, acc[r][u]);
  }
}

// yt = the plan over the band's blocks; masks[t * period + v % period]: tap t's lanes of the batch's
// vector v (pixels 16 v ..), V0 the band's first vector
template <int R, int U>
void conv_dense(const float* at, const int64_t* off, const int32_t* tap, const SparsePlan& s, int64_t T,
                const __mmask16* masks,
                int64_t period, int64_t V0, __mmask16* mk, float* yt, int64_t ldo, int64_t P) {
  for (int64_t p0 = 0; p0 < P; p0 += 16 * U) {
    for (int64_t t = 0; t < T; ++t)
      for (int u = 0; u < U; ++u) mk[t * U + u] = masks[t * period + (V0 + p0 / 16 + u) % period];
    for (int64_t g = 0; g < s.G; ++g) {
      const int64_t a = s.ptr[g];
      masked_block<R, U>(at, off + a, tap + a, mk, s.w + a * R, s.ptr[g + 1] - a, s.rows + g * R, yt, ldo, p0);
    }
  }
}

thread_local std::vector<__mmask16> dense_masks;

// the dense kernel's forward (NHWC in and out; see conv_dense)
void dense_forward(const at::Tensor& x, const SparsePlan& plan, int64_t T, int64_t kw, int64_t ph, int64_t pw,
                   int64_t dh, int64_t dw, const float* bp, const float* rsp, const float* resp, bool relu,
                   int64_t band_bytes, at::Tensor& y) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = y.size(1);
  const int64_t HW = H * W, total = B * HW;
  constexpr int U = SPARSE_PIXELS / 16;
  std::vector<int64_t> shift(T);
  int64_t lo = 0, hi = 0;
  for (int64_t t = 0; t < T; ++t) {
    shift[t] = ((t / kw) * dh - ph) * W + (t % kw) * dw - pw;
    lo = std::max(lo, -shift[t]), hi = std::max(hi, shift[t]);
  }
  const int64_t period = HW / std::gcd<int64_t>(HW, 16);  // masks repeat every HW pixels
  std::vector<__mmask16> masks(T * period);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t ty = (t / kw) * dh - ph, tx = (t % kw) * dw - pw;
    for (int64_t v = 0; v < period; ++v) {
      unsigned m = 0;
      for (int l = 0; l < 16; ++l) {
        const int64_t rem = (16 * v + l) % HW, r = rem / W + ty, c = rem % W + tx;
        if (r >= 0 && r < H && c >= 0 && c < W) m |= 1u << l;
      }
      masks[t * period + v] = (__mmask16)m;
    }
  }
  const int64_t threads = at::get_num_threads();
  // pixels per band: whole blocks, the planar input band near band_bytes, at least two bands a thread
  int64_t pb = band_bytes / ((int64_t)sizeof(float) * C) - lo - hi - 32;
  pb = std::min(pb, (total + 2 * threads - 1) / (2 * threads));
  pb = std::max<int64_t>(1, pb / SPARSE_PIXELS) * SPARSE_PIXELS;
  const int64_t bands = (total + pb - 1) / pb;
  const int64_t L = pb + lo + hi;  // plane: band pixels with the halo on both sides
  const int64_t ld = odd_lines(L + 16), ldo = odd_lines(pb + 16);
  std::vector<int64_t> off(plan.ptr[plan.G]);
  std::vector<int32_t> tap(off.size());  // each input's first mask in a block's (T, U) masks
  for (size_t j = 0; j < off.size(); ++j)
    off[j] = plan.idx[j] / T * ld + lo + shift[plan.idx[j] % T], tap[j] = plan.idx[j] % T * U;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, bands, 1, [&](int64_t first, int64_t end) {
    float* at_ = conv_buffer.get(C * ld + N * ldo + 16);
    float* yt = at_ + C * ld;
    dense_masks.resize(T * U);
    for (int64_t band = first; band < end; ++band) {
      const int64_t q0 = band * pb, P = std::min(pb, total - q0);
      const int64_t g0 = q0 - lo, a0 = std::max<int64_t>(0, g0), a1 = std::min(total, q0 + P + hi);
      if (a0 > g0)
        for (int64_t k = 0; k < C; ++k) std::fill(at_ + k * ld, at_ + k * ld + (a0 - g0), 0.0f);
      to_planar(xp + a0 * C, a1 - a0, C, at_ + (a0 - g0), ld, L - (a0 - g0));
      if (plan.R == 1) conv_dense<1, U>(at_, off.data(), tap.data(), plan, T, masks.data(), period, q0 / 16, dense_masks.data(), yt, ldo, P);
      else if (plan.R == 2) conv_dense<2, U>(at_, off.data(), tap.data(), plan, T, masks.data(), period, q0 / 16, dense_masks.data(), yt, ldo, P);
      else conv_dense<4, U>(at_, off.data(), tap.data(), plan, T, masks.data(), period, q0 / 16, dense_masks.data(), yt, ldo, P);
      Epilogue e{bp, rsp, resp ? resp + q0 * N : nullptr, relu};
      from_planar(yt, ldo, P, N, yp + q0 * N, e);
    }
  });
}
#endif

}  // namespace

// relu?(topological conv(x) + bias + res_scale * residual), NHWC in and out.
//   index / weights: the plan (sparse.h, groups of R = 1) over inputs channel * kh * kw + tap
//   (tap = i * kw + j), each group's inputs every tap of each of its channels in tap order;
//   bias: (N,); res_scale: (N,) or undefined; residual: (B, N, OH, OW) or undefined.
at::Tensor topo_conv_forward(const at::Tensor& x_in, const at::Tensor& index, const at::Tensor& weights,
                             const at::Tensor& bias, const c10::optional<at::Tensor>& res_scale,
                             const c10::optional<at::Tensor>& residual, std::vector<int64_t> kernel,
                             std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, bool relu, bool rows, int64_t band_bytes) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "leanconv cpu topo: x must be a 4-D float32 CPU tensor");
  at::Tensor x = nhwc(x_in);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = bias.size(0);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1],
                dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && ph >= 0 && pw >= 0 && dh > 0 && dw > 0,
              "leanconv cpu topo: bad geometry");
  const int64_t T = kh * kw;
  at::Tensor idx = index.contiguous(), wts = weights.contiguous(), bc = bias.contiguous();
  const SparsePlan plan = sparse_plan_of(idx, wts, C * T, N);
  for (int64_t g = 0; g <= plan.G; ++g) TORCH_CHECK(plan.ptr[g] % T == 0, "leanconv cpu topo: plan taps");
  for (int64_t k = 0; k < plan.ptr[plan.G]; k += T)
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(plan.idx[k + t] == plan.idx[k] + t && plan.idx[k] % T == 0,
                  "leanconv cpu topo: each group's inputs must be every tap of its channels in order");
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  const bool empty = H + 2 * ph < dh * (kh - 1) + 1 || W + 2 * pw < dw * (kw - 1) + 1;
  at::Tensor y = at::empty({B, N, empty ? 0 : OH, empty ? 0 : OW},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (B == 0 || empty) return y;
  at::Tensor res, rs;
  if (residual.has_value() && residual->defined()) {
    res = nhwc(*residual);
    TORCH_CHECK(res.sizes() == y.sizes(), "leanconv cpu topo: residual shape ", res.sizes(), " != output ", y.sizes());
    if (res_scale.has_value() && res_scale->defined()) rs = res_scale->contiguous();
  }
#ifdef __AVX512F__
  // flat, stride-1 'same' convs on small maps (the padded layout's pad row and column >= 10% of the
  // work: 7x7 23%, 14x14 13%): the dense kernel. On 28x28 and 56x56 it was 0-3% slower (its masks)
  if (!rows && sh == 1 && sw == 1 && OH == H && OW == W && 10 * (H + 1) * (W + 1) >= 11 * H * W) {
    dense_forward(x, plan, T, kw, ph, pw, dh, dw, bc.data_ptr<float>(), rs.defined() ? rs.data_ptr<float>() : nullptr,
                  res.defined() ? res.data_ptr<float>() : nullptr, relu, band_bytes, y);
    return y;
  }
#endif
  // each tap's plane and shift; the planes' lead (Ly rows, Lx columns) and trail (Ry, Rx)
  std::vector<int64_t> ta(T), tb(T), ty(T), tx(T);
  int64_t Ly = 0, Lx = 0, Ry = 0, Rx = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = (t / kw) * dh - ph, col = (t % kw) * dw - pw;
    ty[t] = floordiv(row, sh), ta[t] = row - ty[t] * sh;
    tx[t] = floordiv(col, sw), tb[t] = col - tx[t] * sw;
    Ly = std::max(Ly, -ty[t]), Ry = std::max(Ry, ty[t]), Lx = std::max(Lx, -tx[t]), Rx = std::max(Rx, tx[t]);
  }
  const int64_t Hv = (H + sh - 1) / sh, Wv = (W + sw - 1) / sw;  // rows / columns of the largest plane
  int64_t Wq = std::max(Wv + Lx, OW + Rx);
  int64_t M = 1;  // rows: output rows per vector (maps narrower than 16: a power-of-two row length)
  if (rows && Wq <= 16) {
    int64_t p = 1;
    while (p < Wq) p *= 2;
    Wq = p, M = 16 / p;
  } else if (rows) {
    Wq = (Wq + 15) / 16 * 16;  // the row's 16-pixel chunks cover it anyway; whole lines for dx = 0
  }
  const int64_t Hq = std::max(Hv + Ly, OH + Ry);  // rows per image in the tall image
  const int64_t total = (B - 1) * Hq + OH;        // output rows of the tall image
  const int64_t V = 16 / plan.R;  // rows: output vectors per tile (R V = 16 accumulators)
  int64_t TR = rows ? V * M : 1;
  const int64_t chunks = M == 1 ? (OW + 15) / 16 : 1;
  const int64_t threads = at::get_num_threads();
  // output rows per band: the planar input band near band_bytes, at least two bands per thread, a
  // multiple of the tile's rows
  const int64_t row_bytes = C * sh * sw * Wq * (int64_t)sizeof(float);
  int64_t rpb = std::max<int64_t>(1, band_bytes / std::max<int64_t>(1, row_bytes) - Ly - Ry);
  rpb = std::min(rpb, std::max<int64_t>(1, (total + 2 * threads - 1) / (2 * threads)));
  // rows: bands of the tall image; flat: bands of one image each (its gap rows not computed)
  // flat: at least one pixel block per band (stride 2 at 512 channels: 3 rows of 8, 24 of 64 pixels),
  // then of the heights down to half that, the one that computes the fewest blocks per image
  if (!rows) {
    const int64_t hi = std::min(std::max(rpb, (SPARSE_PIXELS + Wq - 1) / Wq), OH);
    auto blocks = [&](int64_t r) { return (r * Wq + SPARSE_PIXELS - 1) / SPARSE_PIXELS; };
    auto cost = [&](int64_t r) { return OH / r * blocks(r) + (OH % r ? blocks(OH % r) : 0); };
    rpb = hi;
    for (int64_t r = hi - 1; r >= std::max<int64_t>(1, hi / 2); --r)
      if (cost(r) < cost(rpb)) rpb = r;
  }
  rpb = std::max(TR, rpb / TR * TR);
  const int64_t per_image = (OH + rpb - 1) / rpb;
  const int64_t bands = rows ? (total + rpb - 1) / rpb : B * per_image;
  // plane: the band's rows with the lead and trail, one spare row (the last tile's columns run
  // past its row) and 32 floats (to_planar's zero fill of a row's last block: 15 past it)
  // (flat: + SPARSE_PIXELS, the last block of pixels past the band)
  const int64_t PS = (rpb + Ly + Ry + 1) * Wq + 32 + (rows ? 0 : SPARSE_PIXELS);
  const int64_t ld = odd_lines(sh * sw * PS);
  const int64_t ldo = odd_lines(rpb * Wq + 16 + (rows ? 0 : SPARSE_PIXELS));  // + 16: from_planar reads past
  // runs: the taps of each plane column shift (a, b, sx) at consecutive row shifts
  std::vector<Run> runs;
  std::vector<bool> done(T, false);
  for (int64_t t = 0; t < T; ++t) {
    if (done[t]) continue;
    // this column class's taps by row shift
    std::vector<std::pair<int64_t, int64_t>> cls;
    for (int64_t u = 0; u < T; ++u)
      if (!done[u] && ta[u] == ta[t] && tb[u] == tb[t] && tx[u] == tx[t]) cls.push_back({ty[u], u}), done[u] = true;
    std::sort(cls.begin(), cls.end());
    for (size_t i = 0; i < cls.size();) {
      Run r{(ta[t] * sw + tb[t]) * PS + (cls[i].first + Ly) * Wq + tx[t] + Lx, 0, {0, 0, 0}};
      while (i < cls.size() && r.kh < 3 && (r.kh == 0 || cls[i].first == cls[i - 1].first + 1))
        r.tap[r.kh++] = (int)cls[i++].second;
      runs.push_back(r);
    }
  }
  std::vector<int64_t> coff(plan.ptr[plan.G] / T);
  for (size_t k = 0; k < coff.size(); ++k) coff[k] = plan.idx[k * T] / T * ld;
  // flat: each input's offset (channel plane + tap shift)
  std::vector<int64_t> off(rows ? 0 : plan.ptr[plan.G]);
  std::vector<int64_t> toff(T);
  for (int64_t t = 0; t < T; ++t) toff[t] = (ta[t] * sw + tb[t]) * PS + (ty[t] + Ly) * Wq + tx[t] + Lx;
  for (size_t k = 0; k < off.size() / T; ++k)
    for (int64_t t = 0; t < T; ++t) off[k * T + t] = coff[k] + toff[t];
  const float* xp = x.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const float* rsp = rs.defined() ? rs.data_ptr<float>() : nullptr;
  const float* resp = res.defined() ? res.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  at::parallel_for(0, bands, 1, [&](int64_t first, int64_t end) {
    float* at_ = conv_buffer.get(C * ld + N * ldo + 16);  // + 16: from_planar's last block may read past
    float* yt = at_ + C * ld;
    for (int64_t band = first; band < end; ++band) {
      const int64_t n0 = band / per_image, r0 = band % per_image * rpb;
      const int64_t R0 = rows ? band * rpb : n0 * Hq + r0;
      const int64_t R1 = rows ? std::min(total, R0 + rpb) : n0 * Hq + std::min(OH, r0 + rpb);
      // zero everything the taps may read: padding, the gaps, the block tails (no garbage:
      // denormals cost a microcode assist per FMA)
      std::memset(at_, 0, C * ld * sizeof(float));
      for (int64_t j = 0; j < (R1 - R0) + Ly + Ry; ++j) {
        const int64_t q = R0 - Ly + j, n = floordiv(q, Hq), r = q - n * Hq;  // plane row q: image n, row r
        if (n < 0 || n >= B) continue;
        for (int64_t a = 0; a < sh; ++a) {
          const int64_t ih = r * sh + a;
          if (ih >= H) continue;
          for (int64_t b = 0; b < sw && b < W; ++b)
            to_planar(xp + ((n * H + ih) * W + b) * C, (W - b + sw - 1) / sw, C,
                      at_ + (a * sw + b) * PS + j * Wq + Lx, ld, (W - b + sw - 1) / sw, sw * C);
        }
      }
      if (!rows) {
        constexpr int U = SPARSE_PIXELS / 16;
        const int64_t P = (R1 - R0) * Wq;
        if (plan.R == 1) conv_flat<1, U>(at_, off.data(), plan, yt, ldo, P);
        else if (plan.R == 2) conv_flat<2, U>(at_, off.data(), plan, yt, ldo, P);
        else conv_flat<4, U>(at_, off.data(), plan, yt, ldo, P);
      }
      for (int64_t t0 = 0; rows && t0 < R1 - R0; t0 += TR)
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t p0 = t0 * Wq + 16 * c;
          auto go = [&](auto r, auto v) {
            switch (M) {
              case 1: conv_tile<r, v, 1>(at_, coff.data(), plan, T, runs, Wq, yt, ldo, p0); break;
              case 2: conv_tile<r, v, 2>(at_, coff.data(), plan, T, runs, Wq, yt, ldo, p0); break;
              case 4: conv_tile<r, v, 4>(at_, coff.data(), plan, T, runs, Wq, yt, ldo, p0); break;
              case 8: conv_tile<r, v, 8>(at_, coff.data(), plan, T, runs, Wq, yt, ldo, p0); break;
              default: conv_tile<r, v, 16>(at_, coff.data(), plan, T, runs, Wq, yt, ldo, p0); break;
            }
          };
          using I = std::integral_constant<int, 1>;
          using II = std::integral_constant<int, 2>;
          using IV = std::integral_constant<int, 4>;
          if (plan.R == 1) go(I{}, std::integral_constant<int, 16>{});
          else if (plan.R == 2) go(II{}, std::integral_constant<int, 8>{});
          else go(IV{}, IV{});
        }
      for (int64_t R = R0; R < R1; ++R) {
        const int64_t n = R / Hq, r = R % Hq;
        if (r >= OH) continue;
        const int64_t o = (n * OH + r) * OW * N;
        Epilogue e{bp, rsp, resp ? resp + o : nullptr, relu};
        from_planar(yt + (R - R0) * Wq, ldo, OW, N, yp + o, e);
      }
    }
  });
  return y;
}

static leanconv_cpu::Register bind_topo([](pybind11::module_& m) {
  m.def("topo_conv_forward", &topo_conv_forward,
        "topological k x k conv with exactly its MACs, band by band (NHWC float32)");
});
