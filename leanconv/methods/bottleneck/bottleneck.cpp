// Spatial bottleneck layer on CPU in one pass (and a whole stack of them): band of reduced rows by
// band, the k x k stride-k depthwise `down` into a per-thread buffer, the projection as the band GEMM
// of kernels.h (its bias on store), then the stride-k depthwise transposed `up` + bias + residual
// (x res_scale) + ReLU written straight into the cropped NHWC output. Offsets 0..k-1, any size.
// NHWC (channels_last) float32 in and out.
#include "kernels.h"

using namespace leanconv_cpu;

namespace {

// One bottleneck layer. Input (H, W, C), output (H, W, N); the cells are k x k blocks of the input
// padded by `off` before, reduced grid rh x rw = ceil((H + off) / k) x ceil((W + off) / k).
struct Bn {
  int64_t H, W, C, N, k, off, rh, rw;
  const float* down;   // (k*k, C)
  const float* wp;     // projection (C, N), packed by pack_projection
  const float* pbias;  // (N,): the projection's bias (down's bias folded in)
  const float* up;     // (k*k, N)
  const float* bias;   // (N,)
  const float* rs;     // (N,) or null
  bool relu;
};

// Reduced row r of `down`, all rw cells, into z (rw x C). `in` is addressed by image row (only the
// cell's rows inside [0, H) are read).
template <int K_>
void down_row(const Bn& g, const float* in, int64_t r, float* z) {
  const int64_t k = K_ ? K_ : g.k, C = g.C, cv = C / 16 * 16;
  const float* rows[16];
  int64_t nrows = 0, taps[16];
  for (int64_t a = 0; a < k; ++a) {
    const int64_t ih = r * k - g.off + a;
    if (ih >= 0 && ih < g.H) {
      rows[nrows] = in + ih * g.W * C;
      taps[nrows++] = a;
    }
  }
  for (int64_t c = 0; c < g.rw; ++c) {
    const int64_t col0 = c * k - g.off;
    float* zc = z + c * C;
    if (col0 >= 0 && col0 + k <= g.W) {  // every column of the cell exists
      for (int64_t ch = 0; ch < cv; ch += 16) {
        v16 acc = {};
        for (int64_t i = 0; i < nrows; ++i) {
          const float* xr = rows[i] + col0 * C + ch;
          const float* w = g.down + taps[i] * k * C + ch;
          for (int64_t b = 0; b < k; ++b) acc += load<v16>(xr + b * C) * load<v16>(w + b * C);
        }
        store<v16>(zc + ch, acc);
      }
      for (int64_t ch = cv; ch < C; ++ch) {
        float acc = 0.0f;
        for (int64_t i = 0; i < nrows; ++i)
          for (int64_t b = 0; b < k; ++b) acc += rows[i][(col0 + b) * C + ch] * g.down[(taps[i] * k + b) * C + ch];
        zc[ch] = acc;
      }
    } else {
      const int64_t b0 = std::max<int64_t>(0, -col0), b1 = std::min<int64_t>(k, g.W - col0);
      for (int64_t ch = 0; ch < cv; ch += 16) {
        v16 acc = {};
        for (int64_t i = 0; i < nrows; ++i)
          for (int64_t b = b0; b < b1; ++b)
            acc += load<v16>(rows[i] + (col0 + b) * C + ch) * load<v16>(g.down + (taps[i] * k + b) * C + ch);
        store<v16>(zc + ch, acc);
      }
      for (int64_t ch = cv; ch < C; ++ch) {
        float acc = 0.0f;
        for (int64_t i = 0; i < nrows; ++i)
          for (int64_t b = b0; b < b1; ++b) acc += rows[i][(col0 + b) * C + ch] * g.down[(taps[i] * k + b) * C + ch];
        zc[ch] = acc;
      }
    }
  }
}

// Output row p (image row) of `up` from its reduced row z (rw x N): out[p, q, n] = relu?(z[(q + off)
// / k, n] * up[(p + off) % k, (q + off) % k, n] + bias[n] + rs[n] * res[p, q, n]). out and res are
// the row's start. The epilogue's switches are compile-time and every operand a local (a store
// through `out` could otherwise alias the layer's fields, which then reload per vector).
template <int K_, bool RES, bool RS, bool RELU>
void up_row(const Bn& g, const float* z, int64_t p, float* out, const float* res) {
  const int64_t k = K_ ? K_ : g.k, N = g.N, nv = N / 16 * 16, W = g.W, rw = g.rw, off = g.off;
  const float* ua = g.up + ((p + off) % k) * k * N;
  const float* bias = g.bias;
  const float* rs = g.rs;
  for (int64_t c = 0; c < rw; ++c) {
    const float* zc = z + c * N;
    const int64_t q0 = c * k - off;
    const int64_t t0 = std::max<int64_t>(0, -q0), t1 = std::min<int64_t>(k, W - q0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q = q0 + t;
      const float* u = ua + t * N;
      float* o = out + q * N;
      const float* rr = RES ? res + q * N : nullptr;
      for (int64_t n = 0; n < nv; n += 16) {
        v16 v = load<v16>(zc + n) * load<v16>(u + n) + load<v16>(bias + n);
        if constexpr (RES) v += (RS ? load<v16>(rs + n) : v16{} + 1.0f) * load<v16>(rr + n);
        if constexpr (RELU) v = v > 0.0f ? v : v16{};
        store<v16>(o + n, v);
      }
      for (int64_t n = nv; n < N; ++n) {
        float v = zc[n] * u[n] + bias[n];
        if constexpr (RES) v += (RS ? rs[n] : 1.0f) * rr[n];
        o[n] = RELU && v < 0.0f ? 0.0f : v;
      }
    }
  }
}

using UpFn = void (*)(const Bn&, const float*, int64_t, float*, const float*);

template <int K_>
UpFn pick_up(bool res, bool rs, bool relu) {
  if (!res) return relu ? up_row<K_, false, false, true> : up_row<K_, false, false, false>;
  if (rs) return relu ? up_row<K_, true, true, true> : up_row<K_, true, true, false>;
  return relu ? up_row<K_, true, false, true> : up_row<K_, true, false, false>;
}

// Output rows [p0, p1) of one image: `in`, `out` and `res` (null: none) addressed by image row (row
// ih at in + ih * W * C). Reduced rows go `sub` at a time through zbuf (sub * rw * C floats) and
// z2buf (sub * rw * N). carry (rw * N floats, or null): the projection output of reduced row
// *carry_row, kept from the previous call; used if that is the first row needed here, and replaced
// by the last row computed (a stack's bands cut the cells they share at their edges).
template <int K_>
void bn_rows(const Bn& g, const float* in, float* out, const float* res, int64_t p0, int64_t p1, int64_t sub,
             float* zbuf, float* z2buf, float* carry, int64_t* carry_row) {
  if (p0 >= p1) return;
  const int64_t k = K_ ? K_ : g.k, rowf = g.W * g.N;
  const int64_t rf = (p0 + g.off) / k, rl = (p1 - 1 + g.off) / k + 1;
  const Epilogue e{g.pbias, nullptr, nullptr, false};
  const UpFn up = pick_up<K_>(res != nullptr, g.rs != nullptr, g.relu);
  int64_t r0 = rf;
  if (carry && *carry_row == rf) {
    for (int64_t p = p0, b = std::min(p1, (rf + 1) * k - g.off); p < b; ++p)
      up(g, carry, p, out + p * rowf, res ? res + p * rowf : nullptr);
    r0 = rf + 1;
  }
  for (; r0 < rl; r0 += sub) {
    const int64_t r1 = std::min(rl, r0 + sub);
    for (int64_t r = r0; r < r1; ++r) down_row<K_>(g, in, r, zbuf + (r - r0) * g.rw * g.C);
    band_gemm(zbuf, (r1 - r0) * g.rw, g.C, g.wp, g.N, z2buf, e);
    const int64_t a = std::max(p0, r0 * k - g.off), b = std::min(p1, r1 * k - g.off);
    for (int64_t p = a; p < b; ++p)
      up(g, z2buf + ((p + g.off) / k - r0) * g.rw * g.N, p, out + p * rowf, res ? res + p * rowf : nullptr);
    if (carry && r1 == rl) {
      std::memcpy(carry, z2buf + (rl - 1 - r0) * g.rw * g.N, g.rw * g.N * sizeof(float));
      *carry_row = rl - 1;
    }
  }
}

using RowsFn = void (*)(const Bn&, const float*, float*, const float*, int64_t, int64_t, int64_t, float*, float*, float*,
                        int64_t*);

RowsFn pick_rows(int64_t k) {
  if (k == 2) return bn_rows<2>;
  if (k == 3) return bn_rows<3>;
  return bn_rows<0>;
}

// the layer's geometry and operand pointers (operands checked against it)
Bn make_bn(int64_t H, int64_t W, int64_t C, const at::Tensor& down, const at::Tensor& wp, const at::Tensor& pbias,
           const at::Tensor& up, const at::Tensor& bias, const float* rs, int64_t k, int64_t off, bool relu) {
  TORCH_CHECK(k >= 2 && k <= 16 && off >= 0 && off < k, "leanconv cpu bottleneck: bad k / offset");
  Bn g;
  g.H = H; g.W = W; g.C = C; g.N = bias.size(0); g.k = k; g.off = off;
  g.rh = (H + off + k - 1) / k;
  g.rw = (W + off + k - 1) / k;
  TORCH_CHECK(down.dim() == 2 && down.size(0) == k * k && down.size(1) == C,
              "leanconv cpu bottleneck: down filters (k*k, C) do not match the input");
  TORCH_CHECK(up.dim() == 2 && up.size(0) == k * k && up.size(1) == g.N && pbias.numel() == g.N,
              "leanconv cpu bottleneck: bad up filters / biases");
  TORCH_CHECK(wp.dim() == 3 && wp.size(0) == (g.N + NR - 1) / NR && wp.size(1) == C && wp.size(2) == NR,
              "leanconv cpu bottleneck: the projection is not packed for this build (pack_projection)");
  for (const at::Tensor* t : {&down, &wp, &pbias, &up, &bias})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat, "leanconv cpu bottleneck: operands must be contiguous float32");
  g.down = down.data_ptr<float>();
  g.wp = wp.data_ptr<float>();
  g.pbias = pbias.data_ptr<float>();
  g.up = up.data_ptr<float>();
  g.bias = bias.data_ptr<float>();
  g.rs = rs;
  g.relu = relu;
  return g;
}

