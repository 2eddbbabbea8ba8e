// ferry-workload: a task for Ferry's tests, demo and benchmark.
//
//   ferry-workload [--mib N] [--dirty MIB_PER_S] [--pattern seq|uniform|hot] [--scan 0|1]
//                  [--interval-ms MS] [--threads N] [--files N] [--procs N] [--seccomp 0|1]
//
// Allocates N MiB of incompressible data and appends a heartbeat line to stdout every interval:
//   hb SEQ MONOTONIC_NS REALTIME_NS
// Pages are dirtied at the given rate by bumping a counter in each page's last word, which the
// checksum leaves out (so a test can compare checksums while the content does change, as a real
// task's does; a tracker that compares content must see these writes): in address order
// (seq), at random (uniform) or 90 % of them in the first 10 % of memory (hot). --scan 1 reads
// its memory in address order between heartbeats (every page, over and over). SIGUSR1 makes it
// print "sum HEX" of its memory. --threads, --files and --procs make the task that many threads,
// open descriptors (of /dev/null) and processes, for measuring how a migration scales with them.
// --seccomp 1 installs a seccomp filter (all threads and processes) that kills the task if it
// ever calls userfaultfd(): a sandboxed service, which a migration must not make call it.
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t want_sum = 0;
static void on_usr1(int sig) { (void)sig; want_sum = 1; }

static uint64_t now_ns(clockid_t c) {
  struct timespec ts;
  clock_gettime(c, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t checksum(const uint64_t *p, size_t words) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < words; i++)
    if (i % 512 != 511) h = (h ^ p[i]) * 1099511628211ull;  // each page's last word is its write counter
  return h;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void say(const char *fmt, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) (void)!write(1, buf, (size_t)n);
}

/* userfaultfd() kills the whole process; every other system call is allowed. */
static int kill_on_userfaultfd(void) {
  struct sock_filter f[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 3),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof f / sizeof f[0], f};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) return -1;
  return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
}

static void *idle_thread(void *arg) {
  (void)arg;
  for (;;) pause();
  return NULL;
}

int main(int argc, char **argv) {
  long mib = 64, dirty = 0, interval_ms = 10, threads = 1, files = 0, procs = 1, pattern = 0, scan = 0, sandbox = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--mib")) mib = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--dirty")) dirty = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--interval-ms")) interval_ms = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--threads")) threads = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--files")) files = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--procs")) procs = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--pattern")) pattern = !strcmp(argv[i + 1], "uniform") ? 1 : !strcmp(argv[i + 1], "hot") ? 2 : 0;
    else if (!strcmp(argv[i], "--scan")) scan = atol(argv[i + 1]);
    else if (!strcmp(argv[i], "--seccomp")) sandbox = atol(argv[i + 1]);
    else {
      fprintf(stderr, "ferry-workload: unknown option %s\n", argv[i]);
      return 2;
    }
  }
  if (mib < 0 || dirty < 0 || interval_ms <= 0 || threads < 1 || files < 0 || procs < 1) {
    fprintf(stderr, "ferry-workload: sizes and rates must be positive\n");
    return 2;
  }
  // Before any thread or process is made: they all inherit it.
  if (sandbox && kill_on_userfaultfd()) {
    perror("ferry-workload: seccomp");
    return 1;
  }
  if (files > 0) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)files + 64) {
      rl.rlim_cur = rl.rlim_max < (rlim_t)files + 64 ? rl.rlim_max : (rlim_t)files + 64;
      setrlimit(RLIMIT_NOFILE, &rl);
    }
    for (long i = 0; i < files; i++) {
      if (open("/dev/null", O_RDONLY) < 0) {
        perror("ferry-workload: open");
        return 1;
      }
    }
  }
  // Idle helper processes (they end with this one) and threads.
  pid_t leader = getpid();
  for (long i = 1; i < procs; i++) {
    pid_t c = fork();
    if (c < 0) {
      perror("ferry-workload: fork");
      return 1;
    }
    if (c == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != leader) _exit(0);
      for (;;) pause();
    }
  }
  for (long i = 1; i < threads; i++) {
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64 * 1024);
    if (pthread_create(&t, &a, idle_thread, NULL) != 0) {
      fprintf(stderr, "ferry-workload: cannot create thread %ld\n", i);
      return 1;
    }
  }
  size_t bytes = (size_t)mib << 20;
  size_t words = bytes / 8, pages = bytes / 4096;
  uint64_t *mem = NULL;
  if (bytes) {
    mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      perror("ferry-workload: mmap");
      return 1;
    }
    uint64_t x = 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid() ^ now_ns(CLOCK_REALTIME);
    for (size_t i = 0; i < words; i++) {  // xorshift64*: incompressible
      x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
      mem[i] = x * 0x2545F4914F6CDD1Dull;
    }
  }
  signal(SIGUSR1, on_usr1);
  say("ready %ld %016llx\n", mib, (unsigned long long)checksum(mem, words));

  double pages_per_tick = pages ? (double)dirty * 256.0 * (double)interval_ms / 1000.0 : 0;
  double owed = 0;
  size_t next_page = 0, scan_page = 0;
  uint64_t rnd = 0x2545F4914F6CDD1Dull ^ (uint64_t)getpid(), scan_sum = 0;
  uint64_t seq = 0;
  struct timespec tick = {interval_ms / 1000, (interval_ms % 1000) * 1000000L};
  for (;;) {
    say("hb %llu %llu %llu\n", (unsigned long long)seq++, (unsigned long long)now_ns(CLOCK_MONOTONIC),
        (unsigned long long)now_ns(CLOCK_REALTIME));
    if (want_sum) {
      want_sum = 0;
      say("sum %016llx\n", (unsigned long long)checksum(mem, words));
    }
    owed += pages_per_tick;
    while (owed >= 1.0) {
      size_t pg = next_page;
      if (pattern) {
        rnd ^= rnd << 13, rnd ^= rnd >> 7, rnd ^= rnd << 17;
        pg = pattern == 2 && rnd % 10 ? (rnd >> 8) % (pages / 10 + 1) : (rnd >> 8) % pages;
      }
      volatile uint64_t *w = mem + pg * 512 + 511;
      *w = *w + 1;  // the page's write counter: new content, the checksum unchanged
      next_page = (next_page + 1) % pages;
      owed -= 1.0;
    }
    if (scan && pages) {
      // Reads on, page after page, until the next heartbeat is due.
      uint64_t due = now_ns(CLOCK_MONOTONIC) + (uint64_t)interval_ms * 1000000ull;
      while (now_ns(CLOCK_MONOTONIC) < due)
        for (int k = 0; k < 64; k++, scan_page = (scan_page + 1) % pages) scan_sum += ((volatile uint64_t *)mem)[scan_page * 512];
    } else {
      nanosleep(&tick, NULL);
    }
  }
}
