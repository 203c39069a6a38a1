/*
 * The fault engine's fast path: the common page fault served without the interpreter.
 *
 * Loaded by shmfault/fastpath.py with ctypes and called from the engine thread, which releases
 * the GIL for the call. sf_wait() waits on the engine's epoll set (spinning first after
 * activity, as the Python loop did) and serves, entirely here, every readiness of a userfaultfd
 * registered with sf_watch() whose batch holds only page faults it can resolve. Everything
 * else goes back to Python, which keeps every rule of docs/architecture.md:
 *   - a batch holding any record other than a page fault (events are applied before faults);
 *   - a fault outside every range, on a page whose state is not ABSENT (removed, zeroed, or
 *     mapped yet faulting again), or whose bytes are not simply the source's;
 *   - every ioctl error, EEXIST and partial copies included (pages done are counted and
 *     marked first, so the slow path redoes nothing);
 *   - a kernel whose userfaultfd has no read_iter (RWF_NOWAIT refused: before 6.8).
 * Unserved records of a batch are left in the attachment's `leftover` buffer for Python.
 *
 * Ownership: a registered attachment's page states and fault-around window belong to whoever
 * runs on the engine thread: this code inside sf_wait(), Python outside it. Counters are only
 * written here and read by any thread (aligned 64-bit loads, never a torn value); a fault and
 * its fill are counted before the ioctl that wakes the client and taken back if it fails, so a
 * reader never misses what a client saw served. A region's lock (struct sf_region) is shared with
 * Python's RegionBacking, which takes it through sf_region_lock(): region writes, fills and
 * close exclude the fills made here, and a closed region is never touched.
 *
 * The kernel ABI comes from the kernel's own header, <linux/userfaultfd.h>.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SF_ABI_VERSION 2

/* page states, as engine.py numbers them */
enum { ABSENT = 0, MAPPED = 1 };

/* attach modes, as modes.py (and the wire) numbers them */
enum { SHARED_COPY = 1, SHARED_CONTINUE = 2, PRIVATE_COPY = 3 };

#define EVENTS_PER_READ 64
#define MSG_SIZE ((int)sizeof(struct uffd_msg))
#define LATENCY_BUCKETS 22
#define EPOLL_BATCH 64
#define MAX_READY 256

struct sf_region {
	pthread_mutex_t lock; /* recursive: RegionBacking's methods call each other */
	int32_t closed;
};

struct sf_range {
	uint64_t base;
	uint64_t length;
	uint64_t region_offset;
	uint8_t *pages;
	int64_t sequential_next;
	uint64_t window_pages;
};

struct sf_counters {
	uint64_t faults_missing;
	uint64_t faults_minor;
	uint64_t pages_filled;
	uint64_t bytes_filled;
	uint64_t zero_pages;
	uint64_t latency[LATENCY_BUCKETS];
};

struct sf_attachment {
	int32_t uffd;
	int32_t mode;
	int32_t region_fd;
	int32_t zero;           /* the region's content is zeros */
	int32_t source_fd;      /* file source (-1: none) */
	uint64_t source_offset; /* file offset of region offset 0 */
	uint64_t source_base;   /* address of region offset 0 in a mapping of the source, or 0 */
	uint64_t source_mapped; /* region bytes mapped from offset 0 */
	uint64_t page_size;
	struct sf_region *region;
	uint32_t range_count;
	uint32_t leftover_length; /* bytes of unserved records in leftover */
	struct sf_range *ranges;
	int64_t leftover_read_ns; /* when the leftover records were read (CLOCK_MONOTONIC) */
	/* a recording attachment's faults served here, page_index << 1 | write, for Python to
	 * take (record_capacity 0: not recording); full, the faults go to Python */
	uint64_t *record;
	uint32_t record_capacity;
	uint32_t record_length;
	struct sf_counters counters;
	uint8_t leftover[EVENTS_PER_READ * sizeof(struct uffd_msg)];
	int32_t in_lane; /* a lane's epoll set holds it: the lane may serve it (struct lane) */
	/* placement (struct lane): the client, the thread that faulted last (0: unknown, the
	 * client did not enable UFFD_FEATURE_THREAD_ID), when its CPU was last looked at, and
	 * the lane it asks to move to when handed back for that (0: not moving) */
	int32_t pid;
	uint32_t last_tid;
	int64_t placed_ns;
	int32_t wanted_lane;
	/* the client shares the service's pid namespace: a fault's thread id names a thread in
	 * our /proc (else it is an id in the client's namespace, and only pid is looked at) */
	int32_t tids_visible;
};

struct sf_engine {
	int32_t epfd;
	int32_t nowait_reads; /* 0 once the kernel refused RWF_NOWAIT on a userfaultfd */
	uint64_t fault_around_pages;
	uint64_t fault_around_max_pages;
	uint64_t base_page;
	uint64_t latency_bounds[LATENCY_BUCKETS - 1];
	/* adaptive spin (FaultEngine's docstring) */
	int64_t spin_ns;
	int64_t spin_window_ns;
	int64_t spin_until;
	int64_t idle_since;
	uint64_t spin_probes;
	uint64_t spin_polls;
	uint64_t spin_hits;
	uint64_t spin_time_ns;
	uint64_t faults_served; /* faults this code resolved */
	uint64_t batches_returned; /* readinesses handed to Python */
	/* fds Python must serve, filled by sf_wait */
	int32_t ready_count;
	int32_t ready[MAX_READY];
	/* fd -> registered attachment */
	int32_t table_size;
	struct sf_attachment **table;
	/* one window of a file source read for shared-continue */
	uint64_t buffer_size;
	uint8_t *buffer;
	/* a window of at least this many bytes is done in two halves at once, the second on the
	 * worker thread (0: never, on one CPU) */
	uint64_t parallel_bytes;
	struct worker *worker;
};

/* The second thread of a large window: runs one job at a time for the engine thread, which
 * does the other half meanwhile and then waits for it. Started on first use. */
struct worker {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int stop;
	int pending; /* a job is set and not finished */
	void (*job)(void *);
	void *argument;
};

static void *worker_main(void *opaque)
{
	struct worker *worker = opaque;
	pthread_mutex_lock(&worker->lock);
	for (;;) {
		while (!worker->pending && !worker->stop)
			pthread_cond_wait(&worker->cond, &worker->lock);
		if (worker->stop && !worker->pending)
			break;
		pthread_mutex_unlock(&worker->lock);
		worker->job(worker->argument);
		pthread_mutex_lock(&worker->lock);
		worker->pending = 0;
		pthread_cond_broadcast(&worker->cond);
	}
	pthread_mutex_unlock(&worker->lock);
	return NULL;
}

/* The CPUs the service may run on, as its threads had them before any lane was pinned: a
 * worker started by a pinned lane must not inherit the lane's one CPU, or the two halves of a
 * window would take turns on it. */
static cpu_set_t service_cpus;
static int service_cpus_known;
static pthread_once_t service_cpus_once = PTHREAD_ONCE_INIT;

