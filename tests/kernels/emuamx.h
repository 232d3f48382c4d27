// gemv.cpp's AMX path on a CPU without AMX (tests only, see conftest.py): the eight tile registers are kept per
// thread in memory, configured, loaded, stored and multiplied as the instructions do (tdpbf16ps: each fp32
// element plus the products of its pairs of bf16 elements, exact in fp32). Include after emu512.h, whose
// AVX-512 BF16 paths an AMX machine has too. Whether the real tiles do what these do is checked where the
// CPU has them (the amx level in test_levels.py).
#include <cstdint>
#include <cstring>
struct EmuTiles {
  alignas(64) uint8_t data[8][16][64];
  uint8_t rows[8];
  uint16_t colsb[8];
};
static thread_local EmuTiles e_tiles;
static inline void e_tile_loadconfig(const void* config) {  // palette 1: colsb at byte 16, rows at byte 48
  const uint8_t* c = static_cast<const uint8_t*>(config);
  for (int t = 0; t < 8; ++t) {
    memcpy(&e_tiles.colsb[t], c + 16 + 2 * t, 2);
    e_tiles.rows[t] = c[48 + t];
  }
}
static inline void e_tile_loadd(int t, const void* base, long stride) {
  memset(e_tiles.data[t], 0, sizeof e_tiles.data[t]);
  for (int r = 0; r < e_tiles.rows[t]; ++r) memcpy(e_tiles.data[t][r], static_cast<const char*>(base) + r * stride, e_tiles.colsb[t]);
}
static inline void e_tile_stored(int t, void* base, long stride) {
  for (int r = 0; r < e_tiles.rows[t]; ++r) memcpy(static_cast<char*>(base) + r * stride, e_tiles.data[t][r], e_tiles.colsb[t]);
}
static inline void e_tile_zero(int t) { memset(e_tiles.data[t], 0, sizeof e_tiles.data[t]); }
static inline void e_tile_release() { memset(&e_tiles, 0, sizeof e_tiles); }
static inline float e_bf16(const uint8_t* p) {
  uint16_t v;
  memcpy(&v, p, 2);
  const uint32_t u = uint32_t(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
// C[m][n] += sum over k of A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1]: A is rows x (pairs of bf16), B is
// pairs x (columns of C, each a pair of bf16), C fp32.
static inline void e_tile_dpbf16ps(int c, int a, int b) {
  for (int m = 0; m < e_tiles.rows[a]; ++m)
    for (int n = 0; n < e_tiles.colsb[c] / 4; ++n) {
      float acc;
      memcpy(&acc, &e_tiles.data[c][m][4 * n], 4);
      for (int k = 0; k < e_tiles.colsb[a] / 4; ++k)
        acc += e_bf16(&e_tiles.data[a][m][4 * k]) * e_bf16(&e_tiles.data[b][k][4 * n]) +
               e_bf16(&e_tiles.data[a][m][4 * k + 2]) * e_bf16(&e_tiles.data[b][k][4 * n + 2]);
      memcpy(&e_tiles.data[c][m][4 * n], &acc, 4);
    }
}
#undef _tile_loadconfig
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_release
#undef _tile_dpbf16ps
#define _tile_loadconfig e_tile_loadconfig
#define _tile_loadd e_tile_loadd
#define _tile_stored e_tile_stored
#define _tile_zero e_tile_zero
#define _tile_release e_tile_release
#define _tile_dpbf16ps e_tile_dpbf16ps
#define __AMX_TILE__ 1
#define __AMX_BF16__ 1
#define LLMASOS_TILES_GRANTED 1
static inline bool tiles_granted() { return true; }
