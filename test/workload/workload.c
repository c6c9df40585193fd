// workload: the victim of phaul's tests, a process that checks its own state.
//
// Memory: --mib N MiB of anonymous memory in 4 KiB pages, each {magic, index,
// version} then 509 xorshift words seeded by (index, version), so a stale, torn
// or foreign page shows. A ledger (own mapping) holds each page's version.
// --fill picks the content of the pages after the 3-word header, all derived
// from (index, version) and checked against the ledger the same way:
//   random  509 xorshift words: incompressible (the default)
//   text    8-byte words from a 32-word vocabulary, 5 bits of xorshift
//           each: compressible like text (zstd -1 about 6x)
//   zero    9 pages in 10 (index % 10 != 0) are all zeros, header included,
//           written (so present in the page tables) and checked to be zero;
//           the rest are random pages
// --threads writers dirty random pages, --rate pages/s in all; a verifier checks
// every page against the ledger every --verify-ms. Both hold the page's stripe
// lock, so no check sees a half-written page.
//
// Log (--log, O_APPEND, one write(2) per line):
//   start pid=P pages=N region=0xADDR threads=T rate=R shm=0|1 fill=F once
//   step=S t=<CLOCK_REALTIME ns> pid=<getpid()> verified=V   every ~50 ms
//   tick gap=G t=<CLOCK_REALTIME ns>  after a step, if the ticker's longest
//                                  gap since the step before is over 5 ms
//   ok <mode> ...                  a mode's check passed (every 10 steps)
//   CORRUPT page=I want=V got=W word=K                         then exit 3
//   FAIL <mode> ...                                            then exit 4
//   exit signal=TERM step=S                                    then exit 0
// S and V (full verifications) live in memory: after a migration they go on.
// The ticker, a thread of its own, sleeps 1 ms (CLOCK_MONOTONIC) at a time and
// touches no memory but its own state (one page) and stack: G is the longest
// CLOCK_MONOTONIC ns between two of its wakeups, t when that gap ended. A
// freeze, a restore or faults on those pages stall it like any thread, so G
// is the stall the process saw, however long a step or a verification takes.
// Steps report and reset it: each window's longest gap, if over 5 ms.
//
// Modes, each holding state that needs a CRIU option:
//   --tcp-pair       two threads ping-pong a counter over 127.0.0.1 TCP
//                    (--tcp-established)
//   --flock FILE     holds flock(LOCK_EX) on FILE (--file-locks)
//   --ghost FILE     writes --ghost-kib KiB (64) to FILE, unlinks and rereads
//                    it: a ghost file (over 1024 KiB needs --ghost-limit)
//   --ghost-link     with --ghost, first links FILE.link to it: open, unlinked,
//                    yet nlink 1 (--link-remap)
//   --ext-unix PATH  SOCK_DGRAM socket connected to PATH, bound outside the
//                    tree; sends "tick seq=N" each step, MSG_DONTWAIT, a full
//                    queue counts a drop (--ext-unix-sk)
//   --shm            the region is MAP_SHARED (CRIU's shmem path)
//   --children N     after filling the region, forks N children (a process
//                    tree; no exec, so the region is copy-on-write shared
//                    until written): child i logs to FILE.child<i> (a start
//                    line with child=i, then steps from the parent's count)
//                    and runs its own writers and verifier on its copy;
//                    modes stay with the parent, which ignores SIGCHLD
//   --zombie         forks a child that exits at once and is never reaped:
//                    the tree holds a zombie (no memory, a pstree entry)
//   --memfd          maps a 1 MiB memfd MAP_PRIVATE: the even pages keep the
//                    file's content, the odd ones are written through the
//                    mapping (private copies); both checked every check
//                    (CRIU's lazy dump cannot take such a mapping)
//   --untouched-mib N  maps FILE.untouched, N MiB, private and never
//                    touches it (logs "untouched region=0xADDR pages=P"): a
//                    migration must not turn its pages into private copies
//   --stopped-child  forks a child that stops itself (SIGSTOP) and logs
//                    "FAIL stopped SIGCONT" to the main log if it is ever
//                    continued: a migration must restore it stopped and
//                    add no signal
// workload --sink PATH --log FILE is that outside peer instead: it binds a
// SOCK_DGRAM socket at PATH and logs "sink tick seq=N" per tick received.
// CRIU finds the peer with sock_diag, so run it in the workload's netns.
// Exit: 0 on SIGTERM, 2 usage or setup, 3 corruption, 4 mode failure.
// Build: cc -O2 -pthread -o workload workload.c
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAGIC 0x706861756c776b31ULL // "phaulwk1"
#define STRIPES 1024
#define STEP_NS 50000000LL  // one step line per 50 ms
#define CHECK_STEPS 10      // mode checks every 10 steps
#define TCP_STALL_STEPS 200 // no TCP round trip in 200 running steps: FAIL
#define TICK_NS 1000000LL   // the ticker's sleep
#define TICK_REPORT_NS 5000000LL // longer ticker gaps are logged