static void note_service_cpus(void)
{
	service_cpus_known = !sched_getaffinity(0, sizeof(service_cpus), &service_cpus);
}

/* The worker, started now if need be; NULL when it cannot be (then one thread does all). */
static struct worker *worker_of(struct sf_engine *engine)
{
	if (engine->worker)
		return engine->worker;
	struct worker *worker = calloc(1, sizeof(*worker));
	if (!worker)
		return NULL;
	pthread_mutex_init(&worker->lock, NULL);
	pthread_cond_init(&worker->cond, NULL);
	pthread_attr_t attributes;
	pthread_attr_init(&attributes);
	if (service_cpus_known)
		pthread_attr_setaffinity_np(&attributes, sizeof(service_cpus), &service_cpus);
	int failed = pthread_create(&worker->thread, &attributes, worker_main, worker);
	pthread_attr_destroy(&attributes);
	if (failed) {
		pthread_cond_destroy(&worker->cond);
		pthread_mutex_destroy(&worker->lock);
		free(worker);
		return NULL;
	}
	engine->worker = worker;
	return worker;
}

/* Run first(a) here and second(b) on the worker at once; returns when both are done. */
static void run_both(struct sf_engine *engine, void (*job)(void *), void *a, void *b)
{
	struct worker *worker = worker_of(engine);
	if (!worker) {
		job(a);
		job(b);
		return;
	}
	pthread_mutex_lock(&worker->lock);
	worker->job = job;
	worker->argument = b;
	worker->pending = 1;
	pthread_cond_broadcast(&worker->cond);
	pthread_mutex_unlock(&worker->lock);
	job(a);
	pthread_mutex_lock(&worker->lock);
	while (worker->pending)
		pthread_cond_wait(&worker->cond, &worker->lock);
	pthread_mutex_unlock(&worker->lock);
}

static void worker_stop(struct sf_engine *engine)
{
	struct worker *worker = engine->worker;
	if (!worker)
		return;
	pthread_mutex_lock(&worker->lock);
	worker->stop = 1;
	pthread_cond_broadcast(&worker->cond);
	pthread_mutex_unlock(&worker->lock);
	pthread_join(worker->thread, NULL);
	pthread_cond_destroy(&worker->cond);
	pthread_mutex_destroy(&worker->lock);
	free(worker);
	engine->worker = NULL;
}

int sf_abi_version(void) { return SF_ABI_VERSION; }

size_t sf_sizeof(int which)
{
	switch (which) {
	case 0: return sizeof(struct sf_region);
	case 1: return sizeof(struct sf_range);
	case 2: return sizeof(struct sf_counters);
	case 3: return sizeof(struct sf_attachment);
	case 4: return sizeof(struct sf_engine);
	}
	return 0;
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* --- the region lock, shared with Python --- */

int sf_region_init(struct sf_region *region)
{
	pthread_mutexattr_t attr;
	int rc = pthread_mutexattr_init(&attr);
	if (rc)
		return rc;
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
	rc = pthread_mutex_init(&region->lock, &attr);
	pthread_mutexattr_destroy(&attr);
	region->closed = 0;
	return rc;
}

void sf_region_lock(struct sf_region *region) { pthread_mutex_lock(&region->lock); }
void sf_region_unlock(struct sf_region *region) { pthread_mutex_unlock(&region->lock); }
/* The region is closed: never touched here again. The caller holds the lock. */
void sf_region_close(struct sf_region *region) { region->closed = 1; }

/* --- the engine --- */

int sf_engine_init(struct sf_engine *engine, int epfd)
{
	pthread_once(&service_cpus_once, note_service_cpus); /* on a Python thread: not pinned */
	engine->epfd = epfd;
	engine->nowait_reads = 1;
	engine->table_size = 0;
	engine->table = NULL;
	engine->buffer_size = 0;
	engine->buffer = NULL;
	engine->parallel_bytes = 0;
	engine->worker = NULL;
	return 0;
}

void sf_engine_free(struct sf_engine *engine)
{
	worker_stop(engine);
	free(engine->table);
	free(engine->buffer);
	engine->table = NULL;
	engine->buffer = NULL;
	engine->table_size = 0;
	engine->buffer_size = 0;
}

/* Serve `fd`'s readiness with `attachment` (NULL: no longer). 0, or ENOMEM. */
int sf_watch(struct sf_engine *engine, int fd, struct sf_attachment *attachment)
{
	if (fd < 0)
		return EINVAL;
	if (fd >= engine->table_size) {
		if (!attachment)
			return 0;
		int size = engine->table_size ? engine->table_size : 64;
		while (size <= fd)
			size *= 2;
		struct sf_attachment **table = realloc(engine->table, size * sizeof(*table));
		if (!table)
			return ENOMEM;
		memset(table + engine->table_size, 0,
		       (size - engine->table_size) * sizeof(*table));
		engine->table = table;
		engine->table_size = size;
	}
	engine->table[fd] = attachment;
	return 0;
}

/* --- resolving one fault --- */

enum { SERVED = 0, TO_PYTHON = 1 };

struct copy_result {
	int error;      /* 0, or the errno */
	uint64_t done;  /* bytes in place from the start */
};

/* One resolving ioctl over [address, address + length). */
static struct copy_result map_pages(int uffd, int mode, uint64_t address, uint64_t source,
				    uint64_t length)
{
	struct copy_result result = {0, 0};
	int rc;
	int64_t reported;
	if (mode == SHARED_CONTINUE) {
		struct uffdio_continue arg = {.range = {address, length}, .mode = 0};
		rc = ioctl(uffd, UFFDIO_CONTINUE, &arg);
		reported = arg.mapped;
	} else if (!source) {
		struct uffdio_zeropage arg = {.range = {address, length}, .mode = 0};
		rc = ioctl(uffd, UFFDIO_ZEROPAGE, &arg);
		reported = arg.zeropage;
	} else {
		struct uffdio_copy arg = {.dst = address, .src = source, .len = length, .mode = 0};
		rc = ioctl(uffd, UFFDIO_COPY, &arg);
		reported = arg.copy;
	}
	if (rc == 0) {
		result.done = length;
		return result;
	}
	result.error = errno;
	/* A partial operation reports the bytes done (and fails EAGAIN); a failure at the first
	 * page reports -errno. */
	result.done = reported > 0 ? (uint64_t)reported : 0;
	return result;
}

/* A part of a window mapped by one ioctl, on either thread. */
struct piece {
	int uffd;
	int mode;
	uint64_t address;
	uint64_t source; /* 0: zeros (ZEROPAGE), or nothing (CONTINUE) */
	uint64_t length;
	struct copy_result result;
};

static void piece_job(void *opaque)
{
	struct piece *piece = opaque;
	piece->result = map_pages(piece->uffd, piece->mode, piece->address, piece->source,
				  piece->length);
}

/* Map [address, address + length): one ioctl, or for a large window two at once (the kernel's
 * allocation and copy are the bound of a large fill, and they run on both CPUs). Returns how
 * many pieces were done (their results in pieces[]). */
static int map_window(struct sf_engine *engine, const struct sf_attachment *attachment, int mode,
		      uint64_t address, uint64_t source, uint64_t length, struct piece pieces[2])
{
	uint64_t page = attachment->page_size;
	uint64_t half = length / 2 - (length / 2) % page;
	pieces[0] = (struct piece){attachment->uffd, mode, address, source, length, {0, 0}};
	if (!engine->parallel_bytes || length < engine->parallel_bytes || !half) {
		piece_job(&pieces[0]);
		return 1;
	}
	pieces[0].length = half;
	pieces[1] = (struct piece){attachment->uffd, mode, address + half,
				   source ? source + half : 0, length - half, {0, 0}};
	run_both(engine, piece_job, &pieces[0], &pieces[1]);
	return 2;
}

static void count_fill(struct sf_attachment *attachment, uint64_t bytes, int zero)
{
	uint64_t pages = bytes / attachment->page_size;
	attachment->counters.pages_filled += pages;
	attachment->counters.bytes_filled += bytes;
	if (zero)
		attachment->counters.zero_pages += pages;
}

/* Take back bytes counted ahead (count_fill before the ioctl) that the ioctl did not fill. */
static void uncount_fill(struct sf_attachment *attachment, uint64_t bytes, int zero)
{
	uint64_t pages = bytes / attachment->page_size;
	attachment->counters.pages_filled -= pages;
	attachment->counters.bytes_filled -= bytes;
	if (zero)
		attachment->counters.zero_pages -= pages;
}

/* The source's bytes for region [start, end) in place, or 0 (zeros, or not mapped there). */
static uint64_t source_address(const struct sf_attachment *attachment, uint64_t start,
			       uint64_t end)
{
	if (attachment->zero || !attachment->source_base || end > attachment->source_mapped)
		return 0;
	return attachment->source_base + start;
}

/* Whether the region file holds any page in [start, end). -1 on an error. */
static int region_has_data(int fd, uint64_t start, uint64_t end)
{
	off_t data = lseek(fd, (off_t)start, SEEK_DATA);
	if (data < 0)
		return errno == ENXIO ? 0 : -1;
	return (uint64_t)data < end;
}

/* The page states of [first, last) become MAPPED. */
static void mark_mapped(struct sf_range *range, uint64_t first, uint64_t last)
{
	memset(range->pages + first, MAPPED, last - first);
}

/* A part of a hole of the region file filled from the file source, on either thread. */
struct fill_piece {
	int source_fd;
	int region_fd;
	uint64_t source_offset; /* in the source file */
	uint64_t region_offset;
	uint64_t length;
	uint64_t page_size;
	uint8_t *buffer;
	uint64_t done; /* whole pages written, even when the rest failed */
};

static void fill_job(void *opaque)
{
	struct fill_piece *piece = opaque;
	piece->done = 0;
	/* Read the whole piece before writing any of it: a short read (the source shrank) must
	 * leave its pages holes, for Python to report. Pieces are whole pages: a piece written
	 * never leaves a page half filled. */
	uint64_t got = 0;
	while (got < piece->length) {
		ssize_t n = pread(piece->source_fd, piece->buffer + got, piece->length - got,
				  (off_t)(piece->source_offset + got));
		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			return;
		}
		got += (uint64_t)n;
	}
	uint64_t written = 0;
	while (written < piece->length) {
		ssize_t n = pwrite(piece->region_fd, piece->buffer + written,
				   piece->length - written, (off_t)(piece->region_offset + written));
		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			break;
		}
		written += (uint64_t)n;
	}
	piece->done = written - written % piece->page_size;
}

