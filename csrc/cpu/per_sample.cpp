// CPU kernels of the per-sample gradient ops (docs/algorithms.md §3–4) and of DP-SAT's multi-tensor passes.
//
// GEMMs and convolution weight-gradients go through ATen (oneDNN / MKL / OpenBLAS): that is where the
// FLOPs are, and no hand-written loop beats those libraries there. The work is arranged here: per-example
// conv gradients as one dense weight-gradient per example (or one batched GEMM for 1×1 and small fan-in),
// an im2col of our own for the ghost route, the Philox noise added to each result in place. Everything
// around the GEMMs is written here as at::parallel_for loops: per-example squared norms straight from the
// Gram matrices or the per-example gradients (no squared temporaries), the norm-layer gradients in one
// pass over x̂ and g, and the multi-tensor norm / perturb of DP-SAT.
//
// Accumulation (dpsat_fast/ops/error_bounds.py derives its worst-case error from what follows): GEMMs
// and convolution weight-gradients in float32 (float64 for float64 inputs). Every sum of squares that
// makes a squared norm is wide: float32 partial sums over at most kWideBlock = 256 consecutive terms,
// added in float64 (float64 throughout for float64 inputs); the ghost route's double sum Σ_{t,s} Â_ts·Ĝ_ts
// takes exact float64 products of the float32 Gram entries and a float64 sum; a per-example result is
// rounded to float32 once, at the end. The clipped sums reduce the B·T rows (examples × positions) in
// blocks of at most kClippedSumBlockRows rows (a whole example when it has more positions), one GEMM or
// convolution weight-gradient per block, and add the block results in order. Our own reductions keep 16
// independent partial sums so that the compiler vectorizes them without reassociating (no -ffast-math),
// and every reduction has a fixed order: results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/noise.h"

namespace dpsat_fast {
namespace {

// Element budget of one batch chunk's temporaries ([b, T, T] Grams or [b, P, D] per-example grads).
constexpr int64_t kChunkElements = int64_t{1} << 24;
// Elements per task in the element-wise parallel loops.
constexpr int64_t kGrain = int64_t{1} << 15;
constexpr int kLanes = 16;
// Consecutive float32 terms summed in float32 before the float64 total of a wide sum of squares.
constexpr int64_t kWideBlock = 256;
// K0: rows (examples × positions) a clipped sum reduces at once before adding the block to the running
// sum. Must equal CLIPPED_SUM_BLOCK_ROWS of dpsat_fast/ops/torch_impl.py, from which the error bounds of
// dpsat_fast/ops/error_bounds.py are computed (tests/test_error_bounds.py checks that they agree).
constexpr int64_t kClippedSumBlockRows = 1024;

at::ScalarType accum_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor to_accum(const at::Tensor& t) {
  return t.to(accum_type(t));
}

at::Tensor accum_empty(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().dtype(accum_type(like)));
}

int64_t chunk_size(int64_t per_example) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(per_example, 1));
}

void check_floating_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": ", name, " must be float32, float64, bfloat16 or float16, got ", dt);
}

void check_route(const char* op, c10::string_view route) {
  TORCH_CHECK(route == "ghost" || route == "instantiate", op,
              ": route must be 'ghost' or 'instantiate', got '", std::string(route), "'");
}

void check_noise(const char* op, int64_t seed, int64_t offset, int64_t numel, double noise_std) {
  cpu::check_seed_offset(op, seed, offset, numel);
  TORCH_CHECK(std::isfinite(noise_std) && noise_std >= 0.0, op,
              ": noise_std must be finite and non-negative, got ", noise_std);
}

// ---------------------------------------------------------------------------------------------
// vectorizable reductions
// ---------------------------------------------------------------------------------------------

// Σ_j term(j) for j < n with kLanes independent partial sums (one per lane), added in a fixed order.
template <typename T, typename Term>
inline T lane_sum(int64_t n, Term term) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += term(j + l);
  }
  for (int l = 0; j < n; ++j, ++l) acc[l] += term(j);
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

template <typename T>
T sum_squares(const T* x, int64_t n) {
  return lane_sum<T>(n, [x](int64_t j) { return x[j] * x[j]; });
}

template <typename T>
T dot(const T* x, const T* y, int64_t n) {
  return lane_sum<T>(n, [x, y](int64_t j) { return x[j] * y[j]; });
}

template <typename T>
T sum(const T* x, int64_t n) {
  return lane_sum<T>(n, [x](int64_t j) { return x[j]; });
}

// Σ x² of float32 data with a float64 total: float32 partial sums over kWideBlock-element blocks only, so
// the rounding error does not grow with n (a global norm over millions of parameters).
double sum_squares_wide(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t s = 0; s < n; s += kWideBlock) total += sum_squares(x + s, std::min(kWideBlock, n - s));
  return total;
}

double sum_squares_wide(const double* x, int64_t n) {
  return sum_squares(x, n);
}