static struct {
	long mib, threads, rate, verify_ms, ghost_kib, children, untouched_mib;
	int zombie, stopped_child, memfd;
	const char *log, *flock, *ghost, *ext_unix, *sink, *fill;
	int tcp, shm, ghost_link;
} o = {.mib = 64, .threads = 2, .rate = 1000, .verify_ms = 250, .ghost_kib = 64, .fill = "random"};

enum { FILL_RANDOM, FILL_TEXT, FILL_ZERO };
static int fill_mode; // from o.fill

static uint64_t *region; // npages pages of WORDS words
static uint64_t *ledger; // the version page i must hold
static size_t npages;
static pthread_mutex_t stripe[STRIPES]; // page i is guarded by stripe[i % STRIPES]
static int logfd = -1;
static uint64_t step; // owned by main
static atomic_ulong verified, tcp_rounds;
static int flock_fd = -1, ghost_fd = -1, unix_fd = -1, tcp_fd[2] = {-1, -1};
static uint64_t *ghost_want, *ghost_got, unix_sent, unix_dropped;

static void logline(const char *fmt, ...) {
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0 || n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	// One write(2) per line: O_APPEND keeps concurrent lines whole. A lost
	// line would hide a step, so a failed write ends the process.
	if (write(logfd, buf, n) != n)
		_exit(4);
}