/* Fill one hole [offset, offset + length) from the file source: 0, or -1 (some of it not). */
static int fill_from_source(struct sf_engine *engine, struct sf_attachment *attachment,
			    uint64_t offset, uint64_t length, uint64_t *filled)
{
	if (attachment->source_fd < 0)
		return -1;
	if (length > engine->buffer_size) {
		uint8_t *buffer = realloc(engine->buffer, length);
		if (!buffer)
			return -1;
		engine->buffer = buffer;
		engine->buffer_size = length;
	}
	uint64_t page = attachment->page_size;
	uint64_t half = length / 2 - (length / 2) % page;
	struct fill_piece pieces[2] = {
		{attachment->source_fd, attachment->region_fd, attachment->source_offset + offset,
		 offset, length, page, engine->buffer, 0},
	};
	int count = 1;
	if (engine->parallel_bytes && length >= engine->parallel_bytes && half) {
		pieces[0].length = half;
		pieces[1] = (struct fill_piece){
			attachment->source_fd, attachment->region_fd,
			attachment->source_offset + offset + half, offset + half, length - half,
			page, engine->buffer + half, 0};
		run_both(engine, fill_job, &pieces[0], &pieces[1]);
		count = 2;
	} else {
		fill_job(&pieces[0]);
	}
	int status = 0;
	for (int i = 0; i < count; i++) {
		*filled += pieces[i].done;
		if (pieces[i].done < pieces[i].length)
			status = -1;
	}
	return status;
}

#ifndef __NR_cachestat
#define __NR_cachestat 451 /* the same number on every architecture (Linux 6.5) */
#endif

/* Whether the region file has every page of [start, end) (in memory or swapped out): 1, 0, or
 * -1 when the kernel cannot say (before 6.5: no cachestat). SEEK_HOLE cannot answer that
 * cheaply: from inside a run of pages it walks the whole run, 0.8 ms over 64 MiB, and a
 * second sharer of a region takes a fault on every page the first one filled. */
static int region_has_all(int fd, uint64_t start, uint64_t end, uint64_t page)
{
	struct {
		uint64_t off, len;
	} range = {start, end - start};
	struct {
		uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
	} stat;
	static volatile int missing; /* ENOSYS once: not asked again */
	if (missing)
		return -1;
	if (syscall(__NR_cachestat, fd, &range, &stat, 0)) {
		if (errno == ENOSYS)
			missing = 1;
		return -1;
	}
	/* shmem counts a page swapped out as evicted; a hole is neither */
	return stat.nr_cache + stat.nr_evicted >= (end - start) / page;
}

/* Fill the region file's holes in [start, end) from the source (shared-continue), under the
 * region lock, adding the bytes filled to *filled. 0, or -1: Python's fill must finish (it
 * raises what went wrong). */