// reduced rows per sub-band: z and z2 of `sub` reduced rows within `bytes`
inline int64_t sub_rows(const Bn& g, int64_t bytes) {
  return std::max<int64_t>(1, bytes / (g.rw * (g.C + g.N) * (int64_t)sizeof(float)));
}

thread_local Buffer bn_stack_buffer;

}  // namespace

// relu?(up(project(down(pad(x)))) cropped + bias + res_scale * residual), NHWC in and out.
//   down: (k*k, C); weight: projection (C, N) packed; pbias: (N,) the projection's bias; up: (k*k, N);
//   bias: (N,); res_scale: (N,) or none; residual: (B, N, H, W) or none. band_bytes: target size of
//   the per-thread buffer of reduced rows (down's and the projection's outputs).
at::Tensor bottleneck_forward(const at::Tensor& x_in, const at::Tensor& down, const at::Tensor& weight,
                              const at::Tensor& pbias, const at::Tensor& up, const at::Tensor& bias,
                              const c10::optional<at::Tensor>& res_scale, const c10::optional<at::Tensor>& residual,
                              int64_t k, int64_t offset, bool relu, int64_t band_bytes) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "leanconv cpu bottleneck: x must be a 4-D float32 CPU tensor");
  at::Tensor x = nhwc(x_in);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor res, rs;
  if (residual.has_value() && residual->defined()) {
    res = nhwc(*residual);
    if (res_scale.has_value() && res_scale->defined()) rs = res_scale->contiguous();
  }
  Bn g = make_bn(H, W, C, down, weight, pbias, up, bias, rs.defined() ? rs.data_ptr<float>() : nullptr, k, offset, relu);
  at::Tensor y = at::empty({B, g.N, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (res.defined())
    TORCH_CHECK(res.sizes() == y.sizes(), "leanconv cpu bottleneck: residual shape ", res.sizes(), " != output ", y.sizes());
  if (B == 0 || H == 0 || W == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* resp = res.defined() ? res.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // bands of reduced rows; at least two per thread where there are rows enough
  const int64_t threads = at::get_num_threads();
  int64_t rpb = sub_rows(g, band_bytes);
  rpb = std::min(rpb, std::max<int64_t>(1, (B * g.rh + 2 * threads - 1) / (2 * threads) / B));
  rpb = std::min(rpb, g.rh);
  const int64_t per_image = (g.rh + rpb - 1) / rpb;
  const int64_t in_img = H * W * C, out_img = H * W * g.N;
  RowsFn rows = pick_rows(k);
  at::parallel_for(0, B * per_image, 1, [&](int64_t first, int64_t end) {
    float* buf = band_buffer.get(rpb * g.rw * (g.C + g.N));
    for (int64_t task = first; task < end; ++task) {
      const int64_t n = task / per_image, band = task % per_image;
      const int64_t r0 = band * rpb, r1 = std::min(g.rh, r0 + rpb);
      const int64_t p0 = std::max<int64_t>(0, r0 * k - offset), p1 = std::min<int64_t>(H, r1 * k - offset);
      rows(g, xp + n * in_img, yp + n * out_img, resp ? resp + n * out_img : nullptr, p0, p1, rpb, buf,
           buf + rpb * g.rw * g.C, nullptr, nullptr);
    }
  });
  return y;
}

// ----------------------------------------------------------------------- a whole stack of them
// m bottleneck layers (each layer's input its residual where flagged) band of the last layer's
// output rows by band: the intermediate rows live in the per-thread buffer only. A layer's output
// rows [lo, hi) read its input rows of the cells they lie in; a band that follows its image's
// previous band on the same thread moves the rows that band already computed instead of
// recomputing them, and takes the projection output of the reduced row of a cell cut by the band
// edge from that band too (offsets alternate, so a band edge cuts the cells of every layer but one).

// x -> layer_{m-1}(... layer_0(x)). Per layer l: downs[l] (k*k, C_l), weights[l] packed, pbiases[l],
//   ups[l] (k*k, N_l), biases[l], res_scales[l] (N_l,) or empty (scale 1); geometry: 2 ints per
//   layer (k, offset); relu, residual: per layer. band_bytes: target of the per-thread buffer of
//   intermediate rows.
at::Tensor bottleneck_stack_forward(const at::Tensor& x_in, const std::vector<at::Tensor>& downs,
                                    const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& pbiases,
                                    const std::vector<at::Tensor>& ups, const std::vector<at::Tensor>& biases,
                                    const std::vector<at::Tensor>& res_scales, std::vector<int64_t> geometry,
                                    std::vector<bool> relu, std::vector<bool> residual, int64_t band_bytes) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "leanconv cpu bottleneck stack: x must be a 4-D float32 CPU tensor");
  const int64_t m = (int64_t)downs.size();
  TORCH_CHECK(m >= 1 && (int64_t)weights.size() == m && (int64_t)pbiases.size() == m && (int64_t)ups.size() == m &&
                  (int64_t)biases.size() == m && (int64_t)res_scales.size() == m && (int64_t)geometry.size() == 2 * m &&
                  (int64_t)relu.size() == m && (int64_t)residual.size() == m,
              "leanconv cpu bottleneck stack: one set of operands per layer");
  at::Tensor x = nhwc(x_in);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  std::vector<Bn> L(m);
  std::vector<RowsFn> fns(m);
  int64_t C = x.size(1);
  for (int64_t l = 0; l < m; ++l) {
    const float* rs = nullptr;
    if (residual[l] && res_scales[l].defined() && res_scales[l].numel() > 0) {
      TORCH_CHECK(res_scales[l].is_contiguous() && res_scales[l].numel() == biases[l].size(0),
                  "leanconv cpu bottleneck stack: bad residual scale");
      rs = res_scales[l].data_ptr<float>();
    }
    L[l] = make_bn(H, W, C, downs[l], weights[l], pbiases[l], ups[l], biases[l], rs, geometry[2 * l],
                   geometry[2 * l + 1], relu[l]);
    if (residual[l]) TORCH_CHECK(L[l].N == C, "leanconv cpu bottleneck stack: layer ", l, " has a residual but changes the channels");
    fns[l] = pick_rows(L[l].k);
    C = L[l].N;
  }
  at::Tensor y = at::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (B == 0 || H == 0 || W == 0) return y;

  // input rows [lo, hi) that output rows [a, b) of layer l read (the cells they lie in, clipped)
  auto need = [&](int64_t l, int64_t a, int64_t b, int64_t* lo, int64_t* hi) {
    const Bn& g = L[l];
    *lo = std::max<int64_t>(0, (a + g.off) / g.k * g.k - g.off);
    *hi = std::min<int64_t>(H, ((b - 1 + g.off) / g.k + 1) * g.k - g.off);
  };
  // rows of every intermediate a band of r output rows holds at most
  auto held = [&](int64_t r, std::vector<int64_t>* rows) {
    rows->assign(m, 0);
    for (int64_t a = 0; a < H; a += r) {
      int64_t lo = a, hi = std::min(H, a + r);
      for (int64_t l = m - 1; l > 0; --l) {
        need(l, lo, hi, &lo, &hi);
        (*rows)[l - 1] = std::max((*rows)[l - 1], hi - lo);
      }
    }
    int64_t bytes = 0;
    for (int64_t l = 0; l < m - 1; ++l) bytes += (*rows)[l] * W * L[l].N * (int64_t)sizeof(float);
    return bytes;
  };
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> rows;
  int64_t rpb = 1;
  while (rpb < H && held(rpb + 1, &rows) <= band_bytes) ++rpb;
  // at least one band per thread (batch 1: the threads split the image's rows)
  rpb = std::min(rpb, std::max<int64_t>(1, (H * B + threads - 1) / threads / B));
  const int64_t per_image = (H + rpb - 1) / rpb;
  held(rpb, &rows);
  // each intermediate's rows slide through a window of kSlack times the rows a band holds: a band
  // appends its rows after the previous band's, and only when the window is full are the rows it
  // still needs moved to the window's start (not once per band)
  constexpr int64_t kSlack = 4;
  std::vector<int64_t> offset(m + 1, 0), sub(m), cap(m);
  int64_t zfloats = 0;
  for (int64_t l = 0; l < m; ++l) {
    sub[l] = sub_rows(L[l], band_bytes / 4);
    zfloats = std::max(zfloats, sub[l] * L[l].rw * (L[l].C + L[l].N));
    cap[l] = kSlack * rows[l];
    if (l < m - 1) offset[l + 1] = offset[l] + cap[l] * W * L[l].N;
  }
  int64_t carry_floats = 0;  // one reduced row of projection output per layer
  for (int64_t l = 0; l < m; ++l) carry_floats = std::max(carry_floats, L[l].rw * L[l].N);
  const int64_t total = offset[m - 1] + zfloats + m * carry_floats + 16;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t in_img = x.size(1) * H * W;

  at::parallel_for(0, B * per_image, 1, [&](int64_t first, int64_t end) {
    float* buf = bn_stack_buffer.get(total);
    float* zbuf = buf + offset[m - 1];
    float* carries = zbuf + zfloats;
    std::vector<int64_t> lo(m), hi(m), plo(m), phi(m), carry_row(m, -1), base(m, 0);
    int64_t prev_n = -1;
    for (int64_t task = first; task < end; ++task) {
      const int64_t n = task / per_image, band = task % per_image;
      lo[m - 1] = band * rpb;
      hi[m - 1] = std::min(H, lo[m - 1] + rpb);
      for (int64_t l = m - 1; l > 0; --l) need(l, lo[l], hi[l], &lo[l - 1], &hi[l - 1]);
      if (prev_n != n) std::fill(carry_row.begin(), carry_row.end(), -1);
      for (int64_t l = 0; l < m; ++l) {
        const Bn& g = L[l];
        // this layer's input and output, addressed by image row (window row 0 is image row base[l])
        const float* in = l == 0 ? xp + n * in_img : buf + offset[l - 1] - base[l - 1] * W * g.C;
        int64_t start = lo[l];
        if (l < m - 1) {
          if (prev_n == n && plo[l] <= lo[l] && lo[l] < phi[l]) {
            // the previous band of this image (this thread's) computed rows [lo, phi): kept
            start = phi[l];
            if (hi[l] - base[l] > cap[l]) {  // the window is full: move them to its start
              const int64_t row = W * g.N;
              float* w0 = buf + offset[l];
              std::memmove(w0, w0 + (lo[l] - base[l]) * row, (phi[l] - lo[l]) * row * sizeof(float));
              base[l] = lo[l];
            }
          } else {
            base[l] = lo[l];
          }
        }
        float* out = l == m - 1 ? yp + n * H * W * g.N : buf + offset[l] - base[l] * W * g.N;
        fns[l](g, in, out, residual[l] ? in : nullptr, start, hi[l], sub[l], zbuf, zbuf + sub[l] * g.rw * g.C,
               carries + l * carry_floats, &carry_row[l]);
      }
      prev_n = n;
      plo = lo;
      phi = hi;
    }
  });
  return y;
}

static leanconv_cpu::Register bind_bottleneck([](pybind11::module_& m) {
  m.def("bottleneck_forward", &bottleneck_forward,
        "fused spatial bottleneck (down, projection, up + epilogue), band of reduced rows by band (NHWC float32)");
  m.def("bottleneck_stack_forward", &bottleneck_stack_forward,
        "a whole stack of spatial bottleneck layers, band by band (NHWC float32)");
});