// ⟨x, y⟩ with exact float64 products (of float32 or float64 data) and a float64 sum.
template <typename T>
double dot_wide(const T* x, const T* y, int64_t n) {
  return lane_sum<double>(n, [x, y](int64_t j) { return static_cast<double>(x[j]) * static_cast<double>(y[j]); });
}

int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(row_length, 1));
}

// out[r] = Σ_k x[r, k]² by the wide sum (x: [rows, ...] contiguous, float32 or float64; out: float64).
void row_sq_norms_wide_into(const at::Tensor& x, at::Tensor out) {
  const int64_t rows = x.size(0), k = x.numel() / std::max<int64_t>(rows, 1);
  double* po = out.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_sq_norms_wide", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) po[r] = sum_squares_wide(px + r * k, k);
    });
  });
}

// Σ_k x[r, k]² for each row r of x [rows, ...] (accumulation dtype, any strides): float64 [rows].
at::Tensor row_sq_norms_wide(const at::Tensor& x) {
  at::Tensor c = x.contiguous();
  at::Tensor out = at::empty({c.size(0)}, c.options().dtype(at::kDouble));
  row_sq_norms_wide_into(c, out);
  return out;
}

// out[r] = ⟨x[r], y[r]⟩ with exact float64 products and a float64 sum (x, y: [rows, K] contiguous,
// float32 or float64; out: float64).
void row_dots_wide_into(const at::Tensor& x, const at::Tensor& y, at::Tensor out) {
  const int64_t rows = x.size(0), k = x.numel() / std::max<int64_t>(rows, 1);
  double* po = out.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_dots_wide", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* py = y.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(k), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) po[r] = dot_wide(px + r * k, py + r * k, k);
    });
  });
}

// Per-example sums Σ_t g_{i,t}: g [B, T, P] (any strides) -> [B, P] in the accumulation dtype.
at::Tensor per_example_sums(const at::Tensor& g3) {
  // [B, T, P] -> [B, P]: ATen's reduction is vectorized and parallel already, and reads g once
  return g3.sum(1, /*keepdim=*/false, accum_type(g3));
}

// ---------------------------------------------------------------------------------------------
// convolution helpers
// ---------------------------------------------------------------------------------------------

// g [B, C, *S] as [B, T, C] (a transposed view), T = ∏S; also for B = 0.
at::Tensor positions_by_channels(const at::Tensor& g) {
  int64_t t = 1;
  for (int64_t d = 2; d < g.dim(); ++d) t *= g.size(d);
  return g.reshape({g.size(0), g.size(1), t}).transpose(1, 2);
}

// 2-D im2col: x [B, C, H, W] (any strides) -> [B, C·kh·kw, Ho·Wo], rows in weight layout order. One
// task per (example, channel) writes its kh·kw rows; at::im2col loops over short rows and is several
// times slower for the small feature maps of deep layers (8×8, 4×4).
template <typename T>
void im2col_kernel(const T* x, std::array<int64_t, 4> xs, int64_t B, int64_t C, int64_t H, int64_t W,
                   int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                   int64_t dw, int64_t Ho, int64_t Wo, T* out) {
  const int64_t L = Ho * Wo;
  at::parallel_for(0, B * C, row_grain(kh * kw * L), [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const T* xc = x + b * xs[0] + c * xs[1];
      T* rows = out + bc * kh * kw * L;  // [B, C, kh, kw, L] = [B, C·kh·kw, L]
      for (int64_t i = 0; i < kh; ++i) {
        for (int64_t j = 0; j < kw; ++j) {
          T* row = rows + (i * kw + j) * L;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const int64_t ih = oh * sh - ph + i * dh;
            T* dst = row + oh * Wo;
            if (ih < 0 || ih >= H) {
              std::fill(dst, dst + Wo, T(0));
              continue;
            }
            // columns ow with 0 <= ow·sw + shift < W read the input, the others are padding
            const int64_t shift = j * dw - pw;
            const int64_t lo = std::min(Wo, shift >= 0 ? int64_t{0} : (-shift + sw - 1) / sw);
            const int64_t hi = std::max(lo, std::min(Wo, W - shift > 0 ? (W - shift + sw - 1) / sw : int64_t{0}));
            std::fill(dst, dst + lo, T(0));
            std::fill(dst + hi, dst + Wo, T(0));
            const T* src = xc + ih * xs[2];
            if (sw == 1 && xs[3] == 1) {
              std::copy(src + lo + shift, src + hi + shift, dst + lo);
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[(ow * sw + shift) * xs[3]];
            }
          }
        }
      }
    }
  });
}

