// ferry-track: finds the pages a running process tree writes, for pre-copy migration, on kernels
// without soft-dirty. For each process it makes the process itself create a userfaultfd (one
// syscall run in one of its threads through ptrace, at a `syscall` instruction the process already
// has, so no code is patched), takes the descriptor with pidfd_getfd, closes the task's copy, and
// arms asynchronous write-protection over its private anonymous memory. PAGEMAP_SCAN then returns
// and re-arms the pages written since the last scan. Everything ends when this program exits: the
// kernel drops the registrations with the last descriptor, so an agent that dies disarms the task.
// A process's first round is read without arming and its pages' hashes kept; it is armed near the
// end of that round, and what was read before is read again in a second thread while the rest
// goes out: pages whose content changed count as written (late_round). A first round is long (all
// memory crosses the link) and every first write to a page after arming is a fault in the task,
// which on a virtual machine with shadow page tables costs 15-25 us: armed from the start, the
// benchmark's task lost ~15 % of its heartbeat during that round. Processes larger than
// LATE_MAX_PAGES (the hashes' memory), and those found writing fast a tenth into the round, are
// armed at once (FERRY_TRACK_ARM=early: all).
// A process that cannot be armed (ptrace refused; a kernel without asynchronous write-protect or
// PAGEMAP_SCAN) is tracked by content hash instead: each round reads its present pages and
// sends those whose hash differs from what was sent (FERRY_TRACK_METHOD=hash asks for that
// method for every process).
//
// Commands, one per line on stdin; one JSON line per command on fd 3; pages on stdout as records
// (struct rec, then npages * 4096 bytes for DATA):
//   round PID...      send what was written since the last round (everything for a new process
//                     or a mapping that is not armed); PIDs are the tree's processes now
//   count             how many pages were written since the last round (nothing is re-armed)
//   final DIR [drop]  the task is frozen and CRIU's images are in DIR: send every page its
//                     pagemap marks lazy that was written since the last round or never sent
//                     (with drop: only tell the destination to forget written pages it has)
//   quit
// With FERRY_DEBUG_DROP_ROUND=N the written pages of round N are re-armed but not sent (=late: the
// pages a late-armed process changed before it was armed): tests use it to prove that a lost
// write is seen.
#define _GNU_SOURCE
#include <dirent.h>
#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define CHUNK 256 /* pages read and sent at a time */

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

/* PAGEMAP_SCAN (Linux 6.7); Debian 12's headers predate it. */
struct pm_scan_arg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct page_region {
  uint64_t start, end, categories;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)

enum { REC_DATA = 1, REC_ZERO = 2, REC_DROP = 3 };
struct rec {
  uint32_t kind, vpid;
  uint64_t vaddr;
  uint32_t npages, pad;
};

/* Pages sent so far, by page number: an open-addressing set. */
struct pageset {
  uint64_t *keys;
  size_t cap, n;
};

static int ps_has(const struct pageset *s, uint64_t pg) {
  if (!s->cap) return 0;
  uint64_t k = pg + 1;
  for (size_t i = (k * 0x9E3779B97F4A7C15ULL) & (s->cap - 1);; i = (i + 1) & (s->cap - 1)) {
    if (s->keys[i] == k) return 1;
    if (!s->keys[i]) return 0;
  }
}

static void ps_add(struct pageset *s, uint64_t pg);
static void ps_grow(struct pageset *s) {
  struct pageset b = {calloc(s->cap ? s->cap * 2 : 4096, 8), s->cap ? s->cap * 2 : 4096, 0};
  if (!b.keys) abort();
  for (size_t i = 0; i < s->cap; i++)
    if (s->keys[i]) ps_add(&b, s->keys[i] - 1);
  free(s->keys);
  *s = b;
}
static void ps_add(struct pageset *s, uint64_t pg) {
  if ((s->n + 1) * 2 > s->cap) ps_grow(s);
  uint64_t k = pg + 1;
  for (size_t i = (k * 0x9E3779B97F4A7C15ULL) & (s->cap - 1);; i = (i + 1) & (s->cap - 1)) {
    if (s->keys[i] == k) return;
    if (!s->keys[i]) {
      s->keys[i] = k;
      s->n++;
      return;
    }
  }
}

/* Content hash of each page as it was sent, by page number (the last-resort method). */
struct pagehash {
  uint64_t *keys, *vals;
  size_t cap, n;
};

static uint64_t *ph_slot(const struct pagehash *h, uint64_t pg) {
  if (!h->cap) return NULL;
  uint64_t k = pg + 1;
  for (size_t i = (k * 0x9E3779B97F4A7C15ULL) & (h->cap - 1);; i = (i + 1) & (h->cap - 1)) {
    if (h->keys[i] == k) return &h->vals[i];
    if (!h->keys[i]) return NULL;
  }
}

static void ph_put(struct pagehash *h, uint64_t pg, uint64_t v);
/* Room for n entries without growing (a first round would otherwise copy the table as it grows). */
static void ph_reserve(struct pagehash *h, uint64_t n) {
  size_t cap = 4096;
  while (cap < 2 * n + 2) cap *= 2;
  if (cap <= h->cap) return;
  struct pagehash b = {calloc(cap, 8), calloc(cap, 8), cap, 0};
  if (!b.keys || !b.vals) abort();
  for (size_t i = 0; i < h->cap; i++)
    if (h->keys[i]) ph_put(&b, h->keys[i] - 1, h->vals[i]);
  free(h->keys);
  free(h->vals);
  *h = b;
}

static void ph_put(struct pagehash *h, uint64_t pg, uint64_t v) {
  if ((h->n + 1) * 2 > h->cap) ph_reserve(h, h->n + 1); /* at most half full: doubles */
  uint64_t k = pg + 1;
  for (size_t i = (k * 0x9E3779B97F4A7C15ULL) & (h->cap - 1);; i = (i + 1) & (h->cap - 1)) {
    if (h->keys[i] == k || !h->keys[i]) {
      if (!h->keys[i]) h->n++;
      h->keys[i] = k;
      h->vals[i] = v;
      return;
    }
  }
}

/* 64-bit hash of a page: four multiply-rotate lanes (fast enough to stay near memory speed). */
static uint64_t page_hash(const uint8_t *page) {
  const uint64_t *w = (const uint64_t *)page;
  uint64_t a = 0x9E3779B97F4A7C15ULL, b = 0xC2B2AE3D27D4EB4FULL, c = 0x165667B19E3779F9ULL, d = 0x27D4EB2F165667C5ULL;
#define LANE(x, v) x = (((x) ^ (v)) * 0x9FB21C651E98DF25ULL), x = (x << 31) | (x >> 33)
  for (size_t i = 0; i < PAGE / 8; i += 4) {
    LANE(a, w[i]);
    LANE(b, w[i + 1]);
    LANE(c, w[i + 2]);
    LANE(d, w[i + 3]);
  }
#undef LANE
  uint64_t h = a ^ (b * 0x94D049BB133111EBULL) ^ ((c << 17) | (c >> 47)) ^ (d * 0xBF58476D1CE4E5B9ULL);
  h ^= h >> 31;
  h *= 0xD6E8FEB86659FD93ULL;
  return h ^ (h >> 32);
}

