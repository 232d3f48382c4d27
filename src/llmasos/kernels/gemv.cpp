// Small-batch matrix products (decoding 1 to ~16 sequences) on CPUs with AVX2 + FMA, and with AVX-512.
//
// Built once per instruction-set level (llmasos.kernels.LEVELS): AVX2+FMA+F16C; AVX-512 F/BW/VL/DQ, where the
// dense and int8 products take 512-bit vectors (16 fp32 lanes, 32 registers: larger register blocks); and
// AVX-512 VNNI, where the int8 and int4 dot products fuse their multiply-adds (vpdpwssd, vpdpbusd); AVX512_BF16
// (vdpbf16ps); and AMX, whose tiles take several rows over bf16 weights. The `#if defined(__AVX512F__)` (etc.)
// blocks below are those levels; everything else is shared.
//
// Decode streams every weight once per token, so its speed is memory bandwidth. PyTorch's
// stock GEMV paths reach about half of it on small matrices (call overhead, packing); these
// kernels read each weight row once, convert in registers (bf16 -> fp32 is a 16-bit shift,
// int8 -> fp32 a widening convert) and accumulate in fp32, split across the intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#if defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// Sixteen weights as two fp32 vectors, taken one at a time so that a block holds only one half of each
// row in registers. bf16: the even-indexed weights (the low halves of the 32-bit lanes, shifted up) and
// the odd-indexed ones (the high halves, low bits cleared); x is stored in the same even/odd order once
// per call. fp32: the first eight and the last eight.
inline __m256 half_lo(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
}
// The high halves by two shifts rather than a mask: a mask would hold the register an input vector needs.
inline __m256 half_hi(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16), 16));
}
inline __m256 half_lo(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 half_hi(const float* p) { return _mm256_loadu_ps(p + 8); }
#if defined(__AVX512F__)
constexpr bool kWide = true;  // 512-bit dense products: sixteen weights widened in one register
// Sixteen weights as one fp32 vector, in order: bf16 zero-extended to 32 bits and shifted up.
inline __m512 wide16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 wide16(const float* p) { return _mm512_loadu_ps(p); }
#else
constexpr bool kWide = false;
#endif
#if defined(__AVX512BF16__)
constexpr bool kBf16Products = true;  // bf16 weights times bf16-rounded inputs for several rows (vdpbf16ps)
#else
constexpr bool kBf16Products = false;
#endif
// Whether x must be stored even/odd-interleaved per 16 for this weight type (the AVX2 bf16 halves above).
template <typename W> constexpr bool kEvenOdd = !kWide && std::is_same<W, c10::BFloat16>::value;

#if defined(__AMX_BF16__)
constexpr bool kAmx = true;  // several rows over bf16 weights in tiles (tdpbf16ps)
#ifndef LLMASOS_TILES_GRANTED  // (the tests' emulation of the tiles needs no grant)
// Linux gives a process the tiles' register state only when asked, once; a tile instruction before faults.
inline bool tiles_granted() {
  static const bool granted = [] {
    constexpr long kReqPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPermission, kTileData) == 0;
  }();
  return granted;
}
#endif
// Five tiles of 16 rows x 64 bytes: C0, C1 (fp32 results, 16 weight rows x 16 inputs each), A0, A1 (16 weight
// rows x 32 bf16 each) and B (32 columns of x for 16 inputs, in pairs: the layout tdpbf16ps takes).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16};
};
constexpr int64_t kTileRows = 32;  // weight rows a pass of the tiles computes
// The tiles take from 4 inputs up: below, the products are too few to be worth a tile's padding to 16 inputs,
// and vdpbf16ps keeps up with memory. (Chosen without an AMX machine to measure on.)
constexpr int64_t kTileMinInputs = 4;

// x [M <= 16, K] as B tiles, one per 32 columns: tile row i holds, for each input m, its columns 2i and 2i + 1
// (bf16-rounded; inputs past M are zeros). 1 KiB per 32 columns.
inline std::vector<c10::BFloat16> tile_inputs(const float* xf, int64_t M, int64_t K) {
  const int64_t blocks = K / 32;
  std::vector<c10::BFloat16> xv(blocks * 512, c10::BFloat16(0.f));
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < 16; ++i)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < 2; ++j) xv[b * 512 + i * 32 + m * 2 + j] = c10::BFloat16(xf[m * K + b * 32 + 2 * i + j]);
  return xv;
}

// out[r][m] = dot(W[n + r, :K32], x[m, :K32]) for 32 weight rows from n, all inputs at once: W's rows load
// straight into the A tiles (a row's 32 columns are 64 contiguous bytes), x comes packed (tile_inputs).
inline void tile_rows(const c10::BFloat16* w, int64_t K, int64_t K32, const c10::BFloat16* xv, int64_t n, float out[kTileRows][16]) {
  _tile_zero(0);
  _tile_zero(1);
  const c10::BFloat16* w0 = w + n * K;
  const c10::BFloat16* w1 = w0 + 16 * K;
  for (int64_t k = 0; k < K32; k += 32) {
    // A pass reads 32 rows side by side, more streams than the hardware prefetcher follows: each row's line
    // 512 bytes ahead is asked for here.
    for (int64_t r = 0; r < 16 && k + 256 < K32; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w0 + r * K + k + 256), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w1 + r * K + k + 256), _MM_HINT_T0);
    }
    _tile_loadd(4, xv + k * 16, 64);
    _tile_loadd(2, w0 + k, K * 2);
    _tile_loadd(3, w1 + k, K * 2);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(1, 3, 4);
  }
  _tile_stored(0, out[0], 64);
  _tile_stored(1, out[16], 64);
}
#else
constexpr bool kAmx = false;
#endif

inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(float v) { return v; }

// A bias vector read as fp32 where it lies, whatever its float dtype (no conversion per call), or none.
class Bias {
 public:
  Bias(const torch::Tensor& b, int64_t outputs) {
    if (!b.numel()) return;
    TORCH_CHECK(b.numel() == outputs, "a bias must have one value per output");
    TORCH_CHECK(b.is_contiguous() && (b.scalar_type() == torch::kFloat32 || b.scalar_type() == torch::kBFloat16 ||
                                      b.scalar_type() == torch::kHalf), "a bias must be a contiguous fp32, bf16 or fp16 vector");
    p_ = b.data_ptr();
    type_ = b.scalar_type();
  }
  float operator[](int64_t n) const {  // 0 where there is no bias
    if (!p_) return 0.f;
    if (type_ == torch::kBFloat16) return static_cast<float>(static_cast<const c10::BFloat16*>(p_)[n]);
    if (type_ == torch::kHalf) return static_cast<float>(static_cast<const at::Half*>(p_)[n]);
    return static_cast<const float*>(p_)[n];
  }

 private:
  const void* p_ = nullptr;
  c10::ScalarType type_ = torch::kFloat32;
};

// A block of R weight rows times MX input rows: out[r][m] = dot(W[r, :K16], x[m, :K16]).
// AVX2: the R * MX accumulators (12 at most), one half of each weight row and one input vector fill the 16
// vector registers: each converted weight vector serves MX inputs, each input vector R rows, so the loop
// is bound by the FMA units rather than by loads or conversions.
template <int R, int MX, typename W>
inline void block_dot_ymm(const W* w, int64_t K, int64_t K16, const float* xs, int64_t ldx, float out[R][MX],
                      const char* ahead = nullptr, int64_t ahead_bytes = 0) {
  static_assert(R * MX <= 12, "accumulators beyond the register file");
  __m256 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm256_setzero_ps();
  // ahead[0, ahead_bytes) is prefetched evenly over the loop, a cache line whenever the credit allows.
  const int64_t per_line = K16 / 16 * 64;
  int64_t credit = 0, line = 0;
  for (int64_t k = 0; k < K16; k += 16) {
    for (credit += ahead_bytes; credit >= per_line; credit -= per_line, line += 64)
      _mm_prefetch(ahead + line, _MM_HINT_T0);
    __m256 h[R];
    for (int r = 0; r < R; ++r) h[r] = half_lo(w + r * K + k);
    for (int m = 0; m < MX; ++m) {
      const __m256 xv = _mm256_loadu_ps(xs + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(h[r], xv, acc[r][m]);
    }
    for (int r = 0; r < R; ++r) h[r] = half_hi(w + r * K + k);
    for (int m = 0; m < MX; ++m) {
      const __m256 xv = _mm256_loadu_ps(xs + m * ldx + k + 8);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(h[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) out[r][m] = hsum(acc[r][m]);
}

#if defined(__AVX512F__)
// The same block in 512-bit registers: 32 of them hold R * MX accumulators (24 at most), R weight vectors
// and an input vector; x in plain order.
template <int R, int MX, typename W>
inline void block_dot_zmm(const W* w, int64_t K, int64_t K16, const float* xs, int64_t ldx, float out[R][MX],
                          const char* ahead, int64_t ahead_bytes, const c10::BFloat16* xb) {
  static_assert(R * MX <= 24, "accumulators beyond the register file");
  __m512 acc[R][MX];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
#if defined(__AVX512BF16__)
  // bf16 weights times x rounded to bf16 (xb): 32 products a register in one vdpbf16ps, twice fp32's rate and
  // no widening; the products are exact in fp32 and summed there. The last 16 columns, if any, go below.
  if (std::is_same<W, c10::BFloat16>::value && xb != nullptr && K16 >= 32) {
    const int64_t K32 = K16 - K16 % 32, per_line = K32 / 32 * 64;
    int64_t credit = 0, line = 0;
    for (; k < K32; k += 32) {
      for (credit += ahead_bytes; credit >= per_line; credit -= per_line, line += 64)
        _mm_prefetch(ahead + line, _MM_HINT_T0);
      __m512bh h[R];
      for (int r = 0; r < R; ++r) h[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int m = 0; m < MX; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + m * ldx + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], h[r], xv);
      }
    }
    ahead_bytes = 0;
  }
#endif
  const int64_t per_line = K16 / 16 * 64;
  int64_t credit = 0, line = 0;
  for (; k < K16; k += 16) {
    for (credit += ahead_bytes; credit >= per_line; credit -= per_line, line += 64)
      _mm_prefetch(ahead + line, _MM_HINT_T0);
    __m512 h[R];
    for (int r = 0; r < R; ++r) h[r] = wide16(w + r * K + k);
    for (int m = 0; m < MX; ++m) {
      const __m512 xv = _mm512_loadu_ps(xs + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(h[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MX; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}
#endif

// xb: x rounded to bf16 (plain order), for the bf16 products where the build has them (else nullptr).
template <int R, int MX, typename W>
inline void block_dot(const W* w, int64_t K, int64_t K16, const float* xs, int64_t ldx, float out[R][MX],
                      const char* ahead, int64_t ahead_bytes, const c10::BFloat16* xb) {
#if defined(__AVX512F__)
  block_dot_zmm<R, MX>(w, K, K16, xs, ldx, out, ahead, ahead_bytes, xb);
#else
  block_dot_ymm<R, MX>(w, K, K16, xs, ldx, out, ahead, ahead_bytes);
#endif
}

// dot(W[n, :K16], x[:K16]) for one sequence: one weight row streamed front to back. A single sequential
// stream per thread with a prefetch ahead reads memory ~35% faster here than interleaving several rows.
template <typename W>
inline float row_dot(const W* w, const float* xs, int64_t K16) {
#if defined(__AVX512F__)
  // 64 weights a step (128 or 256 bytes: every line of them prefetched 1 KiB ahead), x in plain order.
  __m512 z0 = _mm512_setzero_ps(), z1 = z0, z2 = z0, z3 = z0;
  int64_t j = 0;
  for (; j + 64 <= K16; j += 64) {
    for (int64_t b = 0; b < 64 * int64_t(sizeof(W)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + j) + 1024 + b, _MM_HINT_T0);
    z0 = _mm512_fmadd_ps(wide16(w + j), _mm512_loadu_ps(xs + j), z0);
    z1 = _mm512_fmadd_ps(wide16(w + j + 16), _mm512_loadu_ps(xs + j + 16), z1);
    z2 = _mm512_fmadd_ps(wide16(w + j + 32), _mm512_loadu_ps(xs + j + 32), z2);
    z3 = _mm512_fmadd_ps(wide16(w + j + 48), _mm512_loadu_ps(xs + j + 48), z3);
  }
  for (; j < K16; j += 16) z0 = _mm512_fmadd_ps(wide16(w + j), _mm512_loadu_ps(xs + j), z0);
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(z0, z1), _mm512_add_ps(z2, z3)));
#endif
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K16; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + 1024, _MM_HINT_T0);
    if (sizeof(W) == 4) _mm_prefetch(reinterpret_cast<const char*>(w + k) + 1088, _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(half_lo(w + k), _mm256_loadu_ps(xs + k), a0);
    a1 = _mm256_fmadd_ps(half_hi(w + k), _mm256_loadu_ps(xs + k + 8), a1);
    a2 = _mm256_fmadd_ps(half_lo(w + k + 16), _mm256_loadu_ps(xs + k + 16), a2);
    a3 = _mm256_fmadd_ps(half_hi(w + k + 16), _mm256_loadu_ps(xs + k + 24), a3);
  }
  if (k < K16) {
    a0 = _mm256_fmadd_ps(half_lo(w + k), _mm256_loadu_ps(xs + k), a0);
    a1 = _mm256_fmadd_ps(half_hi(w + k), _mm256_loadu_ps(xs + k + 8), a1);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

// Weight rows [n, n + R) times all M inputs, in blocks of four inputs, each result handed to store(row, m, dot).
// Meanwhile the next R rows (contiguous after these) are prefetched, spread over all the passes so that
// memory is read at an even pace rather than in bursts (5-25% faster than prefetching in the first pass).
template <int R, typename W, typename Store>
inline void rows_block(const W* w, const float* xs, const c10::BFloat16* xb, int64_t M, int64_t N, int64_t K,
                       int64_t K16, int64_t n, Store&& store) {
  const int64_t passes = (M + 3) / 4;
  // Whole cache lines within the next rows, so nothing past the weights' end is touched.
  const int64_t share = n + 2 * R <= N ? R * K * sizeof(W) / passes / 64 * 64 : 0;
  const char* ahead = reinterpret_cast<const char*>(w + (share ? n + R : n) * K);
  int64_t m = 0;
  auto run = [&](auto mx) {
    constexpr int MX = decltype(mx)::value;
    float out[R][MX];
    block_dot<R, MX>(w + n * K, K, K16, xs + m * K, K, out, ahead + m / 4 * share, share, xb ? xb + m * K : nullptr);
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < MX; ++i) store(n + r, m + i, out[r][i]);
    m += MX;
  };
  for (; m + 4 <= M;) run(std::integral_constant<int, 4>());
  switch (M - m) {
    case 3: run(std::integral_constant<int, 3>()); break;
    case 2: run(std::integral_constant<int, 2>()); break;
    case 1: run(std::integral_constant<int, 1>()); break;
  }
}

// y[m, n] = dot(W[n, :], x[m, :]) + bias[n] for weight rows [begin, end) and all M inputs.
// xs holds x in the kernel's order (see kEvenOdd) for the first K16 columns; xf holds it plainly.
// xv: x packed for the tiles (tile_inputs), where they take these rows (else nullptr).
template <typename W, typename Y>
void rows_dot(const W* w, const float* xs, const float* xf, const c10::BFloat16* xb, const c10::BFloat16* xv, int64_t M,
              int64_t K, int64_t begin, int64_t end, const Bias& bias, Y* y, int64_t N) {
  auto finish = [&](int64_t from) {  // adds the columns from `from` on to a row's dot, the bias, and stores it
    return [&, from](int64_t n, int64_t m, float s) {
      const W* r = w + n * K;
      for (int64_t k = from; k < K; ++k) s += to_float(r[k]) * xf[m * K + k];
      y[m * N + n] = static_cast<Y>(s + bias[n]);
    };
  };
  const int64_t K16 = K - K % 16;
  auto store = finish(K16);
  if (M == 1) {
    for (int64_t n = begin; n < end; ++n) store(n, 0, row_dot(w + n * K, xs, K16));
    return;
  }
  int64_t n = begin;
#if defined(__AMX_BF16__)
  if constexpr (std::is_same<W, c10::BFloat16>::value) {
    if (xv != nullptr && end - begin >= kTileRows) {  // 32 rows at a time in the tiles, the rest below
      const int64_t K32 = K - K % 32;
      auto tail = finish(K32);
      TileConfig config;
      _tile_loadconfig(&config);
      alignas(64) float out[kTileRows][16];
      for (; n + kTileRows <= end; n += kTileRows) {
        tile_rows(w, K, K32, xv, n, out);
        for (int64_t r = 0; r < kTileRows; ++r)
          for (int64_t m = 0; m < M; ++m) tail(n + r, m, out[r][m]);
      }
      _tile_release();
    }
  }
#endif
  // Several sequences: each group of three weight rows (four in 512-bit registers) is read from memory once
  // and reused from L1 for every block of four inputs.
  constexpr int R = kWide ? 4 : 3;
  for (; n + R <= end; n += R) rows_block<R>(w, xs, xb, M, N, K, K16, n, store);
  switch (end - n) {
    case 3: rows_block<3>(w, xs, xb, M, N, K, K16, n, store); break;
    case 2: rows_block<2>(w, xs, xb, M, N, K, K16, n, store); break;
    case 1: rows_block<1>(w, xs, xb, M, N, K, K16, n, store); break;
  }
}

// y_i = x @ w_i.T + b_i for several weights sharing x (a layer's q/k/v, or gate/up): one pass over x's
// conversion and one parallel region over the rows of all of them.
template <typename W, typename X>
std::vector<torch::Tensor> gemv_typed(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                                      const std::vector<torch::Tensor>& biases) {
  const int64_t K = ws[0].size(1), K16 = K - K % 16, M = x.numel() / K;
  const X* xp = x.data_ptr<X>();
  std::vector<float> xf(M * K), xs(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xf.data() + m * K;
    float* dst = xs.data() + m * K;
    if (kEvenOdd<W>) {
      for (int64_t c = 0; c < K16; c += 16)
        for (int i = 0; i < 8; ++i) { dst[c + i] = src[c + 2 * i]; dst[c + 8 + i] = src[c + 2 * i + 1]; }
      for (int64_t k = K16; k < K; ++k) dst[k] = src[k];
    } else {
      std::copy(src, src + K, dst);
    }
  }
  std::vector<c10::BFloat16> xb;  // x rounded to bf16, for the bf16 products of several rows where built
  if (kBf16Products && std::is_same<W, c10::BFloat16>::value && M > 1) xb.assign(xf.begin(), xf.end());
  std::vector<c10::BFloat16> xv;  // x packed for the tiles, where they take several rows over bf16 weights
#if defined(__AMX_BF16__)
  if (std::is_same<W, c10::BFloat16>::value && M >= kTileMinInputs && M <= 16 && K >= 32 && tiles_granted())
    xv = tile_inputs(xf.data(), M, K);
#endif
  std::vector<torch::Tensor> ys;
  std::vector<Bias> bias;
  std::vector<int64_t> starts{0};  // the weights' rows laid end to end
  for (size_t i = 0; i < ws.size(); ++i) {
    ys.push_back(torch::empty({M, ws[i].size(0)}, x.options()));
    bias.emplace_back(biases[i], ws[i].size(0));
    starts.push_back(starts.back() + ws[i].size(0));
  }
  const int64_t total = starts.back();
  auto rows = [&](int64_t b, int64_t e) {
    for (size_t i = 0; i < ws.size(); ++i) {
      const int64_t lo = std::max(b, starts[i]), hi = std::min(e, starts[i + 1]);
      if (lo >= hi) continue;
      rows_dot<W, X>(ws[i].data_ptr<W>(), xs.data(), xf.data(), xb.empty() ? nullptr : xb.data(), xv.empty() ? nullptr : xv.data(),
                     M, K, lo - starts[i], hi - starts[i], bias[i], ys[i].data_ptr<X>(), ws[i].size(0));
    }
  };
  if (total * K * M < (1 << 18)) {  // small products run on one thread
    rows(0, total);
  } else if (M == 1) {  // one sequence, bound by memory: each thread streams its contiguous share of rows
    at::parallel_for(0, total, 64, rows);
  } else {
    // Several sequences, bound by arithmetic: threads take 48 rows at a time (64, two passes of the tiles,
    // where they are built) as they get to them, so a thread the OS preempts (a server's event loop, its
    // clients) holds the step back by a chunk, not a half.
    constexpr int64_t chunk = kAmx ? 2 * 32 : 48;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t b; (b = next.fetch_add(chunk)) < total;) rows(b, std::min(total, b + chunk));
    });
  }
  return ys;
}

}  // namespace

// x: [M, K] fp32 or bf16 (a few rows: decoding M sequences); ws: [N_i, K] bf16/fp32 contiguous, one dtype;
// biases: [N_i] (fp32, bf16 or fp16, read in place), or empty. Returns [M, N_i] in x's dtype for each weight.
std::vector<torch::Tensor> gemv(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<torch::Tensor> biases) {
  TORCH_CHECK(!ws.empty() && ws.size() == biases.size(), "one bias (or an empty tensor) per weight");
  for (size_t i = 0; i < ws.size(); ++i) {
    TORCH_CHECK(ws[i].dim() == 2 && ws[i].is_contiguous() && ws[i].size(1) == ws[0].size(1) &&
                ws[i].scalar_type() == ws[0].scalar_type(), "weights must be contiguous [N, K] matrices of one K and dtype");
  }
  TORCH_CHECK(x.is_contiguous() && x.numel() % ws[0].size(1) == 0, "x must be contiguous [M, K] with K = w's columns");
  const bool bf = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf || x.scalar_type() == torch::kFloat32, "x must be fp32 or bf16");
  switch (ws[0].scalar_type()) {
    case torch::kBFloat16:
      return bf ? gemv_typed<c10::BFloat16, c10::BFloat16>(x, ws, biases) : gemv_typed<c10::BFloat16, float>(x, ws, biases);
    case torch::kFloat32:
      return bf ? gemv_typed<float, c10::BFloat16>(x, ws, biases) : gemv_typed<float, float>(x, ws, biases);
    default:
      TORCH_CHECK(false, "unsupported weight dtype ", ws[0].scalar_type());
  }
}