at::Tensor im2col_2d(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                     at::IntArrayRef d) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) / s[0] + 1;
  const int64_t Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) / s[1] + 1;
  at::Tensor out = at::empty({B, C * k[0] * k[1], Ho * Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "im2col_2d", [&] {
    im2col_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}, B,
                            C, H, W, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], Ho, Wo,
                            out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// im2col: x [B, C, *S] (accumulation dtype) -> [B, C·∏k, T] (weight layout order), 1-D, 2-D and 3-D.
at::Tensor unfold_patches(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t n = static_cast<int64_t>(kernel.size());
  if (n == 2) return im2col_2d(x, kernel, stride, padding, dilation);
  if (n == 1) {
    return im2col_2d(x.unsqueeze(2), {1, kernel[0]}, {1, stride[0]}, {0, padding[0]}, {1, dilation[0]});
  }
  at::Tensor v = x;
  bool padded = false;
  for (auto p : padding) padded = padded || p != 0;
  if (padded) {
    std::vector<int64_t> pad;
    for (int64_t d = n - 1; d >= 0; --d) {
      pad.push_back(padding[d]);
      pad.push_back(padding[d]);
    }
    v = at::constant_pad_nd(v, pad, 0);
  }
  for (int64_t d = 0; d < n; ++d) {
    v = v.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d]);  // appends a window dim
  }
  std::vector<at::indexing::TensorIndex> idx(2 + n, at::indexing::Slice());
  for (int64_t d = 0; d < n; ++d) idx.push_back(at::indexing::Slice(at::indexing::None, at::indexing::None, dilation[d]));
  v = v.index(idx);  // [B, C, *T, *k]
  std::vector<int64_t> perm = {0, 1};
  int64_t t = 1, k = 1;
  for (int64_t d = 0; d < n; ++d) {
    perm.push_back(2 + n + d);
    k *= kernel[d];
  }
  for (int64_t d = 0; d < n; ++d) {
    perm.push_back(2 + d);
    t *= v.size(2 + d);
  }
  return v.permute(perm).reshape({x.size(0), x.size(1) * k, t});
}

// A tensor of the given sizes whose data is never read (convolution_backward takes the weight's shape
// only when it computes the weight gradient alone): no allocation, no zero fill.
at::Tensor shape_only(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty({}, like.options()).expand(sizes);
}

at::Tensor conv_weight_grad(const at::Tensor& g, const at::Tensor& x, at::IntArrayRef weight_shape,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
  const std::vector<int64_t> output_padding(weight_shape.size() - 2, 0);
  return std::get<1>(at::convolution_backward(g, x, shape_only(g, weight_shape), std::nullopt, stride,
                                              padding, dilation, /*transposed=*/false, output_padding,
                                              groups, {false, true, false}));
}

// From this batch size on, per-example conv weight-gradients are one dense weight-gradient per example;
// below it, one convolution with the batch folded into the groups. Measured here (2 threads, 3×3 convs):
// at B = 64 the loop costs about the batch's own weight-gradient, where the folded convolution is as fast
// at 64 channels on 32×32 but 1.5× slower at 128 on 16×16 and 4× slower at 256 on 8×8; at B = 8 the
// folded convolution was about 10 % faster (bench/results/kernels_cpu.json).
constexpr int64_t kPerExampleLoopMinBatch = 32;

// Per-example weight gradients [b, *weight_shape] in the accumulation dtype.
at::Tensor conv_per_example_weight_grads(const at::Tensor& x, const at::Tensor& g,
                                         at::IntArrayRef ws, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups) {
  const int64_t b = x.size(0), n = static_cast<int64_t>(ws.size()) - 2;
  const auto acc = accum_type(x);
  std::vector<int64_t> out_shape = {b};
  out_shape.insert(out_shape.end(), ws.begin(), ws.end());
  if (b == 0) return at::zeros(out_shape, x.options().dtype(acc));
  int64_t fan_in = 1;
  for (int64_t d = 1; d < static_cast<int64_t>(ws.size()); ++d) fan_in *= ws[d];
  if (groups == 1 && (n == 1 || n == 2)) {
    // dense: one batched GEMM g_i a_iᵀ when the patches are trivial (1×1) or few (small fan-in)
    const at::Tensor gt = g.to(acc).reshape({b, ws[0], -1});  // [b, P, T]
    bool pointwise = true;
    for (int64_t d = 0; d < n; ++d) pointwise = pointwise && ws[2 + d] == 1 && padding[d] == 0;
    if (pointwise) {
      at::Tensor xs = x;
      for (int64_t d = 0; d < n; ++d) xs = xs.slice(2 + d, 0, g.size(2 + d) * stride[d], stride[d]);
      const at::Tensor a = xs.to(acc).reshape({b, fan_in, -1});  // [b, D, T]
      return at::bmm(gt, a.transpose(1, 2)).view(out_shape);
    }
    if (fan_in <= 64) {
      const at::Tensor a = unfold_patches(x.to(acc), ws.slice(2), stride, padding, dilation);
      return at::bmm(gt, a.transpose(1, 2)).view(out_shape);
    }
  }
  const at::Tensor xa = to_accum(x), ga = to_accum(g);
  if (b < kPerExampleLoopMinBatch) {
    // small batches: one convolution weight-gradient with the batch folded into the groups
    std::vector<int64_t> gshape = {1, b * g.size(1)}, xshape = {1, b * x.size(1)};
    std::vector<int64_t> wshape = {b * ws[0]};
    for (int64_t d = 0; d < n; ++d) {
      gshape.push_back(g.size(2 + d));
      xshape.push_back(x.size(2 + d));
    }
    wshape.insert(wshape.end(), ws.begin() + 1, ws.end());
    return conv_weight_grad(ga.reshape(gshape), xa.reshape(xshape), wshape, stride, padding, dilation, b * groups)
        .view(out_shape);
  }
  // one dense convolution weight-gradient per example
  at::Tensor pe = at::empty(out_shape, x.options().dtype(acc));
  for (int64_t i = 0; i < b; ++i) {
    pe[i].copy_(conv_weight_grad(ga.narrow(0, i, 1), xa.narrow(0, i, 1), ws, stride, padding, dilation, groups));
  }
  return pe;
}

