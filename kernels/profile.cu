// Profiling aid for fastnn/benchmarking/gpu_profile.py: holds a stream busy
// for a set time so the host can queue a whole training step (with CUDA events
// between its ops) before the device starts on it; the device then runs the
// queue back to back and the time between two events is device time only.
// Contract: kernels/README.md. Launch: one block of one thread.

// Busy-waits `ns` nanoseconds of the device's global timer (%globaltimer,
// the same clock on every SM), then returns. Also stops after 4*ns SM cycles
// (clock64 always ticks; at <= 4 GHz that is never first): a timer that
// stood still in some virtual machine must not hang the device.
extern "C" __global__ void spin_ns(long long ns) {
    unsigned long long start, now;
    const long long cycles0 = clock64();
    const long long max_cycles = 4 * ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < (unsigned long long)ns && clock64() - cycles0 < max_cycles);
}