namespace {

torch::Tensor silu_mul_(torch::Tensor g, const torch::Tensor& u) {  // g = silu(g) * u, both contiguous fp32
  float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  for (int64_t i = 0, n = g.numel(); i < n; ++i) gp[i] = gp[i] / (1.0f + std::exp(-gp[i])) * up[i];
  return g;
}

}  // namespace

// silu(x @ wg.T + bg) * (x @ wu.T + bu): a SwiGLU MLP's first half in one call.
torch::Tensor swiglu(torch::Tensor x, torch::Tensor wg, torch::Tensor wu, torch::Tensor bg, torch::Tensor bu) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "swiglu takes fp32 activations");
  auto ys = gemv(x, {wg, wu}, {bg, bu});
  return silu_mul_(ys[0], ys[1]);
}

// ---- Elementwise steps of a decode step, fused (fp32 activations) -----------------------------------
// Each is a handful of PyTorch ops at ~5 us of dispatch apiece; with a few rows the arithmetic is nothing.

// weight * (x / sqrt(mean(x^2) + eps)) over the last dimension; weight fp32 or bf16.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous fp32");
  const int64_t D = weight.numel(), rows = x.numel() / D;
  TORCH_CHECK(x.size(-1) == D && weight.is_contiguous(), "weight must match x's last dimension");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto run = [&](auto* wp) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* xr = xp + r * D;
        float ss = 0.f;
        for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
        const float inv = 1.0f / std::sqrt(ss / D + static_cast<float>(eps));
        for (int64_t i = 0; i < D; ++i) yp[r * D + i] = static_cast<float>(wp[i]) * (xr[i] * inv);
      }
    });
  };
  if (weight.scalar_type() == torch::kBFloat16) run(weight.data_ptr<c10::BFloat16>());
  else { TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "weight must be fp32 or bf16"); run(weight.data_ptr<float>()); }
  return y;
}