struct proc {
  pid_t pid, vpid;
  int uffd; /* -1: not armed */
  int hashed; /* tracked by content hash instead: each round reads all its memory */
  int late;   /* its uffd is taken but not armed yet: the first round hashes, then arms */
  struct pageset pending; /* late-armed: changed before arming, to go with the next round */
  uint64_t present;       /* pages present when it was first seen */
  int seen, fresh;
  struct pageset sent;
  struct pagehash hashes;
};

static struct proc *procs;
static size_t nprocs;
static FILE *ctl;
/* Per thread: a late arming compares pages in a second thread (see late_round). */
static __thread uint8_t buf[CHUNK * PAGE];
static const uint8_t zero[PAGE];
static int round_no, drop_round, drop_late, force_hash, arm_early, slow_end_ms;

/* Arming late keeps 32-64 bytes per page of hashes (a half-full table) until the first round ends. */
#define LATE_MAX_PAGES ((4ULL << 30) / PAGE)
/* Smaller processes take no measure of how fast they write: their first round is short. */
#define PROBE_MIN_PAGES ((64ULL << 20) / PAGE)

/* Per-command counters, reported on fd 3. */
static struct {
  uint64_t pages, zero, bytes, dropped, full_vmas;
  /* Pages that could not be read (in the frozen pass: an error, nothing was unmapped). */
  uint64_t unread;
  int armed, unarmed, hashed;
  char why[200];
} st;

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void write_all(int fd, const void *p, size_t n) {
  const char *c = p;
  while (n) {
    ssize_t w = write(fd, c, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) _exit(3); /* the agent stopped reading: nothing left to do */
    c += w;
    n -= (size_t)w;
  }
}

static void emit(uint32_t kind, pid_t vpid, uint64_t vaddr, uint32_t n, const void *data) {
  struct rec r = {kind, (uint32_t)vpid, vaddr, n, 0};
  write_all(1, &r, sizeof(r));
  if (kind == REC_DATA) write_all(1, data, n * PAGE);
}

/*
 * Reads len bytes (whole pages) of the process's memory at addr; returns how many whole pages'
 * bytes it got. process_vm_readv stops at a page the process may not read (PROT_NONE); the rest
 * comes through /proc/PID/mem, which reads any mapped page, as CRIU's dump does (it adds
 * PROT_READ first). Pages left unread were unmapped meanwhile.
 */
static size_t read_mem(pid_t pid, void *dst, uint64_t addr, size_t len) {
  struct iovec l = {dst, len}, r = {(void *)addr, len};
  ssize_t v = process_vm_readv(pid, &l, 1, &r, 1, 0);
  size_t got = v > 0 ? (size_t)v - (size_t)v % PAGE : 0;
  if (got == len) return got;
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/mem", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return got;
  while (got < len) {
    ssize_t n = pread(fd, (char *)dst + got, len - got, (off_t)(addr + got));
    if (n <= 0) break;
    got += (size_t)n;
  }
  close(fd);
  return got - got % PAGE;
}

/*
 * A full pass over an armed mapping (its first round) re-arms each chunk just before reading it:
 * what the task wrote there before the read is in what is sent, so it does not go again in the
 * next round; a write after the re-arm is seen as before. Measured at 1 GiB, 16 MiB/s uniform,
 * the second round shrank by about half. -1 outside such a pass.
 */
static int rearm_pm = -1;

static void rearm(int pm, uint64_t s, uint64_t e) {
  struct page_region vec[64];
  while (s < e) {
    /* Written pages among those present or swapped (see scan()), write-protected again. */
    struct pm_scan_arg a = {.size = sizeof a, .flags = PM_SCAN_WP_MATCHING, .start = s, .end = e, .vec = (uint64_t)(uintptr_t)vec, .vec_len = 64, .category_mask = PAGE_IS_WRITTEN, .category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED, .return_mask = PAGE_IS_WRITTEN};
    if (ioctl(pm, PAGEMAP_SCAN, &a) < 0 || a.walk_end <= s) return; /* then the next round sends them: no harm */
    s = a.walk_end;
  }
}

/* Reads [start, start + n pages) and sends it as runs of data and zero pages. */
static void send_range(struct proc *p, uint64_t start, uint64_t n) {
  while (n) {
    size_t k = n > CHUNK ? CHUNK : n;
    if (rearm_pm >= 0) rearm(rearm_pm, start, start + k * PAGE);
    size_t okp = read_mem(p->pid, buf, start, k * PAGE) / PAGE;
    if (okp == 0) {
      /* Unmapped meanwhile: nothing there for CRIU to dump either. Skip a page. */
      st.unread++;
      start += PAGE;
      n--;
      continue;
    }
    size_t i = 0;
    while (i < okp) {
      int z = memcmp(buf + i * PAGE, zero, PAGE) == 0;
      size_t j = i + 1;
      while (j < okp && (memcmp(buf + j * PAGE, zero, PAGE) == 0) == z) j++;
      emit(z ? REC_ZERO : REC_DATA, p->vpid, start + i * PAGE, (uint32_t)(j - i), buf + i * PAGE);
      for (size_t q = i; q < j; q++) ps_add(&p->sent, (start + q * PAGE) / PAGE);
      st.pages += j - i;
      if (z) st.zero += j - i;
      else st.bytes += (j - i) * PAGE;
      i = j;
    }
    start += okp * PAGE;
    n -= okp;
  }
}

/* --- ptrace: run one syscall inside the process ------------------------------------------- */

static uint64_t find_syscall_insn(pid_t pid) {
  char path[64], line[512];
  snprintf(path, sizeof path, "/proc/%d/maps", pid);
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  uint64_t found = 0;
  while (!found && fgets(line, sizeof line, f)) {
    uint64_t s, e;
    char perms[8];
    if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s", &s, &e, perms) != 3 || perms[2] != 'x') continue;
    if (!strstr(line, "[vdso]") && !strstr(line, "libc")) continue;
    for (uint64_t a = s; a < e && !found; a += sizeof buf) {
      size_t len = e - a < sizeof buf ? e - a : sizeof buf;
      struct iovec l = {buf, len}, r = {(void *)a, len};
      ssize_t got = process_vm_readv(pid, &l, 1, &r, 1, 0);
      for (ssize_t i = 0; i + 1 < got; i++)
        if (buf[i] == 0x0f && buf[i + 1] == 0x05) {
          found = a + (uint64_t)i;
          break;
        }
    }
  }
  fclose(f);
  return found;
}

