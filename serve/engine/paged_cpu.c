/* Paged decode attention on the CPU: each decode token attends over its sequence's K/V where they lie in the
 * block pool, with no gathered copy.
 *
 * serve/engine/paged_cpu.py compiles this file once per machine and calls it through ctypes. The cache of one
 * layer is [blocks, block_size, kv_heads, dim] (float32, bfloat16, or float8 e4m3 bytes with a key and a value
 * scale), the query [batch, heads, dim] (its heads contiguous, sequences q_stride apart) and the output (contiguous) in float32 or bfloat16 (a float32 or bfloat16 cache's own
 * type), contiguous; the head dim a multiple of 8. OpenMP runs one task per (sequence, KV head): the task reads each of the sequence's
 * K rows once for all query heads of its group (grouped-query heads share the loads), keeps the scores of the whole
 * context, takes an exact softmax over them (max, exp, sum), then reads each V row once. A token at position t
 * lives at row table[t / block_size] * block_size + t % block_size. Sums run in float32; bfloat16 values are widened
 * exactly, and the output is rounded once to the nearest even bfloat16. An fp8 cache's bytes (KV_CACHE_DTYPE=fp8)
 * are widened exactly through a table of the 256 e4m3 values; the key scale is folded into the score scale and the
 * value scale into the softmax's normalisation.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { KV_F32 = 0, KV_BF16 = 1, KV_FP8 = 2 };

typedef struct {
  const void *q, *k, *v;
  const int64_t *tables, *lengths;
  void* out;
  int64_t heads, kv_heads, dim, block_size, width, q_stride; /* q_stride: elements from one sequence's query to the next */
  float scale, v_scale; /* scores: times scale (the key scale folded in); outputs: times v_scale */
  int bf16, kv;         /* bf16: the query and output are bfloat16; kv: what the cache holds (KV_F32, _BF16, _FP8) */
  const float* fp8;     /* the 256 float8 e4m3 values, by their bits */
} Step;

/* exp(x) for x <= 0 (scores minus their maximum), 8 at a time: Cephes' polynomial, within 2 ulp of expf. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
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

static inline float widen(uint16_t bits) {
  uint32_t word = (uint32_t)bits << 16;
  float value;
  memcpy(&value, &word, sizeof value);
  return value;
}

static inline uint16_t narrow(float value) {
  uint32_t word;
  memcpy(&word, &value, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((word >> 16) | 0x40u); /* NaN stays NaN */
  return (uint16_t)((word + 0x7fffu + ((word >> 16) & 1u)) >> 16);
}

/* 8 values from element `at` of a float32, bfloat16 or float8 e4m3 array (`kind`), as float32. */
static inline __m256 load8(const void* base, int64_t at, int kind, const float* fp8) {
  if (kind == KV_F32) return _mm256_loadu_ps((const float*)base + at);
  if (kind == KV_FP8) {
    __m128i bytes = _mm_loadl_epi64((const __m128i*)((const uint8_t*)base + at));
    return _mm256_i32gather_ps(fp8, _mm256_cvtepu8_epi32(bytes), 4);
  }
  __m128i bits = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + at));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

/* table[b] = the float8 e4m3 (fn) value of bits b: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
 * subnormal (mantissa x 2^-9); 0x7f and 0xff are NaN (never stored: writes clamp to the finite range). */
static void fp8_table(float* table) {
  for (int b = 0; b < 256; b++) {
    int exponent = (b >> 3) & 15, mantissa = b & 7;
    float value = exponent ? ldexpf(1.0f + mantissa / 8.0f, exponent - 7) : ldexpf((float)mantissa, -9);
    if ((b & 0x7f) == 0x7f) value = NAN;
    table[b] = b & 0x80 ? -value : value;
  }
}

/* The `dim` elements at element `at` of an array as float32: themselves, or widened into `scratch`. */
static inline const float* row(const void* base, int64_t at, int64_t dim, int bf16, float* scratch) {
  if (!bf16) return (const float*)base + at;
  const uint16_t* bits = (const uint16_t*)base + at;
  for (int64_t d = 0; d < dim; d++) scratch[d] = widen(bits[d]);
  return scratch;
}

/* at[t] = where token t of sequence `seq` starts for KV head `head`, in elements of the cache, walked block by block
 * (no division per token); the padding up to `stride` repeats token 0. */
