/* Streaming (non-temporal) writes of batched products with a short inner dimension, for psgrad._stream.

   products(dst, stride_sample, stride_row, b, a, n, p, t, d, threads) sets, for i < n, r < p, k < d,

       dst[i * stride_sample + r * stride_row + k] = sum_{s < t} b[(i * p + r) * t + s] * a[(i * t + s) * d + k]

   (float32; b [n, p, t] and a [n, t, d] contiguous): per example the [p, d] product of b_i and a_i, a
   batched GEMM with an inner dimension t. For t = 1 every element is one IEEE multiply, as in the GEMM, bit
   for bit; for t > 1 the sum runs in order s = 0, 1, ... (fused multiply-adds on AVX-512), within float32
   rounding of any other order. The destination is written with non-temporal stores, which skip the read of
   every destination cache line that ordinary stores make first and leave the caches alone: for results of
   gigabytes, written once, that read is half the memory traffic (NOTE [streaming writes] in _stream.py).
   Returns 0, or -1 where this processor has neither AVX-512F nor AVX (the caller then uses a GEMM). The rows
   are split between `threads` threads; the GIL is released meanwhile. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PSGRAD_X86 1
#endif

/* The vector part of one row, for one instruction set: writes out[k..] for as long as whole vectors fit,
   with k at a vector-aligned address, and returns the first k it left. */
typedef long long (*Vector)(float *out, const float *b, const float *a, long long t, long long d, long long k);

typedef struct {
    float *dst;
    const float *b, *a;
    long long sample_stride, row_stride, p, t, d, begin, end;
} Job;

static inline float dot_column(const float *b, const float *a, long long t, long long d, long long k) {
    float acc = b[0] * a[k];
    for (long long s = 1; s < t; s++) acc += b[s] * a[s * d + k];
    return acc;
}

/* The instruction set chosen once at import: its vector part and the alignment its streaming stores need
   (none where the processor has neither AVX-512F nor AVX). */
static Vector vector_part = NULL;
static uintptr_t vector_align = 0;

#ifdef PSGRAD_X86
__attribute__((target("avx512f"))) static long long vector_avx512(float *out, const float *b, const float *a,
                                                                  long long t, long long d, long long k) {
    for (; k + 16 <= d; k += 16) {
        __m512 acc = _mm512_mul_ps(_mm512_set1_ps(b[0]), _mm512_loadu_ps(a + k));
        for (long long s = 1; s < t; s++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(b[s]), _mm512_loadu_ps(a + s * d + k), acc);
        _mm512_stream_ps(out + k, acc);
    }
    return k;
}

__attribute__((target("avx"))) static long long vector_avx(float *out, const float *b, const float *a,
                                                           long long t, long long d, long long k) {
    for (; k + 8 <= d; k += 8) {
        __m256 acc = _mm256_mul_ps(_mm256_set1_ps(b[0]), _mm256_loadu_ps(a + k));
        for (long long s = 1; s < t; s++)
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(b[s]), _mm256_loadu_ps(a + s * d + k)));
        _mm256_stream_ps(out + k, acc);
    }
    return k;
}
#endif

static void choose_vector_part(void) {
#ifdef PSGRAD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        vector_part = vector_avx512;
        vector_align = 64;
    } else if (__builtin_cpu_supports("avx")) {
        vector_part = vector_avx;
        vector_align = 32;
    }
#endif
}

/* Rows [begin, end): scalar up to the first aligned address, the vector part, a scalar tail. */
static void *run_job(void *arg) {
    const Job *j = (const Job *)arg;
    const long long t = j->t, d = j->d;
    for (long long row = j->begin; row < j->end; row++) {
        long long i = row / j->p, r = row % j->p, k = 0;
        float *out = j->dst + i * j->sample_stride + r * j->row_stride;
        const float *a = j->a + i * t * d;
        const float *b = j->b + row * t;
        for (; k < d && ((uintptr_t)(out + k) & (vector_align - 1)); k++) out[k] = dot_column(b, a, t, d, k);
        k = vector_part(out, b, a, t, d, k);
        for (; k < d; k++) out[k] = dot_column(b, a, t, d, k);
    }
#ifdef PSGRAD_X86
    _mm_sfence(); /* streaming stores are weakly ordered: make them visible before the thread is joined */
#endif
    return NULL;
}

#define MAX_THREADS 64

static PyObject *products(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long dst, b, a;
    long long sample_stride, row_stride, n, p, t, d;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLKKLLLLi", &dst, &sample_stride, &row_stride, &b, &a, &n, &p, &t, &d, &threads))
        return NULL;
    if (t < 1) {
        PyErr_SetString(PyExc_ValueError, "products: the inner dimension must be at least 1");
        return NULL;
    }
    if (vector_part == NULL) return PyLong_FromLong(-1);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    long long rows = n * p;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int w = 0; w < threads; w++) {
        jobs[w] = (Job){(float *)(uintptr_t)dst, (const float *)(uintptr_t)b, (const float *)(uintptr_t)a,
                        sample_stride, row_stride, p, t, d, rows * w / threads, rows * (w + 1) / threads};
    }
    Py_BEGIN_ALLOW_THREADS
    for (int w = 1; w < threads; w++) started[w] = pthread_create(&ids[w], NULL, run_job, &jobs[w]) == 0;
    run_job(&jobs[0]);
    for (int w = 1; w < threads; w++) {
        if (started[w])
            pthread_join(ids[w], NULL);
        else
            run_job(&jobs[w]); /* no thread could be started: do its share here */
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(0);
}

static PyMethodDef methods[] = {
    {"products", products, METH_VARARGS, "Batched products with a short inner dimension, written with streaming stores "
                                         "(see the file's header)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cstream", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cstream(void) {
    choose_vector_part();
    PyObject *m = PyModule_Create(&module);
    /* whether this processor can take the streaming writes at all (else `products` returns -1) */
    if (m != NULL && PyModule_AddIntConstant(m, "usable", vector_part != NULL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