static int wait_stop(pid_t tid, int *status) {
  for (;;) {
    if (waitpid(tid, status, __WALL) < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    return WIFSTOPPED(*status) ? 0 : -1;
  }
}

/* Seized and stopped: execute nr(a0) at insn, returns the syscall's result. */
static int pending_sig;

static long remote_syscall(pid_t tid, const struct user_regs_struct *saved, uint64_t insn, long nr, long a0) {
  struct user_regs_struct r = *saved;
  r.rip = insn;
  r.rax = (uint64_t)nr;
  r.rdi = (uint64_t)a0;
  r.orig_rax = (uint64_t)-1; /* not inside a syscall: no restart handling on the way out */
  r.eflags &= ~((1UL << 8) | (1UL << 10)); /* TF, DF */
  if (ptrace(PTRACE_SETREGS, tid, 0, &r)) return -ENOSYS;
  for (int tries = 0; tries < 8; tries++) {
    int status;
    if (ptrace(PTRACE_SINGLESTEP, tid, 0, 0) || wait_stop(tid, &status)) return -ESRCH;
    if (ptrace(PTRACE_GETREGS, tid, 0, &r)) return -ESRCH;
    if (WSTOPSIG(status) == SIGTRAP && r.rip == insn + 2) return (long)r.rax;
    /* A signal arrived for the task: it is delivered when the thread is let go. */
    if (WSTOPSIG(status) != SIGTRAP && (status >> 16) == 0) pending_sig = WSTOPSIG(status);
    if (r.rip != insn) return -EFAULT; /* a signal handler ran: give up on this process */
  }
  return -EAGAIN;
}

/* The saved registers, rewritten the way compel does so an interrupted syscall restarts. */
static void prepare_restore(struct user_regs_struct *r) {
  if ((long)r->orig_rax < 0) return;
  switch ((long)r->rax) {
    case -512: /* ERESTARTSYS */
    case -513: /* ERESTARTNOINTR */
    case -514: /* ERESTARTNOHAND */
      r->rax = r->orig_rax;
      r->rip -= 2;
      break;
    case -516: /* ERESTART_RESTARTBLOCK */
      r->rax = __NR_restart_syscall;
      r->rip -= 2;
      break;
  }
}

static int arm_uffd(int uffd) {
  /* Not WP_UNPOPULATED: with it every empty page table entry a scan or protect passes over gets a
     marker, which /proc/PID/pagemap reports as a swapped page: CRIU then dumps every reserved,
     never-touched page of the task as zeros and the destination populates them (a 45 MiB
     Node.js process arrived with 870 MiB). Without it an entry first filled after arming has no
     write-protect bit and scans as written, so nothing is missed. */
  struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC};
  return ioctl(uffd, UFFDIO_API, &api);
}

static char thread_state(pid_t pid, pid_t tid) {
  char path[96], buf[512];
  snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = 0;
  char *rp = strrchr(buf, ')'); /* the name may hold spaces and parentheses */
  return rp && rp[1] == ' ' ? rp[2] : 0;
}

/* The thread's seccomp mode (0 none, 1 strict, 2 filter), from its status; -1 if unreadable. */
static int seccomp_mode(pid_t pid, pid_t tid) {
  char path[96], line[256];
  snprintf(path, sizeof path, "/proc/%d/task/%d/status", pid, tid);
  FILE *f = fopen(path, "re");
  if (!f) return -1;
  int mode = -1;
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, "Seccomp:", 8)) {
      mode = atoi(line + 8);
      break;
    }
  fclose(f);
  return mode;
}

/* A userfaultfd on the process's memory, held here; -errno when it cannot be had. */
static int take_uffd(pid_t pid) {
  uint64_t insn = find_syscall_insn(pid);
  if (!insn) return -ENOEXEC;
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/task", pid);
  DIR *d = opendir(path);
  if (!d) return -ESRCH;
  int result = -ESRCH;
  struct dirent *de;
  while ((de = readdir(d)) && (result == -ESRCH || result == -EBUSY)) {
    pid_t tid = atoi(de->d_name);
    if (tid <= 0) continue;
    /* A thread in uninterruptible sleep (a vfork parent waits so until its child execs or exits)
       would not stop for us, and a seized thread cannot be let go before it stops. */
    if (thread_state(pid, tid) == 'D') {
      result = -EBUSY;
      continue;
    }
    /* From seize to detach the thread runs our registers: ending now would leave it broken. */
    sigset_t hold, was;
    sigemptyset(&hold);
    sigaddset(&hold, SIGTERM);
    sigaddset(&hold, SIGINT);
    sigaddset(&hold, SIGHUP);
    sigprocmask(SIG_BLOCK, &hold, &was);
    /* A sandboxed thread's filter may kill the task for the calls we run in it (userfaultfd is
       rarely allowed): its filter is suspended while we hold it, as CRIU's compel does. Where it
       cannot be (no CAP_SYS_ADMIN), the process is tracked by content instead. */
    int sandboxed = seccomp_mode(pid, tid);
    if (sandboxed < 0) continue; /* gone */
    if (ptrace(PTRACE_SEIZE, tid, 0, sandboxed ? PTRACE_O_SUSPEND_SECCOMP : 0)) {
      sigprocmask(SIG_SETMASK, &was, NULL);
      result = errno == EPERM || (sandboxed && errno == EINVAL) ? -EPERM : -ESRCH;
      if (result == -EPERM) break;
      continue;
    }
    int status, ok = 0;
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) == 0) {
      /* A pending signal may be reported first: hand it back and stop again. */
      for (int i = 0; i < 16 && wait_stop(tid, &status) == 0; i++) {
        if ((status >> 16) == PTRACE_EVENT_STOP) {
          ok = 1;
          break;
        }
        ptrace(PTRACE_CONT, tid, 0, WSTOPSIG(status));
        ptrace(PTRACE_INTERRUPT, tid, 0, 0);
      }
      if (!ok) {
        ptrace(PTRACE_DETACH, tid, 0, 0);
        sigprocmask(SIG_SETMASK, &was, NULL);
        continue;
      }
    }
    struct user_regs_struct saved;
    /* Only 64-bit code may run the syscall instruction (a 32-bit task would die of SIGILL; cs
       0x33 is the 64-bit user code segment): such a process is tracked by content instead. */
    int regs = ok && ptrace(PTRACE_GETREGS, tid, 0, &saved) == 0;
    if (regs && saved.cs != 0x33) result = -ENOEXEC;
    else if (regs) {
      long fd = remote_syscall(tid, &saved, insn, __NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
      if (fd == -EPERM) fd = remote_syscall(tid, &saved, insn, __NR_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
      if (fd >= 0) {
        int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        int mine = pidfd >= 0 ? (int)syscall(SYS_pidfd_getfd, pidfd, (int)fd, 0) : -1;
        if (pidfd >= 0) close(pidfd);
        remote_syscall(tid, &saved, insn, __NR_close, fd);
        result = mine >= 0 ? mine : -EBADF;
      } else {
        result = fd == -ESRCH ? -ESRCH : (int)fd;
        if (result == -ESRCH) result = -EIO;
      }
      prepare_restore(&saved);
      ptrace(PTRACE_SETREGS, tid, 0, &saved);
    }
    ptrace(PTRACE_DETACH, tid, 0, pending_sig);
    pending_sig = 0;
    sigprocmask(SIG_SETMASK, &was, NULL);
  }
  closedir(d);
  if (result >= 0 && arm_uffd(result)) {
    int e = errno;
    close(result);
    return -e;
  }
  return result;
}