// Rotary embedding in place on x [B, S, H, D] (contiguous fp32), pairs (i, i + D/2) rotated by
// cos/sin [B or 1, S, D] (fp32): x * cos + rotate_half(x) * sin, as `llama.apply_rope` computes it.
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == torch::kFloat32, "x must be contiguous fp32 [B, S, H, D]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32 &&
              sin.scalar_type() == torch::kFloat32 && cos.sizes() == sin.sizes(), "cos/sin must be contiguous fp32");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(cos.numel() == S * D || cos.numel() == B * S * D, "cos/sin must hold [B or 1, S, D]");
  const int64_t cstride = cos.numel() == S * D ? 0 : S * D;
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const float* c = cp + b * cstride + s * D;
      const float* n = sp + b * cstride + s * D;
      for (int64_t h = 0; h < H; ++h) {
        float* v = xp + ((b * S + s) * H + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c[i] + -x2 * n[i];
          v[i + half] = x2 * c[i + half] + x1 * n[i + half];
        }
      }
    }
}

// Attention of one new token per row over its cache row (decoding), fp32. q: [B, H, 1, D]; k, v: [B, KV, L, D]
// with unit stride along D (slices of the cache); pos: [B] int64, the new token's position: row b attends to
// slots max(0, pos - window + 1)..pos (window <= 0: no window). Returns [B, H, 1, D].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor pos, int64_t window) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32,
              "decode_attention takes fp32");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && k.sizes() == v.sizes() && k.stride(3) == 1 &&
              v.stride(3) == 1 && k.stride(2) == v.stride(2) && q.size(3) == k.size(3), "q [B, H, 1, D], k/v [B, KV, L, D]");
  q = q.contiguous();
  auto p = pos.to(torch::kInt64).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), L = k.size(2), group = H / KV;
  TORCH_CHECK(H % KV == 0 && p.numel() == B, "heads must be a multiple of kv heads; one position per row");
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto y = torch::empty({B, 1, H, D}, q.options());  // [B, 1, H, D] memory: the caller's reshape is free
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* pp = p.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const int64_t work = B * H * L * D;
  at::parallel_for(0, B * H, work < (1 << 16) ? B * H : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, last = std::min(pp[b], L - 1);
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const float* qr = qp + bh * D;
      const float* kr = kp + b * k.stride(0) + (h / group) * k.stride(1);
      const float* vr = vp + b * v.stride(0) + (h / group) * v.stride(1);
      float best = -INFINITY;
      for (int64_t j = first; j <= last; ++j) {
        const float* kj = kr + j * k.stride(2);
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), _mm256_loadu_ps(kj + d), acc);
        float s = hsum(acc);
        for (; d < D; ++d) s += qr[d] * kj[d];
        w[j] = s * scale;
        best = std::max(best, w[j]);
      }
      float total = 0.f;
      for (int64_t j = first; j <= last; ++j) total += (w[j] = std::exp(w[j] - best));
      float* out = yp + (b * H + h) * D;
      std::fill(out, out + D, 0.f);
      for (int64_t j = first; j <= last; ++j) {
        const float* vj = vr + j * v.stride(2);
        const float wj = w[j] / total;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
          _mm256_storeu_ps(out + d, _mm256_fmadd_ps(_mm256_set1_ps(wj), _mm256_loadu_ps(vj + d), _mm256_loadu_ps(out + d)));
        for (; d < D; ++d) out[d] += wj * vj[d];
      }
    }
  });
  return y.transpose(1, 2);
}

