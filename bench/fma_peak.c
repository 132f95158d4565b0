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
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define N 12
int main(void){
  long iters=200000000;
#ifdef W512
  __m512 a[N], b=_mm512_set1_ps(1.0000001f), c=_mm512_set1_ps(1e-7f);
  for(int i=0;i<N;i++) a[i]=_mm512_set1_ps((float)i);
  double t0=now();
  for(long k=0;k<iters;k++){
    #pragma GCC unroll 12
    for(int i=0;i<N;i++) a[i]=_mm512_fmadd_ps(a[i],b,c);
  }
  double t=now()-t0; float s=0; for(int i=0;i<N;i++) s+=_mm512_reduce_add_ps(a[i]);
  printf("zmm: %.1f GFLOP/s (%g)\n", iters*N*16*2/t/1e9, s);
#else
  __m256 a[N], b=_mm256_set1_ps(1.0000001f), c=_mm256_set1_ps(1e-7f);
  for(int i=0;i<N;i++) a[i]=_mm256_set1_ps((float)i);
  double t0=now();
  for(long k=0;k<iters;k++){
    #pragma GCC unroll 12
    for(int i=0;i<N;i++) a[i]=_mm256_fmadd_ps(a[i],b,c);
  }
  double t=now()-t0; float s=0; float o[8]; for(int i=0;i<N;i++){_mm256_storeu_ps(o,a[i]); for(int j=0;j<8;j++) s+=o[j];}
  printf("ymm: %.1f GFLOP/s (%g)\n", iters*N*8*2/t/1e9, s);
#endif
  return 0;}