/* --- memory maps ---------------------------------------------------------------------------- */

struct vma {
  uint64_t start, end;
  int registered;
  int inaccessible; /* PROT_NONE */
};

/* Private anonymous mappings: what CRIU moves as lazy pages, and what pre-copy covers. */
static size_t anon_vmas_from(pid_t pid, struct vma **out, int with_none, const char *file) {
  char path[64], line[4096];
  /* smaps, for VmFlags: "uw" says the mapping is registered for write-protect with us; maps
     (no page table walk) where that is not needed, and registered is then 0. */
  snprintf(path, sizeof path, "/proc/%d/%s", pid, file);
  FILE *f = fopen(path, "r");
  size_t n = 0, cap = 0;
  int keep = 0;
  *out = NULL;
  if (!f) return 0;
  while (fgets(line, sizeof line, f)) {
    uint64_t s, e, off, ino;
    char perms[8], dev[32];
    int pos = 0;
    if (!strncmp(line, "VmFlags:", 8)) {
      if (keep) (*out)[n - 1].registered = strstr(line, " uw") != NULL;
      continue;
    }
    if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s %" SCNx64 " %31s %" SCNu64 " %n", &s, &e, perms, &off, dev, &ino, &pos) < 6) continue;
    keep = 0;
    const char *name = line + pos;
    if (perms[3] != 'p' || ino != 0) continue;
    /* Inaccessible reservations and guards (PROT_NONE): tracking them leaves page table markers
       that read as swapped pages (CRIU dumps them, the destination fills them with zeros). A
       page they do hold goes in the frozen pass, as one never sent. */
    int none = perms[0] == '-' && perms[1] == '-';
    if (none && !with_none) continue;
    if (name[0] == '[' && strncmp(name, "[heap]", 6) && strncmp(name, "[stack", 6) && strncmp(name, "[anon:", 6)) continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 64;
      *out = realloc(*out, cap * sizeof **out);
    }
    (*out)[n++] = (struct vma){s, e, 0, none};
    keep = 1;
  }
  fclose(f);
  return n;
}

static size_t anon_vmas(pid_t pid, struct vma **out, int with_none) {
  return anon_vmas_from(pid, out, with_none, "smaps");
}

static int open_pagemap(pid_t pid) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
  return open(path, O_RDONLY | O_CLOEXEC);
}

typedef void (*range_fn)(struct proc *, uint64_t, uint64_t, void *);

/*
 * PAGEMAP_SCAN over [s, e): the pages in any of the categories `anyof` (with wp: written pages,
 * re-armed). Returns -errno; -EPERM means the mapping is not armed.
 */
static int scan(int pm, struct proc *p, uint64_t s, uint64_t e, int wp, uint64_t anyof, range_fn fn, void *arg) {
  static struct page_region vec[1024];
  while (s < e) {
    /* No PM_SCAN_CHECK_WPASYNC: it insists on WP_UNPOPULATED (see arm_uffd); whether a mapping
       is registered comes from its VmFlags instead, or does not matter (the final pass). */
    struct pm_scan_arg a = {.size = sizeof a, .flags = wp > 0 ? PM_SCAN_WP_MATCHING : 0, .start = s, .end = e, .vec = (uint64_t)(uintptr_t)vec, .vec_len = 1024, .category_anyof_mask = anyof, .return_mask = anyof};
    if (anyof == PAGE_IS_WRITTEN) {
      /* Written and still there. With transparent huge pages always on, the kernel reports an
         empty stretch of an armed mapping as written: reading it to send it then filled it (a
         task that had reserved 1 GiB and used 4 MiB arrived with 1 GiB resident). An empty page
         has nothing to send; one emptied after it was sent is not in CRIU's dump either. */
      a.category_mask = PAGE_IS_WRITTEN;
      a.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
      a.return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    }
    long r = ioctl(pm, PAGEMAP_SCAN, &a);
    if (r < 0) return -errno;
    for (long i = 0; i < r; i++) fn(p, vec[i].start, (vec[i].end - vec[i].start) / PAGE, arg);
    if (a.walk_end <= s) break;
    s = a.walk_end;
  }
  return 0;
}

static void cb_send(struct proc *p, uint64_t s, uint64_t n, void *arg) {
  (void)arg;
  send_range(p, s, n);
}
static void cb_count(struct proc *p, uint64_t s, uint64_t n, void *arg) {
  (void)p;
  (void)s;
  *(uint64_t *)arg += n;
}
static void cb_drop(struct proc *p, uint64_t s, uint64_t n, void *arg) {
  (void)p, (void)s, (void)arg;
  st.dropped += n;
}

/* Arms [s, e) with the process's userfaultfd; -errno when that mapping cannot be armed. */
static void cb_protect(struct proc *p, uint64_t s, uint64_t n, void *arg) {
  struct uffdio_writeprotect wp = {.range = {s, n * PAGE}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
  if (ioctl(p->uffd, UFFDIO_WRITEPROTECT, &wp)) *(int *)arg = -errno;
}

/* Registers the mapping and write-protects its populated pages (empty entries need nothing). */
static int arm_range(struct proc *p, uint64_t s, uint64_t e) {
  struct uffdio_register reg = {.range = {s, e - s}, .mode = UFFDIO_REGISTER_MODE_WP};
  if (ioctl(p->uffd, UFFDIO_REGISTER, &reg)) return -errno;
  int pm = open_pagemap(p->pid);
  if (pm < 0) return -ESRCH;
  int err = 0;
  int r = scan(pm, p, s, e, -1, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, cb_protect, &err);
  close(pm);
  return r ? r : err;
}

static pid_t read_vpid(pid_t pid) {
  char path[64], line[256];
  snprintf(path, sizeof path, "/proc/%d/status", pid);
  FILE *f = fopen(path, "r");
  pid_t v = 0;
  if (!f) return 0;
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, "NSpid:", 6)) {
      char *save, *t = strtok_r(line + 6, " \t\n", &save);
      for (; t; t = strtok_r(NULL, " \t\n", &save)) v = atoi(t);
    }
  fclose(f);
  return v;
}