static int fill_holes(struct sf_engine *engine, struct sf_attachment *attachment,
		      uint64_t start, uint64_t end, uint64_t *filled)
{
	int fd = attachment->region_fd;
	uint64_t position = start;
	/* The common case, a window the region has none of: one lseek says so. */
	off_t first_data = lseek(fd, (off_t)start, SEEK_DATA);
	if (first_data < 0 && errno != ENXIO)
		return -1;
	if (first_data < 0 || (uint64_t)first_data >= end) {
		if (attachment->zero) {
			if (fallocate(fd, 0, (off_t)start, (off_t)(end - start)))
				return -1;
			*filled += end - start;
			return 0;
		}
		return fill_from_source(engine, attachment, start, end - start, filled);
	}
	while (position < end) {
		if (region_has_all(fd, position, end, attachment->page_size) == 1)
			break;
		off_t hole = lseek(fd, (off_t)position, SEEK_HOLE);
		if (hole < 0)
			return errno == ENXIO ? 0 : -1;
		if ((uint64_t)hole >= end)
			break;
		off_t data = lseek(fd, hole, SEEK_DATA);
		uint64_t hole_end;
		if (data < 0) {
			if (errno != ENXIO)
				return -1;
			hole_end = end;
		} else {
			hole_end = (uint64_t)data < end ? (uint64_t)data : end;
		}
		uint64_t length = hole_end - (uint64_t)hole;
		if (attachment->zero) {
			if (fallocate(fd, 0, hole, (off_t)length))
				return -1;
			*filled += length;
		} else if (fill_from_source(engine, attachment, (uint64_t)hole, length, filled)) {
			return -1;
		}
		position = hole_end;
	}
	return 0;
}

/* The fault-around window for a fault at region offset `offset` (engine.py's
 * _adaptive_window), not yet committed to the range. */
/* The aligned fault-around block around region offset `offset`, clipped to the range
 * (engine.py's _window): both ends from the aligned block, so that clipping the start never
 * pushes the end into the next block. */
static void block_of(const struct sf_engine *engine, const struct sf_range *range,
		     uint64_t page, uint64_t offset, uint64_t *start, uint64_t *end)
{
	uint64_t limit = range->region_offset + range->length;
	uint64_t block = engine->fault_around_pages * page;
	uint64_t aligned = offset - offset % block;
	*start = aligned > range->region_offset ? aligned : range->region_offset;
	*end = aligned + block < limit ? aligned + block : limit;
}

static void window_of(const struct sf_engine *engine, const struct sf_range *range,
		      uint64_t page, uint64_t offset, uint64_t *start, uint64_t *end,
		      uint64_t *pages)
{
	uint64_t limit = range->region_offset + range->length;
	if ((int64_t)offset == range->sequential_next &&
	    engine->fault_around_max_pages > engine->fault_around_pages &&
	    page == engine->base_page) {
		uint64_t grown = range->window_pages * 2;
		*pages = grown < engine->fault_around_max_pages ? grown
							     : engine->fault_around_max_pages;
		*start = offset;
		*end = offset + *pages * page < limit ? offset + *pages * page : limit;
		return;
	}
	*pages = engine->fault_around_pages;
	block_of(engine, range, page, offset, start, end);
}

/* shared-copy: the whole window in one COPY (or ZEROPAGE); the kernel never overwrites a page
 * the region file has. */
static int resolve_shared_copy(struct sf_engine *engine, struct sf_attachment *attachment,
			       struct sf_range *range, uint64_t start, uint64_t end, int *complete)
{
	uint64_t delta = range->base - range->region_offset;
	uint64_t source = source_address(attachment, start, end);
	if (!attachment->zero && !source)
		return TO_PYTHON;
	struct piece pieces[2];
	/* Counted before the ioctl, which wakes the client: what a client saw filled is in its
	 * counters by then, as the Python engine's are (taken back below if it was not). */
	count_fill(attachment, end - start, attachment->zero);
	int count = map_window(engine, attachment, SHARED_COPY, start + delta, source, end - start,
			       pieces);
	int outcome = SERVED;
	for (int i = 0; i < count; i++) {
		if (pieces[i].result.done < pieces[i].length)
			uncount_fill(attachment, pieces[i].length - pieces[i].result.done,
				     attachment->zero);
		/* EEXIST, a partial copy, ESRCH, ENOMEM, a source that shrank (EFAULT): the slow
		 * path searches the holes, wakes, or ends the attachment saying why. */
		if (pieces[i].result.error)
			outcome = TO_PYTHON;
	}
	*complete = outcome == SERVED;
	return outcome;
}

/* shared-continue: the window's holes filled from the source, counted. 0, or -1 (Python). */
static int fill_window(struct sf_engine *engine, struct sf_attachment *attachment,
		       uint64_t start, uint64_t end)
{
	uint64_t filled = 0;
	int status = fill_holes(engine, attachment, start, end, &filled);
	if (filled)
		count_fill(attachment, filled, attachment->zero);
	return status;
}

/* The window's file pages are all there: what is left is CONTINUE, which maps them into the
 * client and touches neither the region file nor the source. Other sharers of the region
 * (each takes a MINOR fault on every page another one filled) then map theirs at the same
 * time instead of waiting for the lock in turn. */
static void unlock_for_continue(struct sf_attachment *attachment, int *locked)
{
	if (*locked) {
		pthread_mutex_unlock(&attachment->region->lock);
		*locked = 0;
	}
}

/* private-copy and shared-continue: the window's ABSENT runs, one ioctl each.
 *
 * shared-continue serves a MISSING fault (the page is not in the region file: nobody filled
 * it) with UFFDIO_COPY into the client's shared mapping, as shared-copy does: it fills the
 * region file and maps the page in one ioctl, where a pwrite and a CONTINUE take two passes.
 * The attachment is registered MISSING and MINOR, so both are allowed; the kernel never copies
 * over a page the file has (EEXIST, handed to Python, which fills and CONTINUEs). A MINOR fault
 * (the file has the page) is served by filling the window's holes and CONTINUE. */
