// uffdchild stands in for a task that `criu restore --lazy-pages` restores:
// it maps regions, registers them with a userfaultfd of its own (MISSING,
// with the FORK/REMAP/REMOVE/UNMAP events), hands the userfaultfd to the
// daemon on lazy-pages.socket as CRIU's restore does (int32 id, then one
// byte carrying the fd), and then runs commands from stdin, one a line,
// answering each with one line on stdout: "ok ...", or "CORRUPT ..." /
// "FAIL ..." (then it exits 1). Lines of a forked child start "child:".
//
// Memory is checked against the pattern the test's Source serves: word i
// of the image page at address a is mix(id, a + 8*i); image ranges listed
// as zero read as zero, and words written read as written. The child keeps
// its own model of where image pages are now (mremap moves them).
//
// usage: uffdchild SOCKET ID SPEC...
//   map:ADDR:LEN:r|rw   map anonymous private memory and register it
//   fill:ADDR:LEN       write the pattern there first (CRIU's eager pages)
//   zero:ADDR:LEN       image range that reads as zero (not in the pagemap)
// commands:
//   finish | touch N SEED | write ADDR VAL | remap FROM LEN TO |
//   unmap ADDR LEN | madvise ADDR LEN | protect ADDR LEN | fork N SEED |
//   check | exit
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define MAX 256

struct map { uint64_t cur, len, img; };  // [cur, cur+len) shows image pages from img
struct span { uint64_t img, len; };      // image range reading as zero
struct word { uint64_t img, val; };      // a word written, by image address

static uint64_t id;
static struct map maps[MAX];
static int nmaps;
static struct span zeros[MAX];
static int nzeros;
static struct word words[MAX];
static int nwords;
static const char *who = "";
static pid_t child = -1;
static int child_go = -1;  // parent -> child: run the full check

static void out(const char *fmt, ...) {
	char buf[512];
	int n = snprintf(buf, sizeof buf, "%s", who);
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - n, fmt, ap);
	va_end(ap);
	if (write(1, buf, n) < 0) exit(3);  // one write: lines stay whole
}