static struct proc *find(pid_t pid) {
  for (size_t i = 0; i < nprocs; i++)
    if (procs[i].pid == pid) return &procs[i];
  return NULL;
}

/*
 * Content hash, the last resort for a process that cannot be armed: reads the pages of [s, e)
 * that pagemap (plain reads, any kernel) says are present or swapped, and compares each page's
 * hash with that of what was sent; a page sent before and gone since reads as zeros. What the
 * destination holds is exactly what was hashed, so a page torn by a write during the read only
 * differs later and goes again. mode 'r': send what changed (with drop: remember it, send
 * nothing); 'c': count it; 'm': mark it in marks; 'a': mark every present page.
 */
static uint64_t hash_range(struct proc *p, int pm, uint64_t s, uint64_t e, int mode, int drop, struct pageset *marks) {
  static __thread uint64_t ents[CHUNK], hs[CHUNK];
  static __thread uint8_t ch[CHUNK];
  const uint64_t zero_hash = page_hash(zero);
  uint64_t changed = 0;
  for (uint64_t at = s; at < e;) {
    size_t k = (e - at) / PAGE > CHUNK ? CHUNK : (e - at) / PAGE;
    if (pread(pm, ents, k * 8, (off_t)(at / PAGE * 8)) != (ssize_t)(k * 8)) break;
    for (size_t i = 0; i < k;) {
      int present = (ents[i] >> 62) != 0; /* bit 63 present, bit 62 swapped */
      size_t j = i + 1;
      while (j < k && ((ents[j] >> 62) != 0) == present) j++;
      if (present && mode != 'a') {
        size_t okp = read_mem(p->pid, buf + i * PAGE, at + i * PAGE, (j - i) * PAGE) / PAGE;
        /* Unmapped meanwhile: those pages are gone, nothing to send for them. */
        for (size_t q = i + okp; q < j; q++) ents[q] = 0;
        if (okp < j - i) memset(buf + (i + okp) * PAGE, 0, (j - i - okp) * PAGE);
      } else if (!present)
        memset(buf + i * PAGE, 0, (j - i) * PAGE);
      i = j;
    }
    for (size_t i = 0; i < k; i++) {
      uint64_t pg = at / PAGE + i, *old = ph_slot(&p->hashes, pg);
      int present = (ents[i] >> 62) != 0;
      if (mode == 'a') {
        ch[i] = present;
        continue;
      }
      hs[i] = present ? page_hash(buf + i * PAGE) : zero_hash;
      ch[i] = old ? *old != hs[i] : present;
    }
    for (size_t i = 0; i < k;) {
      size_t j = i + 1;
      while (j < k && ch[j] == ch[i]) j++;
      if (ch[i]) {
        changed += j - i;
        if (mode == 'm' || mode == 'a')
          for (size_t q = i; q < j; q++) ps_add(marks, at / PAGE + q);
        else if (mode == 'r') {
          for (size_t q = i; q < j; q++) ph_put(&p->hashes, at / PAGE + q, hs[q]);
          if (drop) st.dropped += j - i;
          else
            for (size_t q = i; q < j;) {
              int z = memcmp(buf + q * PAGE, zero, PAGE) == 0;
              size_t r = q + 1;
              while (r < j && (memcmp(buf + r * PAGE, zero, PAGE) == 0) == z) r++;
              emit(z ? REC_ZERO : REC_DATA, p->vpid, at + q * PAGE, (uint32_t)(r - q), buf + q * PAGE);
              for (size_t t = q; t < r; t++) ps_add(&p->sent, at / PAGE + t);
              st.pages += r - q;
              if (z) st.zero += r - q;
              else st.bytes += (r - q) * PAGE;
              q = r;
            }
        }
      }
      i = j;
    }
    at += k * PAGE;
  }
  return changed;
}

static void cb_pend(struct proc *p, uint64_t s, uint64_t n, void *arg) {
  (void)arg;
  for (uint64_t i = 0; i < n; i++) ps_add(&p->pending, s / PAGE + i);
}
static void cb_count_new(struct proc *p, uint64_t s, uint64_t n, void *arg) {
  for (uint64_t i = 0; i < n; i++) *(uint64_t *)arg += !ps_has(&p->pending, s / PAGE + i);
}
static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Sends the pending pages in address order (runs of neighbours go as one range), and forgets them. */
static void send_pending(struct proc *p, int drop) {
  uint64_t *pg = malloc((p->pending.n + 1) * 8);
  size_t n = 0;
  if (!pg) abort();
  for (size_t i = 0; i < p->pending.cap; i++)
    if (p->pending.keys[i]) pg[n++] = p->pending.keys[i] - 1;
  qsort(pg, n, 8, cmp_u64);
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    while (j < n && pg[j] == pg[j - 1] + 1) j++;
    if (drop) st.dropped += j - i;
    else send_range(p, pg[i] * PAGE, j - i);
    i = j;
  }
  free(pg);
  free(p->pending.keys);
  memset(&p->pending, 0, sizeof p->pending);
}

/* Arms every mapping of the process; -1 if it has a new address space and cannot be armed again. */
static int arm_all(struct proc *p) {
  struct vma *v;
  size_t n = anon_vmas(p->pid, &v, 0);
  for (size_t i = 0; i < n; i++)
    if (arm_range(p, v[i].start, v[i].end) == -ESRCH) {
      close(p->uffd);
      p->uffd = take_uffd(p->pid);
      if (p->uffd < 0) {
        p->uffd = -1;
        free(v);
        return -1;
      }
      for (size_t j = 0; j < n; j++) arm_range(p, v[j].start, v[j].end);
      break;
    }
  free(v);
  return 0;
}

struct compare_job {
  struct proc *p;
  struct vma *ranges;
  size_t n;
  struct pageset marks;
};

/* Marks the pages of the ranges whose content differs from what was sent (reads only). */
static void *compare(void *arg) {
  struct compare_job *j = arg;
  int pm = open_pagemap(j->p->pid);
  for (size_t i = 0; pm >= 0 && i < j->n; i++) hash_range(j->p, pm, j->ranges[i].start, j->ranges[i].end, 'm', 0, &j->marks);
  if (pm >= 0) close(pm);
  return NULL;
}