// ---- Weight-only int8 and int4 ------------------------------------------------------------------
// int8: the input rows are quantized to 14-bit integers per row (max |x| -> 8191), so weights widen to
// int16 and multiply-add pairwise in one instruction (_mm256_madd_epi16) into int32 lanes. Error: ~1e-4
// of max |x| per element, well below the weights' own quantization error. int4: see int4_gemv.

namespace {

struct QuantRows {
  std::vector<int16_t> q;  // [M, K]
  std::vector<float> scale;  // per row: x ~= q * scale
};

template <typename X>
QuantRows quantize_rows(const X* x, int64_t M, int64_t K) {
  QuantRows r{std::vector<int16_t>(M * K), std::vector<float>(M)};
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(static_cast<float>(x[m * K + k])));
    const float scale = amax > 0 ? amax / 8191.f : 1.f, inv = 1.f / scale;
    for (int64_t k = 0; k < K; ++k) r.q[m * K + k] = static_cast<int16_t>(std::lrintf(static_cast<float>(x[m * K + k]) * inv));
    r.scale[m] = scale;
  }
  return r;
}

inline __m256i madd16(const int8_t* w, const int16_t* x) {  // 16 int8 weights . 16 int16 inputs -> 8 int32
  __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

#if defined(__AVX512F__)
// acc + 32 int8 weights . 32 int16 inputs, pairwise into 16 int32 lanes (VNNI: one instruction).
inline __m512i madd32(__m512i acc, const int8_t* w, const int16_t* x) {
  const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  const __m512i xv = _mm512_loadu_si512(x);
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, wv, xv);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(wv, xv));
#endif
}

