// zoo: one mapping of each kind whose pages a CRIU dump treats in its own
// way, for zoo_test.go, which compares what CRIU dumps with what phaul's
// pre-copy would send.
//
//   zoo DIR     DIR holds the files it maps (created, left in place)
//
// It leads its own session (CRIU refuses a task whose session leader is
// outside its PID namespace, as the test's is when the tests run in a
// PID namespace of their own), makes every mapping, writes recognisable
// data into it, prints one line per mapping
//
//   map NAME START END      [START, END) in hex
//   skip NAME REASON        the kernel refused this kind
//
// then "ready", and sleeps until killed.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08 /* Linux 6.11 */
#endif
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102 /* Linux 6.13 */
#endif
#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#endif
#ifndef PR_SET_VMA_ANON_NAME
#define PR_SET_VMA_ANON_NAME 0
#endif

#define PAGE 4096UL
#define HUGE (2UL << 20)
#define NPAGES 8

static const char *dir;

static void show(const char *name, void *p, size_t len)
{
	printf("map %s %lx %lx\n", name, (unsigned long)p, (unsigned long)p + len);
}

static void skip(const char *name, const char *why, int err)
{
	printf("skip %s %s: %s\n", name, why, strerror(err));
}

// stamp writes a recognisable page: its kind and index, then a pattern.
static void stamp(char *page, const char *name, unsigned long i)
{
	memset(page, (int)(i * 7 + 1) | 1, PAGE);
	snprintf(page, 64, "zoo %s page %lu", name, i);
}

static volatile char sink;

// touch reads one byte of each page of [p, p+n pages): never-written
// anonymous memory then maps the shared zero page, a file its page cache.
static void touch(char *p, unsigned long n)
{
	for (unsigned long i = 0; i < n; i++)
		sink += ((volatile char *)p)[i * PAGE];
}

static char *anon(const char *name, unsigned long n, int prot, int flags)
{
	char *p = mmap(NULL, n * PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
	if (p == MAP_FAILED) {
		skip(name, "mmap", errno);
		return NULL;
	}
	return p;
}

// anon_written: every page written.
static char *anon_written(const char *name, int flags)
{
	char *p = anon(name, NPAGES, PROT_READ | PROT_WRITE, flags);
	if (p)
		for (unsigned long i = 0; i < NPAGES; i++)
			stamp(p + i * PAGE, name, i);
	return p;
}

// Private anonymous memory: pages 0-3 written, 4-5 read (the zero page),
// 6-7 untouched.
static void zoo_anon(void)
{
	char *p = anon("anon", NPAGES, PROT_READ | PROT_WRITE, 0);
	if (!p)
		return;
	for (unsigned long i = 0; i < 4; i++)
		stamp(p + i * PAGE, "anon", i);
	touch(p + 4 * PAGE, 2);
	show("anon", p, NPAGES * PAGE);
}

static void zoo_droppable(void)
{
	char *p = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_DROPPABLE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		skip("droppable", "mmap MAP_DROPPABLE", errno);
		return;
	}
	for (unsigned long i = 0; i < NPAGES; i++)
		stamp(p + i * PAGE, "droppable", i);
	show("droppable", p, NPAGES * PAGE);
}

// pagemap_guard reports whether pagemap marks the page at p a guard
// region (bit 58, Linux 6.15).
static int pagemap_guard(char *p)
{
	uint64_t e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	if (pread(fd, &e, sizeof e, (off_t)((uintptr_t)p / PAGE * sizeof e)) != sizeof e)
		e = 0;
	close(fd);
	return (e >> 58) & 1;
}