static void locate(const Step* s, int64_t seq, int64_t head, int64_t len, int64_t stride, int64_t* at) {
  const int64_t* table = s->tables + seq * s->width;
  int64_t t = 0, row_size = s->kv_heads * s->dim;
  for (int64_t b = 0; t < len; b++) {
    int64_t first = (table[b] * s->block_size * s->kv_heads + head) * s->dim;
    for (int64_t i = 0; i < s->block_size && t < len; i++, t++) at[t] = first + i * row_size;
  }
  for (; t < stride; t++) at[t] = at[0];
}

/* The sums of the 8 vectors' lanes, as one vector: lane j holds the sum of sums[j]. */
static inline __m256 sum_lanes(const __m256* sums) {
  __m256 a = _mm256_hadd_ps(sums[0], sums[1]), b = _mm256_hadd_ps(sums[2], sums[3]);
  __m256 c = _mm256_hadd_ps(sums[4], sums[5]), d = _mm256_hadd_ps(sums[6], sums[7]);
  a = _mm256_hadd_ps(a, b);
  c = _mm256_hadd_ps(c, d);
  return _mm256_add_ps(_mm256_permute2f128_ps(a, c, 0x20), _mm256_permute2f128_ps(a, c, 0x31));
}

/* Ask for the cache lines of the row of `dim` elements at element `at` ahead of use: a step's K/V rows were pushed out
 * to memory by the weights read since they were written, and a sequence's rows lie in scattered blocks. */
static inline void prefetch_row(const void* base, int64_t at, int64_t dim, int kind) {
  int64_t bytes = kind == KV_F32 ? 4 : kind == KV_BF16 ? 2 : 1;
  const char* first = (const char*)base + at * bytes;
  for (int64_t offset = 0; offset < dim * bytes; offset += 64) _mm_prefetch(first + offset, _MM_HINT_T0);
}

/* scores[g][t] = scale * q_g . k_t for the group's heads, 8 tokens at a time (the last 8 padded with token 0). */
static void score(const Step* s, const int64_t* at, int64_t len, int64_t stride, const float* q, float* scores) {
  int64_t group = s->heads / s->kv_heads, dim = s->dim;
  for (int64_t t0 = 0; t0 < len; t0 += 8) {
    const int64_t* k = at + t0;
    for (int64_t t = t0 + 8; t < t0 + 16 && t < len; t++) prefetch_row(s->k, at[t], dim, s->kv);
    for (int64_t g = 0; g < group; g++) {
      const float* qg = q + g * dim;
      __m256 sums[8];
      for (int j = 0; j < 8; j++) sums[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < dim; d += 8) {
        __m256 qd = _mm256_loadu_ps(qg + d);
        for (int j = 0; j < 8; j++) sums[j] = _mm256_fmadd_ps(load8(s->k, k[j] + d, s->kv, s->fp8), qd, sums[j]);
      }
      _mm256_storeu_ps(scores + g * stride + t0, _mm256_mul_ps(sum_lanes(sums), _mm256_set1_ps(s->scale)));
    }
  }
}

/* scores[0..len) -> exp(score - max), padded lanes to 0; returns their sum. */
static float softmax_weights(float* scores, int64_t len, int64_t stride) {
  float total = 0.0f;
  __m256 most = _mm256_set1_ps(-INFINITY); /* over [0, stride): the padding repeats token 0, so the maximum is the same */
  for (int64_t t = 0; t < stride; t += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(scores + t));
  most = _mm256_max_ps(most, _mm256_permute2f128_ps(most, most, 1));
  most = _mm256_max_ps(most, _mm256_permute_ps(most, 0x4e));
  most = _mm256_max_ps(most, _mm256_permute_ps(most, 0xb1));
  for (int64_t t = len; t < stride; t++) scores[t] = -INFINITY;
  __m256 shift = most;
  for (int64_t t = 0; t < stride; t += 8)
    _mm256_storeu_ps(scores + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), shift)));
  for (int64_t t = len; t < stride; t++) scores[t] = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < len; t++) total += scores[t];
  return total;
}

static void store(const Step* s, int64_t index, const float* values) {
  if (!s->bf16) {
    memcpy((float*)s->out + index * s->dim, values, s->dim * sizeof(float));
    return;
  }
  uint16_t* bits = (uint16_t*)s->out + index * s->dim;
  for (int64_t d = 0; d < s->dim; d++) bits[d] = narrow(values[d]);
}

/* out[0 .. 8 * CHUNKS) = sum over t of weights[t] * v_t[0 .. 8 * CHUNKS), v_t at at[t] + d0. CHUNKS is a
 * compile-time count wherever it is inlined with a constant, so the accumulators stay in registers; `kind` likewise
 * folds load8's choice of cache type out of the loop. */
