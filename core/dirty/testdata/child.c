// child: a process whose memory the dirty trackers' tests change on
// command. One command per line on stdin, one answer line on stdout:
//
//   map N            mmap N fresh private anonymous pages, each written
//                    once; answers "ok ADDR"
//   write ADDR N     write one byte into each of N pages from ADDR; "ok"
//   remap ADDR N     move N pages from ADDR elsewhere (mremap); "ok NEWADDR"
//   unmap ADDR N     munmap; "ok"
//   protect ADDR N ro|rw   mprotect; "ok"
//   fork             fork a child that sleeps until killed; "ok PID"
//   sum ADDR N       a checksum of the N pages; "ok SUM"
//   dontneed ADDR N  madvise(MADV_DONTNEED); "ok"
//
// Bad commands answer "err ...". EOF on stdin exits 0.
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static unsigned long counter;

int main(void)
{
	char line[256];
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ok ready\n"); /* exec is complete: the vDSO is mapped */
	while (fgets(line, sizeof line, stdin)) {
		char cmd[32], mode[8] = "";
		unsigned long a = 0, n = 0;
		int f = sscanf(line, "%31s %lx %lu %7s", cmd, &a, &n, mode);
		if (f >= 1 && !strcmp(cmd, "map")) {
			n = strtoul(line + 3, NULL, 10); // decimal, unlike addresses
			char *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED) { printf("err mmap\n"); continue; }
			for (unsigned long i = 0; i < n; i++)
				memset(p + i * PAGE, (int)(i * 7 + 1), PAGE);
			printf("ok %lx\n", (unsigned long)p);
		} else if (f == 3 && !strcmp(cmd, "write")) {
			for (unsigned long i = 0; i < n; i++) {
				counter++;
				((volatile char *)a)[i * PAGE + (counter % PAGE)] = (char)(counter | 1);
			}
			printf("ok\n");
		} else if (f == 3 && !strcmp(cmd, "poke")) {
			((volatile char *)a)[0] = (char)n; // a chosen byte: content can go back
			printf("ok\n");
		} else if (f == 3 && !strcmp(cmd, "remap")) {
			// Reserve a new place, then move there.
			void *to = mmap(NULL, n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			void *p = mremap((void *)a, n * PAGE, n * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, to);
			if (p == MAP_FAILED) { printf("err mremap\n"); continue; }
			printf("ok %lx\n", (unsigned long)p);
		} else if (f == 3 && !strcmp(cmd, "unmap")) {
			printf(munmap((void *)a, n * PAGE) ? "err munmap\n" : "ok\n");
		} else if (f == 4 && !strcmp(cmd, "protect")) {
			int prot = !strcmp(mode, "ro") ? PROT_READ : PROT_READ | PROT_WRITE;
			printf(mprotect((void *)a, n * PAGE, prot) ? "err mprotect\n" : "ok\n");
		} else if (f == 3 && !strcmp(cmd, "dontneed")) {
			printf(madvise((void *)a, n * PAGE, MADV_DONTNEED) ? "err madvise\n" : "ok\n");
		} else if (f == 1 && !strcmp(cmd, "fork")) {
			pid_t pid = fork();
			if (pid == 0) {
				for (;;)
					pause();
			}
			printf("ok %d\n", (int)pid);
		} else if (f == 3 && !strcmp(cmd, "sum")) {
			uint64_t h = 1469598103934665603ULL;
			for (unsigned long i = 0; i < n * PAGE; i++)
				h = (h ^ ((unsigned char *)a)[i]) * 1099511628211ULL;
			printf("ok %llx\n", (unsigned long long)h);
		} else {
			printf("err bad command\n");
		}
	}
	return 0;
}
