// gemv.cpp's AVX-512 code paths on a CPU without AVX-512 (tests only, see conftest.py): each 512-bit
// intrinsic they use is emulated by two 256-bit halves (elements 0-7 low, 8-15 high), and vpdpbusd exactly,
// so the paths' logic (blocks, tails, layouts, reductions) is tested on every developer machine. Whether the
// real instructions do what these do is checked where the CPU has them (the avx512 levels in test_levels.py).
#include <immintrin.h>
#include <cstdint>
#include <cstring>
struct e512 { __m256 lo, hi; };
struct e512i { __m256i lo, hi; };
#define __m512 e512
#define __m512i e512i
static inline e512 e_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline e512 e_loadu_ps(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline e512 e_fmadd_ps(e512 a, e512 b, e512 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
static inline e512 e_add_ps(e512 a, e512 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline float e_reduce_add_ps(e512 a) { float t[16]; _mm256_storeu_ps(t, a.lo); _mm256_storeu_ps(t + 8, a.hi); float s = 0; for (int i = 0; i < 16; ++i) s += t[i]; return s; }
static inline e512 e_castsi512_ps(e512i a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
static inline e512i e_slli_epi32(e512i a, int n) { return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
static inline e512i e_cvtepu16_epi32(__m256i a) { return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))}; }
static inline e512i e_setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline e512i e_loadu_si512(const void* p) { auto q = (const __m256i*)p; return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)}; }
static inline e512i e_cvtepi8_epi16(__m256i a) { return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(a)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1))}; }
static inline e512i e_madd_epi16(e512i a, e512i b) { return {_mm256_madd_epi16(a.lo, b.lo), _mm256_madd_epi16(a.hi, b.hi)}; }
static inline e512i e_add_epi32(e512i a, e512i b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
static inline e512i e_dpwssd_epi32(e512i acc, e512i a, e512i b) { return e_add_epi32(acc, e_madd_epi16(a, b)); }
static inline e512 e_cvtepi32_ps(e512i a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
// vpdpbusd (256-bit): each int32 lane + the sum of four u8 x s8 products, no saturation (emulated exactly).
static inline __m256i e_dpbusd_epi32(__m256i acc, __m256i a, __m256i b) {
  alignas(32) uint8_t ua[32]; alignas(32) int8_t sb[32]; alignas(32) int32_t r[8];
  _mm256_store_si256((__m256i*)ua, a); _mm256_store_si256((__m256i*)sb, b); _mm256_store_si256((__m256i*)r, acc);
  for (int j = 0; j < 8; ++j) for (int i = 0; i < 4; ++i) r[j] += int32_t(ua[4 * j + i]) * int32_t(sb[4 * j + i]);
  return _mm256_load_si256((const __m256i*)r);
}
#define _mm512_setzero_ps e_setzero_ps
#define _mm512_loadu_ps e_loadu_ps
#define _mm512_fmadd_ps e_fmadd_ps
#define _mm512_add_ps e_add_ps
#define _mm512_reduce_add_ps e_reduce_add_ps
#define _mm512_castsi512_ps e_castsi512_ps
#define _mm512_slli_epi32 e_slli_epi32
#define _mm512_cvtepu16_epi32 e_cvtepu16_epi32
#define _mm512_setzero_si512 e_setzero_si512
#define _mm512_loadu_si512 e_loadu_si512
#define _mm512_cvtepi8_epi16 e_cvtepi8_epi16
#define _mm512_madd_epi16 e_madd_epi16
#define _mm512_add_epi32 e_add_epi32
#define _mm512_dpwssd_epi32 e_dpwssd_epi32
#define _mm512_cvtepi32_ps e_cvtepi32_ps
#define _mm256_dpbusd_epi32 e_dpbusd_epi32
// vdpbf16ps: each fp32 lane + the products of its pair of bf16 elements (exact in fp32), summed in fp32.
static inline e512 e_dpbf16_ps(e512 acc, e512i a, e512i b) {
  alignas(32) uint16_t ua[32], ub[32]; alignas(32) float r[16];
  _mm256_store_si256((__m256i*)ua, a.lo); _mm256_store_si256((__m256i*)(ua + 16), a.hi);
  _mm256_store_si256((__m256i*)ub, b.lo); _mm256_store_si256((__m256i*)(ub + 16), b.hi);
  _mm256_store_ps(r, acc.lo); _mm256_store_ps(r + 8, acc.hi);
  auto f = [](uint16_t v) { uint32_t u = uint32_t(v) << 16; float x; memcpy(&x, &u, 4); return x; };
  for (int i = 0; i < 16; ++i) r[i] = r[i] + f(ua[2 * i]) * f(ub[2 * i]) + f(ua[2 * i + 1]) * f(ub[2 * i + 1]);
  return {_mm256_load_ps(r), _mm256_load_ps(r + 8)};
}
#define __m512bh e512i
#define _mm512_dpbf16_ps e_dpbf16_ps
#define __AVX512BF16__ 1
#define __AVX512F__ 1
#define __AVX512VL__ 1
#define __AVX512VNNI__ 1