static inline __attribute__((always_inline)) void mix_span(const void* v, int kind, const float* fp8, const int64_t* at,
                                                           int64_t d0, int64_t len, const float* weights, int chunks,
                                                           float v_scale, float total, int prefetch, float* out) {
  __m256 acc[8];
  for (int c = 0; c < chunks; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; t++) {
    if (prefetch && t + 8 < len) prefetch_row(v, at[t + 8] + d0, 8 * chunks, kind);
    __m256 weight = _mm256_set1_ps(weights[t]);
    const int64_t row = at[t] + d0;
    for (int c = 0; c < chunks; c++) acc[c] = _mm256_fmadd_ps(load8(v, row + 8 * c, kind, fp8), weight, acc[c]);
  }
  __m256 inverse = _mm256_set1_ps(v_scale / total);
  for (int c = 0; c < chunks; c++) _mm256_storeu_ps(out + d0 + 8 * c, _mm256_mul_ps(acc[c], inverse));
}

/* mix_span for one cache type: 64 dims at a time with 8 accumulators, then the rest (8 to 56 dims). */
#define MIX_OF(KIND)                                                                                             \
  static void mix_##KIND(const Step* s, const int64_t* at, int64_t len, const float* weights, float total,     \
                         int prefetch, float* out) {                                                            \
    int64_t d0 = 0, rest = s->dim % 64;                                                                         \
    for (; d0 + 64 <= s->dim; d0 += 64)                                                                         \
      mix_span(s->v, KIND, s->fp8, at, d0, len, weights, 8, s->v_scale, total, prefetch, out);                  \
    if (rest) mix_span(s->v, KIND, s->fp8, at, d0, len, weights, (int)(rest / 8), s->v_scale, total, prefetch, out); \
  }
MIX_OF(KV_F32) MIX_OF(KV_BF16) MIX_OF(KV_FP8)

/* out_g = sum over t of weight[g][t] * v_t / total_g for the group's query heads. */
static void mix(const Step* s, int64_t seq, int64_t head, const int64_t* at, int64_t len, int64_t stride,
                const float* weights, const float* totals) {
  int64_t group = s->heads / s->kv_heads;
  float out[s->dim];
  for (int64_t g = 0; g < group; g++) {
    const float* w = weights + g * stride;
    int prefetch = g == 0; /* the later heads of the group find the rows in cache */
    if (s->kv == KV_F32)
      mix_KV_F32(s, at, len, w, totals[g], prefetch, out);
    else if (s->kv == KV_BF16)
      mix_KV_BF16(s, at, len, w, totals[g], prefetch, out);
    else
      mix_KV_FP8(s, at, len, w, totals[g], prefetch, out);
    store(s, seq * s->heads + head * group + g, out);
  }
}

/* One (sequence, KV head): the outputs of the group's query heads. */
static void attend(const Step* s, int64_t seq, int64_t head) {
  int64_t group = s->heads / s->kv_heads, dim = s->dim, len = s->lengths[seq];
  int64_t stride = (len + 7) / 8 * 8;
  float* q = malloc(sizeof(float) * (group * (stride + dim) + dim) + sizeof(int64_t) * stride);
  float *scores = q + group * dim, *scratch = scores + group * stride;
  int64_t* at = (int64_t*)(scratch + dim);
  for (int64_t g = 0; g < group; g++) {
    const float* source = row(s->q, seq * s->q_stride + (head * group + g) * dim, dim, s->bf16, scratch);
    memcpy(q + g * dim, source, dim * sizeof(float));
  }
  locate(s, seq, head, len, stride, at);
  score(s, at, len, stride, q, scores);
  float totals[group];
  for (int64_t g = 0; g < group; g++) totals[g] = softmax_weights(scores + g * stride, len, stride);
  mix(s, seq, head, at, len, stride, scores, totals);
  free(q);
}

/* kv: what the cache holds (KV_F32, KV_BF16, KV_FP8); k_scale, v_scale: an fp8 cache's scales (1 otherwise). */
void serve_paged_decode(const void* q, const void* k, const void* v, const int64_t* tables, const int64_t* lengths,
                        void* out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                        int64_t width, int64_t q_stride, float scale, int bf16, int kv, float k_scale, float v_scale,
                        int threads) {
  float fp8[256];
  if (kv == KV_FP8) fp8_table(fp8);
  Step s = {q, k, v, tables, lengths, out, heads, kv_heads, dim, block_size, width, q_stride, scale * k_scale,
            v_scale, bf16, kv, fp8};
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (int64_t seq = 0; seq < batch; seq++)
    for (int64_t head = 0; head < kv_heads; head++) attend(&s, seq, head);
}