void check_conv(const char* op, const at::Tensor& x, const at::Tensor& g, at::IntArrayRef ws,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                int64_t groups) {
  check_floating_cpu(op, "x", x);
  check_floating_cpu(op, "g", g);
  const int64_t n = static_cast<int64_t>(ws.size()) - 2;
  TORCH_CHECK(n >= 1 && n <= 3 && x.dim() == n + 2 && g.dim() == n + 2 && x.size(0) == g.size(0), op,
              ": x ", x.sizes(), " and g ", g.sizes(), " do not fit a weight ", ws);
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == n && static_cast<int64_t>(padding.size()) == n &&
                  static_cast<int64_t>(dilation.size()) == n,
              op, ": stride, padding and dilation need ", n, " entries each");
  TORCH_CHECK(groups >= 1 && x.size(1) == ws[1] * groups && g.size(1) == ws[0] && ws[0] % groups == 0,
              op, ": channels of x ", x.size(1), " / g ", g.size(1), " do not match weight ", ws,
              " with groups=", groups);
}

// ---------------------------------------------------------------------------------------------
// norms
// ---------------------------------------------------------------------------------------------

// ‖g_iᵀ a_i‖² of a [b, T, D] and g [b, T, P] (accumulation dtype, any strides) into out[0:b] (float64):
// Grams in the accumulation dtype, their Frobenius product wide.
void ghost_sq_norms_into(const at::Tensor& a, const at::Tensor& g, at::Tensor out) {
  const at::Tensor gram_a = at::bmm(a, a.transpose(1, 2));  // [b, T, T]
  const at::Tensor gram_g = at::bmm(g, g.transpose(1, 2));
  row_dots_wide_into(gram_a, gram_g, out);
}

std::tuple<at::Tensor, at::Tensor> linear_weight_sq_norms_cpu(const at::Tensor& a, const at::Tensor& g,
                                                              c10::string_view route, bool with_bias) {
  constexpr const char* op = "dpsat_fast::linear_weight_sq_norms";
  check_floating_cpu(op, "a", a);
  check_floating_cpu(op, "g", g);
  check_route(op, route);
  TORCH_CHECK(a.dim() == 3 && g.dim() == 3 && a.size(0) == g.size(0) && a.size(1) == g.size(1), op,
              ": a [B, T, D] and g [B, T, P] must agree, got ", a.sizes(), " and ", g.sizes());
  const int64_t B = a.size(0), T = a.size(1), D = a.size(2), P = g.size(2);
  const auto acc = accum_type(a);
  at::Tensor w = at::empty({B}, a.options().dtype(at::kDouble));  // wide until the end
  at::Tensor b = accum_empty(a, {with_bias ? B : 0});
  if (B == 0) return {w.to(acc), b};
  if (T == 1) {
    // rank one: ‖g_i a_iᵀ‖² = ‖a_i‖²·‖g_i‖²
    const at::Tensor sa = row_sq_norms_wide(to_accum(a).reshape({B, D}));
    const at::Tensor sg = row_sq_norms_wide(to_accum(g).reshape({B, P}));
    if (with_bias) b.copy_(sg);
    return {(sa * sg).to(acc), b};
  }
  const bool ghost = route == "ghost";
  const int64_t step = chunk_size(ghost ? T * T : D * P);
  for (int64_t s = 0; s < B; s += step) {
    const int64_t n = std::min(step, B - s);
    const at::Tensor ac = to_accum(a.narrow(0, s, n)), gc = to_accum(g.narrow(0, s, n));
    if (ghost) {
      ghost_sq_norms_into(ac, gc, w.narrow(0, s, n));
    } else {
      row_sq_norms_wide_into(at::bmm(gc.transpose(1, 2), ac), w.narrow(0, s, n));  // [n, P, D]
    }
  }
  if (with_bias) b.copy_(row_sq_norms_wide(per_example_sums(g)));
  return {w.to(acc), b};
}

