/* The benchmarks' touch loops, at C speed so that a per-touch time is the fault's and not the
 * interpreter's. Built at run time into a temporary directory (benchmarks/native.py) and loaded
 * with ctypes; ctypes releases the GIL around every call.
 *
 * A "touch" is one access to the first 8 bytes of a page:
 *   read:  a load;
 *   write: a locked OR with 0, which the CPU performs (and faults) as a write but which leaves the
 *          bytes as they were, so a written page can still be checked against its source.
 * Times are CLOCK_MONOTONIC (vDSO, no system call).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <time.h>

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void touch(char *address, int write) {
    volatile uint64_t *word = (volatile uint64_t *)address;
    if (write)
        __atomic_fetch_or(word, 0, __ATOMIC_RELAXED);
    else
        (void)*word;
}

/* Touch pages[0..count) of base (page indices), in order. When latencies is not NULL, the time
 * of each touch goes to latencies[k] (ns, saturated at 2^32-1). Returns the loop's total time. */
uint64_t sfb_touch_list(char *base, uint64_t page_size, const uint64_t *pages, uint64_t count,
                        uint32_t *latencies, int write) {
    uint64_t start = now_ns();
    if (latencies) {
        for (uint64_t k = 0; k < count; k++) {
            char *address = base + pages[k] * page_size;
            uint64_t before = now_ns();
            touch(address, write);
            uint64_t spent = now_ns() - before;
            latencies[k] = spent > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)spent;
        }
    } else {
        for (uint64_t k = 0; k < count; k++) touch(base + pages[k] * page_size, write);
    }
    return now_ns() - start;
}

/* Touch every page of [base, base + length) in address order. Returns the loop's time. */
uint64_t sfb_touch_seq(char *base, uint64_t length, uint64_t page_size, int write) {
    uint64_t start = now_ns();
    for (uint64_t offset = 0; offset < length; offset += page_size) touch(base + offset, write);
    return now_ns() - start;
}

/* memcpy(destination, source, length); returns its time. */
uint64_t sfb_copy(char *destination, const char *source, uint64_t length) {
    uint64_t start = now_ns();
    memcpy(destination, source, length);
    __asm__ volatile("" ::: "memory");
    return now_ns() - start;
}

/* Pages that differ between got and want: pages[0..count) when pages is not NULL, else the
 * first count pages. */
uint64_t sfb_mismatched_pages(const char *got, const char *want, uint64_t page_size,
                              const uint64_t *pages, uint64_t count) {
    uint64_t bad = 0;
    for (uint64_t k = 0; k < count; k++) {
        uint64_t offset = (pages ? pages[k] : k) * page_size;
        if (memcmp(got + offset, want + offset, page_size) != 0) bad++;
    }
    return bad;
}

/* Fill buffer with bytes that differ from page to page and from run to run (xorshift64* seeded
 * by seed and the word's position), so a page served from the wrong offset, a zero page or a
 * stale page never passes for the right one. length is a multiple of 8. */
void sfb_fill_pattern(char *buffer, uint64_t length, uint64_t seed) {
    uint64_t *words = (uint64_t *)buffer;
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    for (uint64_t k = 0; k < length / 8; k++) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        words[k] = (state * 0x2545F4914F6CDD1Dull) ^ k;
    }
}

/* Mean cost of one now_ns() pair, the floor under every per-touch time. */
uint64_t sfb_timer_overhead_ns(void) {
    const int rounds = 100000;
    uint64_t start = now_ns();
    for (int k = 0; k < rounds; k++) {
        volatile uint64_t sink = now_ns();
        (void)sink;
    }
    return (now_ns() - start) / rounds;
}
