"""CupyBackend's GEMMs: fastnn's own cuBLAS handle (recordable in CUDA graphs),
the float32/TF32/bf16 precisions of ``fn.set_precision``, bf16 operand bits and
bias_grad as a ones-GEMM. A mixin: it relies on CupyBackend's ``xp``, ``_kernel``,
``_launch_1d``, ``_fusable``, ``_ones``, ``_bf16``, ``_blas``, ``capturing`` and
(for ``_oom_guard``) ``_oom_error`` / ``_memory_error``.
"""
from __future__ import annotations

import numpy as np

from ..errors import CaptureUnsupported, warn_at_caller
from ..precision import get_precision
from . import cublas
from .base import GemmOperand, gemm_array, host_array
from .cupy_support import _FLOATS, _c_contiguous, _nbytes, _one_line, _oom_guard


class CupyGemmOps:
    """GEMM and bf16-operand methods of CupyBackend (before Backend in its MRO:
    ``super()`` here is Backend's generic CuPy path)."""

    # ------------------------------------------------------------ cuBLAS
    def _start_own_cublas(self) -> str:
        """Start fastnn's own cuBLAS handle (CUDA graphs can record its GEMMs,
        not CuPy's) and check its exact GEMM on every transpose case against the
        product computed on the host (not ``cupy.matmul``, which is TF32 when the
        backend starts under ``set_precision("tf32")``); returns the status line
        ``fastnn info`` prints. On any failure GEMMs stay with CuPy and training
        steps are not captured. Then one TF32 and one bf16 GEMM: a precision
        that fails there (or later, outside a recording) has its GEMMs on CuPy."""
        cupy = self.xp
        try:
            lib = cublas.load_library(cupy)
            self._blas = cublas.Handle(cupy, lib)
            rng = np.random.default_rng(0)
            for dtype in (np.float32, np.float64):
                a_host = rng.standard_normal((5, 3)).astype(dtype)
                b_host = rng.standard_normal((3, 4)).astype(dtype)
                want = a_host.astype(np.float64) @ b_host.astype(np.float64)
                a, b = cupy.asarray(a_host), cupy.asarray(b_host)
                at, bt = cupy.ascontiguousarray(a.T), cupy.ascontiguousarray(b.T)
                for x, y, ta, tb in ((a, b, False, False), (at, b, True, False),
                                     (a, bt, False, True), (at, bt, True, True)):
                    got = self._gemm(x, y, None, ta, tb, "float32", strict=True)
                    # exact float32 is ~1e-7 here; TF32 or a wrong layout is >= 1e-4
                    err = float(np.abs(host_array(got) - want).max())
                    if not err <= 1e-5:
                        raise RuntimeError(f"{dtype.__name__} trans=({ta}, {tb}) differs from "
                                           f"the exact product by {err:.3g}")
        except Exception as exc:
            self._blas = None
            return f"CuPy's matmul (own cuBLAS handle unusable: {_one_line(exc)})"
        # Which libcublas file: another package may have mapped a second one.
        name = str(getattr(lib, "_name", "") or "").rsplit("/", 1)[-1]
        on = f" on {name}" if name else ""
        refused = [self._probe_reduced_precision(p) for p in ("tf32", "bf16")]
        notes = "".join(f"; {note}" for note in refused if note)
        return f"own cuBLAS handle{on} (training steps can be captured in CUDA graphs){notes}"

    def _probe_reduced_precision(self, precision: str) -> str | None:
        """One float32 GEMM at ``precision`` ("tf32" or "bf16") on the own handle,
        checked against the host: None when right, else a note, and GEMMs at
        that precision go to CuPy (``_blas_refused``)."""
        cupy = self.xp
        rng = np.random.default_rng(1)
        a_host = rng.standard_normal((5, 3)).astype(np.float32)
        b_host = rng.standard_normal((3, 4)).astype(np.float32)
        a, b = cupy.asarray(a_host), cupy.asarray(b_host)
        try:
            got = host_array(self._gemm(a, b, None, False, False, precision, strict=True))
            if precision == "bf16":  # exact products of the bf16 inputs, float32 sums
                a_host, b_host = (host_array(self._bf16_rounded(x)) for x in (a, b))
                bound = 1e-5
            else:
                bound = 1e-2  # TF32 keeps 10 mantissa bits; a wrong layout is off by ~1
            want = a_host.astype(np.float64) @ b_host.astype(np.float64)
            err = float(np.abs(got - want).max())
            if not err <= bound:
                raise RuntimeError(f"differs from the host product by {err:.3g}")
        except Exception as exc:
            self._blas_refused.add(precision)
            return f"{precision} GEMMs on CuPy's matmul ({_one_line(exc)})"
        finally:
            self._bf16.clear()  # the probe's scratch, of no training run's size
        return None

    def _blas_failed(self, precision: str, exc) -> None:
        """A GEMM on the own handle failed outside a recording: say so once, and
        leave this precision's GEMMs to CuPy from now on (the fit goes on)."""
        self._blas_refused.add(precision)
        self.blas_status += f"; {precision} GEMMs on CuPy's matmul since: {_one_line(exc)}"
        warn_at_caller(f"fastnn: cuBLAS GEMM failed ({_one_line(exc)}); {precision} GEMMs "
                       "now run on CuPy's matmul, and new CUDA-graph recordings of them fail")

    def _blas_operands(self, a, b, out, precision: str) -> bool:
        nd = self.xp.ndarray
        if precision in self._blas_refused:
            return False
        # The handle belongs to the device it was made on (the backend's).
        if self.xp.cuda.runtime.getDevice() != self._device_id:
            return False
        if not (isinstance(a, nd) and isinstance(b, nd) and a.ndim == 2 and b.ndim == 2):
            return False
        if a.dtype not in _FLOATS or b.dtype != a.dtype:
            return False
        if not (_c_contiguous(a) and _c_contiguous(b)):
            return False
        return out is None or (isinstance(out, nd) and out.dtype == a.dtype
                               and _c_contiguous(out))

    @_oom_guard("gemm", lambda a, b, *r, **k: _nbytes(gemm_array(a), gemm_array(b)))
    def gemm(self, a, b, out=None, trans_a=False, trans_b=False):
        """``out = op(a) @ op(b)`` on fastnn's cuBLAS handle, at the GEMM precision
        of ``fn.set_precision`` (float32, TF32 or bf16 inputs; float64 exact).
        ``a``/``b`` may be ``gemm_operand`` results (bf16 bits converted once)."""
        return self._gemm(a, b, out, trans_a, trans_b, get_precision())

    @property
    def prepares_gemm_operands(self) -> bool:
        return self._blas is not None and get_precision() == "bf16"

    def gemm_operand(self, x, bits_buffer):
        """Under bf16, ``x`` (float32, 2-D, C-contiguous) with its bf16 bits in
        ``bits_buffer(shape)``: a layer converts its input and weight once in the
        forward pass and its ``dz`` once in the backward pass, not per GEMM."""
        if not (self._bf16_operand_ok(x) and self._fusable(x)):
            return x
        return GemmOperand(x, self._write_bf16(x, bits_buffer(x.shape)))

    def _gemm(self, a, b, out, trans_a, trans_b, precision: str, strict: bool = False):
        """``strict``: a cuBLAS error is raised, never answered by CuPy (the probes)."""
        a_bits, b_bits = getattr(a, "bits", None), getattr(b, "bits", None)
        a, b = gemm_array(a), gemm_array(b)
        blas = self._blas
        # float64 GEMMs are exact whatever the policy (their own entry in _blas_refused)
        kind = "float64" if a.dtype == np.float64 else precision
        if blas is None or not self._blas_operands(a, b, out, kind):
            return self._cupy_gemm(a, b, out, trans_a, trans_b, precision)
        m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
        kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
        if kb != k or 0 in (m, n, k) or (out is not None and out.shape != (m, n)):
            return super().gemm(a, b, out, trans_a, trans_b)  # CuPy's error, or an empty product
        if out is None:
            out = self.xp.empty((m, n), dtype=a.dtype)
        try:
            if a.dtype == np.float64:
                blas.gemm(a, b, out, trans_a, trans_b, data_type=cublas.R_64F,
                          compute=cublas.COMPUTE_64F)
            elif precision == "bf16":
                blas.gemm(a, b, out, trans_a, trans_b, data_type=cublas.R_16BF,
                          compute=cublas.COMPUTE_32F,
                          a_bits=self._to_bf16(a, "a") if a_bits is None else a_bits,
                          b_bits=self._to_bf16(b, "b") if b_bits is None else b_bits)
            else:
                compute = (cublas.COMPUTE_32F_FAST_TF32 if precision == "tf32"
                           else cublas.COMPUTE_32F)
                blas.gemm(a, b, out, trans_a, trans_b, data_type=cublas.R_32F, compute=compute)
        except cublas.CublasError as exc:
            if self.capturing or strict:
                raise  # a recording fails (fit runs this step op by op); a probe says why
            self._blas_failed(kind, exc)
            return self._cupy_gemm(a, b, out, trans_a, trans_b, precision)
        return out

    def _cupy_gemm(self, a, b, out, trans_a, trans_b, precision: str):
        """The GEMM on CuPy's matmul (Backend's generic path), bf16 inputs rounded."""
        if precision == "bf16" and a.dtype == b.dtype == np.float32:
            # CuPy's matmul has no bf16 inputs: give it the bf16 values (their
            # products are exact in float32, as in a bf16 GEMM's accumulation)
            a, b = self._bf16_rounded(a), self._bf16_rounded(b)
        return super().gemm(a, b, out, trans_a, trans_b)

    def _to_bf16(self, x, operand: str):
        """bf16 bits of float32 ``x`` (round to nearest even) in a reused scratch buffer."""
        key = (operand, x.size)
        bits = self._bf16.get(key)
        if bits is None:
            bits = self._bf16[key] = self.xp.empty((x.size,), dtype=np.uint16)
        return self._write_bf16(x, bits)

    def _bf16_rounded(self, x):
        """float32 ``x`` rounded to bf16, as float32 values (a new array)."""
        x = self.xp.ascontiguousarray(x)
        if x.size == 0:
            return x  # nothing to round (and a launch of no blocks is an error)
        bits = self._write_bf16(x, self.xp.empty((x.size,), dtype=np.uint16))
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(x.shape)

    def _write_bf16(self, x, bits):
        """One f32_to_bf16 launch: ``bits`` (uint16, x.size elements) = bf16(x)."""
        self._launch_1d(self._kernel("convert.cu", "f32_to_bf16"), x.size,
                        (x, bits, np.int64(x.size)))
        return bits

    def bias_grad(self, dz, out=None):
        """Column sums of dz (N, F) as ``ones(1, N) @ dz`` on cuBLAS, always exact
        float32 (gradients never take TF32/bf16 shortcuts)."""
        ok_out = out is None or (self._fusable(out) and out.dtype == dz.dtype
                                 and out.shape == dz.shape[1:])
        exact = "float64" if dz.dtype == np.float64 else "float32"
        if self._blas is None or dz.ndim != 2 or not self._fusable(dz) \
                or not ok_out or exact in self._blas_refused:
            return super().bias_grad(dz, out)  # a sum, not CuPy's matmul (TF32 under "tf32")
        n, f = dz.shape
        ones = self._ones.get((n, dz.dtype))
        if ones is None:
            # While recording, the fill is recorded, not run: garbage if the recording fails.
            if self.capturing:
                raise CaptureUnsupported(f"bias_grad over {n} rows first runs while a CUDA graph "
                                         "records (run one ordinary step first)")
            ones = self._ones[(n, dz.dtype)] = self.xp.ones((1, n), dtype=dz.dtype)
        if out is None:
            out = self.xp.empty((f,), dtype=dz.dtype)
        self._gemm(ones, dz, out.reshape(1, f), False, False, "float32")
        return out

    def _bf16_operand_ok(self, x) -> bool:
        """``x`` can take its bf16 bits in the pass that writes it (gemm_operand's test)."""
        return self.prepares_gemm_operands and x.dtype == np.float32 and x.ndim == 2
