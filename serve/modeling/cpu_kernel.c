/* The CPU panel kernel: float32 linear layers y = x @ w^T + bias for x86-64 with AVX2 and FMA.
 *
 * serve/modeling/cpu_kernel.py compiles this file once per machine (cached under SERVE_CACHE_DIR) and calls it
 * through ctypes. The weight [n, k] is repacked once into panels of 16 output features, [ceil(n/16)][k][16],
 * zero-padded past n, so a step streams each panel front to back. For each panel and each block of up to 6 rows
 * of x, 12 AVX registers accumulate a 6 x 16 tile: per k, two loads of the panel and one broadcast of x per row.
 *
 * Each output is one ordered sum over k, whatever the number of rows and wherever the row sits in the step, so a
 * sequence gets the same logits alone or in a batch. Threads: OpenMP over panels, on the runtime torch loaded
 * (libgomp.so.1), with the thread count given by the caller (torch.get_num_threads()).
 */
#include <immintrin.h>
#include <stdint.h>

#define PANEL 16
#define MAX_ROWS 6

void serve_pack_panels(const float* w, int64_t n, int64_t k, float* out) {
  int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
  for (int64_t jp = 0; jp < panels; jp++) {
    float* dst = out + jp * k * PANEL;
    for (int64_t p = 0; p < k; p++)
      for (int64_t c = 0; c < PANEL; c++) {
        int64_t j = jp * PANEL + c;
        dst[p * PANEL + c] = j < n ? w[j * k + p] : 0.0f;
      }
  }
}

/* tile[r][0..16) = sum over p of x[r][p] * panel[p][0..16), for R rows of x (a compile-time count). */
#define TILE(R)                                                                                  \
  static void tile##R(const float* x, int64_t k, const float* panel, float* tile) {             \
    __m256 lo[R], hi[R];                                                                        \
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {                                       \
      lo[r] = _mm256_setzero_ps();                                                              \
      hi[r] = _mm256_setzero_ps();                                                              \
    }                                                                                           \
    for (int64_t p = 0; p < k; p++) {                                                           \
      __m256 b0 = _mm256_loadu_ps(panel + p * PANEL), b1 = _mm256_loadu_ps(panel + p * PANEL + 8); \
      _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {                                     \
        __m256 v = _mm256_broadcast_ss(x + r * k + p);                                          \
        lo[r] = _mm256_fmadd_ps(b0, v, lo[r]);                                                  \
        hi[r] = _mm256_fmadd_ps(b1, v, hi[r]);                                                  \
      }                                                                                         \
    }                                                                                           \
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {                                       \
      _mm256_storeu_ps(tile + r * PANEL, lo[r]);                                                \
      _mm256_storeu_ps(tile + r * PANEL + 8, hi[r]);                                            \
    }                                                                                           \
  }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)

typedef void (*tile_fn)(const float*, int64_t, const float*, float*);
static const tile_fn TILES[MAX_ROWS + 1] = {0, tile1, tile2, tile3, tile4, tile5, tile6};

/* y[m, n] = x[m, k] @ w^T + bias (bias may be NULL), w given as panels by serve_pack_panels. */
void serve_linear_panels(const float* x, int64_t m, const float* panels, int64_t n, int64_t k, const float* bias,
                         float* y, int threads) {
  int64_t count = (n + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t jp = 0; jp < count; jp++) {
    float tile[MAX_ROWS * PANEL];
    const float* panel = panels + jp * k * PANEL;
    int64_t first = jp * PANEL, width = n - first < PANEL ? n - first : PANEL;
    for (int64_t i = 0; i < m; i += MAX_ROWS) {
      int rows = m - i < MAX_ROWS ? (int)(m - i) : MAX_ROWS;
      TILES[rows](x + i * k, k, panel, tile);
      for (int r = 0; r < rows; r++)
        for (int64_t c = 0; c < width; c++)
          y[(i + r) * n + first + c] = tile[r * PANEL + c] + (bias ? bias[first + c] : 0.0f);
    }
  }
}