static int resolve_runs(struct sf_engine *engine, struct sf_attachment *attachment,
			struct sf_range *range, uint64_t start, uint64_t end, uint64_t index,
			int minor, int *complete, int *locked)
{
	uint64_t page = attachment->page_size;
	uint64_t first = (start - range->region_offset) / page;
	uint64_t last = first + (end - start) / page;
	uint8_t *states = range->pages;
	int served = 0;
	/* the ioctl: COPY (ZEROPAGE for zeros), or CONTINUE after filling the window's holes */
	int copy = attachment->mode == PRIVATE_COPY || !minor;
	*complete = 0; /* until the window is done without an error */
	if (!copy) {
		if (fill_window(engine, attachment, start, end))
			return TO_PYTHON;
		unlock_for_continue(attachment, locked);
	}
	int failed = 0;
	uint64_t run_start = first;
	while (run_start < last) {
		while (run_start < last && states[run_start] != ABSENT)
			run_start++;
		if (run_start == last)
			break;
		uint64_t run_end = run_start;
		while (run_end < last && states[run_end] == ABSENT)
			run_end++;
		uint64_t offset = range->region_offset + run_start * page;
		uint64_t length = (run_end - run_start) * page;
		uint64_t source = 0;
		if (copy) {
			/* private-copy: the source's bytes (or zeros) only where the region has none
			 * of the run's pages; a run over written pages is read by the slow path.
			 * shared-continue: the kernel refuses a page the file has. */
			if (attachment->mode == PRIVATE_COPY &&
			    region_has_data(attachment->region_fd, offset, offset + length))
				return served ? SERVED : TO_PYTHON;
			source = source_address(attachment, offset, offset + length);
			if (!attachment->zero && !source)
				return served ? SERVED : TO_PYTHON;
		}
		struct piece pieces[2];
		if (copy) /* before the ioctl wakes the client, as in resolve_shared_copy */
			count_fill(attachment, length, attachment->zero);
		int count = map_window(engine, attachment, copy ? SHARED_COPY : SHARED_CONTINUE,
				       range->base + run_start * page, source, length, pieces);
		int to_continue = 0;
		/* Both pieces' pages done are marked (and what was not done taken back from the
		 * count) before any error is acted on, which may return. */
		for (int i = 0; i < count; i++) {
			uint64_t piece_start = (pieces[i].address - range->base) / page;
			uint64_t done = pieces[i].result.done / page;
			mark_mapped(range, piece_start, piece_start + done);
			if (copy && done * page < pieces[i].length)
				uncount_fill(attachment, pieces[i].length - done * page, attachment->zero);
			if (piece_start <= index && index < piece_start + done)
				served = 1;
		}
		for (int i = 0; i < count; i++) {
			uint64_t piece_start = (pieces[i].address - range->base) / page;
			uint64_t done = pieces[i].result.done / page;
			int error = pieces[i].result.error;
			if (!error)
				continue;
			failed = 1;
			if (error != EEXIST && error != EAGAIN)
				return served ? SERVED : TO_PYTHON; /* Python reacts to the errno */
			if (copy && attachment->mode == SHARED_CONTINUE)
				to_continue = 1; /* the file has a page of the window */
			else if (error == EEXIST && piece_start + done < last)
				states[piece_start + done] = MAPPED; /* mapped already */
			/* EAGAIN (a partial copy): the rest of the piece is left to fault, as the
			 * Python engine leaves it; a fault page among it goes to Python below. */
		}
		if (to_continue) {
			/* shared-continue, a page of the window in the file already: the rest the
			 * way the Python engine does all of it, holes filled, then CONTINUE. */
			copy = 0;
			failed = 0;
			if (fill_window(engine, attachment, start, end))
				return served ? SERVED : TO_PYTHON;
			unlock_for_continue(attachment, locked);
			run_end = first;
		}
		run_start = run_end;
	}
	*complete = !failed;
	return served ? SERVED : TO_PYTHON;
}

/* Fill region offsets [start, end) of `range` by the attachment's mode, under the region
 * lock, resolving the fault at `index` (a page of the range; UINT64_MAX: none, a prefetch).
 * *complete says whether the whole block was done without an error. */
static int fill_block(struct sf_engine *engine, struct sf_attachment *attachment,
		      struct sf_range *range, uint64_t start, uint64_t end, uint64_t index,
		      int minor, int *complete)
{
	struct sf_region *region = attachment->region;
	int outcome = TO_PYTHON;
	*complete = 0;
	pthread_mutex_lock(&region->lock);
	int locked = 1;
	if (region->closed)
		outcome = TO_PYTHON;
	else if (attachment->mode == SHARED_COPY)
		outcome = resolve_shared_copy(engine, attachment, range, start, end, complete);
	else
		outcome = resolve_runs(engine, attachment, range, start, end, index, minor,
				       complete, &locked);
	if (locked)
		pthread_mutex_unlock(&region->lock);
	return outcome;
}

static int resolve(struct sf_engine *engine, struct sf_attachment *attachment, uint64_t address,
		   int minor, uint64_t *page_index)
{
	struct sf_range *range = NULL;
	for (uint32_t i = 0; i < attachment->range_count; i++) {
		struct sf_range *candidate = &attachment->ranges[i];
		if (address - candidate->base < candidate->length) {
			range = candidate;
			break;
		}
	}
	if (!range)
		return TO_PYTHON; /* logged, unregistered and woken there */
	uint64_t page = attachment->page_size;
	uint64_t offset = range->region_offset + (address - range->base);
	uint64_t index = (offset - range->region_offset) / page;
	if (attachment->mode != SHARED_COPY && range->pages[index] != ABSENT)
		return TO_PYTHON; /* removed, zeroed, or a state the page tables disagree with */
	uint64_t start, end, pages;
	window_of(engine, range, page, offset, &start, &end, &pages);
	int complete;
	int outcome = fill_block(engine, attachment, range, start, end, index, minor, &complete);
	if (outcome == SERVED) {
		range->window_pages = pages;
		range->sequential_next = (int64_t)end;
		*page_index = offset / page;
	}
	return outcome;
}

/* One replay step: fill the fault-around blocks of the recorded pages `pages` (region page
 * indexes, ascending), overlapping blocks once, pages outside every range skipped; as
 * FaultEngine._prefetch does. Adds the pages filled to *filled. Returns how many of `pages`
 * are done with: all of them, or up to the end of a block not done whole, which is then in
 * *block_range, *block_start, *block_end for Python to finish (a page raced in, an error);
 * *block_end stays 0 when every block was done (the last block may be the unfinished one, so
 * the count alone cannot say). */
int sf_replay_step(struct sf_engine *engine, struct sf_attachment *attachment,
		   const uint64_t *pages, int count, uint64_t *filled, uint32_t *block_range,
		   uint64_t *block_start, uint64_t *block_end)
{
	uint64_t page = attachment->page_size;
	uint64_t before = attachment->counters.pages_filled;
	int32_t current = -1; /* the block being gathered: its range, or -1 */
	uint64_t start = 0, end = 0;
	int done = count;
	*block_end = 0;
	for (int i = 0; i <= count; i++) {
		int32_t found = -1;
		uint64_t offset = 0, next_start = 0, next_end = 0;
		if (i < count) {
			offset = pages[i] * page;
			for (uint32_t r = 0; r < attachment->range_count; r++) {
				struct sf_range *range = &attachment->ranges[r];
				if (offset >= range->region_offset &&
				    offset - range->region_offset < range->length) {
					found = (int32_t)r;
					block_of(engine, range, page, offset, &next_start, &next_end);
					break;
				}
			}
			if (found < 0)
				continue; /* a page outside what this attachment maps */
			if (found == current && next_start <= end) {
				end = next_end > end ? next_end : end;
				continue;
			}
		}
		if (current >= 0) {
			int complete;
			fill_block(engine, attachment, &attachment->ranges[current], start, end,
				   UINT64_MAX, 0, &complete);
			if (!complete) {
				*block_range = (uint32_t)current;
				*block_start = start;
				*block_end = end;
				done = i;
				break;
			}
		}
		current = found;
		start = next_start;
		end = next_end;
	}
	*filled = attachment->counters.pages_filled - before;
	return done;
}

static int latency_bucket(const struct sf_engine *engine, uint64_t nanoseconds)
{
	int low = 0, high = LATENCY_BUCKETS - 1; /* bisect_left over the bounds */
	while (low < high) {
		int middle = (low + high) / 2;
		if (engine->latency_bounds[middle] < nanoseconds)
			low = middle + 1;
		else
			high = middle;
	}
	return low;
}

/* Read and serve one batch of `attachment`'s records. SERVED, or TO_PYTHON with the unserved
 * records (possibly none: Python reads itself) in the leftover buffer. */