/*
 * A late-armed process's first round. Its pages are read and hashed unarmed until a sixteenth of
 * them is left; then it is armed, the rest is read as for a process armed at once, and a second
 * thread reads again what was read before the arming and marks each page whose content changed
 * (written before the arming; a write during that read is also seen as written). The marked pages
 * count as written and go with the next round, as pages written during the round would if armed
 * at once. The compare runs while the link still carries the rest: at 1 GiB it reads for ~0.25 s
 * here, as long as a 1 Gbit/s link takes for ~30 MB. A process whose address space changed (exec)
 * and cannot be armed again stays with content hashes.
 */
static void late_round(struct proc *p, int pm, struct vma *v, size_t n, int drop, int skip_compare) {
  struct compare_job job = {p, malloc((n + 1) * sizeof *v), 0, {0}};
  if (!job.ranges) abort();
  uint64_t done = 0, tail = p->present / 16;
  int armed = 0, failed = 0, threaded = 0, probed = p->present < PROBE_MIN_PAGES, fast = 0;
  double t0 = now_ms();
  pthread_t th;
  for (size_t i = 0; i < n; i++)
    for (uint64_t at = v[i].start; at < v[i].end;) {
      uint64_t end = v[i].end - at > CHUNK * PAGE ? at + CHUNK * PAGE : v[i].end;
      if (!probed && done >= p->present / 10) {
        /*
         * A tenth is read: how much of it changed since says how fast the task writes. Read
         * evenly since t0, a page is on average half that old; written at random at w pages a
         * second, a share 1 - exp(-w * age / present) has changed. Faster than a quarter of the
         * rate pages leave here, pre-copy will need to hold the task back, and the faults of
         * arming at once do that (measured at 256 MiB/s on 1 GiB: 0.4 s pause against 0.9-3.3 s
         * armed late): such a process is armed now.
         */
        probed = 1;
        uint64_t changed = 0;
        for (size_t k = 0; k < job.n; k++) changed += hash_range(p, pm, job.ranges[k].start, job.ranges[k].end, 'c', 0, NULL);
        double x = (double)done / (8.0 * (double)p->present), limit = x - x * x / 2 + x * x * x / 6;
        fast = (double)changed > limit * (double)done;
        snprintf(st.why, sizeof st.why, "late arming: %" PRIu64 " of %" PRIu64 " pages read in %.0f ms changed since%s", changed, done, now_ms() - t0, fast ? ": armed at once" : "");
      }
      if (!armed && !failed && (fast || done + tail >= p->present)) {
        if (arm_all(p) < 0) failed = 1;
        else {
          armed = 1;
          if (!drop && !skip_compare && job.n) {
            if (pthread_create(&th, NULL, compare, &job) == 0) threaded = 1;
            else compare(&job);
          }
        }
      }
      if (armed) {
        rearm_pm = pm;
        scan(pm, p, at, end, -1, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, drop ? cb_drop : cb_send, NULL);
        rearm_pm = -1;
      } else {
        done += hash_range(p, pm, at, end, 'r', drop, NULL);
        if (job.n && job.ranges[job.n - 1].end == at) job.ranges[job.n - 1].end = end;
        else job.ranges[job.n++] = (struct vma){.start = at, .end = end};
      }
      at = end;
    }
  if (!armed && !failed) {
    /* Fewer pages than counted at the start: armed after the last read, compared at once. */
    if (arm_all(p) < 0) failed = 1;
    else if (!drop && !skip_compare) compare(&job);
  }
  if (threaded) pthread_join(th, NULL);
  p->late = 0;
  if (!failed) {
    for (size_t i = 0; i < job.marks.cap; i++)
      if (job.marks.keys[i]) ps_add(&p->pending, job.marks.keys[i] - 1);
    p->hashed = 0;
    free(p->hashes.keys);
    free(p->hashes.vals);
    memset(&p->hashes, 0, sizeof p->hashes);
  }
  free(job.marks.keys);
  free(job.ranges);
}

/*
 * One process's pages for this round. mode: 'r' send written (everything where not armed),
 * 'c' count written, 'f' final (like 'r', plus never-sent lazy pages, done by the caller).
 */
static uint64_t visit(struct proc *p, int mode, int drop) {
  uint64_t counted = 0;
  int pm = open_pagemap(p->pid);
  if (pm < 0) return 0;
  struct vma *v;
  size_t n = anon_vmas(p->pid, &v, 0);
  if (p->hashed) {
    if (p->late && mode != 'c') late_round(p, pm, v, n, drop, drop_late);
    else
      for (size_t i = 0; i < n; i++) counted += hash_range(p, pm, v[i].start, v[i].end, mode == 'c' ? 'c' : 'r', drop, NULL);
    free(v);
    close(pm);
    p->fresh = 0;
    return counted;
  }
  for (size_t i = 0; i < n; i++) {
    int r = -EPERM;
    if (p->fresh && mode != 'c') r = -EAGAIN; /* armed just now: all of it is new */
    else if (p->uffd >= 0 && !v[i].registered) r = -EPERM; /* new, moved, or a new address space (exec) */
    else if (p->uffd >= 0) {
      /* With pages pending from a late arming, written ones join them and all go in order. */
      if (mode == 'c') r = scan(pm, p, v[i].start, v[i].end, 0, PAGE_IS_WRITTEN, p->pending.n ? cb_count_new : cb_count, &counted);
      else r = scan(pm, p, v[i].start, v[i].end, 1, PAGE_IS_WRITTEN, p->pending.n ? cb_pend : drop ? cb_drop : cb_send, NULL);
    }
    if (r == 0) continue;
    /* Not armed (new since the last round, moved, or the process exec'd): all of it counts. */
    if (mode == 'c') {
      scan(pm, p, v[i].start, v[i].end, -1, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, cb_count, &counted);
      continue;
    }
    if (mode == 'r' && r == -EPERM && p->uffd >= 0 && arm_range(p, v[i].start, v[i].end) == -ESRCH) {
      /* The process has a new address space (exec): it needs a new userfaultfd. */
      close(p->uffd);
      p->uffd = take_uffd(p->pid);
      if (p->uffd < 0) {
        /* From now on by content hash; this round sends it all (nothing is hashed yet). */
        p->uffd = -1;
        p->hashed = 1;
      } else
        arm_range(p, v[i].start, v[i].end);
    }
    if (r == -EPERM) st.full_vmas++;
    if (drop) scan(pm, p, v[i].start, v[i].end, -1, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, cb_drop, NULL);
    else {
      /* Armed (just now, or above): each chunk is re-armed as it is read (fails harmlessly where not). */
      if (p->uffd >= 0) rearm_pm = pm;
      scan(pm, p, v[i].start, v[i].end, -1, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, cb_send, NULL);
      rearm_pm = -1;
    }
  }
  free(v);
  close(pm);
  if (mode == 'c') counted += p->pending.n;
  else if (p->pending.n) send_pending(p, drop);
  if (mode != 'c') p->fresh = 0;
  return counted;
}

