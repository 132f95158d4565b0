/* Peak FMA throughput of one core, 256-bit (AVX2) vs 512-bit (AVX-512) vectors: 12 independent
 * accumulator chains, enough to cover two FMA ports' latency. Evidence for docs/kernels.md (what an
 * AVX2-only build can reach against the native one on this CPU); not part of rlx.
 *
 *   gcc -O3 -mavx2 -mfma bench/fma_peak.c -o /tmp/fma256 && /tmp/fma256
 *   gcc -O3 -mavx512f -mfma -DW512 bench/fma_peak.c -o /tmp/fma512 && /tmp/fma512
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#ifdef W512
typedef __m512 vec;
#define LANES 16
#define NAME "zmm"
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define STORE _mm512_storeu_ps
#else
typedef __m256 vec;
#define LANES 8
#define NAME "ymm"
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define STORE _mm256_storeu_ps
#endif
#define CHAINS 12

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const long iters = 200000000;
  vec acc[CHAINS], b = SET1(1.0000001f), c = SET1(1e-7f);
  for (int i = 0; i < CHAINS; i++) acc[i] = SET1((float)i);
  double t0 = now();
  for (long k = 0; k < iters; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; i++) acc[i] = FMA(acc[i], b, c);
  }
  double seconds = now() - t0;
  float sum = 0, lanes[LANES];  /* the result is used, so the loop is not optimised away */
  for (int i = 0; i < CHAINS; i++) {
    STORE(lanes, acc[i]);
    for (int j = 0; j < LANES; j++) sum += lanes[j];
  }
  printf("%s: %.1f GFLOP/s (checksum %g)\n", NAME, iters * CHAINS * LANES * 2.0 / seconds / 1e9, sum);
  return 0;
}
