// SIC / unravelled layer on CPU in one pass: depthwise k x k (multiplier b) band of output rows by
// band into a per-thread buffer that stays in L2, then the 1x1 projection as a GEMM on that
// buffer (our own micro-kernel) with bias / residual / ReLU applied as each output block is stored.
// NHWC (channels_last) float32 in and out. Vectorized with GCC vector extensions: 16 floats per
// vector (one zmm under -mavx512f, two ymm under -mavx2), the ISA chosen by the loader's flags.
#include "kernels.h"
#include "sparse.h"

#include <memory>

using namespace leanconv_cpu;

namespace {

// Geometry of one depthwise step.
struct Dw {
  int64_t H, W, C, b;        // input size, channels, multiplier
  int64_t OH, OW;            // output size
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// The input rows one output row reads, which of them exist, and the output columns whose every
// tap lies inside the row ([lo, hi): the fast interior; the rest are edges).
struct RowPlan {
  const float* rows[64];
  bool full;        // every row present
  int64_t lo, hi;
};

inline RowPlan plan_row(const float* x, const Dw& g, int64_t oh) {
  RowPlan p;
  p.full = true;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.sh - g.ph + i * g.dh;
    p.rows[i] = (ih >= 0 && ih < g.H) ? x + ih * g.W * g.C : nullptr;
    p.full = p.full && p.rows[i];
  }
  const int64_t lo = std::min((g.pw + g.sw - 1) / g.sw, g.OW);
  const int64_t last = g.W - 1 - (g.kw - 1) * g.dw + g.pw;  // interior: ow * sw <= last
  const int64_t hi = last < 0 ? 0 : std::min(g.OW, last / g.sw + 1);
  p.lo = lo;
  p.hi = std::max(hi, lo);
  return p;
}

// Depthwise outputs for channels [c, c + width(V)) of multiplier slot r:
// out[ow * ldo + r * C + c] = sum_taps x[ih, iw, c] * w[r, tap, c]. KH_/KW_ > 0: compile-time
// kernel size (taps unrolled, weights held in registers).
template <typename V, int KH_, int KW_>
struct DwChunk {
  const RowPlan& p;
  const Dw& g;
  const float* w;   // w[r, tap, c] for this (r, c): tap t at w + t * C
  float* o;         // out + r * C + c
  int64_t ldo, c;

  int64_t KH() const { return KH_ ? KH_ : g.kh; }
  int64_t KW() const { return KW_ ? KW_ : g.kw; }

  // one output with bounds checks (edges, and rows cut by the padding)
  void edge(int64_t ow) const {
    V acc = {};
    const int64_t base = ow * g.sw - g.pw;
    for (int64_t i = 0; i < KH(); ++i) {
      if (!p.rows[i]) continue;
      for (int64_t j = 0; j < KW(); ++j) {
        const int64_t iw = base + j * g.dw;
        if (iw >= 0 && iw < g.W) acc += load<V>(p.rows[i] + iw * g.C + c) * load<V>(w + (i * KW() + j) * g.C);
      }
    }
    store<V>(o + ow * ldo, acc);
  }

  // U interior outputs from ow on: U independent accumulators hide the FMA latency (one chain of
  // KH*KW dependent FMAs per output runs at a fraction of the FMA units' rate)
  template <int U>
  void block(int64_t ow) const {
    const int64_t off = (ow * g.sw - g.pw) * g.C + c, step = g.sw * g.C;
    V acc[U] = {};
    for (int64_t i = 0; i < KH(); ++i) {
      const float* xr = p.rows[i] + off;
      for (int64_t j = 0; j < KW(); ++j) {
        const V t = load<V>(w + (i * KW() + j) * g.C);
        const float* xj = xr + j * g.dw * g.C;
        for (int u = 0; u < U; ++u) acc[u] += load<V>(xj + u * step) * t;
      }
    }
    for (int u = 0; u < U; ++u) store<V>(o + (ow + u) * ldo, acc[u]);
  }

