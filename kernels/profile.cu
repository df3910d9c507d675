// Profiling aid for fastnn/benchmarking/gpu_profile.py: holds a stream busy
// for a set time so the host can queue a whole training step (with CUDA events
// between its ops) before the device starts on it; the device then runs the
// queue back to back and the time between two events is device time only.
// Contract: kernels/README.md. Launch: one block of one thread.

// Busy-waits `ns` nanoseconds of the device's global timer (%globaltimer,
// the same clock on every SM), then returns.
extern "C" __global__ void spin_ns(long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < (unsigned long long)ns);
}