// Guard regions on pages 2-3 of written memory (installing zaps them).
// Where pagemap cannot show them (6.13, 6.14) CRIU refuses to dump the
// process: no guard then.
static void zoo_guard(void)
{
	char *p = anon_written("guard", 0);
	if (!p)
		return;
	if (madvise(p + 2 * PAGE, 2 * PAGE, MADV_GUARD_INSTALL)) {
		skip("guard", "madvise MADV_GUARD_INSTALL", errno);
		munmap(p, NPAGES * PAGE);
		return;
	}
	if (!pagemap_guard(p + 2 * PAGE)) {
		skip("guard", "pagemap shows no guard region (Linux 6.15), CRIU would refuse", ENOTSUP);
		munmap(p, NPAGES * PAGE);
		return;
	}
	show("guard", p, NPAGES * PAGE);
}

static void zoo_simple(const char *name, int prot_after, int flags, int madv)
{
	char *p = anon_written(name, flags);
	if (!p)
		return;
	if (madv >= 0 && madvise(p, NPAGES * PAGE, madv)) {
		skip(name, "madvise", errno);
		munmap(p, NPAGES * PAGE);
		return;
	}
	if (prot_after >= 0 && mprotect(p, NPAGES * PAGE, prot_after)) {
		skip(name, "mprotect", errno);
		munmap(p, NPAGES * PAGE);
		return;
	}
	show(name, p, NPAGES * PAGE);
}

static void zoo_shared_anon(void)
{
	char *p = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		skip("shared-anon", "mmap", errno);
		return;
	}
	for (unsigned long i = 0; i < NPAGES; i++)
		stamp(p + i * PAGE, "shared-anon", i);
	show("shared-anon", p, NPAGES * PAGE);
}

// backing fills fd with NPAGES stamped pages.
static int backing(int fd, const char *name)
{
	char page[PAGE];
	for (unsigned long i = 0; i < NPAGES; i++) {
		stamp(page, name, i);
		if (write(fd, page, PAGE) != (ssize_t)PAGE)
			return -1;
	}
	return 0;
}

// file_or_memfd opens a file in dir, or a memfd, holding NPAGES pages.
static int file_or_memfd(const char *name, int memfd)
{
	char path[4096];
	int fd;
	if (memfd) {
		fd = memfd_create(name, MFD_CLOEXEC);
	} else {
		snprintf(path, sizeof path, "%s/%s.dat", dir, name);
		fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	}
	if (fd < 0 || backing(fd, name)) {
		skip(name, memfd ? "memfd_create" : "create file", errno);
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

// A mapping of a file or memfd. Private: pages 0-3 written (copied on
// write), 4-5 read (page cache), 6-7 untouched. Shared: all written.
static void zoo_file(const char *name, int memfd, int shared)
{
	int fd = file_or_memfd(name, memfd);
	if (fd < 0)
		return;
	char *p = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE, shared ? MAP_SHARED : MAP_PRIVATE, fd, 0);
	int err = errno;
	if (!memfd)
		close(fd); // the mapping holds the file; a memfd stays open, as programs keep it
	if (p == MAP_FAILED) {
		skip(name, "mmap", err);
		return;
	}
	for (unsigned long i = 0; i < (shared ? NPAGES : 4); i++)
		stamp(p + i * PAGE, name, i);
	if (!shared)
		touch(p + 4 * PAGE, 2);
	show(name, p, NPAGES * PAGE);
}

// thp_region returns a 2 MiB-aligned region of n huge pages with
// MADV_HUGEPAGE, or NULL (reported) without THP.
static char *thp_region(const char *name, unsigned long n)
{
	char mode[64] = "";
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
	if (!f || !fgets(mode, sizeof mode, f) || strstr(mode, "[never]")) {
		if (f)
			fclose(f);
		skip(name, "transparent huge pages off", ENOTSUP);
		return NULL;
	}
	fclose(f);
	char *raw = mmap(NULL, (n + 1) * HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED) {
		skip(name, "mmap", errno);
		return NULL;
	}
	char *p = (char *)(((uintptr_t)raw + HUGE - 1) & ~(HUGE - 1));
	if (p > raw)
		munmap(raw, p - raw);
	munmap(p + n * HUGE, raw + (n + 1) * HUGE - (p + n * HUGE));
	if (madvise(p, n * HUGE, MADV_HUGEPAGE)) {
		skip(name, "madvise MADV_HUGEPAGE", errno);
		munmap(p, n * HUGE);
		return NULL;
	}
	return p;
}

// Huge pages: one written in every small page, one written in one place
// (a whole huge page of mostly zeros), one only read (the huge zero page).
static void zoo_thp(void)
{
	char *p = thp_region("thp", 2);
	if (p) {
		for (unsigned long i = 0; i < HUGE / PAGE; i++)
			stamp(p + i * PAGE, "thp", i);
		stamp(p + HUGE, "thp", HUGE / PAGE);
		show("thp", p, 2 * HUGE);
	}
	p = thp_region("thp-read", 1);
	if (p) {
		touch(p, HUGE / PAGE);
		show("thp-read", p, HUGE);
	}
}

// Named anonymous memory shows as [anon:zoo] in maps (CONFIG_ANON_VMA_NAME).
static void zoo_named(void)
{
	char *p = anon_written("named", 0);
	if (!p)
		return;
	if (prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)p, NPAGES * PAGE, "zoo")) {
		skip("named", "prctl PR_SET_VMA_ANON_NAME", errno);
		munmap(p, NPAGES * PAGE);
		return;
	}
	show("named", p, NPAGES * PAGE);
}