static int serve(struct sf_engine *engine, struct sf_attachment *attachment)
{
	attachment->leftover_length = 0;
	if (!engine->nowait_reads)
		return TO_PYTHON;
	struct uffd_msg messages[EVENTS_PER_READ];
	struct iovec vector = {messages, sizeof(messages)};
	ssize_t count = preadv2(attachment->uffd, &vector, 1, -1, RWF_NOWAIT);
	if (count < 0) {
		if (errno == EOPNOTSUPP || errno == EINVAL || errno == ESPIPE || errno == ENOSYS)
			engine->nowait_reads = 0; /* no read_iter: Python's guarded read */
		return TO_PYTHON;
	}
	int64_t read_at = now_ns();
	int records = (int)(count / MSG_SIZE);
	int whole = count % MSG_SIZE == 0;
	for (int i = 0; whole && i < records; i++)
		if (messages[i].event != UFFD_EVENT_PAGEFAULT ||
		    messages[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)
			whole = 0;
	int first_unserved = 0;
	if (whole) {
		for (; first_unserved < records; first_unserved++) {
			struct uffd_msg *message = &messages[first_unserved];
			uint64_t flags = message->arg.pagefault.flags;
			uint64_t page_index;
			if (attachment->record_length == attachment->record_capacity &&
			    attachment->record_capacity)
				break; /* Python takes the recorded faults first */
			/* Counted before the ioctl wakes the client (as Python counts a fault when it
			 * reads it); taken back if Python is to serve it, and count it, after all. */
			uint64_t *kind = flags & UFFD_PAGEFAULT_FLAG_MINOR
						 ? &attachment->counters.faults_minor
						 : &attachment->counters.faults_missing;
			++*kind;
			if (resolve(engine, attachment, message->arg.pagefault.address,
				    flags & UFFD_PAGEFAULT_FLAG_MINOR, &page_index) != SERVED) {
				--*kind;
				break;
			}
			if (attachment->record_capacity)
				attachment->record[attachment->record_length++] =
					page_index << 1 | !!(flags & UFFD_PAGEFAULT_FLAG_WRITE);
			attachment->last_tid = message->arg.pagefault.feat.ptid;
			attachment->counters.latency[latency_bucket(engine, now_ns() - read_at)]++;
			engine->faults_served++;
		}
		if (first_unserved == records)
			return SERVED;
	}
	uint64_t offset = (uint64_t)first_unserved * MSG_SIZE;
	attachment->leftover_length = (uint32_t)(count - offset);
	memcpy(attachment->leftover, (uint8_t *)messages + offset, attachment->leftover_length);
	attachment->leftover_read_ns = read_at;
	return TO_PYTHON;
}

/* Python served something: the spin window starts now, after that work. */
void sf_mark_active(struct sf_engine *engine)
{
	if (engine->spin_ns) {
		engine->idle_since = now_ns();
		engine->spin_until = engine->idle_since + engine->spin_window_ns;
	}
}

static int64_t spin_window(int64_t gap, int64_t spin_ns, int64_t divisor)
{
	return gap <= spin_ns ? spin_ns : spin_ns / divisor;
}

/* One look at the engine's epoll set, spinning bookkeeping included: waits at most
 * timeout_ms unless spinning. Returns the events' count, or -errno. */
static int poll_once(struct sf_engine *engine, int timeout_ms, int probe_divisor,
		     struct epoll_event *events, int *spinning)
{
	int64_t now = engine->spin_ns ? now_ns() : 0;
	*spinning = now < engine->spin_until;
	if (engine->spin_until && !*spinning) {
		engine->spin_time_ns += (uint64_t)(engine->spin_until - engine->idle_since);
		engine->spin_until = 0;
	}
	int count = epoll_wait(engine->epfd, events, EPOLL_BATCH, *spinning ? 0 : timeout_ms);
	if (count < 0)
		return -errno;
	if (*spinning && !count)
		sched_yield(); /* a client on this CPU runs first: the one it may be waiting for */
	if (*spinning) {
		engine->spin_polls++;
		if (count) {
			engine->spin_hits++;
			engine->spin_time_ns += (uint64_t)(now_ns() - engine->idle_since);
			engine->spin_until = 0;
		}
	}
	if (count && engine->spin_ns) {
		engine->spin_window_ns =
			spin_window(now_ns() - engine->idle_since, engine->spin_ns, probe_divisor);
		engine->spin_probes += engine->spin_window_ns < engine->spin_ns;
	}
	return count;
}

/* Wait for readiness on the engine's epoll set (at most timeout_ms; -1: no limit, 0: a look)
 * and serve what can be served here. Returns how many fds are in engine->ready for Python
 * (0: the timeout passed or a signal came), or -errno. */
int sf_wait(struct sf_engine *engine, int timeout_ms, int probe_divisor)
{
	struct epoll_event events[EPOLL_BATCH];
	engine->ready_count = 0;
	for (;;) {
		int spinning;
		int count = poll_once(engine, timeout_ms, probe_divisor, events, &spinning);
		if (count < 0)
			return count == -EINTR ? 0 : count;
		for (int i = 0; i < count; i++) {
			int fd = events[i].data.fd;
			struct sf_attachment *attachment =
				fd < engine->table_size ? engine->table[fd] : NULL;
			if (attachment && serve(engine, attachment) == SERVED)
				continue;
			if (engine->ready_count < MAX_READY)
				engine->ready[engine->ready_count++] = fd;
		}
		if (count)
			sf_mark_active(engine);
		if (engine->ready_count)
			engine->batches_returned++;
		/* timeout 0 is a look even while spinning: Python has work pending (a replay step)
		 * that the spin window must not hold up. */
		if (engine->ready_count || timeout_ms == 0 || (!spinning && count == 0))
			return engine->ready_count;
	}
}

/* --- lanes: more engine threads, all in C ---
 *
 * A lane is a thread with an epoll set of its own, serving the attachments lent to it exactly
 * as sf_wait serves the engine thread's. What it cannot serve it hands back: it takes the
 * userfaultfd out of its set, queues the attachment and writes the engine's eventfd; the
 * engine thread serves it in Python and lends it again (sf_lane_give), or ends it. A lane holds
 * its lock while it serves one attachment: sf_lane_take / sf_lane_unwatch, under the same lock,
 * return only once it is not serving that one and will not. */

struct handbacks {
	pthread_mutex_t lock;
	int eventfd;
	uint32_t count;
	uint32_t capacity;
	struct sf_attachment **items;
	/* the lanes, numbered from 1 in the order started; a pinned lane's number by its CPU (0:
	 * no lane there). Written before the lanes serve anything, read-only afterwards. */
	int lanes;
	int16_t lane_of_cpu[CPU_SETSIZE];
};

struct lane {
	struct sf_engine engine;
	pthread_t thread;
	pthread_mutex_t lock;
	int wake_fd;
	volatile int stop;
	int probe_divisor;
	struct handbacks *handbacks;
	int number; /* 1.. (struct handbacks) */
	int cpu;    /* the CPU it is pinned to, or -1 */
	int64_t next_placement_ns; /* the next look at a client's CPU may be made from then */
};

/* Placement. A lane is pinned to a CPU and serves best the clients that run on that CPU: a
 * client blocked in a fault leaves the CPU to the lane, which resolves the fault and yields it
 * back, with no wake-up of another CPU on either side. Two clients served across CPUs took
 * twice as long per fault (docs/benchmarks.md, "Cores"). So a lane looks, now and then, at the
 * CPU the kernel last ran the faulting thread on, and hands an attachment whose client moved
 * to another lane's CPU back to the engine thread, which lends it to that lane. Two clients
 * the scheduler put on one CPU share its lane until it spreads them: serving one of them from
 * an idle CPU instead was tried, and the scheduler then left both clients where they were
 * for the whole run (docs/benchmarks.md, "Cores"). The look is a read of /proc (about 10 us):
 * at most one per attachment per PLACEMENT_INTERVAL_NS and one per lane per PLACEMENT_GAP_NS,
 * so it costs a busy lane at most 1% of its time. */
#define PLACEMENT_INTERVAL_NS 10000000LL
#define PLACEMENT_GAP_NS 1000000LL

/* The CPU thread `tid` of process `pid` last ran on (tid 0: the process's main thread), from
 * field 39 of its stat file; -1 when it cannot be read (the process is gone). */
int sf_task_cpu(int pid, unsigned int tid)
{
	char path[64];
	if (tid)
		snprintf(path, sizeof(path), "/proc/%d/task/%u/stat", pid, tid);
	else
		snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	char text[1024];
	ssize_t length = read(fd, text, sizeof(text) - 1);
	close(fd);
	if (length <= 0)
		return -1;
	text[length] = 0;
	/* The command name (field 2) may hold spaces and parentheses: fields resume after the
	 * last ')'. Field 3 follows it; the CPU is 36 fields further on. */
	char *field = strrchr(text, ')');
	for (int index = 2; field && index < 39; index++)
		field = strchr(field + 1, ' ');
	if (!field)
		return -1;
	char *end;
	long cpu = strtol(field + 1, &end, 10);
	return end == field + 1 || cpu < 0 || cpu >= CPU_SETSIZE ? -1 : (int)cpu;
}

/* The lane the attachment's client would be served best by, when that is another lane and it
 * is time to look; else 0. */
static int better_lane(struct lane *lane, struct sf_attachment *attachment)
{
	if (lane->cpu < 0 || attachment->pid <= 0)
		return 0;
	int64_t now = now_ns();
	if (now < lane->next_placement_ns || now < attachment->placed_ns + PLACEMENT_INTERVAL_NS)
		return 0;
	lane->next_placement_ns = now + PLACEMENT_GAP_NS;
	attachment->placed_ns = now;
	uint32_t tid = attachment->tids_visible ? attachment->last_tid : 0;
	int cpu = sf_task_cpu(attachment->pid, tid);
	if (cpu < 0 && tid) /* that thread ended: its process, then */
		cpu = sf_task_cpu(attachment->pid, 0);
	if (cpu < 0 || cpu == lane->cpu)
		return 0;
	int home = lane->handbacks->lane_of_cpu[cpu];
	return home == lane->number ? 0 : home;
}

void *sf_handbacks_new(int eventfd)
{
	struct handbacks *handbacks = calloc(1, sizeof(*handbacks));
	if (!handbacks)
		return NULL;
	pthread_mutex_init(&handbacks->lock, NULL);
	handbacks->eventfd = eventfd;
	return handbacks;
}

void sf_handbacks_free(void *opaque)
{
	struct handbacks *handbacks = opaque;
	if (!handbacks)
		return;
	pthread_mutex_destroy(&handbacks->lock);
	free(handbacks->items);
	free(handbacks);
}

/* The attachments handed back since the last call (at most `room`), oldest first. */
int sf_handbacks_take(void *opaque, struct sf_attachment **out, int room)
{
	struct handbacks *handbacks = opaque;
	pthread_mutex_lock(&handbacks->lock);
	int count = (int)handbacks->count < room ? (int)handbacks->count : room;
	memcpy(out, handbacks->items, (size_t)count * sizeof(*out));
	memmove(handbacks->items, handbacks->items + count,
		(handbacks->count - (uint32_t)count) * sizeof(*out));
	handbacks->count -= (uint32_t)count;
	pthread_mutex_unlock(&handbacks->lock);
	return count;
}

static int hand_back(struct handbacks *handbacks, struct sf_attachment *attachment)
{
	pthread_mutex_lock(&handbacks->lock);
	if (handbacks->count == handbacks->capacity) {
		uint32_t capacity = handbacks->capacity ? handbacks->capacity * 2 : 64;
		struct sf_attachment **items =
			realloc(handbacks->items, capacity * sizeof(*items));
		if (!items) {
			pthread_mutex_unlock(&handbacks->lock);
			return -1;
		}
		handbacks->items = items;
		handbacks->capacity = capacity;
	}
	handbacks->items[handbacks->count++] = attachment;
	pthread_mutex_unlock(&handbacks->lock);
	uint64_t one = 1;
	while (write(handbacks->eventfd, &one, sizeof(one)) < 0 && errno == EINTR)
		;
	return 0;
}

/* Stop serving the attachment and hand it to the engine thread: to serve what is left over
 * (wanted 0), or to lend it to lane `wanted`. Under the lane's lock. */
static void lane_hand_back(struct lane *lane, int fd, struct sf_attachment *attachment,
			   int wanted)
{
	epoll_ctl(lane->engine.epfd, EPOLL_CTL_DEL, fd, NULL);
	attachment->in_lane = 0;
	attachment->wanted_lane = wanted;
	if (hand_back(lane->handbacks, attachment)) {
		/* no memory for the queue: keep serving it here rather than lose it (its records
		 * stay in the leftover buffer) */
		struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
		epoll_ctl(lane->engine.epfd, EPOLL_CTL_ADD, fd, &event);
		attachment->in_lane = 1;
		attachment->wanted_lane = 0;
	}
}

static void *lane_main(void *opaque)
{
	struct lane *lane = opaque;
	struct sf_engine *engine = &lane->engine;
	sigset_t all;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the Python threads' business */
	struct epoll_event events[EPOLL_BATCH];
	while (!lane->stop) {
		int spinning;
		int count = poll_once(engine, -1, lane->probe_divisor, events, &spinning);
		if (count < 0)
			continue; /* EINTR; nothing else is expected of a valid epoll fd */
		for (int i = 0; i < count; i++) {
			int fd = events[i].data.fd;
			if (fd == lane->wake_fd)
				continue;
			pthread_mutex_lock(&lane->lock);
			struct sf_attachment *attachment =
				fd < engine->table_size ? engine->table[fd] : NULL;
			if (attachment && attachment->in_lane) {
				if (serve(engine, attachment) != SERVED) {
					engine->batches_returned++;
					lane_hand_back(lane, fd, attachment, 0);
				} else {
					int wanted = better_lane(lane, attachment);
					if (wanted)
						lane_hand_back(lane, fd, attachment, wanted);
				}
			}
			pthread_mutex_unlock(&lane->lock);
		}
		if (count)
			sf_mark_active(engine);
	}
	return NULL;
}

/* A lane configured like `model` (fault-around, spin, latency bounds, parallel copies),
 * handing back through `handbacks`, pinned to `cpu` (-1: not pinned); started. NULL when it
 * cannot be. Started one after the other, before any is lent an attachment. */
void *sf_lane_start(const struct sf_engine *model, void *handbacks, int probe_divisor, int cpu)
{
	struct lane *lane = calloc(1, sizeof(*lane));
	if (!lane)
		return NULL;
	int epfd = epoll_create1(EPOLL_CLOEXEC);
	int wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (epfd < 0 || wake_fd < 0)
		goto fail;
	sf_engine_init(&lane->engine, epfd);
	lane->engine.fault_around_pages = model->fault_around_pages;
	lane->engine.fault_around_max_pages = model->fault_around_max_pages;
	lane->engine.base_page = model->base_page;
	memcpy(lane->engine.latency_bounds, model->latency_bounds,
	       sizeof(model->latency_bounds));
	lane->engine.spin_ns = model->spin_ns;
	lane->engine.spin_window_ns = model->spin_ns;
	lane->engine.parallel_bytes = model->parallel_bytes;
	lane->wake_fd = wake_fd;
	lane->probe_divisor = probe_divisor;
	lane->handbacks = handbacks;
	lane->cpu = cpu >= 0 && cpu < CPU_SETSIZE ? cpu : -1;
	struct handbacks *shared = handbacks;
	lane->number = shared->lanes + 1;
	pthread_mutex_init(&lane->lock, NULL);
	struct epoll_event event = {.events = EPOLLIN, .data.fd = wake_fd};
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, wake_fd, &event))
		goto fail_lock;
	pthread_attr_t attributes;
	pthread_attr_init(&attributes);
	if (lane->cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(lane->cpu, &set);
		pthread_attr_setaffinity_np(&attributes, sizeof(set), &set);
	}
	int failed = pthread_create(&lane->thread, &attributes, lane_main, lane);
	if (failed && lane->cpu >= 0) { /* not allowed there (any more): unpinned */
		lane->cpu = -1;
		failed = pthread_create(&lane->thread, NULL, lane_main, lane);
	}
	pthread_attr_destroy(&attributes);
	if (failed)
		goto fail_lock;
	shared->lanes = lane->number;
	if (lane->cpu >= 0 && !shared->lane_of_cpu[lane->cpu])
		shared->lane_of_cpu[lane->cpu] = (int16_t)lane->number;
	return lane;
