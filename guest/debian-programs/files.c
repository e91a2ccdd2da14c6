// ftvm-files: reads entropy (/dev/urandom, and getrandom, which blocks until the kernel's
// pool is ready: early in boot that needs the board's entropy device) and files on the
// virtio disk, given as arguments. Prints verdicts and checksums that are the same on any
// correct machine (compared between ftvm and QEMU), then "info:" lines that are not.
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

// Not all bytes equal, and some bytes differ between two reads: random enough to tell
// entropy from a stuck device.
static int looks_random(const unsigned char *a, const unsigned char *b, size_t n) {
    int varied = 0, differ = 0;
    for (size_t i = 1; i < n; i++) varied |= a[i] != a[0];
    differ = memcmp(a, b, n) != 0;
    return varied && differ;
}

int main(int argc, char **argv) {
    int ok = 1;
    unsigned char a[64], b[64];
    double started = now_s();
    ssize_t got = getrandom(a, sizeof a, 0);
    double getrandom_s = now_s() - started;
    int fd = open("/dev/urandom", O_RDONLY);
    ssize_t read_bytes = fd >= 0 ? read(fd, b, sizeof b) : -1;
    if (fd >= 0) close(fd);
    int random_ok = got == sizeof a && read_bytes == sizeof b && looks_random(a, b, sizeof a);
    printf("getrandom and /dev/urandom give %zu random bytes: %s\n", sizeof a, random_ok ? "yes" : "no");
    ok &= random_ok;

    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            printf("%s: cannot open\n", argv[i]);
            ok = 0;
            continue;
        }
        uint64_t hash = 1469598103934665603ull; // FNV-1a, 64-bit
        size_t total = 0, n;
        unsigned char buf[65536];
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
            for (size_t j = 0; j < n; j++) hash = (hash ^ buf[j]) * 1099511628211ull;
            total += n;
        }
        fclose(f);
        printf("%s: %zu bytes, fnv1a %016llx\n", argv[i], total, (unsigned long long)hash);
    }
    printf("info: getrandom waited %.1f ms\n", getrandom_s * 1e3);
    printf("files: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
