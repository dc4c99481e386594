/* LD_PRELOAD shim for the root tests: sees every BPF_PROG_LOAD that connwatch makes.
 *
 * aya asks the kernel for a verifier log only after a load has failed, so a program
 * that verifies leaves no figure behind. This shim asks for BPF_LOG_STATS on every load
 * that has no log of its own and appends "<prog name> <stack depth line>" to the file
 * named by CONNWATCH_SHIM_STATS. With CONNWATCH_SHIM_REJECT=NAME it fails the load of
 * the program whose name starts with NAME with EACCES and a verifier-like log, as a
 * kernel that rejects the probe would. Built by the tests with `gcc -shared`. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <linux/bpf.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>

typedef long (*syscall_fn)(long, ...);

static char stats[1 << 16];

static void record(const union bpf_attr *attr)
{
	const char *out = getenv("CONNWATCH_SHIM_STATS");
	const char *line = strstr(stats, "stack depth ");
	if (!out || !line)
		return;
	FILE *f = fopen(out, "a");
	if (!f)
		return;
	fprintf(f, "%.16s ", attr->prog_name);
	for (; *line && *line != '\n'; line++)
		fputc(*line, f);
	fputc('\n', f);
	fclose(f);
}

long syscall(long number, ...)
{
	va_list ap;
	long a[6];
	va_start(ap, number);
	for (int i = 0; i < 6; i++)
		a[i] = va_arg(ap, long);
	va_end(ap);
	syscall_fn real = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
	if (number != SYS_bpf || a[0] != BPF_PROG_LOAD)
		return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);

	union bpf_attr *attr = (union bpf_attr *)a[1];
	const char *reject = getenv("CONNWATCH_SHIM_REJECT");
	if (reject && *reject && strncmp(attr->prog_name, reject, strlen(reject)) == 0) {
		if (attr->log_buf && attr->log_size > 64)
			snprintf((char *)(unsigned long)attr->log_buf, attr->log_size,
				 "0: (bf) r6 = r1\n1: (85) call unknown#999\n"
				 "invalid func unknown#999\nprocessed 2 insns (limit 1000000)\n");
		errno = EACCES;
		return -1;
	}
	if (attr->log_level != 0 || attr->log_buf != 0)
		return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
	stats[0] = 0;
	attr->log_level = 4; /* BPF_LOG_STATS */
	attr->log_buf = (unsigned long)stats;
	attr->log_size = sizeof(stats);
	long ret = real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
	int saved = errno;
	attr->log_level = 0;
	attr->log_buf = 0;
	attr->log_size = 0;
	if (ret >= 0)
		record(attr);
	errno = saved;
	return ret;
}
