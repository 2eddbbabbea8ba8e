// ferry-memcheck: a task that proves its memory survived a migration page by page.
//
//   ferry-memcheck [--mib N] [--rate MIB_PER_S] [--pattern uniform|hot|seq] [--threads N]
//                  [--procs N] [--shared MIB] [--churn 0|1] [--scan 0|1] [--interval-ms MS]
//                  [--text 0|1] [--move MS] [--dontfork MIB] [--wipeonfork MIB] [--fork-ms MS]
//
// Every process writes pages of its memory at the given rate (hot: 90 % of writes to 10 % of the
// pages; seq: in address order). Before each write it appends (page, sequence number) to a log
// file of its own in the working directory, so the record of what memory must hold lives outside
// that memory. A page's content is derived from its sequence number; sequence 0 means the page was
// dropped with MADV_DONTNEED and must read as zeros. On SIGUSR1 each process checks every page
// against its logs and prints "check NAME ok PAGES" or "check NAME BAD ..." (the main process
// passes the signal on to its children first).
//
// --churn 1 also maps, grows (mremap), moves and unmaps regions, drops pages and forks new
// processes while it runs; --shared puts a shared anonymous region in the tree; --scan 1 reads
// all memory in address order without pause (what post-copy handles worst); --text 1 makes pages
// as compressible as text (64 bytes repeated); --move MS moves each process's main region to a
// new address (mremap) every MS milliseconds, its writers held meanwhile; --dontfork MIB gives
// the main process a region its children do not inherit (MADV_DONTFORK), checked with the rest;
// --wipeonfork MIB gives it a region children get empty (MADV_WIPEONFORK), as a TLS library's
// random generator keeps its state; --fork-ms MS makes it fork an idle child every MS
// milliseconds (three alive at most, the oldest ended), as a server forks workers; each such
// child first reads its copy of that region and prints "wipe ok PAGES" when it is all zeros,
// "wipe BAD PAGES" with the number of pages that are not. The main process
// prints heartbeats like ferry-workload: "hb SEQ MONOTONIC_NS REALTIME_NS".
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX_CHILDREN 64

static long mib = 64, rate = 0, threads = 1, procs = 1, shared_mib = 0, churn = 0, scan = 0, interval_ms = 10, text = 0, move_ms = 0, dontfork_mib = 0, wipe_mib = 0, fork_ms = 0;
static uint8_t *dontfork, *wipe;
static int pattern; /* 0 uniform, 1 hot, 2 seq */
static volatile sig_atomic_t want_check;
static pid_t children[MAX_CHILDREN];
static int nchildren;
static char name[32];
static uint8_t *shared;
static atomic_uint seqno = 1;

static void on_usr1(int s) {
  (void)s;
  want_check = 1;
}