// dot(w[:K], x[:K]) of one int8 row and one quantized input row, 128 columns a step in four accumulators.
// Each int32 lane sums at most 64 products of |127 * 8191| per 4096 columns before moving to fp32.
inline float int8_row_dot(const int8_t* r, const int16_t* xr, int64_t K) {
  __m512 f = _mm512_setzero_ps();
  __m256 tail = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 4096) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t end = std::min(K, k0 + 4096);
    int64_t k = k0;
    for (; k + 128 <= end; k += 128) {
      _mm_prefetch(reinterpret_cast<const char*>(r + k) + 1024, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(r + k) + 1088, _MM_HINT_T0);
      a0 = madd32(a0, r + k, xr + k);
      a1 = madd32(a1, r + k + 32, xr + k + 32);
      a2 = madd32(a2, r + k + 64, xr + k + 64);
      a3 = madd32(a3, r + k + 96, xr + k + 96);
    }
    for (; k + 32 <= end; k += 32) a0 = madd32(a0, r + k, xr + k);
    if (k < end) tail = _mm256_add_ps(tail, _mm256_cvtepi32_ps(madd16(r + k, xr + k)));  // the last 16
    f = _mm512_add_ps(f, _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3))));
  }
  return _mm512_reduce_add_ps(f) + hsum(tail);
}
#endif

}  // namespace

// y[m, n] = scale[n] * dot(w[n], x[m]) + bias[n]; w: [N, K] int8 with K % 16 == 0.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor bias) {
  const int64_t N = w.size(0), K = w.size(1), M = x.numel() / K;
  TORCH_CHECK(K % 16 == 0 && w.scalar_type() == torch::kInt8 && w.is_contiguous(), "w must be contiguous int8 [N, K], K % 16 == 0");
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16), "x must be contiguous fp32/bf16");
  auto run = [&](auto* xp) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    QuantRows xq = quantize_rows(xp, M, K);
    auto y = torch::empty({M, N}, x.options());
    X* yp = y.data_ptr<X>();
    const float* sp = scale.data_ptr<float>();
    const Bias bp(bias, N);
    const int8_t* wp = w.data_ptr<int8_t>();
    // One weight row at a time (a single sequential stream per thread, prefetched ahead), four int32
    // accumulators; the int32 lanes move to fp32 every 4096 columns, far before they could overflow.
    at::parallel_for(0, N, N * K * M < (1 << 18) ? N : 64, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const int8_t* r = wp + n * K;
        for (int64_t m = 0; m < M; ++m) {
          const int16_t* xr = xq.q.data() + m * K;
#if defined(__AVX512F__)
          yp[m * N + n] = static_cast<X>(int8_row_dot(r, xr, K) * xq.scale[m] * sp[n] + bp[n]);
#else
          __m256 f = _mm256_setzero_ps();
          for (int64_t k0 = 0; k0 < K; k0 += 4096) {
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            const int64_t end = std::min(K, k0 + 4096);
            int64_t k = k0;
            for (; k + 64 <= end; k += 64) {
              _mm_prefetch(reinterpret_cast<const char*>(r + k) + 1024, _MM_HINT_T0);
              a0 = _mm256_add_epi32(a0, madd16(r + k, xr + k));
              a1 = _mm256_add_epi32(a1, madd16(r + k + 16, xr + k + 16));
              a2 = _mm256_add_epi32(a2, madd16(r + k + 32, xr + k + 32));
              a3 = _mm256_add_epi32(a3, madd16(r + k + 48, xr + k + 48));
            }
            for (; k < end; k += 16) a0 = _mm256_add_epi32(a0, madd16(r + k, xr + k));
            f = _mm256_add_ps(f, _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3))));
          }
          yp[m * N + n] = static_cast<X>(hsum(f) * xq.scale[m] * sp[n] + bp[n]);
#endif
        }
      }
    });
    return y;
  };
  return x.scalar_type() == torch::kFloat32 ? run(x.data_ptr<float>()) : run(x.data_ptr<c10::BFloat16>());
}

