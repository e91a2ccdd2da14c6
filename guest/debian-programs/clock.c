// ftvm-clock: reads the clock the way every dynamically linked glibc program does, through
// the vDSO (clock_gettime, gettimeofday, time), whose fast path executes `rdtime` in user
// mode, and once more with `rdtime` itself. Prints verdicts that are the same on any
// correct machine (compared between ftvm and QEMU), then "info:" lines that are not.
#include <stdio.h>
#include <stdlib.h>
#include <sys/auxv.h>
#include <sys/time.h>
#include <time.h>

static double seconds(struct timespec t) { return t.tv_sec + t.tv_nsec / 1e9; }

int main(void) {
    int ok = 1;
    unsigned long vdso = getauxval(AT_SYSINFO_EHDR);
    printf("vdso: %s\n", vdso ? "mapped" : "missing");
    ok &= vdso != 0;

    struct timespec real, mono_first, mono_last;
    clock_gettime(CLOCK_REALTIME, &real);
    clock_gettime(CLOCK_MONOTONIC, &mono_first);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    time_t now = time(NULL);
    unsigned long ticks_first, ticks_last;
    __asm__ volatile("rdtime %0" : "=r"(ticks_first));

    // The clocks agree with each other (gettimeofday truncates to microseconds, so it may read
    // up to a microsecond before the clock_gettime that came first).
    double gtod = tv.tv_sec + tv.tv_usec / 1e6;
    int agree = gtod - seconds(real) > -1e-6 && gtod - seconds(real) < 1 && now - real.tv_sec >= 0 && now - real.tv_sec <= 1;
    printf("clock_gettime, gettimeofday and time agree: %s\n", agree ? "yes" : "no");
    ok &= agree;

    // They move forward, and not faster than real time would allow over a short busy loop.
    int monotonic = 1;
    struct timespec prev = mono_first;
    for (int i = 0; i < 100000; i++) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        monotonic &= seconds(t) >= seconds(prev);
        prev = t;
    }
    clock_gettime(CLOCK_MONOTONIC, &mono_last);
    __asm__ volatile("rdtime %0" : "=r"(ticks_last));
    int advances = seconds(mono_last) > seconds(mono_first) && ticks_last > ticks_first;
    printf("monotonic and never back over 100000 reads: %s\n", monotonic && advances ? "yes" : "no");
    ok &= monotonic && advances;

    // The wall clock came from the board's RTC: not 1970.
    struct tm utc;
    gmtime_r(&real.tv_sec, &utc);
    int dated = utc.tm_year + 1900 >= 2025;
    printf("the date is after 2025: %s\n", dated ? "yes" : "no");
    ok &= dated;

    printf("info: realtime %lld.%09ld\n", (long long)real.tv_sec, real.tv_nsec);
    printf("info: 100000 clock reads took %.3f ms\n", (seconds(mono_last) - seconds(mono_first)) * 1e3);
    printf("clock: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