std::tuple<at::Tensor, at::Tensor> conv_weight_sq_norms_cpu(
    const at::Tensor& x, const at::Tensor& g, at::IntArrayRef ws, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, c10::string_view route,
    bool with_bias) {
  constexpr const char* op = "dpsat_fast::conv_weight_sq_norms";
  check_conv(op, x, g, ws, stride, padding, dilation, groups);
  check_route(op, route);
  const int64_t B = x.size(0);
  const int64_t T = positions_by_channels(g).size(1);
  const auto acc = accum_type(x);
  at::Tensor w = at::empty({B}, x.options().dtype(at::kDouble));  // wide until the end
  at::Tensor b = accum_empty(x, {with_bias ? B : 0});
  if (B == 0) return {w.to(acc), b};
  int64_t weight_numel = 1;
  for (auto s : ws) weight_numel *= s;
  if (route == "instantiate") {
    const int64_t step = chunk_size(weight_numel);
    for (int64_t s = 0; s < B; s += step) {
      const int64_t n = std::min(step, B - s);
      const at::Tensor pe = conv_per_example_weight_grads(x.narrow(0, s, n), g.narrow(0, s, n), ws,
                                                          stride, padding, dilation, groups);
      row_sq_norms_wide_into(pe.contiguous(), w.narrow(0, s, n));
    }
  } else {
    // ghost, per (example, group): a [T, D_k] the unfolded input, g [T, P_k]
    const int64_t d_k = weight_numel / ws[0], p_k = ws[0] / groups;
    const int64_t step = chunk_size(groups * T * T);
    at::Tensor per_group = at::empty({B * groups}, x.options().dtype(at::kDouble));
    for (int64_t s = 0; s < B; s += step) {
      const int64_t n = std::min(step, B - s);
      const at::Tensor cols = unfold_patches(to_accum(x.narrow(0, s, n)), ws.slice(2), stride, padding,
                                             dilation)
                                  .reshape({n * groups, d_k, T});
      const at::Tensor gc = to_accum(g.narrow(0, s, n)).reshape({n * groups, p_k, T});
      ghost_sq_norms_into(cols.transpose(1, 2), gc.transpose(1, 2), per_group.narrow(0, s * groups, n * groups));
    }
    w.copy_(per_group.view({B, groups}).sum(1));
  }
  if (with_bias) b.copy_(row_sq_norms_wide(per_example_sums(positions_by_channels(g))));
  return {w.to(acc), b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_per_example_grads_cpu(
    const at::Tensor& x, const at::Tensor& g, at::IntArrayRef ws, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool with_bias) {
  constexpr const char* op = "dpsat_fast::conv_per_example_grads";
  check_conv(op, x, g, ws, stride, padding, dilation, groups);
  const int64_t B = x.size(0);
  const at::Tensor pe = conv_per_example_weight_grads(x, g, ws, stride, padding, dilation, groups);
  const auto acc = accum_type(x);
  const at::Tensor w_sq = row_sq_norms_wide(pe).to(acc);
  at::Tensor db = accum_empty(x, {0}), b_sq = accum_empty(x, {0});
  if (with_bias) {
    db = per_example_sums(positions_by_channels(g)).contiguous();
    b_sq = row_sq_norms_wide(db).to(acc);
  }
  return {pe, db, w_sq, b_sq};
}

// ---------------------------------------------------------------------------------------------
// clipped sums with noise
// ---------------------------------------------------------------------------------------------

void add_noise_if(at::Tensor& t, int64_t seed, int64_t offset, double noise_std) {
  if (noise_std != 0.0) cpu::add_noise_(t, seed, offset, noise_std);
}

// rows [n, K] of the accumulation dtype (any strides) -> Σ_r rows[r] · w[r] ([K]): one GEMV.
at::Tensor weighted_row_sum(const at::Tensor& rows, const at::Tensor& w) {
  return at::mv(rows.t(), w);
}

// x * s_i along dim 0 in the accumulation dtype.
at::Tensor scale_examples(const at::Tensor& x, const at::Tensor& scale) {
  std::vector<int64_t> view(x.dim(), 1);
  view[0] = x.size(0);
  return to_accum(x) * scale.to(accum_type(x)).view(view);
}

void check_scale(const char* op, const at::Tensor& scale, int64_t B) {
  check_floating_cpu(op, "scale", scale);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == B, op, ": scale must be [B] = [", B, "], got ",
              scale.sizes());
}

std::tuple<at::Tensor, at::Tensor> linear_clipped_sum_with_noise_cpu(
    const at::Tensor& a, const at::Tensor& g, const at::Tensor& scale, bool with_bias, int64_t seed,
    int64_t weight_offset, int64_t bias_offset, double noise_std) {
  constexpr const char* op = "dpsat_fast::linear_clipped_sum_with_noise";
  check_floating_cpu(op, "a", a);
  check_floating_cpu(op, "g", g);
  TORCH_CHECK(a.dim() == 3 && g.dim() == 3 && a.size(0) == g.size(0) && a.size(1) == g.size(1), op,
              ": a [B, T, D] and g [B, T, P] must agree, got ", a.sizes(), " and ", g.sizes());
  const int64_t B = a.size(0), T = a.size(1), D = a.size(2), P = g.size(2);
  check_scale(op, scale, B);
  check_noise(op, seed, weight_offset, P * D, noise_std);
  check_noise(op, seed, bias_offset, with_bias ? P : 0, noise_std);
  // (diag(s) g)ᵀ a, one GEMM per block of at most kClippedSumBlockRows of the B·T rows, the blocks added in
  // order; the per-example scale goes on the narrower operand
  const int64_t rows = B * T;
  const at::Tensor a2 = (P <= D ? to_accum(a) : scale_examples(a, scale)).reshape({rows, D});
  const at::Tensor g2 = (P <= D ? scale_examples(g, scale) : to_accum(g)).reshape({rows, P});
  at::Tensor w = rows == 0 ? accum_empty(a, {P, D}).zero_() : at::Tensor();
  for (int64_t s = 0; s < rows; s += kClippedSumBlockRows) {
    const int64_t n = std::min(kClippedSumBlockRows, rows - s);
    at::Tensor part = at::mm(g2.narrow(0, s, n).t(), a2.narrow(0, s, n));  // [P, D]
    if (s == 0) {
      w = part.contiguous();
    } else {
      w.add_(part);
    }
  }
  add_noise_if(w, seed, weight_offset, noise_std);
  at::Tensor b = accum_empty(a, {0});
  if (with_bias) {
    // Σ_rows s_row g_row over the same blocks
    const at::Tensor gu = to_accum(g).reshape({rows, P});
    const at::Tensor sc = scale.to(accum_type(a));
    const at::Tensor row_scale = T == 1 ? sc : sc.repeat_interleave(T);
    b = rows == 0 ? accum_empty(a, {P}).zero_() : at::Tensor();
    for (int64_t s = 0; s < rows; s += kClippedSumBlockRows) {
      const int64_t n = std::min(kClippedSumBlockRows, rows - s);
      at::Tensor part = weighted_row_sum(gu.narrow(0, s, n), row_scale.narrow(0, s, n));
      if (s == 0) {
        b = part;
      } else {
        b.add_(part);
      }
    }
    add_noise_if(b, seed, bias_offset, noise_std);
  }
  return {w, b};
}

std::tuple<at::Tensor, at::Tensor> conv_clipped_sum_with_noise_cpu(
    const at::Tensor& x, const at::Tensor& g, const at::Tensor& scale, at::IntArrayRef ws,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool with_bias, int64_t seed, int64_t weight_offset, int64_t bias_offset, double noise_std) {
  constexpr const char* op = "dpsat_fast::conv_clipped_sum_with_noise";
  check_conv(op, x, g, ws, stride, padding, dilation, groups);
  const int64_t B = x.size(0);
  check_scale(op, scale, B);
  int64_t weight_numel = 1;
  for (auto s : ws) weight_numel *= s;
  check_noise(op, seed, weight_offset, weight_numel, noise_std);
  check_noise(op, seed, bias_offset, with_bias ? ws[0] : 0, noise_std);
  // Σ_i s_i ∂W_i is the weight-gradient of (x, diag(s) g), or of (diag(s) x, g): scale the smaller. One
  // weight-gradient per block of whole examples, max(1, K0 / T) of them (at most max(K0, T) rows), the
  // blocks added in order.
  const bool scale_x = x.numel() <= g.numel();
  const at::Tensor xs = scale_x ? scale_examples(x, scale) : to_accum(x);
  const at::Tensor gs = scale_x ? to_accum(g) : scale_examples(g, scale);
  const int64_t T = positions_by_channels(g).size(1);
  const int64_t step = std::max<int64_t>(1, kClippedSumBlockRows / std::max<int64_t>(T, 1));
  at::Tensor w = B == 0 ? accum_empty(x, ws).zero_() : at::Tensor();
  const auto add_block = [&w](int64_t s, const at::Tensor& part) {
    if (s == 0) {
      w = part.contiguous();
    } else {
      w.add_(part);
    }
  };
  if (step == 1) {
    // every block is one example (T >= K0): the per-example weight-gradients, computed as
    // conv_per_example_weight_grads does (one batched GEMM for trivial or few patches), then summed
    const int64_t chunk = chunk_size(weight_numel);
    for (int64_t s = 0; s < B; s += chunk) {
      const int64_t n = std::min(chunk, B - s);
      add_block(s, conv_per_example_weight_grads(xs.narrow(0, s, n), gs.narrow(0, s, n), ws, stride, padding,
                                                 dilation, groups).sum(0));
    }
  } else {
    for (int64_t s = 0; s < B; s += step) {
      const int64_t n = std::min(step, B - s);
      add_block(s, conv_weight_grad(gs.narrow(0, s, n), xs.narrow(0, s, n), ws, stride, padding, dilation, groups));
    }
  }
  add_noise_if(w, seed, weight_offset, noise_std);
  at::Tensor b = accum_empty(x, {0});
  if (with_bias) {
    // per-example sums over the T positions, then Σ_i s_i ·(sum)_i over the same blocks of examples
    const at::Tensor sums = per_example_sums(positions_by_channels(g));  // [B, C_out]
    const at::Tensor sc = scale.to(accum_type(x));
    b = B == 0 ? accum_empty(x, {ws[0]}).zero_() : at::Tensor();
    for (int64_t s = 0; s < B; s += step) {
      const int64_t n = std::min(step, B - s);
      at::Tensor part = weighted_row_sum(sums.narrow(0, s, n), sc.narrow(0, s, n));
      if (s == 0) {
        b = part;
      } else {
        b.add_(part);
      }
    }
    add_noise_if(b, seed, bias_offset, noise_std);
  }
  return {w, b};
}

at::Tensor per_example_clipped_sum_with_noise_cpu(const at::Tensor& grads, const at::Tensor& scale,
                                                  int64_t seed, int64_t offset, double noise_std) {
  constexpr const char* op = "dpsat_fast::per_example_clipped_sum_with_noise";
  check_floating_cpu(op, "grads", grads);
  TORCH_CHECK(grads.dim() == 2, op, ": grads must be [B, K], got ", grads.sizes());
  const int64_t B = grads.size(0), K = grads.size(1);
  check_scale(op, scale, B);
  check_noise(op, seed, offset, K, noise_std);
  // a GEMV (BLAS reads grads once, at full vector width), then the noise over the K sums: measured faster
  // here than a fused loop of our own, which reads the same B·K elements but vectorizes only to SSE
  at::Tensor out = at::mv(to_accum(grads).t(), scale.to(accum_type(grads))).contiguous();
  add_noise_if(out, seed, offset, noise_std);
  return out;
}

// ---------------------------------------------------------------------------------------------
// norm layers
// ---------------------------------------------------------------------------------------------

// ∂w_i = Σ_t x̂_{i,t} ⊙ g_{i,t}, ∂b_i = Σ_t g_{i,t} and their squared norms, x̂ and g [B, T, C]: one
// pass over both. Channel-first storage ([B, C, T] underneath: GroupNorm/InstanceNorm) reduces each
// contiguous row; channel-last (LayerNorm/RMSNorm) accumulates rows of C per example.
template <typename T>
void affine_kernel(const T* x, const T* g, int64_t B, int64_t L, int64_t C, bool channel_first,
                   T* dw, T* db) {
  if (channel_first) {  // x, g: [B·C, L]
    at::parallel_for(0, B * C, row_grain(2 * L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (dw != nullptr) dw[r] = dot(x + r * L, g + r * L, L);
        if (db != nullptr) db[r] = sum(g + r * L, L);
      }
    });
    return;
  }
  at::parallel_for(0, B, row_grain(2 * L * C), [&](int64_t begin, int64_t end) {  // x, g: [B, L, C]
    for (int64_t i = begin; i < end; ++i) {
      T* w = dw != nullptr ? dw + i * C : nullptr;
      T* b = db != nullptr ? db + i * C : nullptr;
      if (w != nullptr) std::fill(w, w + C, T(0));
      if (b != nullptr) std::fill(b, b + C, T(0));
      for (int64_t t = 0; t < L; ++t) {
        const T* xr = x + (i * L + t) * C;
        const T* gr = g + (i * L + t) * C;
        if (w != nullptr) {
          for (int64_t c = 0; c < C; ++c) w[c] += xr[c] * gr[c];
        }
        if (b != nullptr) {
          for (int64_t c = 0; c < C; ++c) b[c] += gr[c];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> affine_per_example_grads_cpu(
    const at::Tensor& xhat, const at::Tensor& g, bool with_weight, bool with_bias) {
  constexpr const char* op = "dpsat_fast::affine_per_example_grads";
  check_floating_cpu(op, "xhat", xhat);
  check_floating_cpu(op, "g", g);
  TORCH_CHECK(g.dim() == 3 && xhat.sizes() == g.sizes(), op, ": xhat and g must both be [B, T, C], got ",
              xhat.sizes(), " and ", g.sizes());
  const int64_t B = g.size(0), L = g.size(1), C = g.size(2);
  const bool channel_first = C > 1 && L > 1 && g.stride(1) == 1 && xhat.stride(1) == 1;
  const auto layout = [&](const at::Tensor& t) {
    return channel_first ? to_accum(t).transpose(1, 2).contiguous() : to_accum(t).contiguous();
  };
  const at::Tensor gc = layout(g);
  const at::Tensor xc = with_weight ? layout(xhat) : gc;
  at::Tensor dw = accum_empty(g, {with_weight ? B : 0, C});
  at::Tensor db = accum_empty(g, {with_bias ? B : 0, C});
  AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "affine_per_example_grads", [&] {
    affine_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), B, L, C, channel_first,
                            with_weight ? dw.mutable_data_ptr<scalar_t>() : nullptr,
                            with_bias ? db.mutable_data_ptr<scalar_t>() : nullptr);
  });
  at::Tensor w_sq = accum_empty(g, {0}), b_sq = accum_empty(g, {0});
  if (with_weight) {
    w_sq = row_sq_norms_wide(dw).to(accum_type(g));
  } else {
    dw = accum_empty(g, {0});
  }
  if (with_bias) {
    b_sq = row_sq_norms_wide(db).to(accum_type(g));
  } else {
    db = accum_empty(g, {0});
  }
  return {dw, db, w_sq, b_sq};
}

// ---------------------------------------------------------------------------------------------
// DP-SAT's multi-tensor passes
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMultiTensorChunk = int64_t{1} << 16;

void check_multi_tensor(const char* op, const char* name, const at::Tensor& t) {
  check_floating_cpu(op, name, t);
  TORCH_CHECK(t.is_contiguous(), op, ": every tensor of ", name, " must be contiguous");
}

// Σ over all tensors of Σ x²: float32 (float64 if any input is float64); partial sums per 64K-element
// chunk, added in chunk order (deterministic for any thread count).
at::Tensor multi_tensor_sq_norm_cpu(at::TensorList tensors) {
  constexpr const char* op = "dpsat_fast::multi_tensor_sq_norm";
  bool any_double = false;
  std::vector<at::Tensor> acc;
  acc.reserve(tensors.size());
  for (const auto& t : tensors) {
    check_floating_cpu(op, "tensors", t);
    any_double = any_double || t.scalar_type() == at::kDouble;
  }
  struct Chunk {
    size_t tensor;
    int64_t start, n;
  };
  std::vector<Chunk> chunks;
  for (size_t k = 0; k < tensors.size(); ++k) {
    // float32/float64 as they are; 16-bit tensors widened to float32
    acc.push_back(tensors[k].scalar_type() == at::kDouble ? tensors[k].contiguous()
                                                          : tensors[k].to(at::kFloat).contiguous());
    for (int64_t s = 0; s < acc.back().numel(); s += kMultiTensorChunk) {
      chunks.push_back({k, s, std::min(kMultiTensorChunk, acc.back().numel() - s)});
    }
  }
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      const at::Tensor& t = acc[ch.tensor];
      partial[c] = t.scalar_type() == at::kDouble
                       ? sum_squares(t.const_data_ptr<double>() + ch.start, ch.n)
                       : sum_squares_wide(t.const_data_ptr<float>() + ch.start, ch.n);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(total, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
}

template <typename T>
void perturb_kernel(T* p, T* backup, const T* d, int64_t n, float alpha_f, double alpha_d) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const acc_t alpha = std::is_same_v<T, double> ? static_cast<acc_t>(alpha_d) : static_cast<acc_t>(alpha_f);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T w = p[j];
      backup[j] = w;
      // ε = α·d rounded to the parameter dtype first: the same bits as p + (α·d) computed apart
      const T eps = static_cast<T>(alpha * static_cast<acc_t>(d[j]));
      p[j] = static_cast<T>(static_cast<acc_t>(w) + static_cast<acc_t>(eps));
    }
  });
}

