/* The CPU panel kernel: linear layers y = x @ w^T + bias (+ a residual, float32) for x86-64, float32 weights with AVX2
 * and FMA (and, where the CPU has AVX-512F, a wider tile with the same results), bfloat16 weights with AVX-512 BF16;
 * and a float32 layer's elementwise work (RMSNorm, SiLU gate, rotary embedding) in one pass each.
 *
 * serve/modeling/cpu_kernel.py compiles this file once per machine (cached under SERVE_CACHE_DIR) and calls it
 * through ctypes. The weight [n, k] is repacked once into panels of 16 output features, [ceil(n/16)][k][16],
 * zero-padded past n, so a step streams each panel front to back. For each panel and each block of up to 6 rows
 * of x, 12 AVX registers accumulate a 6 x 16 tile: per k, two loads of the panel and one broadcast of x per row.
 *
 * Each output is one ordered sum over k, whatever the number of rows and wherever the row sits in the step, so a
 * sequence gets the same logits alone or in a batch. Threads: OpenMP over panels, on the runtime torch loaded
 * (libgomp.so.1), with the thread count given by the caller (torch.get_num_threads()).
 *
 * bfloat16 (the second half of this file): the same panels holding pairs of inputs, [ceil(n/16)][ceil(k/2)][16][2],
 * zero-padded past n and k, half the bytes a decode step reads. Per pair, one 64-byte load of each of two
 * neighbouring panels and, for each of up to 8 rows, a broadcast of the row's two inputs and two VDPBF16PS, each
 * adding both products (exact: bf16 x bf16 fits a float32 mantissa) to float32 accumulators; the sum is rounded
 * once to bf16 (nearest even) after the bias. Those functions carry their own target flags (avx512f, avx512bf16),
 * so the library still builds with -mavx2 -mfma and runs anywhere; cpu_kernel.py calls them only where the CPU
 * has avx512_bf16, and serve_has_bf16() says whether the compiler could build them at all.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* y[m, n] = x[m, k] @ w^T + bias + residual (bias and residual [m, n] may be NULL), w given as panels by
 * serve_pack_panels. The residual is added last, as torch's ``residual + linear(x)`` adds it. */
void serve_linear_panels(const float* x, int64_t m, const float* panels, int64_t n, int64_t k, const float* bias,
                         const float* residual, float* y, int threads) {
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
        for (int64_t c = 0; c < width; c++) {
          int64_t at = (i + r) * n + first + c;
          float sum = tile[r * PANEL + c] + (bias ? bias[first + c] : 0.0f);
          y[at] = residual ? sum + residual[at] : sum;
        }
    }
  }
}

/* ---- float32 weights on AVX-512F: two neighbouring panels per tile, up to 8 rows ----
 * Per k, one 64-byte load of each panel and, for each row, one broadcast feeding both: 16 accumulators, so a step
 * of 8 rows streams each panel once at twice the AVX2 tile's arithmetic per load. Each output is the same ordered
 * FMA chain over k as the AVX2 tile's (the lanes of a 512-bit register are those of two 256-bit ones): the results
 * are bit for bit the same, and either path may serve any step. */

#define F32_512_TARGET __attribute__((target("avx512f")))
#define ROWS_512 8

#define TILE_512(R)                                                                                         \
  F32_512_TARGET static void tile_512_##R(const float* x, int64_t k, const float* panel, const float* next, \
                                          float* acc) {                                                     \
    __m512 sum[R], sum2[R];                                                                                \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sum[r] = sum2[r] = _mm512_setzero_ps();            \
    if (next == NULL) {                                                                                    \
      for (int64_t p = 0; p < k; p++) {                                                                    \
        __m512 w = _mm512_loadu_ps(panel + p * PANEL);                                                     \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sum[r] =                                       \
            _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * k + p]), sum[r]);                                      \
      }                                                                                                    \
    } else {                                                                                               \
      for (int64_t p = 0; p < k; p++) {                                                                    \
        __m512 w = _mm512_loadu_ps(panel + p * PANEL), w2 = _mm512_loadu_ps(next + p * PANEL);             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                              \
          __m512 v = _mm512_set1_ps(x[r * k + p]);                                                         \
          sum[r] = _mm512_fmadd_ps(w, v, sum[r]);                                                          \
          sum2[r] = _mm512_fmadd_ps(w2, v, sum2[r]);                                                       \
        }                                                                                                  \
      }                                                                                                    \
    }                                                                                                      \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                  \
      _mm512_storeu_ps(acc + r * PANEL, sum[r]);                                                           \
      _mm512_storeu_ps(acc + (ROWS_512 + r) * PANEL, sum2[r]);                                             \
    }                                                                                                      \
  }