static void fail(const char *what) {
	out("FAIL %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t mix(uint64_t a) {  // splitmix64 of id and address; lazy/child_test.go has its twin
	uint64_t z = a ^ (id * 0x9E3779B97F4A7C15ULL);
	z += 0x9E3779B97F4A7C15ULL;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static int is_zero(uint64_t img) {
	for (int i = 0; i < nzeros; i++)
		if (img >= zeros[i].img && img < zeros[i].img + zeros[i].len) return 1;
	return 0;
}

// check_page compares the page now at cur, holding image page img.
static int check_page(uint64_t cur, uint64_t img) {
	const volatile uint64_t *p = (const volatile uint64_t *)cur;
	uint64_t over[PAGE / 8];
	char has[PAGE / 8] = {0};
	for (int i = 0; i < nwords; i++)
		if ((words[i].img & ~(PAGE - 1)) == img) {
			has[(words[i].img - img) / 8] = 1;
			over[(words[i].img - img) / 8] = words[i].val;
		}
	int zero = is_zero(img);
	for (unsigned i = 0; i < PAGE / 8; i++) {
		uint64_t want = has[i] ? over[i] : zero ? 0 : mix(img + 8 * i);
		uint64_t got = p[i];
		if (got != want) {
			out("CORRUPT addr=%#lx img=%#lx word=%u got=%#lx want=%#lx\n",
			    (unsigned long)cur, (unsigned long)img, i, (unsigned long)got, (unsigned long)want);
			return 0;
		}
	}
	return 1;
}

static struct map *find(uint64_t cur) {
	for (int i = 0; i < nmaps; i++)
		if (cur >= maps[i].cur && cur < maps[i].cur + maps[i].len) return &maps[i];
	return NULL;
}

static uint64_t img_of(uint64_t cur) {
	struct map *m = find(cur);
	if (!m) { errno = EFAULT; fail("address not mapped in the model"); }
	return m->img + (cur - m->cur);
}

// cut removes [s, s+len) from the model and returns the pieces it held.
static int cut(uint64_t s, uint64_t len, struct map *pieces) {
	struct map keep[MAX];
	int nkeep = 0, np = 0;
	uint64_t e = s + len;
	for (int i = 0; i < nmaps; i++) {
		struct map m = maps[i];
		uint64_t me = m.cur + m.len;
		if (me <= s || m.cur >= e) { keep[nkeep++] = m; continue; }
		if (m.cur < s) keep[nkeep++] = (struct map){m.cur, s - m.cur, m.img};
		if (me > e) keep[nkeep++] = (struct map){e, me - e, m.img + (e - m.cur)};
		uint64_t ps = m.cur > s ? m.cur : s, pe = me < e ? me : e;
		if (pieces) pieces[np++] = (struct map){ps, pe - ps, m.img + (ps - m.cur)};
	}
	memcpy(maps, keep, sizeof(struct map) * nkeep);
	nmaps = nkeep;
	return np;
}

static uint64_t rng;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

// touch reads and checks n random pages of the model.
static int touch(int n, uint64_t seed) {
	uint64_t total = 0;
	rng = seed | 1;
	for (int i = 0; i < nmaps; i++) total += maps[i].len / PAGE;
	for (int k = 0; k < n; k++) {
		uint64_t pg = next() % total;
		for (int i = 0; i < nmaps; i++) {
			if (pg < maps[i].len / PAGE) {
				if (!check_page(maps[i].cur + pg * PAGE, maps[i].img + pg * PAGE)) return 0;
				break;
			}
			pg -= maps[i].len / PAGE;
		}
	}
	return 1;
}

static long check_all(void) {
	long pages = 0;
	for (int i = 0; i < nmaps; i++)
		for (uint64_t off = 0; off < maps[i].len; off += PAGE, pages++)
			if (!check_page(maps[i].cur + off, maps[i].img + off)) return -1;
	return pages;
}

static void fork_child(int n, uint64_t seed) {
	int p[2];
	if (pipe(p)) fail("pipe");
	child = fork();
	if (child < 0) fail("fork");
	if (child > 0) { close(p[0]); child_go = p[1]; return; }
	close(p[1]);
	who = "child: ";
	out(touch(n, seed) ? "ok touched %d\n" : "FAIL touch\n", n);
	char c;
	if (read(p[0], &c, 1) != 1) fail("child wait");
	long pages = check_all();
	if (pages < 0) exit(1);
	out("ok checked %ld pages\n", pages);
	exit(0);
}

static void check(void) {
	long pages = check_all();
	if (pages < 0) exit(1);
	if (child > 0) {
		int st;
		if (write(child_go, "x", 1) != 1) fail("signal child");
		if (waitpid(child, &st, 0) != child) fail("waitpid");
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { out("FAIL child status %#x\n", st); exit(1); }
	}
	out("ok checked %ld pages\n", pages);
}

static void command(char *line, int uffd_sk) {
	char op[32];
	unsigned long a = 0, b = 0, c = 0;
	int n = sscanf(line, "%31s %li %li %li", op, &a, &b, &c);
	if (n < 1) { out("FAIL empty command\n"); exit(1); }
	if (!strcmp(op, "finish")) {
		uint32_t fin = 0x52535446;  // LAZY_PAGES_RESTORE_FINISHED
		if (send(uffd_sk, &fin, sizeof fin, 0) != sizeof fin) fail("send finish");
		out("ok finished\n");
	} else if (!strcmp(op, "touch")) {
		if (!touch(a, b)) exit(1);
		out("ok touched %lu\n", a);
	} else if (!strcmp(op, "write")) {
		*(volatile uint64_t *)a = b;
		if (nwords == MAX) { out("FAIL too many words\n"); exit(1); }
		words[nwords++] = (struct word){img_of(a), b};
		out("ok wrote\n");
	} else if (!strcmp(op, "remap")) {
		struct map pieces[MAX];
		if (mremap((void *)a, b, b, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)c) == MAP_FAILED) fail("mremap");
		int np = cut(a, b, pieces);
		for (int i = 0; i < np; i++) { pieces[i].cur += c - a; maps[nmaps++] = pieces[i]; }
		out("ok remapped\n");
	} else if (!strcmp(op, "unmap")) {
		if (munmap((void *)a, b)) fail("munmap");
		cut(a, b, NULL);
		out("ok unmapped\n");
	} else if (!strcmp(op, "madvise")) {
		if (madvise((void *)a, b, MADV_DONTNEED)) fail("madvise");
		for (uint64_t off = 0; off < b; off += PAGE) {
			uint64_t img = img_of(a + off);
			zeros[nzeros++] = (struct span){img, PAGE};  // one page at a time: few
			for (int i = 0; i < nwords; i++)
				if ((words[i].img & ~(PAGE - 1)) == img) words[i].val = 0;
			if (nzeros == MAX) { out("FAIL too many zero spans\n"); exit(1); }
		}
		out("ok madvised\n");
	} else if (!strcmp(op, "protect")) {
		if (mprotect((void *)a, b, PROT_READ)) fail("mprotect");
		out("ok protected\n");
	} else if (!strcmp(op, "fork")) {
		fork_child(a, b);
		out("ok forked %d\n", child);
	} else if (!strcmp(op, "check")) {
		check();
	} else if (!strcmp(op, "exit")) {
		exit(0);
	} else {
		out("FAIL unknown command %s\n", op);
		exit(1);
	}
}

// hand_over sends id and uffd as CRIU's restore does (criu/uffd.c).
static int hand_over(const char *path, int uffd) {
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int sk = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sk < 0) fail("socket");
	strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
	if (connect(sk, (struct sockaddr *)&sa, sizeof sa)) fail("connect");
	int32_t pid = (int32_t)id;
	if (send(sk, &pid, sizeof pid, 0) != sizeof pid) fail("send pid");
	char byte = 0;
	struct iovec iov = {&byte, 1};
	char cbuf[CMSG_SPACE(sizeof(int))] = {0};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &uffd, sizeof(int));
	if (sendmsg(sk, &mh, 0) != 1) fail("sendmsg uffd");
	return sk;
}

