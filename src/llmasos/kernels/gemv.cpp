// Batch-1 matrix-vector products for decoding on CPUs with AVX2 + FMA.
//
// Decode streams every weight once per token, so its speed is memory bandwidth. PyTorch's
// stock GEMV paths reach about half of it on small matrices (call overhead, packing); these
// kernels read each weight row once, convert in registers (bf16 -> fp32 is a 16-bit shift,
// int8 -> fp32 a widening convert) and accumulate in fp32, split across the intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Sixteen bf16 weights as two fp32 vectors: the even-indexed ones (low halves shifted up) and the
// odd-indexed ones (high halves masked). x is stored in the same even/odd order once per call.
inline void load16(const c10::BFloat16* p, __m256& even, __m256& odd) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000)));
}
inline void load16(const float* p, __m256& a, __m256& b) { a = _mm256_loadu_ps(p); b = _mm256_loadu_ps(p + 8); }
inline void load16(const int8_t* p, __m256& a, __m256& b) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}
// Whether x must be stored even/odd-interleaved per 16 for this weight type.
template <typename W> constexpr bool kEvenOdd = std::is_same<W, c10::BFloat16>::value;

inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }

// y[n] = scale[n] * dot(W[n, :], x) + bias[n] for rows [begin, end); four rows at a time share each x load.
// xs is x in the kernel's order (see kEvenOdd) for the first K16 elements, plain after.
template <typename W, typename B, typename Y>
void rows_dot(const W* w, const float* xs, const float* x, int64_t K, int64_t begin, int64_t end,
              const float* scale, const B* bias, Y* y) {
  const int64_t K16 = K - K % 16;
  int64_t n = begin;
  auto finish = [&](int64_t row, float s) {
    const W* r = w + row * K;
    for (int64_t k = K16; k < K; ++k) s += to_float(r[k]) * x[k];
    y[row] = static_cast<Y>(s * (scale ? scale[row] : 1.0f) + (bias ? static_cast<float>(bias[row]) : 0.0f));
  };
  for (; n + 4 <= end; n += 4) {
    const W* r0 = w + n * K; const W* r1 = r0 + K; const W* r2 = r1 + K; const W* r3 = r2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m256 lo, hi;
    for (int64_t k = 0; k < K16; k += 16) {
      __m256 x0 = _mm256_loadu_ps(xs + k), x1 = _mm256_loadu_ps(xs + k + 8);
      load16(r0 + k, lo, hi); a0 = _mm256_fmadd_ps(lo, x0, a0); b0 = _mm256_fmadd_ps(hi, x1, b0);
      load16(r1 + k, lo, hi); a1 = _mm256_fmadd_ps(lo, x0, a1); b1 = _mm256_fmadd_ps(hi, x1, b1);
      load16(r2 + k, lo, hi); a2 = _mm256_fmadd_ps(lo, x0, a2); b2 = _mm256_fmadd_ps(hi, x1, b2);
      load16(r3 + k, lo, hi); a3 = _mm256_fmadd_ps(lo, x0, a3); b3 = _mm256_fmadd_ps(hi, x1, b3);
    }
    finish(n, hsum(_mm256_add_ps(a0, b0)));
    finish(n + 1, hsum(_mm256_add_ps(a1, b1)));
    finish(n + 2, hsum(_mm256_add_ps(a2, b2)));
    finish(n + 3, hsum(_mm256_add_ps(a3, b3)));
  }
  for (; n < end; ++n) {
    const W* r = w + n * K;
    __m256 a = _mm256_setzero_ps(), b = a, lo, hi;
    for (int64_t k = 0; k < K16; k += 16) {
      load16(r + k, lo, hi);
      a = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xs + k), a);
      b = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xs + k + 8), b);
    }
    finish(n, hsum(_mm256_add_ps(a, b)));
  }
}

template <typename W, typename X>
torch::Tensor gemv_typed(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                         const torch::Tensor& bias) {
  const int64_t N = w.size(0), K = w.size(1), K16 = K - K % 16;
  const X* xp = x.data_ptr<X>();
  std::vector<float> xf(K), xs(K);
  for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xp[k]);
  if (kEvenOdd<W>) {
    for (int64_t c = 0; c < K16; c += 16)
      for (int i = 0; i < 8; ++i) { xs[c + i] = xf[c + 2 * i]; xs[c + 8 + i] = xf[c + 2 * i + 1]; }
    for (int64_t k = K16; k < K; ++k) xs[k] = xf[k];
  } else {
    xs = xf;
  }
  auto y = torch::empty({N}, x.options());
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const X* bp = bias.numel() ? bias.data_ptr<X>() : nullptr;
  const W* wp = w.data_ptr<W>();
  X* yp = y.data_ptr<X>();
  // Blocks of 64 rows keep both threads streaming; small matrices run on one thread.
  const int64_t grain = N * K < (1 << 18) ? N : 64;
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    rows_dot<W, X, X>(wp, xs.data(), xf.data(), K, b, e, sp, bp, yp);
  });
  return y;
}

}  // namespace

// x: [K] fp32 or bf16, w: [N, K] bf16/fp32/int8 contiguous, scale: [N] fp32 or empty (int8 only),
// bias: [N] in x's dtype or empty. Returns [N] in x's dtype.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be a contiguous [N, K] matrix");
  TORCH_CHECK(x.numel() == w.size(1) && x.is_contiguous(), "x must be contiguous with as many elements as w has columns");
  TORCH_CHECK(!scale.numel() || scale.scalar_type() == torch::kFloat32, "scale must be fp32");
  TORCH_CHECK(!bias.numel() || bias.scalar_type() == x.scalar_type(), "bias must have x's dtype");
  const bool bf = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf || x.scalar_type() == torch::kFloat32, "x must be fp32 or bf16");
  switch (w.scalar_type()) {
    case torch::kBFloat16:
      return bf ? gemv_typed<c10::BFloat16, c10::BFloat16>(x, w, scale, bias) : gemv_typed<c10::BFloat16, float>(x, w, scale, bias);
    case torch::kFloat32:
      return bf ? gemv_typed<float, c10::BFloat16>(x, w, scale, bias) : gemv_typed<float, float>(x, w, scale, bias);
    case torch::kInt8:
      return bf ? gemv_typed<int8_t, c10::BFloat16>(x, w, scale, bias) : gemv_typed<int8_t, float>(x, w, scale, bias);
    default:
      TORCH_CHECK(false, "unsupported weight dtype ", w.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gemv", &gemv, "batch-1 GEMV with fp32 accumulation"); }
