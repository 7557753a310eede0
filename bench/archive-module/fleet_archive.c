/*
 * A measuring prototype, not part of the package: a PostgreSQL 15 archive
 * module (archive_library) that asks the fleet-agent WAL service the question
 * `agentctl wal push %p` asks first (POST /v1/wal/push by the file's identity)
 * over its Unix socket, from the archiver process itself. It exists to measure
 * what PostgreSQL's shell and agentctl cost per segment (bench/wal.sh method
 * fleet-module; docs/benchmarks.md). It has no fallback: where agentctl would
 * send the content (the service answers 412), it fails the segment and
 * PostgreSQL retries.
 *
 *   make -C bench/archive-module   (needs postgresql-server-dev-15)
 *   archive_library = '<dir>/fleet_archive'
 *   fleet_archive.socket = '<the WAL service's socket>'
 */
#include "postgres.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "fmgr.h"
#include "postmaster/pgarch.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);
void		_PG_archive_module_init(ArchiveModuleCallbacks *cb);

static char *socket_path = NULL;

void
_PG_init(void)
{
	DefineCustomStringVariable("fleet_archive.socket",
							   "The fleet-agent WAL service's Unix socket.",
							   NULL, &socket_path, "", PGC_SIGHUP, 0,
							   NULL, NULL, NULL);
	MarkGUCPrefixReserved("fleet_archive");
}

static bool
check_configured(void)
{
	return socket_path != NULL && socket_path[0] != '\0';
}

static bool
write_all(int fd, const char *buf, size_t len)
{
	while (len > 0)
	{
		ssize_t		n = write(fd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		buf += n;
		len -= (size_t) n;
	}
	return true;
}

static bool
archive_file(const char *file, const char *path)
{
	struct stat st;
	struct sockaddr_un addr;
	struct timeval timeout = {30, 0};
	char		request[1024];
	char		answer[512];
	size_t		got = 0;
	int			fd,
				sock,
				len,
				status = 0;

	/* O_NOFOLLOW, as agentctl: a symlink in place of a segment is refused. */
	fd = open(path, O_RDONLY | O_NOFOLLOW);
	if (fd < 0)
	{
		ereport(WARNING, (errmsg("fleet_archive: %s: %m", path)));
		return false;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
	{
		ereport(WARNING, (errmsg("fleet_archive: %s: not a regular file", path)));
		close(fd);
		return false;
	}
	close(fd);

	len = snprintf(request, sizeof(request),
				   "POST /v1/wal/push?name=%s&dev=%llu&ino=%llu&size=%lld&mtime_ns=%lld HTTP/1.1\r\n"
				   "Host: fleet-agent\r\nContent-Type: application/octet-stream\r\n"
				   "Content-Length: 0\r\nConnection: close\r\n\r\n",
				   file, (unsigned long long) st.st_dev, (unsigned long long) st.st_ino,
				   (long long) st.st_size,
				   (long long) st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
	if (len <= 0 || (size_t) len >= sizeof(request))
		return false;

	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	if (strlen(socket_path) >= sizeof(addr.sun_path))
	{
		ereport(WARNING, (errmsg("fleet_archive: socket path too long: %s", socket_path)));
		return false;
	}
	strcpy(addr.sun_path, socket_path);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		return false;
	setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
	setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
	if (connect(sock, (struct sockaddr *) &addr, sizeof(addr)) != 0 ||
		!write_all(sock, request, (size_t) len))
	{
		ereport(WARNING, (errmsg("fleet_archive: %s: %m", socket_path)));
		close(sock);
		return false;
	}
	/* The status line is all we need: "HTTP/1.1 200 OK". */
	while (got < sizeof(answer) - 1)
	{
		ssize_t		n = read(sock, answer + got, sizeof(answer) - 1 - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t) n;
		if (memchr(answer, '\n', got) != NULL)
			break;
	}
	close(sock);
	answer[got] = '\0';
	if (sscanf(answer, "HTTP/1.%*d %d", &status) != 1 || status < 200 || status > 299)
	{
		ereport(WARNING, (errmsg("fleet_archive: %s: the WAL service answered \"%.80s\"", file, answer)));
		return false;
	}
	return true;
}

void
_PG_archive_module_init(ArchiveModuleCallbacks *cb)
{
	cb->check_configured_cb = check_configured;
	cb->archive_file_cb = archive_file;
}