static void cmd_round(char *args) {
  round_no++;
  for (size_t i = 0; i < nprocs; i++) procs[i].seen = 0;
  char *save;
  for (char *t = strtok_r(args, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) {
    pid_t pid = atoi(t);
    if (pid <= 0) continue;
    struct proc *p = find(pid);
    if (!p) {
      procs = realloc(procs, (nprocs + 1) * sizeof *procs);
      p = &procs[nprocs++];
      memset(p, 0, sizeof *p);
      p->pid = pid;
      p->vpid = read_vpid(pid);
      p->fresh = 1;
      p->uffd = force_hash ? -EPERM : take_uffd(pid);
      if (p->uffd < 0) {
        /* Cannot be armed (ptrace refused, an old kernel...): its pages are hashed. */
        snprintf(st.why, sizeof st.why, "process %d: %s", pid, force_hash ? "content hash asked for" : strerror(-p->uffd));
        p->uffd = -1;
        p->hashed = 1;
      } else {
        struct vma *v;
        size_t n = anon_vmas(pid, &v, 0);
        uint64_t present = 0;
        int pm = arm_early ? -1 : open_pagemap(pid);
        for (size_t i = 0; pm >= 0 && i < n; i++) scan(pm, p, v[i].start, v[i].end, -1, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, cb_count, &present);
        if (pm >= 0 && present <= LATE_MAX_PAGES) {
          /* Hashed through most of this round, armed near its end (late_round). */
          p->late = p->hashed = 1;
          p->present = present;
          ph_reserve(&p->hashes, present + present / 8);
        } else
          /* Armed before anything is read: a write during the read is seen by the next round. */
          for (size_t i = 0; i < n; i++) arm_range(p, v[i].start, v[i].end);
        if (pm >= 0) close(pm);
        free(v);
      }
    }
    p->seen = 1;
  }
  /* Processes that exited: their memory is gone with them. */
  for (size_t i = 0; i < nprocs;) {
    if (procs[i].seen) {
      i++;
      continue;
    }
    if (procs[i].uffd >= 0) close(procs[i].uffd);
    free(procs[i].sent.keys);
    free(procs[i].pending.keys);
    free(procs[i].hashes.keys);
    free(procs[i].hashes.vals);
    procs[i] = procs[--nprocs];
  }
  for (size_t i = 0; i < nprocs; i++) {
    if (procs[i].uffd >= 0) st.armed++;
    else if (procs[i].hashed) st.hashed++;
    else st.unarmed++;
    visit(&procs[i], 'r', round_no == drop_round);
  }
}

/* --- CRIU's pagemap image ------------------------------------------------------------------- */

static int varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
  *v = 0;
  for (int sh = 0; *p < end && sh < 64; sh += 7) {
    uint8_t b = *(*p)++;
    *v |= (uint64_t)(b & 0x7f) << sh;
    if (!(b & 0x80)) return 0;
  }
  return -1;
}

/* Calls fn for each PE_LAZY run of pagemap-VPID.img in dir; -1 on a malformed image. */
static int lazy_runs(const char *dir, pid_t vpid, void (*fn)(pid_t, uint64_t, uint64_t, void *), void *arg) {
  char path[4096];
  snprintf(path, sizeof path, "%s/pagemap-%d.img", dir, vpid);
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  uint32_t magic[2], len;
  int rc = fread(magic, 4, 2, f) == 2 && magic[0] == 0x54564319 && magic[1] == 0x56084025 ? 0 : -1;
  for (int first = 1; rc == 0 && fread(&len, 4, 1, f) == 1; first = 0) {
    uint8_t msg[256];
    if (len > sizeof msg || fread(msg, 1, len, f) != len) {
      rc = -1;
      break;
    }
    if (first) continue; /* pagemap_head */
    uint64_t vaddr = 0, compat = 0, nr = 0, flags = 0, key, val;
    const uint8_t *q = msg, *end = msg + len;
    while (q < end && rc == 0) {
      if (varint(&q, end, &key) || (key & 7) != 0 || varint(&q, end, &val)) {
        rc = -1;
        break;
      }
      switch (key >> 3) {
        case 1: vaddr = val; break;
        case 2: compat = val; break;
        case 4: flags = val; break;
        case 5: nr = val; break;
      }
    }
    if (!nr) nr = compat;
    if (rc == 0 && (flags & 2 /* PE_LAZY */)) fn(vpid, vaddr, nr, arg);
  }
  fclose(f);
  return rc;
}

struct final_ctx {
  struct proc *p;
  struct pageset dirty;
  int drop;
};

static void cb_mark(struct proc *p, uint64_t s, uint64_t n, void *arg) {
  (void)p;
  for (uint64_t i = 0; i < n; i++) ps_add((struct pageset *)arg, s / PAGE + i);
}

static void final_run(pid_t vpid, uint64_t vaddr, uint64_t nr, void *arg) {
  struct final_ctx *c = arg;
  uint64_t i = 0;
  while (i < nr) {
    uint64_t pg = vaddr / PAGE + i;
    int need = ps_has(&c->dirty, pg) || !ps_has(&c->p->sent, pg);
    uint64_t j = i + 1;
    while (j < nr && (ps_has(&c->dirty, vaddr / PAGE + j) || !ps_has(&c->p->sent, vaddr / PAGE + j)) == need) j++;
    if (need) {
      if (!c->drop) send_range(c->p, vaddr + i * PAGE, j - i);
      else if (ps_has(&c->p->sent, pg)) {
        /* Written since it was sent: the destination must not use its copy. */
        emit(REC_DROP, vpid, vaddr + i * PAGE, (uint32_t)(j - i), NULL);
        st.dropped += j - i;
      }
    }
    i = j;
  }
}