fail_lock:
	pthread_mutex_destroy(&lane->lock);
fail:
	if (epfd >= 0)
		close(epfd);
	if (wake_fd >= 0)
		close(wake_fd);
	free(lane);
	return NULL;
}

/* Stop the lane's thread and free it (its attachments were unwatched first). */
void sf_lane_stop(void *opaque)
{
	struct lane *lane = opaque;
	lane->stop = 1;
	uint64_t one = 1;
	while (write(lane->wake_fd, &one, sizeof(one)) < 0 && errno == EINTR)
		;
	pthread_join(lane->thread, NULL);
	sf_engine_free(&lane->engine);
	close(lane->engine.epfd);
	close(lane->wake_fd);
	pthread_mutex_destroy(&lane->lock);
	free(lane);
}

/* The lane's engine, for its counters (read without the lock). */
struct sf_engine *sf_lane_engine(void *opaque) { return &((struct lane *)opaque)->engine; }

/* The CPU the lane is pinned to, or -1. */
int sf_lane_cpu(void *opaque) { return ((struct lane *)opaque)->cpu; }

/* Lend the attachment (its userfaultfd `fd`) to the lane. 0, or an errno. */
int sf_lane_watch(void *opaque, int fd, struct sf_attachment *attachment)
{
	struct lane *lane = opaque;
	pthread_mutex_lock(&lane->lock);
	int rc = sf_watch(&lane->engine, fd, attachment);
	if (!rc) {
		struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
		if (epoll_ctl(lane->engine.epfd, EPOLL_CTL_ADD, fd, &event)) {
			rc = errno;
			sf_watch(&lane->engine, fd, NULL);
		} else {
			attachment->in_lane = 1;
		}
	}
	pthread_mutex_unlock(&lane->lock);
	return rc;
}

