"""Numbers the backends' kernels share with the generic ops.

A file of its own, apart from base.py, because the JIT kernels freeze these in:
``jit_cache.track_sources`` recompiles a kernel when its files change, and an
edit to base.py should not make every kernel stale.
"""

BCE_EPSILON = 9.999999960041972e-13  # float32(1e-12), torch's BCE backward, in every dtype