TILE_512(1) TILE_512(2) TILE_512(3) TILE_512(4) TILE_512(5) TILE_512(6) TILE_512(7) TILE_512(8)

typedef void (*tile_512_fn)(const float*, int64_t, const float*, const float*, float*);
static const tile_512_fn TILES_512[ROWS_512 + 1] = {
    0, tile_512_1, tile_512_2, tile_512_3, tile_512_4, tile_512_5, tile_512_6, tile_512_7, tile_512_8};

/* y's rows [0, rows) at columns [first, first + width): acc + bias + residual (the same rows and columns of it). */
static void store_512(const float* acc, int rows, const float* bias, const float* residual, int64_t first,
                      int64_t width, int64_t n, float* y) {
  for (int r = 0; r < rows; r++)
    for (int64_t c = 0; c < width; c++) {
      float sum = acc[r * PANEL + c] + (bias ? bias[first + c] : 0.0f);
      y[r * n + first + c] = residual ? sum + residual[r * n + first + c] : sum;
    }
}

/* serve_linear_panels on AVX-512F (the same panels, the same results). */
F32_512_TARGET void serve_linear_panels_512(const float* x, int64_t m, const float* panels, int64_t n, int64_t k,
                                            const float* bias, const float* residual, float* y, int threads) {
  int64_t count = (n + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t jp = 0; jp < count; jp += 2) { /* two neighbouring panels per tile (the last one alone if odd) */
    float acc[2 * ROWS_512 * PANEL];
    const float* panel = panels + jp * k * PANEL;
    const float* next = jp + 1 < count ? panel + k * PANEL : NULL;
    int64_t first = jp * PANEL, width = n - first < PANEL ? n - first : PANEL;
    int64_t width2 = next ? (n - first - PANEL < PANEL ? n - first - PANEL : PANEL) : 0;
    for (int64_t i = 0; i < m; i += ROWS_512) {
      int block = m - i < ROWS_512 ? (int)(m - i) : ROWS_512;
      TILES_512[block](x + i * k, k, panel, next, acc);
      const float* skip = residual ? residual + i * n : NULL;
      store_512(acc, block, bias, skip, first, width, n, y + i * n);
      if (next) store_512(acc + ROWS_512 * PANEL, block, bias, skip, first + PANEL, width2, n, y + i * n);
    }
  }
}

/* ---- float32 elementwise work of a layer: RMSNorm, SiLU-gated product, rotary embedding ----
 * Each is one pass over its rows where torch runs three to eight ops (each a trip through the dispatcher and, on
 * two threads, an OpenMP barrier): at decode sizes the dispatch, not the arithmetic, was their cost. Rows are split
 * over threads only when there are many (a prompt chunk); a decode step's few rows run on the calling thread. */

#define PARALLEL_ELEMENTS (1 << 16) /* below this many elements a pass runs on one thread */
#define PARALLEL_EXPS (1 << 13)      /* likewise for SiLU, whose exponential costs more per element */

static inline float sum8(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  half = _mm_add_ss(half, _mm_movehdup_ps(half));
  return _mm_cvtss_f32(half);
}

/* exp(x), 8 at a time, x clamped to [-87.3, 88.7]: Cephes' polynomial, within 2 ulp of expf. */
static inline __m256 exp8_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows of n; x and out may be the same. */
void serve_rms_norm(const float* x, int64_t rows, int64_t n, const float* w, float eps, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PARALLEL_ELEMENTS)
  for (int64_t r = 0; r < rows; r++) {
    const float* in = x + r * n;
    float* y = out + r * n;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      __m256 a = _mm256_loadu_ps(in + i), b = _mm256_loadu_ps(in + i + 8);
      acc0 = _mm256_fmadd_ps(a, a, acc0);
      acc1 = _mm256_fmadd_ps(b, b, acc1);
    }
    float squares = sum8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) squares += in[i] * in[i];
    float scale = 1.0f / sqrtf(squares / (float)n + eps);
    __m256 s = _mm256_set1_ps(scale);
    for (i = 0; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), s), _mm256_loadu_ps(w + i)));
    for (; i < n; i++) y[i] = in[i] * scale * w[i];
  }
}