// backup <- params; params <- params + alpha·direction, in one pass per tensor.
void multi_tensor_perturb_cpu(at::TensorList params, at::TensorList backup, at::TensorList direction,
                              const at::Tensor& alpha) {
  constexpr const char* op = "dpsat_fast::multi_tensor_perturb_";
  TORCH_CHECK(params.size() == backup.size() && params.size() == direction.size(), op,
              ": params, backup and direction must have one tensor each, got ", params.size(), ", ",
              backup.size(), " and ", direction.size());
  TORCH_CHECK(alpha.numel() == 1 && alpha.device().is_cpu(), op, ": alpha must be a one-element CPU tensor");
  const double a = alpha.to(at::kDouble).item<double>();
  for (size_t k = 0; k < params.size(); ++k) {
    check_multi_tensor(op, "params", params[k]);
    check_multi_tensor(op, "backup", backup[k]);
    check_multi_tensor(op, "direction", direction[k]);
    TORCH_CHECK(params[k].sizes() == backup[k].sizes() && params[k].sizes() == direction[k].sizes() &&
                    params[k].scalar_type() == backup[k].scalar_type() &&
                    params[k].scalar_type() == direction[k].scalar_type(),
                op, ": tensor ", k, " of params, backup and direction differ in shape or dtype");
  }
  const float a_f = static_cast<float>(a);
  for (size_t k = 0; k < params.size(); ++k) {
    at::Tensor p = params[k], b = backup[k];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "multi_tensor_perturb_", [&] {
      perturb_kernel<scalar_t>(p.mutable_data_ptr<scalar_t>(), b.mutable_data_ptr<scalar_t>(),
                               direction[k].const_data_ptr<scalar_t>(), p.numel(), a_f, a);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dpsat_fast, CPU, m) {
  m.impl("linear_weight_sq_norms", &linear_weight_sq_norms_cpu);
  m.impl("conv_weight_sq_norms", &conv_weight_sq_norms_cpu);
  m.impl("conv_per_example_grads", &conv_per_example_grads_cpu);
  m.impl("linear_clipped_sum_with_noise", &linear_clipped_sum_with_noise_cpu);
  m.impl("conv_clipped_sum_with_noise", &conv_clipped_sum_with_noise_cpu);
  m.impl("per_example_clipped_sum_with_noise", &per_example_clipped_sum_with_noise_cpu);
  m.impl("affine_per_example_grads", &affine_per_example_grads_cpu);
  m.impl("multi_tensor_sq_norm", &multi_tensor_sq_norm_cpu);
  m.impl("multi_tensor_perturb_", &multi_tensor_perturb_cpu);
}

}  // namespace dpsat_fast