/* Drop the attachment's hand-backs not taken yet: its memory may be reused by another
 * attachment, which a stale entry would then name. */
static void forget_handbacks(struct handbacks *handbacks, const struct sf_attachment *attachment)
{
	pthread_mutex_lock(&handbacks->lock);
	uint32_t kept = 0;
	for (uint32_t i = 0; i < handbacks->count; i++)
		if (handbacks->items[i] != attachment)
			handbacks->items[kept++] = handbacks->items[i];
	handbacks->count = kept;
	pthread_mutex_unlock(&handbacks->lock);
}

/* Take the attachment back from the lane for good (before its userfaultfd is closed). */
void sf_lane_unwatch(void *opaque, int fd)
{
	struct lane *lane = opaque;
	pthread_mutex_lock(&lane->lock);
	struct sf_attachment *attachment =
		fd < lane->engine.table_size ? lane->engine.table[fd] : NULL;
	if (attachment) {
		if (attachment->in_lane)
			epoll_ctl(lane->engine.epfd, EPOLL_CTL_DEL, fd, NULL);
		attachment->in_lane = 0;
		sf_watch(&lane->engine, fd, NULL);
		forget_handbacks(lane->handbacks, attachment);
	}
	pthread_mutex_unlock(&lane->lock);
}

/* Take the attachment back for a while: the lane does not serve it until sf_lane_give. */
void sf_lane_take(void *opaque, int fd)
{
	struct lane *lane = opaque;
	pthread_mutex_lock(&lane->lock);
	struct sf_attachment *attachment =
		fd < lane->engine.table_size ? lane->engine.table[fd] : NULL;
	if (attachment && attachment->in_lane) {
		epoll_ctl(lane->engine.epfd, EPOLL_CTL_DEL, fd, NULL);
		attachment->in_lane = 0;
	}
	pthread_mutex_unlock(&lane->lock);
}

/* Lend it again: the lane serves it from now on. 0, or an errno. */
int sf_lane_give(void *opaque, int fd)
{
	struct lane *lane = opaque;
	int rc = 0;
	pthread_mutex_lock(&lane->lock);
	struct sf_attachment *attachment =
		fd < lane->engine.table_size ? lane->engine.table[fd] : NULL;
	if (attachment && !attachment->in_lane) {
		struct epoll_event event = {.events = EPOLLIN, .data.fd = fd};
		if (epoll_ctl(lane->engine.epfd, EPOLL_CTL_ADD, fd, &event))
			rc = errno;
		else
			attachment->in_lane = 1;
	}
	pthread_mutex_unlock(&lane->lock);
	return rc;
}