/* out[r][j] = silu(gate_up[r][j]) * gate_up[r][n + j]: the gate's and the up projection's halves of a fused row. */
void serve_silu_mul(const float* gate_up, int64_t rows, int64_t n, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= PARALLEL_EXPS)
  for (int64_t r = 0; r < rows; r++) {
    const float *gate = gate_up + r * 2 * n, *up = gate + n;
    float* y = out + r * n;
    int64_t j = 0;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      __m256 g = _mm256_loadu_ps(gate + j);
      __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8_ps(_mm256_sub_ps(zero, g))));
      _mm256_storeu_ps(y + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
    }
    for (; j < n; j++) y[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
  }
}

/* Rotate heads [0, heads) of each token's row in place (half-split layout): x [tokens][row_stride], head h at
 * h * dim; cos and signed_sin [tokens][dim], the sine's first half negated, so x <- x * cos + swap(x) * signed_sin. */
void serve_rope(float* x, int64_t tokens, int64_t row_stride, int64_t heads, int64_t dim, const float* cos,
                const float* signed_sin, int threads) {
  int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens * heads * dim >= PARALLEL_ELEMENTS)
  for (int64_t t = 0; t < tokens; t++) {
    const float *c = cos + t * dim, *s = signed_sin + t * dim;
    for (int64_t h = 0; h < heads; h++) {
      float* v = x + t * row_stride + h * dim;
      int64_t d = 0;
      for (; d + 8 <= half; d += 8) {
        __m256 a = _mm256_loadu_ps(v + d), b = _mm256_loadu_ps(v + half + d);
        __m256 first = _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + d)), _mm256_mul_ps(b, _mm256_loadu_ps(s + d)));
        __m256 second = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + half + d)),
                                      _mm256_mul_ps(a, _mm256_loadu_ps(s + half + d)));
        _mm256_storeu_ps(v + d, first);
        _mm256_storeu_ps(v + half + d, second);
      }
      for (; d < half; d++) {
        float a = v[d], b = v[half + d];
        v[d] = a * c[d] + b * s[d];
        v[half + d] = b * c[half + d] + a * s[half + d];
      }
    }
  }
}

/* ---- a float32 decoder layer's two halves around attention, one call each ----
 * The same functions as above, in the order the lean model runs them one by one (so the same bits), for a layer
 * whose four linear layers are all on the panels: one trip from Python per half instead of five. */

typedef struct {
  int64_t hidden, qkv_out, rotated_heads, head_dim, attended, intermediate;
  float eps_in, eps_post;
  const float *norm_in, *qkv, *qkv_bias, *o, *o_bias, *norm_post, *gate_up, *gate_up_bias, *down, *down_bias;
  int wide; /* the AVX-512F tile for steps of two or more rows */
} LayerPlan;

static void plan_linear(const LayerPlan* p, const float* x, int64_t m, const float* panels, int64_t n, int64_t k,
                        const float* bias, const float* residual, float* y, int threads) {
  if (p->wide && m > 1)
    serve_linear_panels_512(x, m, panels, n, k, bias, residual, y, threads);
  else
    serve_linear_panels(x, m, panels, n, k, bias, residual, y, threads);
}

/* qkv[m][qkv_out] = rotary(rms_norm(x) @ qkv^T + bias) for the first rotated_heads heads. Returns 0, or -1 when the
 * scratch could not be allocated. */
