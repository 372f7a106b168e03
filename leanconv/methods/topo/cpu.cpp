// A topological k x k conv (stride 1, any padding and dilation) on CPU with exactly its MACs, band
// of output rows by band: the band's input rows (with their halo) transposed into zero-padded
// planar rows (one plane of (rows + halo) rows of Wr floats per input channel: the W pixels, then
// a gap of zeros that is both this row's right padding and the next row's left padding), then
// every output channel accumulates over its own (input channel, tap) pairs: a tap is the plane
// shifted by dy * Wr + dx, so a k x k conv is the sparse projection of sparse.h over C * k * k
// shifted inputs. Outputs are computed on rows of Wr (the Wr - OW extra columns are discarded) and
// transposed back to NHWC with bias / residual / ReLU. NHWC float32 in and out.
#include "kernels.h"
#include "sparse.h"

using namespace leanconv_cpu;

namespace {

template <int R, int U>
void conv_rows(const float* at, const int64_t* off, const SparsePlan& s, float* yt, int64_t ldo, int64_t P) {
  // pixel blocks outer (groups outer timed the same, 128-512 channels)
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

thread_local Buffer conv_buffer;

}  // namespace

// relu?(topological conv(x) + bias + res_scale * residual), NHWC in and out, stride 1.
//   index / weights: the plan (sparse.h) over inputs channel * kh * kw + tap (tap = i * kw + j);
//   bias: (N,); res_scale: (N,) or undefined; residual: (B, N, OH, OW) or undefined.
at::Tensor topo_conv_forward(const at::Tensor& x_in, const at::Tensor& index, const at::Tensor& weights,
                             const at::Tensor& bias, const c10::optional<at::Tensor>& res_scale,
                             const c10::optional<at::Tensor>& residual, std::vector<int64_t> kernel,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation, bool relu,
                             int64_t band_bytes) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "leanconv cpu topo: x must be a 4-D float32 CPU tensor");
  at::Tensor x = nhwc(x_in);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = bias.size(0);
  const int64_t kh = kernel[0], kw = kernel[1], ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(kh > 0 && kw > 0 && ph >= 0 && pw >= 0 && dh > 0 && dw > 0, "leanconv cpu topo: bad geometry");
  const int64_t T = kh * kw;
  at::Tensor idx = index.contiguous(), wts = weights.contiguous(), bc = bias.contiguous();
  const SparsePlan plan = sparse_plan_of(idx, wts, C * T, N);
  const int64_t OH = H + 2 * ph - dh * (kh - 1), OW = W + 2 * pw - dw * (kw - 1);
  at::Tensor y = at::empty({B, N, std::max<int64_t>(OH, 0), std::max<int64_t>(OW, 0)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (B == 0 || OH <= 0 || OW <= 0) return y;
  at::Tensor res, rs;
  if (residual.has_value() && residual->defined()) {
    res = nhwc(*residual);
    TORCH_CHECK(res.sizes() == y.sizes(), "leanconv cpu topo: residual shape ", res.sizes(), " != output ", y.sizes());
    if (res_scale.has_value() && res_scale->defined()) rs = res_scale->contiguous();
  }
  // row stride: the pixels and one gap of zeros, wide enough for the left taps' reach (pw) and the
  // right taps' ((kw - 1) dw - pw); 3x3 'same': W + 1 (W + 2 with a gap per side: 29% more work at 7x7)
  const int64_t gap = std::max<int64_t>(pw, (kw - 1) * dw - pw);
  const int64_t Wp = std::max(W + gap, OW), halo = (kh - 1) * dh;
  const int64_t threads = at::get_num_threads();
  // output rows per band: the planar input band near band_bytes, at least two bands per thread
  int64_t rpb = std::max<int64_t>(1, band_bytes / std::max<int64_t>(1, C * Wp * (int64_t)sizeof(float)) - halo);
  rpb = std::min(rpb, std::max<int64_t>(1, (B * OH + 2 * threads - 1) / (2 * threads)));
  rpb = std::min(rpb, OH);
  const int64_t per_image = (OH + rpb - 1) / rpb;
  const int64_t P = rpb * Wp;                                                       // padded output pixels
  constexpr int U = SPARSE_PIXELS / 16;  // (R, U) = (2, 8), (4, 6), (4, 2) timed within 5-10% of U = 4
  const int64_t pend = (P + SPARSE_PIXELS - 1) / SPARSE_PIXELS * SPARSE_PIXELS;     // computed pixels
  const int64_t reach = halo * Wp + (kw - 1) * dw;                                  // farthest tap
  // + 16: to_planar's last block of a row writes (zeros) up to 15 columns past the row
  // + pw: the lead of zeros the first row's left taps read; + 16: the last row's to_planar spill
  const int64_t ld = odd_lines(std::max(pend + reach, pw + (rpb + halo) * Wp + 16));
  const int64_t ldo = odd_lines(pend);
  // each input's offset into the planar band: channel plane + tap shift
  std::vector<int64_t> off(plan.ptr[plan.G]);
  for (size_t e = 0; e < off.size(); ++e) {
    const int64_t c = plan.idx[e] / T, t = plan.idx[e] % T;
    off[e] = c * ld + (t / kw) * dh * Wp + (t % kw) * dw;
  }
  const float* xp = x.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const float* rsp = rs.defined() ? rs.data_ptr<float>() : nullptr;
  const float* resp = res.defined() ? res.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  at::parallel_for(0, B * per_image, 1, [&](int64_t first, int64_t end) {
    float* at_ = conv_buffer.get(C * ld + N * ldo + 16);  // + 16: from_planar's last block may read past
    float* yt = at_ + C * ld;
    for (int64_t task = first; task < end; ++task) {
      const int64_t n = task / per_image, r0 = task % per_image * rpb, r1 = std::min(OH, r0 + rpb);
      // zero everything the taps may read: padding, rows outside the image, the block tails (no
      // garbage: denormals cost a microcode assist per FMA)
      std::memset(at_, 0, C * ld * sizeof(float));
      for (int64_t i = 0; i < (r1 - r0) + halo; ++i) {
        const int64_t ih = r0 - ph + i;
        if (ih < 0 || ih >= H) continue;
        to_planar(xp + (n * H + ih) * W * C, W, C, at_ + pw + i * Wp, ld, W);
      }
      const int64_t Pb = (r1 - r0) * Wp;
      if (plan.R == 1) conv_rows<1, U>(at_, off.data(), plan, yt, ldo, Pb);
      else if (plan.R == 2) conv_rows<2, U>(at_, off.data(), plan, yt, ldo, Pb);
      else conv_rows<4, U>(at_, off.data(), plan, yt, ldo, Pb);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = (n * OH + r) * OW * N;
        Epilogue e{bp, rsp, resp ? resp + o : nullptr, relu};
        from_planar(yt + (r - r0) * Wp, ldo, OW, N, yp + o, e);
      }
    }
  });
  return y;
}

static leanconv_cpu::Register bind_topo([](pybind11::module_& m) {
  m.def("topo_conv_forward", &topo_conv_forward,
        "topological k x k conv (stride 1) with exactly its MACs, band by band (NHWC float32)");
});