int main(int argc, char **argv) {
	if (argc < 3) { fprintf(stderr, "usage: uffdchild SOCKET ID SPEC...\n"); return 2; }
	id = strtoull(argv[2], NULL, 0);
	signal(SIGPIPE, SIG_IGN);  // as CRIU: a send to a closed daemon fails with EPIPE
	int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0) fail("userfaultfd");
	struct uffdio_api api = {.api = UFFD_API,
		.features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP};
	if (ioctl(uffd, UFFDIO_API, &api)) fail("UFFDIO_API");
	// Three passes: map everything writable, write the eager pages (CRIU
	// restores those before it registers), then make read-only what is.
	for (int pass = 0; pass < 3; pass++)
		for (int i = 3; i < argc; i++) {
			char kind[8], prot[4] = "";
			unsigned long a, l;
			if (sscanf(argv[i], "%7[a-z]:%li:%li:%3s", kind, &a, &l, prot) < 3) { errno = EINVAL; fail(argv[i]); }
			if (pass == 0 && !strcmp(kind, "zero")) {
				zeros[nzeros++] = (struct span){a, l};
			} else if (pass == 0 && !strcmp(kind, "map")) {
				if (mmap((void *)a, l, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != (void *)a) fail("mmap");
				maps[nmaps++] = (struct map){a, l, a};
			} else if (pass == 1 && !strcmp(kind, "fill")) {
				for (uint64_t w = 0; w < l; w += 8) *(uint64_t *)(a + w) = mix(a + w);
			} else if (pass == 2 && !strcmp(kind, "map") && strcmp(prot, "rw")) {
				if (mprotect((void *)a, l, PROT_READ)) fail("mprotect");
			}
		}
	for (int i = 0; i < nmaps; i++) {
		struct uffdio_register r = {.range = {maps[i].cur, maps[i].len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
		if (ioctl(uffd, UFFDIO_REGISTER, &r)) fail("UFFDIO_REGISTER");
	}
	int sk = hand_over(argv[1], uffd);
	close(uffd);  // as CRIU's restorer: only the daemon holds it now
	out("ok ready\n");
	char line[256];
	FILE *in = fdopen(0, "r");
	while (fgets(line, sizeof line, in)) command(line, sk);
	return 0;
}