// Eight fp16 values as fp32 (F16C).
inline __m256 load8h(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// int4 in groups of 32 along K: packed [N, K/2] uint8 where byte j of a group holds q[j] (low nibble) and
// q[j + 16] (high nibble), q in 0..15; w = q * scale + offset per group (scale, offset: [N, K/32] fp16).
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor offsets,
                        torch::Tensor bias) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / 32, G8 = G - G % 8, M = x.numel() / K;
  TORCH_CHECK(K % 32 == 0 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && offsets.scalar_type() == torch::kHalf && scales.is_contiguous() &&
              offsets.is_contiguous() && scales.numel() == N * G && offsets.numel() == N * G,
              "scales and offsets must be contiguous fp16 [N, K/32]");
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16), "x must be contiguous fp32/bf16");
  auto run = [&](auto* xp) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    // The inputs as int8 per group of 32 (scale amax / 127, as llama.cpp's q8_0), with each group's exact sum
    // for the offsets. A pair of groups A, B is stored [A0-15 | B0-15][A16-31 | B16-31]: the order in which one
    // 32-byte load of the pair's packed weights splits into low and high nibbles.
    std::vector<int8_t> xq(M * K);
    std::vector<float> xscale(M * G), gsum(M * G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const X* src = xp + m * K + g * 32;
        float amax = 0.f, sum = 0.f;
        for (int i = 0; i < 32; ++i) {
          const float v = static_cast<float>(src[i]);
          amax = std::max(amax, std::abs(v));
          sum += v;
        }
        const float scale = amax > 0 ? amax / 127.f : 1.f, inv = 1.f / scale;
        int8_t* dst = xq.data() + m * K + (g < G8 ? (g & ~int64_t(1)) * 32 + (g & 1) * 16 : g * 32);
        for (int i = 0; i < 32; ++i) {
          const int64_t at = g < G8 ? (i < 16 ? i : 32 + i - 16) : i;
          dst[at] = static_cast<int8_t>(std::lrintf(static_cast<float>(src[i]) * inv));
        }
        xscale[m * G + g] = scale;
        gsum[m * G + g] = sum;
      }
    auto y = torch::empty({M, N}, x.options());
    X* yp = y.data_ptr<X>();
    const at::Half* sp = scales.data_ptr<at::Half>();
    const at::Half* op = offsets.data_ptr<at::Half>();
    const Bias bp(bias, N);
    const uint8_t* wp = packed.data_ptr<uint8_t>();
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    // Eight groups a step: four 32-byte loads of two groups each; 32 unsigned 4-bit weights times 32 int8 inputs
    // is one multiply-add instruction (_mm256_maddubs_epi16; 15 * 127 * 4 fits its int16 lanes); the eight
    // groups' sums gathered by horizontal adds, then scaled by one FMA.
    at::parallel_for(0, N, N * K * M < (1 << 18) ? N : 64, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        const uint8_t* row = wp + n * (K / 2);
        const at::Half* rs = sp + n * G;
        const at::Half* ro = op + n * G;
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* xr = xq.data() + m * K;
          const float* xs = xscale.data() + m * G;
          const float* gs = gsum.data() + m * G;
          __m256 acc = _mm256_setzero_ps(), off = acc;
          for (int64_t g = 0; g < G8; g += 8) {
            // Both cache lines of the step (128 bytes of weights), 2 KiB ahead: one a step left half to chance.
            _mm_prefetch(reinterpret_cast<const char*>(row + g * 16) + 2048, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(row + g * 16) + 2112, _MM_HINT_T0);
            __m256i r[4];
            for (int j = 0; j < 4; ++j) {
              const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (g + 2 * j) * 16));
              const int8_t* xg = xr + (g + 2 * j) * 32;
              const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
              const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg));
              const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 32));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
              // Each int32 lane: the sum of four unsigned-by-signed byte products, as maddubs then madd below.
              r[j] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xa), hi, xb);
#else
              const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
              r[j] = _mm256_madd_epi16(p, ones);  // [group A's 4 partial sums | group B's]
#endif
            }
            __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(r[0], r[1]), _mm256_hadd_epi32(r[2], r[3]));
            h = _mm256_permutevar8x32_epi32(h, order);  // the eight groups' sums, in order
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(load8h(rs + g), _mm256_loadu_ps(xs + g)), acc);
            off = _mm256_fmadd_ps(load8h(ro + g), _mm256_loadu_ps(gs + g), off);
          }
          float tail = 0.f;
          for (int64_t g = G8; g < G; ++g) {  // the last G % 8 groups, inputs in plain order
            int32_t d = 0;
            for (int i = 0; i < 16; ++i) {
              const uint8_t byte = row[g * 16 + i];
              d += (byte & 0x0F) * xr[g * 32 + i] + (byte >> 4) * xr[g * 32 + 16 + i];
            }
            tail += d * static_cast<float>(rs[g]) * xs[g] + static_cast<float>(ro[g]) * gs[g];
          }
          yp[m * N + n] = static_cast<X>(hsum(_mm256_add_ps(acc, off)) + tail + bp[n]);
        }
      }
    });
    return y;
  };
  return x.scalar_type() == torch::kFloat32 ? run(x.data_ptr<float>()) : run(x.data_ptr<c10::BFloat16>());
}

// ---- A whole decoder block ------------------------------------------------------------------------

