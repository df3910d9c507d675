/* A host-memory stand-in for the libcublas calls fastnn makes, with the C
 * prototypes of cublas_api.h (CUDA 11-13), so tests/test_cublas.py drives
 * fastnn/backends/cublas.py through real ctypes marshalling: argument types,
 * pointer widths, the alpha/beta host pointers, column-major leading dimensions.
 * cublasGemmEx checks its arguments as cuBLAS does: m, n, k >= 0, transa/transb
 * OP_N or OP_T, lda >= max(1, op N ? m : k), ldb >= max(1, op N ? k : n),
 * ldc >= max(1, m) (else CUBLAS_STATUS_INVALID_VALUE, 7), and only the type
 * combinations fastnn uses (32F with compute 32F or 32F_FAST_TF32; 64F with
 * 64F; 16BF inputs, 32F output, compute 32F; else NOT_SUPPORTED, 15), so a
 * wrong row- to column-major mapping fails even when it indexes in bounds.
 * Matrices live in host memory here; on a GPU the same calls get device pointers.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef int cublasStatus_t;
typedef void *cublasHandle_t;
typedef void *cudaStream_t;

enum { OP_N = 0, OP_T = 1 };
enum { R_32F = 0, R_64F = 1, R_16BF = 14 };
enum { COMPUTE_32F = 68, COMPUTE_64F = 70, COMPUTE_32F_FAST_TF32 = 77 };
enum { STATUS_NOT_INITIALIZED = 1, STATUS_INVALID_VALUE = 7, STATUS_NOT_SUPPORTED = 15 };

static struct {
    int created, math_mode;
    cudaStream_t stream;
    void *workspace;
    size_t workspace_bytes;
    long long gemms;
} state;

cublasStatus_t cublasCreate_v2(cublasHandle_t *handle) {
    state.created = 1;
    *handle = (cublasHandle_t)&state;
    return 0;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) { state.created = 0; return handle == &state ? 0 : 7; }
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, int mode) { state.math_mode = mode; return handle == &state ? 0 : 7; }
cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    state.stream = stream;
    state.workspace = NULL;  /* as cuBLAS: setting the stream drops a user workspace */
    state.workspace_bytes = 0;
    return handle == &state ? 0 : 7;
}
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void *workspace, size_t bytes) {
    state.workspace = workspace;
    state.workspace_bytes = bytes;
    return handle == &state ? 0 : 7;
}

static double load(const void *p, int type, long long i) {
    if (type == R_32F) return ((const float *)p)[i];
    if (type == R_64F) return ((const double *)p)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;  /* bf16 */
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static int max1(int x) { return x > 1 ? x : 1; }

/* The cublasGemmEx type combinations fastnn uses (Atype == Btype checked apart). */
static int supported(int ab_type, int c_type, int compute) {
    if (ab_type == R_32F && c_type == R_32F)
        return compute == COMPUTE_32F || compute == COMPUTE_32F_FAST_TF32;
    if (ab_type == R_64F && c_type == R_64F) return compute == COMPUTE_64F;
    if (ab_type == R_16BF && c_type == R_32F) return compute == COMPUTE_32F;
    return 0;
}

/* C = alpha op(A) op(B) + beta C, column-major, op(A) m x k, op(B) k x n. */
cublasStatus_t cublasGemmEx(cublasHandle_t handle, int transa, int transb, int m, int n, int k,
                            const void *alpha, const void *A, int Atype, int lda,
                            const void *B, int Btype, int ldb, const void *beta, void *C,
                            int Ctype, int ldc, int computeType, int algo) {
    if (handle != &state || !state.created) return STATUS_NOT_INITIALIZED;
    if (state.workspace == NULL || state.workspace_bytes < (4u << 20)) return STATUS_INVALID_VALUE;
    if (Atype != Btype || m < 0 || n < 0 || k < 0 || algo != -1) return STATUS_INVALID_VALUE;
    if ((transa != OP_N && transa != OP_T) || (transb != OP_N && transb != OP_T))
        return STATUS_INVALID_VALUE;
    /* column-major: A is lda x (op N ? k : m), B is ldb x (op N ? n : k), C is ldc x n */
    if (lda < max1(transa == OP_N ? m : k) || ldb < max1(transb == OP_N ? k : n) || ldc < max1(m))
        return STATUS_INVALID_VALUE;
    if (!supported(Atype, Ctype, computeType)) return STATUS_NOT_SUPPORTED;
    int wide = computeType == COMPUTE_64F;
    double a = wide ? *(const double *)alpha : *(const float *)alpha;
    double b = wide ? *(const double *)beta : *(const float *)beta;
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < m; i++) {
            double sum = 0.0;
            for (int p = 0; p < k; p++) {
                long long ia = transa == OP_T ? (long long)i * lda + p : (long long)p * lda + i;
                long long ib = transb == OP_T ? (long long)p * ldb + j : (long long)j * ldb + p;
                sum += load(A, Atype, ia) * load(B, Btype, ib);
            }
            long long ic = (long long)j * ldc + i;
            double old = b != 0.0 ? load(C, Ctype, ic) : 0.0;
            if (Ctype == R_64F) ((double *)C)[ic] = a * sum + b * old;
            else ((float *)C)[ic] = (float)(a * sum + b * old);
        }
    }
    state.gemms++;
    return 0;
}

long long shim_gemm_count(void) { return state.gemms; }
int shim_math_mode(void) { return state.math_mode; }