static uint64_t now_ns(clockid_t c) {
  struct timespec t;
  clock_gettime(c, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void say(const char *fmt, ...) {
  char b[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(b, sizeof b, fmt, ap);
  va_end(ap);
  if (n > 0) (void)!write(1, b, (size_t)n);
}

static void fill(uint8_t *page, uint32_t idx, uint32_t seq) {
  uint64_t *w = (uint64_t *)page;
  uint64_t x = ((uint64_t)seq << 32 | idx) * 0x9E3779B97F4A7C15ull | 1;
  /* --text 1: 64 bytes repeated over the page, as compressible as text; still unique per write. */
  size_t fresh = text ? 8 : PAGE / 8;
  for (size_t i = 0; i < PAGE / 8; i++) {
    if (i < fresh) x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    w[i] = i < fresh ? x : w[i % fresh];
  }
}

static int matches(const uint8_t *page, uint32_t idx, uint32_t seq) {
  static __thread uint8_t want[PAGE];
  if (seq == 0) {
    for (size_t i = 0; i < PAGE; i++)
      if (page[i]) return 0;
    return 1;
  }
  fill(want, idx, seq);
  return memcmp(want, page, PAGE) == 0;
}

/* A region written once at the start (page i holds sequence 1): its page count, or -1 and why. */
static long check_filled(const uint8_t *r, long mib, const char *what, char *bad, size_t badlen) {
  size_t np = (size_t)mib * (1 << 20) / PAGE;
  for (size_t i = 0; i < np; i++) {
    if (matches(r + i * PAGE, (uint32_t)i, 1)) continue;
    snprintf(bad, badlen, "page %zu of the region %s", i, what);
    return -1;
  }
  return (long)np;
}

/* One writer: its pages (idx % nw == w) of a region, its own log. */
struct writer {
  uint8_t *base;
  size_t pages;
  int w, nw, fd;
  char log[64];
  double per_tick;
  uint64_t rnd, cursor;
  int shared; /* MADV_DONTNEED does not zero shared memory: no drops there */
  pthread_mutex_t mu; /* held while writing; the check holds it so log and memory agree */
};

static uint64_t next_rand(uint64_t *s) {
  *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
  return *s;
}

static void write_page(struct writer *wr, size_t idx, int drop) {
  uint32_t seq = drop ? 0 : atomic_fetch_add(&seqno, 1);
  uint32_t e[2] = {(uint32_t)idx, seq};
  if (write(wr->fd, e, sizeof e) != sizeof e) _exit(3);
  if (drop) madvise(wr->base + idx * PAGE, PAGE, MADV_DONTNEED);
  else fill(wr->base + idx * PAGE, (uint32_t)idx, seq);
}

static size_t pick(struct writer *wr) {
  size_t mine = (wr->pages + (size_t)wr->nw - 1 - (size_t)wr->w) / (size_t)wr->nw, k;
  if (!mine) return (size_t)-1;
  if (pattern == 2) k = wr->cursor++ % mine;
  else if (pattern == 1 && next_rand(&wr->rnd) % 10 != 0) k = next_rand(&wr->rnd) % (mine / 10 + 1);
  else k = next_rand(&wr->rnd) % mine;
  return k * (size_t)wr->nw + (size_t)wr->w;
}

static void writer_open(struct writer *wr, const char *tag) {
  snprintf(wr->log, sizeof wr->log, "writes-%s-%s.log", name, tag);
  wr->fd = open(wr->log, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
  if (wr->fd < 0) {
    perror(wr->log);
    exit(1);
  }
}

static void *writer_loop(void *arg) {
  struct writer *wr = arg;
  double owed = 0;
  uint64_t n = 0;
  for (;;) {
    owed += wr->per_tick;
    pthread_mutex_lock(&wr->mu);
    for (; owed >= 1; owed--) {
      size_t idx = pick(wr);
      if (idx == (size_t)-1) break;
      write_page(wr, idx, churn && !wr->shared && ++n % 64 == 0);
    }
    pthread_mutex_unlock(&wr->mu);
    usleep((useconds_t)interval_ms * 1000);
  }
  return NULL;
}

/* Checks a region against a log: the last entry may or may not have reached memory. */
static long check_region(const uint8_t *base, size_t pages, const char *log, int nw, int w, char *bad, size_t badlen) {
  FILE *f = fopen(log, "r");
  if (!f) {
    snprintf(bad, badlen, "%s: %s", log, strerror(errno));
    return -1;
  }
  uint32_t *last = calloc(pages, 4), *prev = calloc(pages, 4);
  for (size_t i = 0; i < pages; i++) last[i] = prev[i] = 1; /* every page starts at sequence 1 */
  uint32_t e[2], tail = (uint32_t)-1;
  while (fread(e, sizeof e, 1, f) == 1) {
    if (e[0] >= pages) continue;
    prev[e[0]] = last[e[0]];
    last[e[0]] = e[1];
    tail = e[0];
  }
  fclose(f);
  long ok = 0;
  for (size_t i = (size_t)w; i < pages; i += (size_t)nw) {
    uint32_t want = last[i];
    if (matches(base + i * PAGE, (uint32_t)i, want) || (i == tail && matches(base + i * PAGE, (uint32_t)i, prev[i]))) {
      ok++;
      continue;
    }
    snprintf(bad, badlen, "page %zu of %s: expected sequence %u", i, log, want);
    ok = -1;
    break;
  }
  free(last);
  free(prev);
  return ok;
}

/* Regions that come and go (--churn); their expected content is kept here, in the process. */
struct churned {
  uint8_t *base;
  size_t pages;
  uint32_t seq;
  size_t dropped; /* one page dropped with MADV_DONTNEED, or -1 */
};
static struct churned ring[4];
static int ring_n;

static void churn_step(void) {
  /* Map, fill, grow or move, drop one page; keep at most four regions. */
  size_t pages = 64 + (size_t)(rand() % 512);
  uint8_t *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return;
  uint32_t seq = atomic_fetch_add(&seqno, 1);
  for (size_t i = 0; i < pages; i++) fill(p + i * PAGE, (uint32_t)i, seq);
  size_t grown = pages + 128;
  uint8_t *q = mremap(p, pages * PAGE, grown * PAGE, MREMAP_MAYMOVE);
  if (q == MAP_FAILED) q = p, grown = pages;
  for (size_t i = pages; i < grown; i++) fill(q + i * PAGE, (uint32_t)i, seq);
  size_t drop = (size_t)rand() % grown;
  madvise(q + drop * PAGE, PAGE, MADV_DONTNEED);
  if (ring_n == 4) {
    munmap(ring[0].base, ring[0].pages * PAGE);
    memmove(ring, ring + 1, sizeof ring[0] * 3);
    ring_n--;
  }
  ring[ring_n++] = (struct churned){q, grown, seq, drop};
}

static long check_churned(char *bad, size_t badlen) {
  long ok = 0;
  for (int r = 0; r < ring_n; r++)
    for (size_t i = 0; i < ring[r].pages; i++) {
      if (matches(ring[r].base + i * PAGE, (uint32_t)i, i == ring[r].dropped ? 0 : ring[r].seq)) {
        ok++;
        continue;
      }
      snprintf(bad, badlen, "page %zu of churned region %d: expected sequence %u", i, r, ring[r].seq);
      return -1;
    }
  return ok;
}

static void run_process(int is_main);

/* Moves a region elsewhere whole (what a growing buffer's realloc does); NULL if it could not. */
static uint8_t *move_region(uint8_t *base, size_t len) {
  void *to = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (to == MAP_FAILED) return NULL;
  void *q = mremap(base, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
  if (q == MAP_FAILED) {
    munmap(to, len);
    return NULL;
  }
  return q;
}

static pid_t spawn_child(const char *nm) {
  pid_t c = fork();
  if (c == 0) {
    nchildren = 0;
    snprintf(name, sizeof name, "%s", nm);
    run_process(0);
    _exit(0);
  }
  if (c > 0 && nchildren < MAX_CHILDREN) children[nchildren++] = c;
  return c;
}

static void run_process(int is_main) {
  size_t pages = (size_t)mib * (1 << 20) / PAGE;
  uint8_t *base = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    perror("mmap");
    exit(1);
  }
  for (size_t i = 0; i < pages; i++) fill(base + i * PAGE, (uint32_t)i, 1);
  struct writer *ws = calloc((size_t)threads, sizeof *ws);
  double per_tick = (double)rate * (1 << 20) / PAGE * (double)interval_ms / 1000.0 / (double)threads;
  for (int t = 0; t < threads; t++) {
    char tag[16];
    snprintf(tag, sizeof tag, "t%d", t);
    ws[t] = (struct writer){base, pages, t, (int)threads, -1, "", per_tick, 0x1234567ull + (uint64_t)t * 7919 + (uint64_t)getpid(), 0, 0, PTHREAD_MUTEX_INITIALIZER};
    writer_open(&ws[t], tag);
  }
  struct writer sw = {0};
  size_t spages = (size_t)shared_mib * (1 << 20) / PAGE;
  if (is_main && shared) {
    sw = (struct writer){shared, spages, 0, 1, -1, "", per_tick / 4 + 1, 99, 0, 1, PTHREAD_MUTEX_INITIALIZER};
    writer_open(&sw, "shared");
  }
  say("ready %s\n", name);
  for (int t = 0; t < threads; t++) {
    pthread_t th;
    if (rate > 0) pthread_create(&th, NULL, writer_loop, &ws[t]);
  }
  if (is_main && shared && rate > 0) {
    pthread_t th;
    pthread_create(&th, NULL, writer_loop, &sw);
  }
  uint64_t next = now_ns(CLOCK_MONOTONIC), seq = 0, ticks = 0, sum = 0;
  size_t sp = 0;
  int forked = 0;
  uint64_t next_move = now_ns(CLOCK_MONOTONIC) + (uint64_t)move_ms * 1000000ull;
  uint64_t next_fork = now_ns(CLOCK_MONOTONIC) + (uint64_t)fork_ms * 1000000ull;
  pid_t idle[3] = {0};
  int nidle = 0;
  for (;;) {
    if (is_main && fork_ms > 0 && now_ns(CLOCK_MONOTONIC) >= next_fork) {
      if (nidle == 3) {
        kill(idle[0], SIGKILL);
        waitpid(idle[0], NULL, 0);
        memmove(idle, idle + 1, sizeof idle[0] * 2);
        nidle--;
      }
      pid_t c = fork();
      if (c == 0) {
        size_t np = (size_t)wipe_mib * (1 << 20) / PAGE, bad = 0;
        for (size_t i = 0; i < np; i++) {
          const uint64_t *w = (const uint64_t *)(wipe + i * PAGE);
          for (size_t k = 0; k < PAGE / 8; k++) {
            if (w[k]) {
              bad++;
              break;
            }
          }
        }
        if (np) {
          if (bad) say("wipe BAD %zu\n", bad);
          else say("wipe ok %zu\n", np);
        }
        for (;;) pause();
      }
      if (c > 0) idle[nidle++] = c;
      next_fork = now_ns(CLOCK_MONOTONIC) + (uint64_t)fork_ms * 1000000ull;
    }
    if (move_ms > 0 && now_ns(CLOCK_MONOTONIC) >= next_move) {
      for (int t = 0; t < threads; t++) pthread_mutex_lock(&ws[t].mu);
      uint8_t *q = move_region(base, pages * PAGE);
      if (q) {
        base = q;
        for (int t = 0; t < threads; t++) ws[t].base = q;
      }
      for (int t = 0; t < threads; t++) pthread_mutex_unlock(&ws[t].mu);
      next_move = now_ns(CLOCK_MONOTONIC) + (uint64_t)move_ms * 1000000ull;
    }
    if (want_check) {
      want_check = 0;
      for (int c = 0; c < nchildren; c++) kill(children[c], SIGUSR1);
      char bad[256] = "";
      long total = 0, n;
      for (int t = 0; t < threads; t++) pthread_mutex_lock(&ws[t].mu);
      if (is_main && shared) pthread_mutex_lock(&sw.mu);
      for (int t = 0; t < threads && total >= 0; t++) total = (n = check_region(base, pages, ws[t].log, (int)threads, t, bad, sizeof bad)) < 0 ? -1 : total + n;
      if (total >= 0 && is_main && shared) total = (n = check_region(shared, spages, sw.log, 1, 0, bad, sizeof bad)) < 0 ? -1 : total + n;
      if (total >= 0) total = (n = check_churned(bad, sizeof bad)) < 0 ? -1 : total + n;
      if (total >= 0 && is_main) total = (n = check_filled(dontfork, dontfork_mib, "children do not inherit", bad, sizeof bad)) < 0 ? -1 : total + n;
      if (total >= 0 && is_main) total = (n = check_filled(wipe, wipe_mib, "children get empty", bad, sizeof bad)) < 0 ? -1 : total + n;
      for (int t = 0; t < threads; t++) pthread_mutex_unlock(&ws[t].mu);
      if (is_main && shared) pthread_mutex_unlock(&sw.mu);
      if (total >= 0) say("check %s ok %ld\n", name, total);
      else say("check %s BAD %s\n", name, bad);
    }
    if (scan) {
      /* Reads on until the next heartbeat is due. */
      while (now_ns(CLOCK_MONOTONIC) < next) {
        for (int k = 0; k < 64; k++, sp = (sp + 1) % pages) sum += base[sp * PAGE];
      }
    } else {
      uint64_t t = now_ns(CLOCK_MONOTONIC);
      if (t < next) usleep((useconds_t)((next - t) / 1000));
    }
    next += (uint64_t)interval_ms * 1000000ull;
    if (is_main) say("hb %llu %llu %llu\n", (unsigned long long)seq++, (unsigned long long)now_ns(CLOCK_MONOTONIC), (unsigned long long)now_ns(CLOCK_REALTIME));
    if (churn && ++ticks % (uint64_t)(100 / interval_ms + 1) == 0) {
      churn_step();
      if (is_main && forked < 3 && ticks % (uint64_t)(1000 / interval_ms + 1) == 0) {
        char nm[32];
        snprintf(nm, sizeof nm, "f%d", forked++);
        spawn_child(nm);
      }
    }
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
  }
  (void)sum;
}

int main(int argc, char **argv) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const char *k = argv[i], *v = argv[i + 1];
    if (!strcmp(k, "--mib")) mib = atol(v);
    else if (!strcmp(k, "--rate")) rate = atol(v);
    else if (!strcmp(k, "--threads")) threads = atol(v);
    else if (!strcmp(k, "--procs")) procs = atol(v);
    else if (!strcmp(k, "--shared")) shared_mib = atol(v);
    else if (!strcmp(k, "--churn")) churn = atol(v);
    else if (!strcmp(k, "--scan")) scan = atol(v);
    else if (!strcmp(k, "--text")) text = atol(v);
    else if (!strcmp(k, "--interval-ms")) interval_ms = atol(v);
    else if (!strcmp(k, "--move")) move_ms = atol(v);
    else if (!strcmp(k, "--dontfork")) dontfork_mib = atol(v);
    else if (!strcmp(k, "--wipeonfork")) wipe_mib = atol(v);
    else if (!strcmp(k, "--fork-ms")) fork_ms = atol(v);
    else if (!strcmp(k, "--pattern")) pattern = !strcmp(v, "hot") ? 1 : !strcmp(v, "seq") ? 2 : 0;
    else {
      fprintf(stderr, "ferry-memcheck: unknown option %s\n", k);
      return 2;
    }
  }
  if (mib < 1 || threads < 1 || procs < 1 || procs > MAX_CHILDREN || interval_ms < 1 || move_ms < 0 || dontfork_mib < 0 || wipe_mib < 0 || fork_ms < 0) {
    fprintf(stderr, "ferry-memcheck: bad arguments\n");
    return 2;
  }
  struct sigaction sa = {0};
  sa.sa_handler = on_usr1;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGUSR1, &sa, NULL);
  if (shared_mib > 0) {
    size_t sp = (size_t)shared_mib * (1 << 20) / PAGE;
    shared = mmap(NULL, sp * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) return 1;
    for (size_t i = 0; i < sp; i++) fill(shared + i * PAGE, (uint32_t)i, 1);
  }
  if (wipe_mib > 0) {
    /* Mapped first too, so the daemon fills it last: children forked meanwhile find it missing. */
    size_t wp = (size_t)wipe_mib * (1 << 20) / PAGE;
    wipe = mmap(NULL, wp * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (wipe == MAP_FAILED || madvise(wipe, wp * PAGE, MADV_WIPEONFORK)) return 1;
    for (size_t i = 0; i < wp; i++) fill(wipe + i * PAGE, (uint32_t)i, 1);
  }
  if (dontfork_mib > 0) {
    /* Mapped first, so above the main region: the lazy-pages daemon fills it last. */
    size_t dp = (size_t)dontfork_mib * (1 << 20) / PAGE;
    dontfork = mmap(NULL, dp * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dontfork == MAP_FAILED || madvise(dontfork, dp * PAGE, MADV_DONTFORK)) return 1;
    for (size_t i = 0; i < dp; i++) fill(dontfork + i * PAGE, (uint32_t)i, 1);
  }
  srand((unsigned)getpid());
  snprintf(name, sizeof name, "p0");
  for (long p = 1; p < procs; p++) {
    char nm[32];
    snprintf(nm, sizeof nm, "p%ld", p);
    spawn_child(nm);
  }
  run_process(1);
  return 0;
}