int serve_layer_before(const LayerPlan* p, const float* x, int64_t m, const float* cos, const float* signed_sin,
                       float* qkv, int threads) {
  float* normed = malloc(sizeof(float) * (size_t)(m * p->hidden));
  if (normed == NULL) return -1;
  serve_rms_norm(x, m, p->hidden, p->norm_in, p->eps_in, normed, threads);
  plan_linear(p, normed, m, p->qkv, p->qkv_out, p->hidden, p->qkv_bias, NULL, qkv, threads);
  serve_rope(qkv, m, p->qkv_out, p->rotated_heads, p->head_dim, cos, signed_sin, threads);
  free(normed);
  return 0;
}

/* out = h + down(silu_gate(gate_up(rms_norm(h)))) where h = x + o(attended). Returns 0, or -1 (no scratch). */
int serve_layer_after(const LayerPlan* p, const float* attended, const float* x, int64_t m, float* out, int threads) {
  int64_t hidden = p->hidden, inter = p->intermediate;
  float* scratch = malloc(sizeof(float) * (size_t)(m * (2 * hidden + 3 * inter)));
  if (scratch == NULL) return -1;
  float *h = scratch, *normed = h + m * hidden, *gate_up = normed + m * hidden, *gated = gate_up + m * 2 * inter;
  plan_linear(p, attended, m, p->o, hidden, p->attended, p->o_bias, x, h, threads);
  serve_rms_norm(h, m, hidden, p->norm_post, p->eps_post, normed, threads);
  plan_linear(p, normed, m, p->gate_up, 2 * inter, hidden, p->gate_up_bias, NULL, gate_up, threads);
  serve_silu_mul(gate_up, m, inter, gated, threads);
  plan_linear(p, gated, m, p->down, hidden, inter, p->down_bias, h, out, threads);
  free(scratch);
  return 0;
}

/* ---- bfloat16 weights (AVX-512 BF16) ---- */

#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10
#define BF16_TARGET __attribute__((target("avx512f,avx512bf16")))
#define BF16_ROWS 8

typedef uint16_t bf16;

int serve_has_bf16(void) { return 1; }

void serve_pack_panels_bf16(const bf16* w, int64_t n, int64_t k, bf16* out) {
  int64_t panels = (n + PANEL - 1) / PANEL, pairs = (k + 1) / 2;
#pragma omp parallel for schedule(static)
  for (int64_t jp = 0; jp < panels; jp++) {
    bf16* dst = out + jp * pairs * PANEL * 2;
    for (int64_t q = 0; q < pairs; q++)
      for (int64_t c = 0; c < PANEL; c++)
        for (int64_t h = 0; h < 2; h++) {
          int64_t j = jp * PANEL + c, p = 2 * q + h;
          dst[(q * PANEL + c) * 2 + h] = j < n && p < k ? w[j * k + p] : 0;
        }
  }
}

/* acc[r][0..16) = sum over pairs q of row r's pair q . panel[q], for R rows given as 32-bit words of two bf16; with
 * next (the neighbouring panel) also acc[BF16_ROWS + r][0..16) from it, each broadcast feeding both. */
#define TILE_BF16(R)                                                                                      \
  BF16_TARGET static void tile_bf16_##R(const uint32_t* x, int64_t pairs, const bf16* panel, const bf16* next, \
                                        float* acc) {                                                      \
    __m512 sum[R], sum2[R];                                                                             \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sum[r] = sum2[r] = _mm512_setzero_ps();         \
    if (next == NULL) {                                                                                 \
      for (int64_t q = 0; q < pairs; q++) {                                                             \
        __m512bh w = (__m512bh)_mm512_loadu_si512(panel + q * PANEL * 2);                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sum[r] =                                    \
            _mm512_dpbf16_ps(sum[r], (__m512bh)_mm512_set1_epi32((int)x[r * pairs + q]), w);            \
      }                                                                                                 \
    } else {                                                                                            \
      for (int64_t q = 0; q < pairs; q++) {                                                             \
        __m512bh w = (__m512bh)_mm512_loadu_si512(panel + q * PANEL * 2);                               \
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(next + q * PANEL * 2);                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                           \
          __m512bh v = (__m512bh)_mm512_set1_epi32((int)x[r * pairs + q]);                              \
          sum[r] = _mm512_dpbf16_ps(sum[r], v, w);                                                      \
          sum2[r] = _mm512_dpbf16_ps(sum2[r], v, w2);                                                   \
        }                                                                                               \
      }                                                                                                 \
    }                                                                                                   \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                               \
      _mm512_storeu_ps(acc + r * PANEL, sum[r]);                                                        \
      _mm512_storeu_ps(acc + (BF16_ROWS + r) * PANEL, sum2[r]);                                         \
    }                                                                                                   \
  }