  // block<U> for stride 1 and dilation 1 along the row with a compile-time KW: the U + KW - 1
  // input vectors of a kernel row are loaded once and reused by every output and tap (block<U>
  // loads U * KW), so the FMAs, not the loads, bound it
  template <int U>
  void block_unit(int64_t ow) const {
    static_assert(KW_ > 0, "block_unit needs a compile-time kernel width");
    const int64_t off = (ow - g.pw) * g.C + c;
    V acc[U] = {};
    for (int64_t i = 0; i < KH(); ++i) {
      const float* xr = p.rows[i] + off;
      V in[U + KW_ - 1];
      for (int t = 0; t < U + KW_ - 1; ++t) in[t] = load<V>(xr + t * g.C);
      for (int j = 0; j < KW_; ++j) {
        const V t = load<V>(w + (i * KW_ + j) * g.C);
        for (int u = 0; u < U; ++u) acc[u] += in[u + j] * t;
      }
    }
    for (int u = 0; u < U; ++u) store<V>(o + (ow + u) * ldo, acc[u]);
  }
};

// One output row (image-local row oh) of the depthwise step, every channel and multiplier slot,
// into out (OW x ldo). Interior columns go in blocks of U outputs, all channels of a block before
// the next, so the block's input window (KH rows x (U*sw + KW) pixels x C) is read from L1.
template <int KH_, int KW_>
void dw_row(const float* x, const float* w, float* out, int64_t ldo, const Dw& g, int64_t oh) {
  constexpr int U = 8;
  const RowPlan p = plan_row(x, g, oh);
  const int64_t C = g.C, ntaps = g.kh * g.kw, cv = C / 16 * 16;
  auto each = [&](auto&& fn) {  // fn(chunk of 16 | scalar channel, r, c)
    for (int64_t r = 0; r < g.b; ++r) {
      for (int64_t c = 0; c < cv; c += 16)
        fn(DwChunk<v16, KH_, KW_>{p, g, w + r * ntaps * C + c, out + r * C + c, ldo, c});
      for (int64_t c = cv; c < C; ++c)
        fn(DwChunk<float, KH_, KW_>{p, g, w + r * ntaps * C + c, out + r * C + c, ldo, c});
    }
  };
  if (!p.full) {
    each([&](const auto& k) { for (int64_t ow = 0; ow < g.OW; ++ow) k.edge(ow); });
    return;
  }
  each([&](const auto& k) {
    for (int64_t ow = 0; ow < p.lo; ++ow) k.edge(ow);
    for (int64_t ow = p.hi; ow < g.OW; ++ow) k.edge(ow);
  });
  int64_t ow = p.lo;
  if constexpr (KW_ > 0) {
    if (g.sw == 1 && g.dw == 1)
      for (; ow + U <= p.hi; ow += U) {
        // the input window of the block two ahead, into L1 (the rows stream from L3 / memory)
        const int64_t ahead = ow + 2 * U - g.pw;
        if (ahead + U + KW_ <= g.W)
          for (int64_t i = 0; i < g.kh; ++i)
            for (const char *q = (const char*)(p.rows[i] + ahead * C), *e = q + U * C * sizeof(float); q < e; q += 64)
              __builtin_prefetch(q);
        each([&](const auto& k) { k.template block_unit<U>(ow); });
      }
  }
  for (; ow + U <= p.hi; ow += U) each([&](const auto& k) { k.template block<U>(ow); });
  for (; ow < p.hi; ++ow) each([&](const auto& k) { k.template block<1>(ow); });
}

using RowFn = void (*)(const float*, const float*, float*, int64_t, const Dw&, int64_t);

RowFn pick_row(int64_t kh, int64_t kw) {
  if (kh == 3 && kw == 3) return dw_row<3, 3>;
  if (kh == 5 && kw == 5) return dw_row<5, 5>;
  if (kh == 7 && kw == 7) return dw_row<7, 7>;
  return dw_row<0, 0>;
}

}  // namespace