static void cmd_final(char *args) {
  char *save, *dir = strtok_r(args, " \t\n", &save), *opt = dir ? strtok_r(NULL, " \t\n", &save) : NULL;
  int drop = opt && !strcmp(opt, "drop");
  if (!dir) {
    snprintf(st.why, sizeof st.why, "final needs the images directory");
    return;
  }
  DIR *d = opendir(dir);
  if (!d) {
    snprintf(st.why, sizeof st.why, "%s: %s", dir, strerror(errno));
    return;
  }
  struct dirent *de;
  while ((de = readdir(d))) {
    int vpid;
    char tail[8];
    if (sscanf(de->d_name, "pagemap-%d.%7s", &vpid, tail) != 2 || strcmp(tail, "img")) continue;
    struct proc *p = NULL;
    for (size_t i = 0; i < nprocs; i++)
      if (procs[i].vpid == vpid) p = &procs[i];
    struct proc fresh = {0};
    if (!p) {
      /* Appeared after the last round: nothing of it was sent. Find it by its namespace pid. */
      fresh.uffd = -1;
      fresh.vpid = vpid;
      fresh.pid = -1;
      p = &fresh;
      DIR *pd = opendir("/proc");
      struct dirent *pe;
      while (pd && (pe = readdir(pd)) && fresh.pid < 0) {
        pid_t h = atoi(pe->d_name);
        if (h > 0 && read_vpid(h) == vpid && fresh.pid < 0) {
          /* Only a process of the tracked tree's namespace: share a pid namespace with a tracked one. */
          char a[64], b[64], la[128] = "", lb[128] = "";
          snprintf(a, sizeof a, "/proc/%d/ns/pid", h);
          snprintf(b, sizeof b, "/proc/%d/ns/pid", nprocs ? procs[0].pid : 0);
          if (readlink(a, la, sizeof la - 1) > 0 && readlink(b, lb, sizeof lb - 1) > 0 && !strcmp(la, lb)) fresh.pid = h;
        }
      }
      if (pd) closedir(pd);
      if (fresh.pid < 0) {
        snprintf(st.why, sizeof st.why, "process %d of the images is not found", vpid);
        continue;
      }
    }
    struct final_ctx c = {p, {0}, drop};
    int pm = open_pagemap(p->pid);
    if (p->hashed && pm >= 0) {
      /* Frozen now: every page whose content differs from what was sent. Inaccessible mappings
         cannot be read: all their pages count as written. */
      struct vma *v;
      size_t n = anon_vmas(p->pid, &v, 1);
      for (size_t i = 0; i < n; i++) hash_range(p, pm, v[i].start, v[i].end, v[i].inaccessible ? 'a' : 'm', 0, &c.dirty);
      free(v);
    } else if (p->uffd < 0) {
      /* Not armed: whatever it has may have changed since it was sent. */
      free(p->sent.keys);
      memset(&p->sent, 0, sizeof p->sent);
    } else if (pm >= 0) {
      struct vma *v;
      /* Inaccessible mappings too: one may have been written while it was accessible and sent
         before. Their pages, and those of mappings not armed, all count as written: a page
         without the write-protect bit reads as written, so an unarmed mapping's whole content
         does. So `maps` is enough here, not `smaps` for which mappings are armed: smaps walks
         every page table entry (~20 ms of the pause per GiB). */
      size_t n = anon_vmas_from(p->pid, &v, 1, "maps");
      for (size_t i = 0; i < n; i++)
        if (v[i].inaccessible || scan(pm, p, v[i].start, v[i].end, 0, PAGE_IS_WRITTEN, cb_mark, &c.dirty) < 0)
          scan(pm, p, v[i].start, v[i].end, -1, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, cb_mark, &c.dirty);
      free(v);
    }
    if (pm >= 0) close(pm);
    /* Changed before a late arming and not sent since: written. */
    for (size_t i = 0; i < p->pending.cap; i++)
      if (p->pending.keys[i]) ps_add(&c.dirty, p->pending.keys[i] - 1);
    uint64_t unread0 = st.unread;
    if (lazy_runs(dir, vpid, final_run, &c)) snprintf(st.why, sizeof st.why, "pagemap-%d.img cannot be read", vpid);
    /* The task is frozen: a page CRIU listed that cannot be read would be missing on the
       destination, which gets every lazy page from us. */
    else if (st.unread > unread0 && !drop) snprintf(st.why, sizeof st.why, "%" PRIu64 " pages of process %d could not be read", st.unread - unread0, vpid);
    free(c.dirty.keys);
    free(fresh.sent.keys);
  }
  closedir(d);
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  ctl = fdopen(3, "w");
  if (!ctl) {
    fprintf(stderr, "ferry-track: fd 3 must be open for replies\n");
    return 2;
  }
  const char *dr = getenv("FERRY_DEBUG_DROP_ROUND");
  drop_round = dr ? atoi(dr) : 0;
  /* "late": what a late-armed process changed before it was armed is not sent. */
  drop_late = dr && !strcmp(dr, "late");
  const char *method = getenv("FERRY_TRACK_METHOD");
  force_hash = method && !strcmp(method, "hash");
  const char *arm = getenv("FERRY_TRACK_ARM");
  arm_early = arm && !strcmp(arm, "early");
  /* Tests: linger this long after ending the pages, as a helper the scheduler left waiting would. */
  const char *se = getenv("FERRY_DEBUG_TRACK_SLOW_END");
  slow_end_ms = se ? atoi(se) : 0;
  int end_pages = 0;
  char *line = NULL;
  size_t cap = 0;
  while (getline(&line, &cap, stdin) > 0) {
    memset(&st, 0, sizeof st);
    double t0 = now_ms();
    char *sp = strchr(line, ' ');
    char *args = sp ? sp + 1 : line + strlen(line);
    uint64_t counted = 0;
    if (!strncmp(line, "round", 5)) cmd_round(args);
    else if (!strncmp(line, "count", 5))
      for (size_t i = 0; i < nprocs; i++) counted += visit(&procs[i], 'c', 0);
    else if (!strncmp(line, "final", 5)) {
      cmd_final(args);
      end_pages = 1;
    }
    else if (!strncmp(line, "quit", 4)) break;
    else snprintf(st.why, sizeof st.why, "unknown command");
    for (char *c = st.why; *c; c++)
      if (*c == '"' || *c == '\\') *c = '\'';
    fprintf(ctl, "{\"pages\":%" PRIu64 ",\"zero\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"dropped\":%" PRIu64 ",\"counted\":%" PRIu64 ",\"fullVmas\":%" PRIu64 ",\"armed\":%d,\"hashed\":%d,\"unarmed\":%d,\"ms\":%.2f,\"note\":\"%s\"}\n", st.pages, st.zero, st.bytes, st.dropped, counted, st.full_vmas, st.armed, st.hashed, st.unarmed, now_ms() - t0, st.why);
    fflush(ctl);
    if (end_pages) {
      /* The last pages are out: end their stream now, not after disarming (closing the
       * descriptors walks every armed page table, ~20 ms per GiB, inside the pause). Only after
       * the reply: the stream's end makes the agent stop this helper, and a helper stopped before
       * it replied failed the migration (seen once in 109 moves, six at a time on two cores). */
      close(1);
      end_pages = 0;
      if (slow_end_ms > 0) usleep((useconds_t)slow_end_ms * 1000);
    }
  }
  return 0;
}