#define FAIL(mode, fmt, ...) \
	do { logline("FAIL " mode " " fmt, ##__VA_ARGS__); _exit(4); } while (0)

static uint64_t xorshift(uint64_t *s) {
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static uint64_t seed(uint64_t a, uint64_t b) {
	uint64_t s = (a + 1) * 0x9e3779b97f4a7c15ULL ^ (b + 1) * 0xbf58476d1ce4e5b9ULL;
	return s ? s : 1;
}

static int64_t now_ns(clockid_t c) {
	struct timespec ts;
	clock_gettime(c, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec ts_of(int64_t ns) {
	return (struct timespec){ns / 1000000000LL, ns % 1000000000LL};
}

static void sleep_ns(int64_t ns) {
	struct timespec ts = ts_of(ns);
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

// vocab holds the text mode's words, 8 bytes each, so a page is built a
// word at a time as fast as a random one.
static const char vocab[32][8] = {
	"the page", " server ", "dumps a ", "restore ", "memory, ", "process ", "tree of ", "and the ",
	"link is ", "zero or ", "stores  ", "images, ", "CRIU 4.2", "phaul's ", "migrate ", "with it ",
	"streams ", "frames. ", "bytes at", " a host ", "tasks in", "time.\n  ", "copy on ", "for its ",
	"pagemap ", "network ", "then we ", "checks  ", "version ", "ledger  ", "writes  ", "reads it",
};

// make_page writes page i at version ver into w (WORDS words), as --fill says.
static void make_page(uint64_t *w, size_t i, uint64_t ver) {
	uint64_t s = seed(i, ver), r = 0;
	if (fill_mode == FILL_ZERO && i % 10) {
		memset(w, 0, PAGE);
		return;
	}
	w[0] = MAGIC, w[1] = i, w[2] = ver;
	for (int k = 3; k < WORDS; k++) {
		if (fill_mode != FILL_TEXT) {
			w[k] = xorshift(&s);
			continue;
		}
		if (k % 12 == 3) // 12 words of 5 bits from each 64
			r = xorshift(&s);
		memcpy(&w[k], vocab[r & 31], 8);
		r >>= 5;
	}
}

static void fill_page(size_t i, uint64_t ver) {
	make_page(region + i * WORDS, i, ver);
}

// check_page returns the index of the first wrong word of page i, or -1.
static int check_page(size_t i, uint64_t ver) {
	const uint64_t *w = region + i * WORDS;
	if (fill_mode == FILL_RANDOM) { // the common case, without a copy
		uint64_t s = seed(i, ver), head[3] = {MAGIC, i, ver};
		for (int k = 0; k < WORDS; k++)
			if (w[k] != (k < 3 ? head[k] : xorshift(&s)))
				return k;
		return -1;
	}
	uint64_t want[WORDS];
	make_page(want, i, ver);
	for (int k = 0; k < WORDS; k++)
		if (w[k] != want[k])
			return k;
	return -1;
}

// writer dirties its share of --rate pages per second.
static void *writer(void *arg) {
	long id = (long)arg;
	int64_t rate = o.rate / o.threads + (id < o.rate % o.threads);
	uint64_t rng = seed(id, (uint64_t)now_ns(CLOCK_MONOTONIC));
	int64_t t0 = now_ns(CLOCK_MONOTONIC), done = 0;
	while (rate > 0) {
		int64_t el = now_ns(CLOCK_MONOTONIC) - t0;
		int64_t due = (int64_t)((__int128)el * rate / 1000000000LL);
		// Over 100 ms behind (frozen for a dump) or a clock that went
		// back: pace from now rather than dirty a burst.
		if (due - done > rate / 10 + 1 || el < 0)
			t0 = now_ns(CLOCK_MONOTONIC), done = due = 0;
		for (; done < due; done++) {
			size_t i = xorshift(&rng) % npages;
			pthread_mutex_lock(&stripe[i % STRIPES]);
			fill_page(i, ledger[i] + 1);
			ledger[i]++;
			pthread_mutex_unlock(&stripe[i % STRIPES]);
		}
		sleep_ns(1000000);
	}
	return NULL;
}

// tick_state is the ticker's, a page of its own (the first member's
// alignment pads it) that it shares with no other data.
static struct {
	_Alignas(PAGE) pthread_mutex_t mu;
	int64_t gap, end; // guarded by mu: longest gap since the last report, its end (CLOCK_REALTIME)
} tick_state = {.mu = PTHREAD_MUTEX_INITIALIZER};

// ticker wakes every TICK_NS and records the longest gap between two
// wakeups. It touches no memory but tick_state and its own stack (glibc
// keeps the thread's control block there) and reads the clocks in the vDSO.
// An early wakeup (EINTR: CRIU's restore interrupts the sleep) counts as one.
static void *ticker(void *arg) {
	const struct timespec d = ts_of(TICK_NS);
	for (int64_t prev = now_ns(CLOCK_MONOTONIC);;) {
		clock_nanosleep(CLOCK_MONOTONIC, 0, &d, NULL);
		int64_t now = now_ns(CLOCK_MONOTONIC), gap = now - prev;
		prev = now;
		pthread_mutex_lock(&tick_state.mu);
		if (gap > tick_state.gap)
			tick_state.gap = gap, tick_state.end = now_ns(CLOCK_REALTIME);
		pthread_mutex_unlock(&tick_state.mu);
	}
	return arg;
}

// report_tick logs the ticker's longest gap since the last call, if over
// TICK_REPORT_NS, and starts a new window.
static void report_tick(void) {
	pthread_mutex_lock(&tick_state.mu);
	int64_t gap = tick_state.gap, end = tick_state.end;
	tick_state.gap = 0;
	pthread_mutex_unlock(&tick_state.mu);
	if (gap > TICK_REPORT_NS)
		logline("tick gap=%ld t=%ld", gap, end);
}

static void *verifier(void *arg) {
	for (;; sleep_ns(o.verify_ms * 1000000LL)) {
		for (size_t i = 0; i < npages; i++) {
			pthread_mutex_lock(&stripe[i % STRIPES]);
			uint64_t want = ledger[i], got = region[i * WORDS + 2];
			int bad = check_page(i, want);
			pthread_mutex_unlock(&stripe[i % STRIPES]);
			if (bad >= 0) {
				logline("CORRUPT page=%zu want=%lu got=%lu word=%d", i, want, got, bad);
				_exit(3);
			}
		}
		atomic_fetch_add(&verified, 1);
	}
	return arg;
}

static void tcp_io(int out, int fd, uint64_t *v) {
	for (size_t off = 0; off < sizeof(*v);) {
		char *p = (char *)v + off;
		ssize_t r = out ? send(fd, p, sizeof(*v) - off, MSG_NOSIGNAL)
				: recv(fd, p, sizeof(*v) - off, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			FAIL("tcp", "%s: %s", out ? "send" : "recv", r ? strerror(errno) : "EOF");
		off += r;
	}
}

// tcp_ping sends n and wants n+1 back; tcp_pong answers n with n+1.
static void *tcp_ping(void *arg) {
	for (uint64_t n = 0, got;; n += 2, sleep_ns(1000000)) {
		tcp_io(1, tcp_fd[0], &n);
		tcp_io(0, tcp_fd[0], &got);
		if (got != n + 1)
			FAIL("tcp", "ping want=%lu got=%lu", n + 1, got);
		atomic_fetch_add(&tcp_rounds, 1);
	}
	return arg;
}

static void *tcp_pong(void *arg) {
	for (uint64_t want = 0, n;; want += 2) {
		tcp_io(0, tcp_fd[1], &n);
		if (n++ != want)
			FAIL("tcp", "pong want=%lu got=%lu", want, n - 1);
		tcp_io(1, tcp_fd[1], &n);
	}
	return arg;
}

static void setup_tcp(void) {
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t alen = sizeof(a);
	int one = 1, l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0 || bind(l, (void *)&a, sizeof(a)) || listen(l, 1) ||
	    getsockname(l, (void *)&a, &alen))
		FAIL("tcp", "listen: %s", strerror(errno));
	// connect completes from the backlog before accept: no thread needed.
	tcp_fd[0] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (tcp_fd[0] < 0 || connect(tcp_fd[0], (void *)&a, sizeof(a)) ||
	    (tcp_fd[1] = accept4(l, NULL, NULL, SOCK_CLOEXEC)) < 0)
		FAIL("tcp", "connect: %s", strerror(errno));
	close(l); // only the established pair is left to dump
	for (int i = 0; i < 2; i++)
		setsockopt(tcp_fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	logline("ok tcp port=%d", ntohs(a.sin_port));
}

static void setup_flock(void) {
	flock_fd = open(o.flock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (flock_fd < 0 || flock(flock_fd, LOCK_EX | LOCK_NB))
		FAIL("flock", "lock %s: %s", o.flock, strerror(errno));
	logline("ok flock path=%s", o.flock);
}

// check_flock: flock locks belong to an open file description, so a second
// one must not get the lock while ours holds it.
static void check_flock(void) {
	int fd = open(o.flock, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		FAIL("flock", "open %s: %s", o.flock, strerror(errno));
	if (flock(fd, LOCK_EX | LOCK_NB) == 0)
		FAIL("flock", "lock on %s lost", o.flock);
	if (errno != EWOULDBLOCK)
		FAIL("flock", "probe %s: %s", o.flock, strerror(errno));
	close(fd);
	logline("ok flock");
}

static void setup_ghost(void) {
	size_t n = o.ghost_kib * 1024;
	uint64_t s = seed(0x67686f7374, n);
	ghost_want = malloc(n), ghost_got = malloc(n);
	ghost_fd = open(o.ghost, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (!ghost_want || !ghost_got || ghost_fd < 0)
		FAIL("ghost", "open %s: %s", o.ghost, strerror(errno));
	for (size_t k = 0; k < n / 8; k++)
		ghost_want[k] = xorshift(&s);
	char link_path[4096];
	snprintf(link_path, sizeof(link_path), "%s.link", o.ghost);
	if (pwrite(ghost_fd, ghost_want, n, 0) != (ssize_t)n ||
	    (o.ghost_link && link(o.ghost, link_path)) || unlink(o.ghost))
		FAIL("ghost", "write %s: %s", o.ghost, strerror(errno));
	logline("ok ghost bytes=%zu nlink=%d", n, o.ghost_link);
}

static void check_ghost(void) {
	size_t n = o.ghost_kib * 1024;
	struct stat st;
	if (fstat(ghost_fd, &st))
		FAIL("ghost", "stat: %s", strerror(errno));
	if (st.st_nlink != (nlink_t)o.ghost_link || st.st_size != (off_t)n)
		FAIL("ghost", "nlink=%lu size=%ld", (unsigned long)st.st_nlink, (long)st.st_size);
	if (pread(ghost_fd, ghost_got, n, 0) != (ssize_t)n)
		FAIL("ghost", "read: %s", strerror(errno));
	if (memcmp(ghost_got, ghost_want, n))
		FAIL("ghost", "content changed");
	logline("ok ghost");
}

// unix_dgram returns a SOCK_DGRAM socket bound or connected to path.
static int unix_dgram(const char *path, int (*op)(int, const struct sockaddr *, socklen_t)) {
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(a.sun_path))
		return errno = ENAMETOOLONG, -1;
	strcpy(a.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	return fd < 0 || op(fd, (void *)&a, sizeof(a)) ? -1 : fd;
}

static void setup_ext_unix(void) {
	if ((unix_fd = unix_dgram(o.ext_unix, connect)) < 0)
		FAIL("ext-unix", "connect %s: %s", o.ext_unix, strerror(errno));
	logline("ok ext-unix path=%s", o.ext_unix);
}

static _Noreturn void run_sink(void) {
	int fd = unix_dgram(o.sink, bind);
	if (fd < 0)
		FAIL("sink", "bind %s: %s", o.sink, strerror(errno));
	logline("sink ready path=%s", o.sink);
	for (char buf[64];;) {
		ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
		if (n < 0 && errno != EINTR)
			FAIL("sink", "recv: %s", strerror(errno));
		if (n >= 0)
			buf[n] = 0, logline("sink %s", buf);
	}
}

static void tick_ext_unix(void) {
	char msg[64];
	int n = snprintf(msg, sizeof(msg), "tick seq=%lu", unix_sent + unix_dropped);
	if (send(unix_fd, msg, n, MSG_DONTWAIT | MSG_NOSIGNAL) == n)
		unix_sent++;
	else if (errno == EAGAIN)
		unix_dropped++; // the peer reads slowly: not a failure
	else
		FAIL("ext-unix", "send: %s", strerror(errno));
}

#define MEMFD_PAGES 256
static uint8_t *memfd_map;

// memfd_byte is the content of page i of the memfd mapping: even pages
// hold the file's bytes, odd ones the private copy's.
static uint8_t memfd_byte(size_t i) { return (uint8_t)(i % 2 ? 0xa0 + i % 16 : 0x10 + i % 16); }

static void setup_memfd(void) {
	int fd = memfd_create("phaul-workload", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, MEMFD_PAGES * PAGE) < 0)
		FAIL("memfd", "create: %s", strerror(errno));
	static uint8_t page[PAGE];
	for (size_t i = 0; i < MEMFD_PAGES; i++) {
		memset(page, i % 2 ? 0x5a : memfd_byte(i), PAGE);
		if (pwrite(fd, page, PAGE, (off_t)(i * PAGE)) != (ssize_t)PAGE)
			FAIL("memfd", "write: %s", strerror(errno));
	}
	memfd_map = mmap(NULL, MEMFD_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (memfd_map == MAP_FAILED)
		FAIL("memfd", "mmap: %s", strerror(errno));
	for (size_t i = 1; i < MEMFD_PAGES; i += 2)
		memset(memfd_map + i * PAGE, memfd_byte(i), PAGE);
	logline("ok memfd pages=%d", MEMFD_PAGES);
}

static void check_memfd(void) {
	for (size_t i = 0; i < MEMFD_PAGES; i++)
		for (size_t b = 0; b < PAGE; b += 512)
			if (memfd_map[i * PAGE + b] != memfd_byte(i))
				FAIL("memfd", "page %zu byte %zu: %#x, want %#x", i, b, memfd_map[i * PAGE + b], memfd_byte(i));
	logline("ok memfd");
}

// check_modes runs in main every CHECK_STEPS steps.
static void check_modes(void) {
	static uint64_t tcp_last, tcp_step;
	if (o.memfd)
		check_memfd();
	if (o.flock)
		check_flock();
	if (o.ghost)
		check_ghost();
	if (o.ext_unix)
		logline("ok ext-unix sent=%lu dropped=%lu", unix_sent, unix_dropped);
	if (o.tcp) {
		// Counted in running steps, so a frozen process never stalls.
		uint64_t r = atomic_load(&tcp_rounds);
		if (r != tcp_last)
			tcp_last = r, tcp_step = step;
		else if (step - tcp_step > TCP_STALL_STEPS)
			FAIL("tcp", "stalled rounds=%lu", r);
		logline("ok tcp rounds=%lu", r);
	}
}

static void parse(int argc, char **argv) {
	static const struct option opts[] = {
		{"mib", 1, 0, 'm'}, {"threads", 1, 0, 't'}, {"rate", 1, 0, 'r'},
		{"verify-ms", 1, 0, 'v'}, {"ghost-kib", 1, 0, 'K'}, {"log", 1, 0, 'l'},
		{"flock", 1, 0, 'F'}, {"ghost", 1, 0, 'G'}, {"ext-unix", 1, 0, 'U'},
		{"sink", 1, 0, 'k'}, {"tcp-pair", 0, 0, 'T'}, {"shm", 0, 0, 'S'},
		{"ghost-link", 0, 0, 'L'}, {"fill", 1, 0, 'f'}, {"children", 1, 0, 'c'},
		{"zombie", 0, 0, 'Z'}, {"stopped-child", 0, 0, 'P'}, {"memfd", 0, 0, 'M'},
		{"untouched-mib", 1, 0, 'u'}, {0}};
	long *num[128] = {['m'] = &o.mib, ['t'] = &o.threads, ['r'] = &o.rate,
			  ['v'] = &o.verify_ms, ['K'] = &o.ghost_kib, ['c'] = &o.children,
			  ['u'] = &o.untouched_mib};
	const char **str[128] = {['l'] = &o.log, ['F'] = &o.flock, ['G'] = &o.ghost,
				 ['U'] = &o.ext_unix, ['k'] = &o.sink, ['f'] = &o.fill};
	int c, bad = 0;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		char *end;
		if (c == 'T' || c == 'S' || c == 'L')
			*(c == 'T' ? &o.tcp : c == 'S' ? &o.shm : &o.ghost_link) = 1;
		else if (c == 'Z' || c == 'P' || c == 'M')
			*(c == 'Z' ? &o.zombie : c == 'P' ? &o.stopped_child : &o.memfd) = 1;
		else if (c > 0 && c < 128 && str[c])
			*str[c] = optarg;
		else if (c > 0 && c < 128 && num[c])
			*num[c] = strtol(optarg, &end, 10), bad |= *end || end == optarg;
		else
			bad = 1;
	}
	if (!strcmp(o.fill, "random"))
		fill_mode = FILL_RANDOM;
	else if (!strcmp(o.fill, "text"))
		fill_mode = FILL_TEXT;
	else if (!strcmp(o.fill, "zero"))
		fill_mode = FILL_ZERO;
	else
		bad = 1;
	if (bad || optind != argc || !o.log || o.mib < 1 || o.threads < 1 ||
	    o.rate < 0 || o.verify_ms < 0 || o.ghost_kib < 1 || o.children < 0 || o.children > 64) {
		fprintf(stderr, "usage: workload --log FILE [--mib N] [--threads T] "
				"[--rate PAGES_PER_SEC] [--verify-ms MS] [--fill random|text|zero] [--tcp-pair] [--flock FILE] "
				"[--ghost FILE [--ghost-kib K] [--ghost-link]] [--ext-unix PATH] [--shm] [--children N] "
				"[--zombie] [--stopped-child] [--memfd] [--untouched-mib N] | --sink PATH --log FILE\n");
		exit(2);
	}
}

// setup_untouched maps FILE.untouched (--untouched-mib MiB of 0x5a bytes,
// written through the file) private and never touches the mapping: it
// holds no page of the process's own.
static void setup_untouched(void) {
	char path[4096];
	snprintf(path, sizeof(path), "%s.untouched", o.log);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		FAIL("untouched", "open %s: %s", path, strerror(errno));
	static uint8_t chunk[1 << 16];
	memset(chunk, 0x5a, sizeof(chunk));
	for (long off = 0; off < o.untouched_mib << 20; off += sizeof(chunk))
		if (pwrite(fd, chunk, sizeof(chunk), off) != (ssize_t)sizeof(chunk))
			FAIL("untouched", "write %s: %s", path, strerror(errno));
	void *u = mmap(NULL, (size_t)o.untouched_mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (u == MAP_FAILED)
		FAIL("untouched", "mmap: %s", strerror(errno));
	close(fd);
	logline("untouched region=%p pages=%ld", u, o.untouched_mib << 8);
}

// setup_zombie forks a child that exits at once; the parent never waits
// for it.
static void setup_zombie(void) {
	pid_t pid = fork();
	if (pid < 0) {
		logline("FAIL setup fork: %s", strerror(errno));
		exit(2);
	}
	if (pid == 0)
		_exit(0);
	logline("zombie pid=%d", pid);
}

static void on_sigcont(int sig) {
	(void)sig;
	logline("FAIL stopped SIGCONT");
}

// setup_stopped_child forks a child that stops itself and reports any
// SIGCONT it gets.
static void setup_stopped_child(void) {
	pid_t pid = fork();
	if (pid < 0) {
		logline("FAIL setup fork: %s", strerror(errno));
		exit(2);
	}
	if (pid > 0) {
		logline("stopped-child pid=%d", pid);
		return;
	}
	signal(SIGCONT, on_sigcont);
	for (;;)
		raise(SIGSTOP);
}

static void start(void *(*fn)(void *), long arg) {
	pthread_t t;
	if (pthread_create(&t, NULL, fn, (void *)arg)) {
		logline("FAIL setup pthread_create");
		exit(2);
	}
}

int main(int argc, char **argv) {
	parse(argc, argv);
	logfd = open(o.log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (logfd < 0) {
		perror(o.log);
		return 2;
	}
	if (o.sink)
		run_sink();
	// Every thread inherits the block and main takes SIGTERM with
	// sigtimedwait: a blocked signal is queued even for a pid-ns init.
	sigset_t term;
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &term, NULL);

	npages = (size_t)o.mib << 8;
	region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE,
		      (o.shm ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
	ledger = mmap(NULL, npages * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED || ledger == MAP_FAILED) {
		logline("FAIL setup mmap: %s", strerror(errno));
		return 2;
	}
	for (size_t i = 0; i < npages; i++)
		fill_page(i, ledger[i] = 1);
	for (int i = 0; i < STRIPES; i++)
		pthread_mutex_init(&stripe[i], NULL);
	logline("start pid=%d pages=%zu region=%p threads=%ld rate=%ld shm=%d fill=%s", getpid(),
		npages, (void *)region, o.threads, o.rate, o.shm, o.fill);

	if (o.untouched_mib > 0)
		setup_untouched();
	// Before SIGCHLD is ignored: an ignored child is reaped at once.
	if (o.zombie)
		setup_zombie();
	if (o.stopped_child)
		setup_stopped_child();
	long child = 0;
	if (o.children > 0)
		signal(SIGCHLD, SIG_IGN); // no zombies: a dead child shows in its log
	for (long i = 1; i <= o.children && !child; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			logline("FAIL setup fork: %s", strerror(errno));
			return 2;
		}
		if (pid == 0) {
			char path[4096];
			snprintf(path, sizeof(path), "%s.child%ld", o.log, i);
			int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
			if (fd < 0)
				_exit(2);
			close(logfd);
			logfd = fd, child = i;
			logline("start pid=%d pages=%zu region=%p threads=%ld rate=%ld shm=%d fill=%s child=%ld",
				getpid(), npages, (void *)region, o.threads, o.rate, o.shm, o.fill, i);
		}
	}
	if (!child) {
		if (o.tcp)
			setup_tcp();
		if (o.flock)
			setup_flock();
		if (o.ghost)
			setup_ghost();
		if (o.ext_unix)
			setup_ext_unix();
		if (o.memfd)
			setup_memfd();
	}
	for (long i = 0; i < o.threads; i++)
		start(writer, i);
	start(verifier, 0);
	start(ticker, 0);
	if (o.tcp && !child)
		start(tcp_ping, 0), start(tcp_pong, 0);

	for (int64_t next = now_ns(CLOCK_MONOTONIC);;) {
		logline("step=%lu t=%ld pid=%d verified=%lu", ++step, now_ns(CLOCK_REALTIME),
			getpid(), atomic_load(&verified));
		report_tick();
		if (o.ext_unix && !child)
			tick_ext_unix();
		if (step % CHECK_STEPS == 1 && !child)
			check_modes();
		int64_t now = now_ns(CLOCK_MONOTONIC);
		next += STEP_NS;
		// After a freeze, or a clock that moved with a migration, pace
		// from now: no catching up, no long wait.
		if (next < now - STEP_NS || next > now + STEP_NS)
			next = now + STEP_NS;
		struct timespec ts = ts_of(next > now ? next - now : 0);
		if (sigtimedwait(&term, NULL, &ts) == SIGTERM) {
			logline("exit signal=TERM step=%lu", step);
			_exit(0);
		}
	}
}