// relu?(project(depthwise(x)) + bias + res_scale * residual), NHWC in and out.
//   x: (B, C, H, W) float32; dw: (b, kh*kw, C) depthwise filters, multiplier slot r major;
//   weight: (b*C, N) projection, row r*C + i for depthwise channel (i, r), packed by pack_projection;
//   or, with a non-empty index, a sparse projection's weights (index: its plan, sparse.h); bias: (N,) (the
//   depthwise bias already folded in); res_scale: (N,) or undefined; residual: (B, N, OH, OW) or
//   undefined. band_bytes: the per-thread depthwise buffer's target size.
at::Tensor sic_forward(const at::Tensor& x_in, const at::Tensor& dw, const at::Tensor& weight, const at::Tensor& index,
                       const at::Tensor& bias,
                       const c10::optional<at::Tensor>& res_scale, const c10::optional<at::Tensor>& residual,
                       std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding,
                       std::vector<int64_t> dilation, bool relu, int64_t band_bytes) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "leanconv cpu sic: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(dw.dim() == 3 && bias.dim() == 1, "leanconv cpu sic: bad packed operands");
  at::Tensor x = nhwc(x_in);
  Dw g;
  g.H = x.size(2); g.W = x.size(3); g.C = x.size(1); g.b = dw.size(0);
  g.kh = kernel[0]; g.kw = kernel[1]; g.sh = stride[0]; g.sw = stride[1];
  g.ph = padding[0]; g.pw = padding[1]; g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(dw.size(1) == g.kh * g.kw && dw.size(2) == g.C, "leanconv cpu sic: depthwise filters do not match x");
  TORCH_CHECK(g.kh <= 64, "leanconv cpu sic: kernel too tall");
  const int64_t K = g.b * g.C, N = bias.size(0);
  const bool sparse = index.defined() && index.numel() > 0;
  SparsePlan plan;
  if (sparse)
    plan = sparse_plan_of(index, weight, K, N);
  else
    TORCH_CHECK(weight.dim() == 3 && weight.size(0) == (N + NR - 1) / NR && weight.size(1) == K && weight.size(2) == NR,
                "leanconv cpu sic: the projection is not packed for this build (pack_projection)");
  g.OH = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  const int64_t B = x.size(0);
  at::Tensor y = at::empty({B, N, std::max<int64_t>(g.OH, 0), std::max<int64_t>(g.OW, 0)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (B == 0 || g.OH <= 0 || g.OW <= 0) return y;
  at::Tensor res, rs;
  if (residual.has_value() && residual->defined()) {
    res = nhwc(*residual);
    TORCH_CHECK(res.sizes() == y.sizes(), "leanconv cpu sic: residual shape ", res.sizes(), " != output ", y.sizes());
    if (res_scale.has_value() && res_scale->defined()) rs = res_scale->contiguous();
  }
  at::Tensor wc = weight.contiguous(), dwc = dw.contiguous(), bc = bias.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* wp = dwc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const float* wp_packed = wc.data_ptr<float>();
  const float* rsp = rs.defined() ? rs.data_ptr<float>() : nullptr;
  const float* resp = res.defined() ? res.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  const int64_t rows_total = B * g.OH;
  const int64_t row_bytes = g.OW * K * (int64_t)sizeof(float);
  int64_t rpb = std::max<int64_t>(1, band_bytes / std::max<int64_t>(row_bytes, 1));
  const int64_t threads = at::get_num_threads();
  // at least two bands per thread where there are rows enough (load balance)
  rpb = std::min(rpb, std::max<int64_t>(1, (rows_total + 2 * threads - 1) / (2 * threads)));
  int64_t nbands = (rows_total + rpb - 1) / rpb;
  // a multiple of the threads, of equal height (each thread's share is a contiguous run of bands)
  while (nbands < rows_total && nbands % threads != 0) ++nbands;
  rpb = (rows_total + nbands - 1) / nbands;
  nbands = (rows_total + rpb - 1) / rpb;
  RowFn row = pick_row(g.kh, g.kw);
  const int64_t img = g.H * g.W * g.C;

  at::parallel_for(0, nbands, 1, [&](int64_t first, int64_t end) {
    float* buf = band_buffer.get(rpb * g.OW * K);
    for (int64_t band = first; band < end; ++band) {
      const int64_t r0 = band * rpb, r1 = std::min(rows_total, r0 + rpb);
      const int64_t P = (r1 - r0) * g.OW;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.OH, oh = r % g.OH;
        row(xp + n * img, wp, buf + (r - r0) * g.OW * K, K, g, oh);
      }
      float* yb = yp + r0 * g.OW * N;
      Epilogue e{bp, rsp, resp ? resp + r0 * g.OW * N : nullptr, relu};
      if (sparse)
        sparse_band(buf, P, K, plan, N, yb, e);
      else
        band_gemm(buf, P, K, wp_packed, N, yb, e);
    }
  });
  return y;
}