TILE_BF16(1) TILE_BF16(2) TILE_BF16(3) TILE_BF16(4) TILE_BF16(5) TILE_BF16(6) TILE_BF16(7) TILE_BF16(8)

typedef void (*tile_bf16_fn)(const uint32_t*, int64_t, const bf16*, const bf16*, float*);
static const tile_bf16_fn TILES_BF16[BF16_ROWS + 1] = {
    0, tile_bf16_1, tile_bf16_2, tile_bf16_3, tile_bf16_4, tile_bf16_5, tile_bf16_6, tile_bf16_7, tile_bf16_8};

/* x [m, k] as [m, ceil(k/2)] 32-bit pairs: x itself for an even k, else a copy padded with a zero (*owned). */
static const uint32_t* as_pairs(const bf16* x, int64_t m, int64_t k, uint32_t** owned) {
  *owned = NULL;
  if (k % 2 == 0) return (const uint32_t*)x;
  int64_t pairs = (k + 1) / 2;
  bf16* padded = calloc((size_t)(m * pairs * 2), sizeof(bf16));
  if (padded == NULL) return NULL;
  for (int64_t i = 0; i < m; i++) memcpy(padded + i * pairs * 2, x + i * k, (size_t)k * sizeof(bf16));
  *owned = (uint32_t*)padded;
  return *owned;
}

/* y's rows [0, rows) at columns [first, first + width): acc + bias, rounded to bf16 (nearest even). */
BF16_TARGET static void store_bf16(float* acc, int rows, const bf16* bias, int64_t first, int64_t width, int64_t n,
                                   bf16* y) {
  bf16 rounded[PANEL];
  for (int r = 0; r < rows; r++) {
    float* sums = acc + r * PANEL;
    for (int64_t c = 0; c < width && bias; c++) {
      uint32_t bits = (uint32_t)bias[first + c] << 16;
      float value;
      memcpy(&value, &bits, sizeof value);
      sums[c] += value;
    }
    __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(sums));
    memcpy(rounded, &packed, sizeof rounded);
    memcpy(y + r * n + first, rounded, (size_t)width * sizeof(bf16));
  }
}

/* y[m, n] = x[m, k] @ w^T + bias, all bf16 (bias may be NULL), w given as panels by serve_pack_panels_bf16.
 * Returns 0, or -1 when an odd k's padded copy of x could not be allocated. */
BF16_TARGET int serve_linear_panels_bf16(const bf16* x, int64_t m, const bf16* panels, int64_t n, int64_t k,
                                         const bf16* bias, bf16* y, int threads) {
  uint32_t* owned;
  const uint32_t* rows = as_pairs(x, m, k, &owned);
  if (rows == NULL) return -1;
  int64_t count = (n + PANEL - 1) / PANEL, pairs = (k + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t jp = 0; jp < count; jp += 2) { /* two neighbouring panels per tile (the last one alone if odd) */
    float acc[2 * BF16_ROWS * PANEL];
    const bf16* panel = panels + jp * pairs * PANEL * 2;
    const bf16* next = jp + 1 < count ? panel + pairs * PANEL * 2 : NULL;
    int64_t first = jp * PANEL, width = n - first < PANEL ? n - first : PANEL;
    int64_t width2 = next ? (n - first - PANEL < PANEL ? n - first - PANEL : PANEL) : 0;
    for (int64_t i = 0; i < m; i += BF16_ROWS) {
      int block = m - i < BF16_ROWS ? (int)(m - i) : BF16_ROWS;
      TILES_BF16[block](rows + i * pairs, pairs, panel, next, acc);
      store_bf16(acc, block, bias, first, width, n, y + i * n);
      if (next) store_bf16(acc + BF16_ROWS * PANEL, block, bias, first + PANEL, width2, n, y + i * n);
    }
  }
  free(owned);
  return 0;
}
#else
int serve_has_bf16(void) { return 0; }
#endif