namespace {

// A linear layer as decode_block receives it: w bf16/fp32 (dense), int8 (with per-row scales) or packed
// uint8 int4 (with group scales and offsets).
struct Linear {
  torch::Tensor w, scales, offsets, bias;
  bool dense() const { return w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16; }
  torch::Tensor operator()(const torch::Tensor& x) const {
    if (w.scalar_type() == torch::kInt8) return int8_gemv(x, w, scales, bias);
    if (w.scalar_type() == torch::kUInt8) return int4_gemv(x, w, scales, offsets, bias);
    return gemv(x, {w}, {bias})[0];
  }
};

// Several projections of one input: dense ones of one dtype in a single parallel pass, others one by one.
std::vector<torch::Tensor> project(const torch::Tensor& x, const std::vector<Linear>& lin) {
  bool fused = true;
  for (const auto& l : lin) fused = fused && l.dense() && l.w.scalar_type() == lin[0].w.scalar_type();
  std::vector<torch::Tensor> ws, bs, ys;
  if (!fused) {
    for (const auto& l : lin) ys.push_back(l(x));
    return ys;
  }
  for (const auto& l : lin) {
    ws.push_back(l.w);
    bs.push_back(l.bias);
  }
  return gemv(x, ws, bs);
}

void add_into(torch::Tensor& y, const torch::Tensor& x) {  // y += x, both contiguous fp32 of one size
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) yp[i] += xp[i];
}

}  // namespace

// One decoder block for one new token per row, fp32 activations: norm, q/k/v, rotary, the cache write at each
// row's position, attention, output projection, residual, norm, SwiGLU MLP, residual, all in one call, so a
// decode step costs a dozen calls from Python instead of several hundred small operations.
// x: [B, 1, hidden]; norms: the input and post-attention norm weights; the seven projections (q, k, v, o, gate,
// up, down) as w (dense, int8 or packed int4), scales and offsets (empty where the kind has none) and biases;
// cos/sin: [B or 1, 1, 1, head_dim]; kc/vc: the layer's whole cache [rows, kv_heads, L, head_dim] (fp32), rows
// row0..row0+B-1 in use; pos: [B] positions.
torch::Tensor decode_block(torch::Tensor x, std::vector<torch::Tensor> norms, std::vector<torch::Tensor> w,
                           std::vector<torch::Tensor> scales, std::vector<torch::Tensor> offsets,
                           std::vector<torch::Tensor> biases, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                           torch::Tensor vc, int64_t row0, torch::Tensor pos, int64_t n_heads, int64_t window, double eps) {
  TORCH_CHECK(norms.size() == 2 && w.size() == 7 && scales.size() == 7 && offsets.size() == 7 && biases.size() == 7,
              "decode_block takes 2 norms and 7 projections");
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == torch::kFloat32, "x must be fp32 [B, 1, hidden]");
  TORCH_CHECK(kc.scalar_type() == torch::kFloat32 && kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes(),
              "the cache must be contiguous fp32");
  std::vector<Linear> lin;
  for (int i = 0; i < 7; ++i) lin.push_back({w[i], scales[i], offsets[i], biases[i]});
  const int64_t B = x.size(0), hidden = x.size(2), D = kc.size(3), KV = kc.size(1), L = kc.size(2);
  TORCH_CHECK(row0 >= 0 && row0 + B <= kc.size(0), "cache rows out of range");
  auto p = pos.to(torch::kInt64).contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < L, "position ", pp[i], " is outside the cache");
  x = x.contiguous().view({B, hidden});

  auto qkv = project(rms_norm(x, norms[0], eps), {lin[0], lin[1], lin[2]});
  auto q = qkv[0].view({B, 1, n_heads, D}), k = qkv[1].view({B, 1, KV, D}), v = qkv[2];
  rope_(q, cos, sin);
  rope_(k, cos, sin);
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  const float* kn = k.data_ptr<float>();
  const float* vn = v.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < KV; ++j) {
      const int64_t at = (((row0 + i) * KV + j) * L + pp[i]) * D;
      std::copy(kn + (i * KV + j) * D, kn + (i * KV + j + 1) * D, kp + at);
      std::copy(vn + (i * KV + j) * D, vn + (i * KV + j + 1) * D, vp + at);
    }
  auto att = decode_attention(q.view({B, n_heads, 1, D}), kc.narrow(0, row0, B), vc.narrow(0, row0, B), p, window);
  auto o = lin[3](att.reshape({B, n_heads * D}));
  add_into(o, x);  // the attention residual

  auto gate_up = project(rms_norm(o, norms[1], eps), {lin[4], lin[5]});
  auto y = lin[6](silu_mul_(gate_up[0], gate_up[1]));
  add_into(y, o);  // the MLP residual
  return y.view({B, 1, hidden});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel lets go of the GIL: a server's event loop (streaming, HTTP) runs while a step computes.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.attr("bf16_products") = kBf16Products;  // several rows over bf16 weights round x to bf16 (tests' tolerance)
  m.def("gemv", &gemv, "small-batch GEMV of several weights sharing an input, fp32 accumulation (fp32/bf16 weights)", nogil);
  m.def("swiglu", &swiglu, "silu(x @ wg.T + bg) * (x @ wu.T + bu) for a few rows", nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (fp32 activations)", nogil);
  m.def("rope_", &rope_, "rotary embedding in place on [B, S, H, D]", nogil);
  m.def("decode_attention", &decode_attention, "attention of one new token per row over its cache row", nogil);
  m.def("decode_block", &decode_block, "one decoder block for one new token per row (fp32 activations)", nogil);
  m.def("int8_gemv", &int8_gemv, "small-batch GEMV over int8 weights with per-row scales", nogil);
  m.def("int4_gemv", &int4_gemv, "small-batch GEMV over int4 weights in groups of 32", nogil);
}