// ------------------------------------------------------------------------------ a whole SIC stack
// m SIC layers (depthwise -> projection -> epilogue, each layer's input its residual where flagged)
// band of the last layer's output rows by band: each band's intermediate activations live in the
// per-thread buffer only. The halo rows each depthwise needs are recomputed by a band that starts
// a thread's run of an image; a band that follows its image's previous band on the same thread
// moves them from that band's rows instead.

namespace {

struct StackLayer {
  Dw g;
  const float* dw;      // (b, kh*kw, C)
  const float* wp;      // packed projection (dense)
  SparsePlan sparse;    // or a sparse one (sparse.R > 0)
  const float* bias;    // (N,)
  const float* rs;      // (N,) or null
  int64_t K, N;
  bool relu, res;
  RowFn row;
};

// rows [lo, hi) of layer l's output that rows [a, b) of layer l + 1's output read (clipped)
inline void input_rows(const Dw& g, int64_t a, int64_t b, int64_t* lo, int64_t* hi) {
  *lo = std::max<int64_t>(0, a * g.sh - g.ph);
  *hi = std::min<int64_t>(g.H, (b - 1) * g.sh - g.ph + (g.kh - 1) * g.dh + 1);
}

thread_local Buffer stack_buffer;

}  // namespace

// x -> layer_{m-1}(... layer_0(x)), every layer relu?(project(depthwise(in)) + bias + rs * in?).
//   dws[l]: (b, kh*kw, C_l); weights[l]: packed (pack_projection), or a sparse projection's
//   weights where index[l] is not empty (its plan, sparse.h); biases[l]: (N_l,);
//   res_scales[l]: (N_l,) or empty (scale 1); geometry: 8 ints per layer (kh kw sh sw ph pw dh dw);
//   relu, residual: per layer. band_bytes: the per-thread buffer's target for the intermediates.
at::Tensor sic_stack_forward(const at::Tensor& x_in, const std::vector<at::Tensor>& dws,
                             const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& index,
                             const std::vector<at::Tensor>& biases,
                             const std::vector<at::Tensor>& res_scales, std::vector<int64_t> geometry,
                             std::vector<bool> relu, std::vector<bool> residual, int64_t band_bytes) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "leanconv cpu sic stack: x must be a 4-D float32 CPU tensor");
  const int64_t m = (int64_t)dws.size();
  TORCH_CHECK(m >= 1 && (int64_t)weights.size() == m && (int64_t)index.size() == m && (int64_t)biases.size() == m && (int64_t)res_scales.size() == m &&
                  (int64_t)geometry.size() == 8 * m && (int64_t)relu.size() == m && (int64_t)residual.size() == m,
              "leanconv cpu sic stack: one set of operands per layer");
  at::Tensor x = nhwc(x_in);
  const int64_t B = x.size(0);
  std::vector<at::Tensor> keep;  // contiguous operands, alive for the call
  std::vector<StackLayer> L(m);
  int64_t H = x.size(2), W = x.size(3), C = x.size(1);
  for (int64_t l = 0; l < m; ++l) {
    StackLayer& s = L[l];
    const int64_t* q = geometry.data() + 8 * l;
    Dw& g = s.g;
    g.H = H; g.W = W; g.C = C; g.b = dws[l].size(0);
    g.kh = q[0]; g.kw = q[1]; g.sh = q[2]; g.sw = q[3]; g.ph = q[4]; g.pw = q[5]; g.dh = q[6]; g.dw = q[7];
    TORCH_CHECK(dws[l].dim() == 3 && dws[l].size(1) == g.kh * g.kw && dws[l].size(2) == C,
                "leanconv cpu sic stack: layer ", l, "'s depthwise filters do not match its input");
    TORCH_CHECK(g.kh <= 64 && g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
                "leanconv cpu sic stack: bad geometry");
    s.K = g.b * C;
    s.N = biases[l].size(0);
    const bool sparse = index[l].defined() && index[l].numel() > 0;
    if (!sparse)
      TORCH_CHECK(weights[l].dim() == 3 && weights[l].size(0) == (s.N + NR - 1) / NR && weights[l].size(1) == s.K &&
                      weights[l].size(2) == NR,
                  "leanconv cpu sic stack: layer ", l, "'s projection is not packed for this build");
    g.OH = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
    g.OW = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
    s.res = residual[l];
    s.relu = relu[l];
    if (s.res)
      TORCH_CHECK(g.OH == H && g.OW == W && s.N == C && g.sh == 1,
                  "leanconv cpu sic stack: layer ", l, " has a residual but changes the shape");
    for (const at::Tensor* t : {&dws[l], &weights[l], &biases[l]}) keep.push_back(t->contiguous());
    s.dw = keep[keep.size() - 3].data_ptr<float>();
    s.wp = keep[keep.size() - 2].data_ptr<float>();
    s.bias = keep[keep.size() - 1].data_ptr<float>();
    if (sparse) {
      keep.push_back(index[l].contiguous());
      s.sparse = sparse_plan_of(keep.back(), keep[keep.size() - 3], s.K, s.N);
    }
    s.rs = nullptr;
    if (s.res && res_scales[l].defined() && res_scales[l].numel() > 0) {
      TORCH_CHECK(res_scales[l].numel() == s.N, "leanconv cpu sic stack: bad residual scale");
      keep.push_back(res_scales[l].contiguous());
      s.rs = keep.back().data_ptr<float>();
    }
    s.row = pick_row(g.kh, g.kw);
    H = std::max<int64_t>(g.OH, 0); W = std::max<int64_t>(g.OW, 0); C = s.N;
  }
  const Dw& last = L[m - 1].g;
  at::Tensor y = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (B == 0 || H == 0 || W == 0) return y;
  for (const StackLayer& s : L) TORCH_CHECK(s.g.OH > 0 && s.g.OW > 0, "leanconv cpu sic stack: an empty intermediate");

  // rows of each intermediate a band of r output rows needs at most; the band's buffer size
  auto sizes = [&](int64_t r, std::vector<int64_t>* rows) {
    rows->assign(m, 0);
    (*rows)[m - 1] = r;
    int64_t bytes = 0;
    for (int64_t l = m - 1; l > 0; --l) {
      const Dw& g = L[l].g;
      (*rows)[l - 1] = std::min<int64_t>(g.H, ((*rows)[l] - 1) * g.sh + (g.kh - 1) * g.dh + 1);
      bytes += (*rows)[l - 1] * g.W * g.C * (int64_t)sizeof(float);
    }
    return bytes;
  };
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> rows;
  int64_t rpb = 1;
  while (rpb < last.OH && sizes(rpb + 1, &rows) <= band_bytes) ++rpb;
  // at least one band per thread (batch 1: the threads split the image's rows)
  rpb = std::min(rpb, std::max<int64_t>(1, (last.OH * B + threads - 1) / threads / B));
  int64_t per_image = (last.OH + rpb - 1) / rpb;
  // as many bands in all as a multiple of the threads (where the rows allow), and bands of equal
  // height: the threads' shares are contiguous runs of bands, so uneven ones leave a thread idle
  // (batch 1, 56 rows, 2 threads: bands of 17 split 34 / 22 rows; of 14, 28 / 28)
  while (per_image < last.OH && (B * per_image) % threads != 0) ++per_image;
  rpb = (last.OH + per_image - 1) / per_image;
  per_image = (last.OH + rpb - 1) / rpb;
  sizes(rpb, &rows);
  // depthwise sub-band: about a quarter of the target, at least one row
  std::vector<int64_t> sub(m), offset(m + 1, 0);
  int64_t dw_floats = 0;
  for (int64_t l = 0; l < m; ++l) {
    const int64_t row_floats = L[l].g.OW * L[l].K;
    sub[l] = std::max<int64_t>(1, band_bytes / 4 / (row_floats * (int64_t)sizeof(float)));
    dw_floats = std::max(dw_floats, sub[l] * row_floats);
    if (l < m - 1) offset[l + 1] = offset[l] + rows[l] * L[l].g.OW * L[l].N;
  }
  const int64_t total_floats = offset[m - 1] + dw_floats + 16;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t img = x.size(1) * x.size(2) * x.size(3);

  // Small images, a band each, and packed weights over half of L2 (2 MiB for a 2-layer stack at
  // 512 channels): G whole images per task, every layer's projection one GEMM over all of them,
  // so the weights come from L3 once per task rather than once per image. G: as many images as
  // the band target holds (their intermediates and depthwise rows), the tasks a multiple of the
  // threads where the batch allows.
  int64_t G = 1, weight_bytes = 0;
  for (const StackLayer& s : L) weight_bytes += s.K * s.N * (int64_t)sizeof(float);
  if (per_image == 1 && B > 1 && weight_bytes > (1 << 20)) {
    int64_t inter = 0, dwi = 0;
    for (int64_t l = 0; l < m; ++l) {
      const Dw& g = L[l].g;
      if (l < m - 1) inter += g.OH * g.OW * L[l].N;
      dwi = std::max(dwi, g.OH * g.OW * L[l].K);
    }
    G = std::max<int64_t>(1, std::min<int64_t>(band_bytes / ((inter + dwi) * (int64_t)sizeof(float)),
                                               (B + threads - 1) / threads));
    while (G > 1 && ((B + G - 1) / G) % threads != 0) --G;
  }
  if (G > 1) {
    std::vector<int64_t> off(m + 1, 0);  // per layer: its G images' output (the last: y), then the depthwise rows
    int64_t dwg = 0;
    for (int64_t l = 0; l < m; ++l) {
      const Dw& g = L[l].g;
      off[l + 1] = off[l] + (l < m - 1 ? G * g.OH * g.OW * L[l].N : 0);
      dwg = std::max(dwg, G * g.OH * g.OW * L[l].K);
    }
    const int64_t tasks = (B + G - 1) / G, all = off[m] + dwg + 16;
    at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t end) {
      float* buf = stack_buffer.get(all);
      float* dwbuf = buf + off[m];
      for (int64_t task = first; task < end; ++task) {
        const int64_t n0 = task * G, ng = std::min(G, B - n0);
        for (int64_t l = 0; l < m; ++l) {
          const StackLayer& s = L[l];
          const Dw& g = s.g;
          const int64_t in_img = l == 0 ? img : g.H * g.W * g.C;  // an input image's floats
          const float* in = l == 0 ? xp + n0 * img : buf + off[l - 1];
          float* out = l == m - 1 ? yp + n0 * g.OH * g.OW * s.N : buf + off[l];
          for (int64_t i = 0; i < ng; ++i)
            for (int64_t r = 0; r < g.OH; ++r)
              s.row(in + i * in_img, s.dw, dwbuf + (i * g.OH + r) * g.OW * s.K, s.K, g, r);
          Epilogue e{s.bias, s.rs, s.res ? in : nullptr, s.relu};  // same shape: the images' input rows
          if (s.sparse.R > 0)
            sparse_band(dwbuf, ng * g.OH * g.OW, s.K, s.sparse, s.N, out, e);
          else
            band_gemm(dwbuf, ng * g.OH * g.OW, s.K, s.wp, s.N, out, e);
        }
      }
    });
    return y;
  }

  at::parallel_for(0, B * per_image, 1, [&](int64_t first, int64_t end) {
    float* buf = stack_buffer.get(total_floats);
    float* dwbuf = buf + offset[m - 1];
    std::vector<int64_t> lo(m), hi(m), plo(m), phi(m);
    int64_t prev_n = -1;
    for (int64_t task = first; task < end; ++task) {
      const int64_t n = task / per_image, band = task % per_image;
      lo[m - 1] = band * rpb;
      hi[m - 1] = std::min(last.OH, lo[m - 1] + rpb);
      for (int64_t l = m - 1; l > 0; --l) input_rows(L[l].g, lo[l], hi[l], &lo[l - 1], &hi[l - 1]);
      for (int64_t l = 0; l < m; ++l) {
        const StackLayer& s = L[l];
        const Dw& g = s.g;
        // this layer's input, addressed by image row (only rows [lo[l-1], hi[l-1]) are held)
        const float* in = l == 0 ? xp + n * img : buf + offset[l - 1] - lo[l - 1] * g.W * g.C;
        float* out = l == m - 1 ? yp + (n * g.OH + lo[l]) * g.OW * s.N : buf + offset[l];
        const float* res = s.res ? in + lo[l] * g.W * g.C : nullptr;  // same shape: input row = output row
        int64_t start = lo[l];
        if (l < m - 1 && prev_n == n && plo[l] <= lo[l] && lo[l] < phi[l]) {
          // the previous band of this image (this thread's) computed the halo rows: moved, not recomputed
          const int64_t row = g.OW * s.N;
          std::memmove(out, out + (lo[l] - plo[l]) * row, (phi[l] - lo[l]) * row * sizeof(float));
          start = phi[l];
        }
        for (int64_t a = start; a < hi[l]; a += sub[l]) {
          const int64_t b = std::min(hi[l], a + sub[l]);
          for (int64_t r = a; r < b; ++r) s.row(in, s.dw, dwbuf + (r - a) * g.OW * s.K, s.K, g, r);
          const int64_t done = (a - lo[l]) * g.OW * s.N;
          Epilogue e{s.bias, s.rs, res ? res + done : nullptr, s.relu};
          if (s.sparse.R > 0)
            sparse_band(dwbuf, (b - a) * g.OW, s.K, s.sparse, s.N, out + done, e);
          else
            band_gemm(dwbuf, (b - a) * g.OW, s.K, s.wp, s.N, out + done, e);
        }
      }
      prev_n = n;
      plo = lo;
      phi = hi;
    }
  });
  return y;
}

static leanconv_cpu::Register bind_sic([](pybind11::module_& m) {
  m.def("pack_projection", &pack_projection, "the projection in the GEMM's panel layout");
  m.def("sic_forward", &sic_forward, "fused depthwise + 1x1 projection + epilogue, band by band (NHWC float32)");
  m.def("sic_stack_forward", &sic_stack_forward, "a whole stack of SIC layers, band by band (NHWC float32)");
});
