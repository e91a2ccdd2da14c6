// ftvm-threads: threads that share work through a mutex and a condition variable, sleep
// on timers and are joined: futexes, clone, the scheduler and timer interrupts. The sums
// are the same on any correct machine (compared between ftvm and QEMU).
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define THREADS 4
#define ROUNDS 200
#define WORK 5000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_changed = PTHREAD_COND_INITIALIZER;
static int turn;             // whose turn it is to add to the shared sum
static uint64_t shared_sum;  // changed only on one's turn: the order is fixed
static uint64_t own_sums[THREADS];

static void *worker(void *arg) {
    int me = (int)(intptr_t)arg;
    uint64_t mine = 0;
    for (int round = 0; round < ROUNDS; round++) {
        uint64_t x = (uint64_t)(me + 1) * 2654435761u + (uint64_t)round;
        for (int i = 0; i < WORK; i++) x = x * 6364136223846793005ull + 1442695040888963407ull;
        mine += x >> 33;
        pthread_mutex_lock(&lock);
        while (turn != me) pthread_cond_wait(&turn_changed, &lock);
        shared_sum = shared_sum * 31 + (x >> 40);
        turn = (turn + 1) % THREADS;
        pthread_cond_broadcast(&turn_changed);
        pthread_mutex_unlock(&lock);
        if (round % 50 == 0) {
            struct timespec nap = {0, 2000000}; // 2 ms: a timer per thread
            nanosleep(&nap, NULL);
        }
    }
    own_sums[me] = mine;
    return NULL;
}

int main(void) {
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) {
        if (pthread_create(&threads[i], NULL, worker, (void *)(intptr_t)i) != 0) {
            printf("threads: FAILED to create thread %d\n", i);
            return 1;
        }
    }
    for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < THREADS; i++) printf("thread %d sum %llu\n", i, (unsigned long long)own_sums[i]);
    printf("shared sum %llu\n", (unsigned long long)shared_sum);
    printf("threads: ok\n");
    return 0;
}
