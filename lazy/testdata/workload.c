// workload checks its own memory, for the CRIU test of the lazy daemon.
//
// usage: workload MIB
// It fills MIB MiB of anonymous private memory, prints "REGION <addr>
// <pages>" and then, every 50 ms, checks every page ("OK <round>", or
// "CORRUPT page=<i> ..." and exit 1) and rewrites a few pages of the
// second half with a new generation. Page i holds its generation in word 0
// and word w = mix(i, gen, w) elsewhere, so a page of zeros or of another
// page's or generation's data is caught. The first half is never
// rewritten after the fill: a test may corrupt a page there and know it
// is read as it was restored.
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static void out(const char *fmt, ...) {
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (write(1, buf, n) < 0) exit(3);  // one write a line
}

static uint64_t mix(uint64_t page, uint64_t gen, uint64_t w) {
	uint64_t z = page * 0x9E3779B97F4A7C15ULL ^ gen << 40 ^ w;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static void fill(uint64_t *p, uint64_t page, uint64_t gen) {
	p[0] = gen;
	for (uint64_t w = 1; w < WORDS; w++) p[w] = mix(page, gen, w);
}

int main(int argc, char **argv) {
	if (argc != 2) { fprintf(stderr, "usage: workload MIB\n"); return 2; }
	uint64_t pages = strtoull(argv[1], NULL, 0) * (1 << 20) / PAGE;
	uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) { out("FAIL mmap\n"); return 1; }
	for (uint64_t i = 0; i < pages; i++) fill(mem + i * WORDS, i, 1);
	out("REGION %#lx %lu\n", (unsigned long)mem, (unsigned long)pages);
	uint64_t rng = 88172645463325252ULL;
	for (unsigned long round = 1;; round++) {
		for (uint64_t i = 0; i < pages; i++) {
			uint64_t *p = mem + i * WORDS, gen = p[0];
			for (uint64_t w = 1; w < WORDS; w++)
				if (gen == 0 || p[w] != mix(i, gen, w)) {
					out("CORRUPT page=%lu word=%lu gen=%lu got=%#lx\n", (unsigned long)i,
					    (unsigned long)w, (unsigned long)gen, (unsigned long)p[w]);
					return 1;
				}
		}
		out("OK %lu\n", round);
		for (int k = 0; k < 16; k++) {
			rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
			uint64_t i = pages / 2 + rng % (pages - pages / 2);
			fill(mem + i * WORDS, i, mem[i * WORDS] + 1);
		}
		struct timespec ts = {0, 50 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}