static void zoo_hugetlb(void)
{
	char *p = mmap(NULL, HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	if (p == MAP_FAILED) {
		skip("hugetlb", "mmap MAP_HUGETLB", errno);
		return;
	}
	for (unsigned long i = 0; i < 4; i++)
		stamp(p + i * PAGE, "hugetlb", i);
	show("hugetlb", p, HUGE);
}

// show_maps prints the kernel's mappings [vdso], [vvar] and
// [vvar_vclock] from /proc/self/maps, and, if aio_ring is not 0, the one
// holding that address as "aio".
static void show_maps(unsigned long aio_ring)
{
	static const char *const kernel[] = {"[vdso]", "[vvar]", "[vvar_vclock]"};
	char line[4096];
	FILE *f = fopen("/proc/self/maps", "r");
	if (!f) {
		skip("vdso", "open /proc/self/maps", errno);
		return;
	}
	while (fgets(line, sizeof line, f)) {
		unsigned long s, e;
		char path[4096] = "";
		if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %4095s", &s, &e, path) < 2)
			continue;
		for (size_t i = 0; i < sizeof kernel / sizeof kernel[0]; i++)
			if (!strcmp(path, kernel[i]))
				printf("map %.*s %lx %lx\n", (int)strlen(kernel[i]) - 2, kernel[i] + 1, s, e);
		if (aio_ring && s <= aio_ring && aio_ring < e)
			printf("map aio %lx %lx\n", s, e);
	}
	fclose(f);
}

// An AIO ring: memory the kernel writes (events), mapped shared.
static unsigned long zoo_aio(void)
{
	aio_context_t ctx = 0;
	if (syscall(SYS_io_setup, 16, &ctx)) {
		skip("aio", "io_setup", errno);
		return 0;
	}
	return (unsigned long)ctx;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: zoo DIR\n");
		return 2;
	}
	dir = argv[1];
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (setsid() < 0) {
		perror("setsid");
		return 1;
	}
	zoo_anon();
	zoo_droppable();
	zoo_guard();
	zoo_shared_anon();
	zoo_file("file-private", 0, 0);
	zoo_file("file-shared", 0, 1);
	zoo_file("memfd-private", 1, 0);
	zoo_file("memfd-shared", 1, 1);
	zoo_simple("prot-none", PROT_NONE, 0, -1);
	zoo_simple("read-only", PROT_READ, 0, -1);
	zoo_simple("growsdown", -1, MAP_GROWSDOWN, -1);
	zoo_simple("dontdump", -1, 0, MADV_DONTDUMP);
	zoo_thp();
	zoo_named();
	zoo_hugetlb();
	show_maps(zoo_aio());
	printf("ready\n");
	for (;;)
		pause();
}
