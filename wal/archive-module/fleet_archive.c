/*
 * fleet_archive: a PostgreSQL 15 archive module (archive_library) that
 * archives through the fleet-agent WAL service, from the archiver process
 * itself. It does what `agentctl wal push %p` does, without PostgreSQL forking
 * a shell and agentctl per segment (docs/wal.md, "archive_library instead of
 * archive_command"):
 *
 *   1. ask by the file's identity (POST /v1/wal/push?name=..&dev=..&ino=..
 *      &size=..&mtime_ns=.., no body): the service's look-ahead has usually
 *      archived the segment already, or reads it from pg_wal itself;
 *   2. on 412 (the service cannot serve it by identity) send the content,
 *      streamed from the open file;
 *   3. on 503 with Retry-After (the service is busy) wait and send again,
 *      for at most BUSY_PATIENCE, as agentctl does.
 *
 * Every failure is a WARNING and `false`: PostgreSQL keeps the segment and
 * retries. Never ERROR: PostgreSQL 15's archiver exits on ERROR.
 *
 * PostgreSQL 15 only: 16 changed the archive module API.
 */
#include "postgres.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "access/xlog.h"
#include "fmgr.h"
#include "postmaster/pgarch.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);
void		_PG_archive_module_init(ArchiveModuleCallbacks *cb);

/* Where the packaged fleet-agent-wal.service listens (RuntimeDirectory). */
#define DEFAULT_SOCKET "/run/fleet-agent-wal/wal.sock"

/*
 * A hung service must not hang the archiver for ever. The service gives up
 * on a push itself after 30 s (JOB_WAIT in wal/src/service.rs); 60 s per
 * read or write leaves it room to answer that.
 */
#define IO_TIMEOUT_SECS 60

/* agentctl's BUSY_PATIENCE: how long a busy service is waited for. */
#define BUSY_PATIENCE_SECS 30

/* Pieces of the segment sent per write; never 16 MiB in one allocation. */
#define CHUNK 65536

/* The answer's head and the start of its body; error bodies are small. */
#define ANSWER_MAX 8192

static char *socket_path = NULL;

typedef struct Answer
{
	int			status;			/* 0: no HTTP answer */
	int			retry_after;	/* seconds, -1: no Retry-After */
	char		line[256];		/* first line of the body, for the log */
} Answer;

void
_PG_init(void)
{
	DefineCustomStringVariable("fleet_archive.socket",
							   "The fleet-agent WAL service's Unix socket.",
							   NULL, &socket_path, DEFAULT_SOCKET, PGC_SIGHUP, 0,
							   NULL, NULL, NULL);
	MarkGUCPrefixReserved("fleet_archive");
}

static bool
check_configured(void)
{
	return socket_path != NULL && socket_path[0] != '\0';
}

/* MSG_NOSIGNAL: a service that closed early is an error here, not SIGPIPE. */
static bool
write_all(int fd, const char *buf, size_t len)
{
	while (len > 0)
	{
		ssize_t		n = send(fd, buf, len, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
		{
			/* SO_SNDTIMEO ran out. */
			if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
				errno = ETIMEDOUT;
			return false;
		}
		buf += n;
		len -= (size_t) n;
	}
	return true;
}

/*
 * Escapes what is not safe in a query value, so the service sees (and
 * refuses) exactly the name PostgreSQL gave, as agentctl's urlencode.
 */
static bool
urlencode(const char *in, char *out, size_t size)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t		o = 0;

	for (; *in; in++)
	{
		unsigned char c = (unsigned char) *in;
		bool		plain = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
			(c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';

		if (o + (plain ? 1 : 3) >= size)
			return false;
		if (plain)
			out[o++] = (char) c;
		else
		{
			out[o++] = '%';
			out[o++] = hex[c >> 4];
			out[o++] = hex[c & 15];
		}
	}
	out[o] = '\0';
	return true;
}

/* A connected socket with timeouts, or -1 with errno set. */
static int
connect_service(void)
{
	struct sockaddr_un addr;
	struct timeval timeout = {IO_TIMEOUT_SECS, 0};
	int			sock;
	int			saved;

	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	if (strlen(socket_path) >= sizeof(addr.sun_path))
	{
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(addr.sun_path, socket_path);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		return -1;
	if (setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)) != 0 ||
		setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout)) != 0 ||
		connect(sock, (struct sockaddr *) &addr, sizeof(addr)) != 0)
	{
		saved = errno;
		close(sock);
		errno = saved;
		return -1;
	}
	return sock;
}

/* Status, Retry-After and the body's first line of an HTTP/1.1 answer. */
static void
parse_answer(char *buf, size_t got, Answer *answer)
{
	char	   *body;
	char	   *line;
	char	   *end;

	buf[got] = '\0';
	if (sscanf(buf, "HTTP/1.%*d %d", &answer->status) != 1)
	{
		answer->status = 0;
		strlcpy(answer->line, buf, sizeof(answer->line));
		return;
	}
	body = strstr(buf, "\r\n\r\n");
	if (body != NULL)
	{
		*body = '\0';
		body += 4;
	}
	/* Header lines, case-insensitive; the status line is skipped. */
	for (line = strstr(buf, "\r\n"); line != NULL; line = strstr(line, "\r\n"))
	{
		line += 2;
		if (pg_strncasecmp(line, "Retry-After:", 12) == 0)
			answer->retry_after = atoi(line + 12);
	}
	if (body != NULL)
	{
		end = strpbrk(body, "\r\n");
		if (end != NULL)
			*end = '\0';
		strlcpy(answer->line, body, sizeof(answer->line));
	}
}

/*
 * One request: the head, then (content_fd >= 0) `length` bytes of the file
 * from its start, in pieces. False with errno set when the service could not
 * be asked or did not answer; the answer otherwise.
 */
static bool
exchange(const char *query, int content_fd, off_t length, Answer *answer)
{
	char		head[1024];
	char	   *buf;
	size_t		got = 0;
	int			len;
	int			sock;
	int			saved;
	int			send_errno = 0;
	bool		ok = false;

	answer->status = 0;
	answer->retry_after = -1;
	answer->line[0] = '\0';
	len = snprintf(head, sizeof(head),
				   "POST /v1/wal/push?%s HTTP/1.1\r\n"
				   "Host: fleet-agent\r\nContent-Type: application/octet-stream\r\n"
				   "Content-Length: %lld\r\nConnection: close\r\n\r\n",
				   query, (long long) (content_fd >= 0 ? length : 0));
	if (len <= 0 || (size_t) len >= sizeof(head))
	{
		errno = ENAMETOOLONG;
		return false;
	}
	sock = connect_service();
	if (sock < 0)
		return false;
	/* One buffer for the body's pieces and then the answer. */
	buf = palloc(Max(CHUNK, ANSWER_MAX + 1));
	if (!write_all(sock, head, (size_t) len))
		goto out;
	if (content_fd >= 0)
	{
		off_t		sent = 0;

		while (sent < length)
		{
			ssize_t		n = pread(content_fd, buf, Min((off_t) CHUNK, length - sent), sent);

			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
			{
				/* Shorter than fstat said: the service sees a broken body. */
				if (n == 0)
					errno = EIO;
				goto out;
			}
			if (!write_all(sock, buf, (size_t) n))
			{
				/*
				 * The service may refuse before reading the body (413) and
				 * close: its answer, if it came, says more than EPIPE.
				 */
				send_errno = errno;
				break;
			}
			sent += n;
		}
	}
	/* Connection: close, so the answer ends where the stream does. */
	while (got < ANSWER_MAX)
	{
		ssize_t		n = read(sock, buf + got, ANSWER_MAX - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && got == 0)
		{
			/* SO_RCVTIMEO ran out: say so rather than "temporarily unavailable". */
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				errno = ETIMEDOUT;
			goto out;
		}
		if (n <= 0)
			break;
		got += (size_t) n;
	}
	if (got == 0)
	{
		errno = send_errno != 0 ? send_errno : ECONNRESET;
		goto out;
	}
	parse_answer(buf, got, answer);
	ok = true;
out:
	saved = errno;
	pfree(buf);
	close(sock);
	errno = saved;
	return ok;
}

static void
warn_answer(const char *file, const Answer *answer)
{
	ereport(WARNING,
			(errmsg("fleet_archive: %s: the WAL service at %s answered %d: %s",
					file, socket_path, answer->status, answer->line)));
}

static bool
archive_file(const char *file, const char *path)
{
	struct stat st;
	char		name[256];
	char		query[768];
	char		identity[1024];
	Answer		answer;
	time_t		deadline;
	int			fd;

	/* O_NOFOLLOW, as agentctl: a symlink in place of a segment is refused. */
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
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
	if (!urlencode(file, name, sizeof(name)))
	{
		ereport(WARNING, (errmsg("fleet_archive: %s: name too long", file)));
		close(fd);
		return false;
	}
	/* The system identifier keeps two clusters' segments apart, as agentctl. */
	snprintf(query, sizeof(query), "name=%s&system_id=" UINT64_FORMAT,
			 name, GetSystemIdentifier());
	snprintf(identity, sizeof(identity),
			 "%s&dev=%llu&ino=%llu&size=%lld&mtime_ns=%lld",
			 query, (unsigned long long) st.st_dev, (unsigned long long) st.st_ino,
			 (long long) st.st_size,
			 (long long) st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);

	if (!exchange(identity, -1, 0, &answer))
		goto unreachable;
	if (answer.status >= 200 && answer.status <= 299)
	{
		close(fd);
		return true;
	}
	if (answer.status != 412)
		goto refused;

	/*
	 * A busy service (more pushes in flight than it takes) answers 503 with
	 * Retry-After; waiting here spares PostgreSQL counting a failure and
	 * backing off. A target failure is a 503 without it: fail at once.
	 */
	deadline = time(NULL) + BUSY_PATIENCE_SECS;
	for (;;)
	{
		int			wait;

		if (!exchange(query, fd, st.st_size, &answer))
			goto unreachable;
		if (answer.status != 503 || answer.retry_after < 0)
			break;
		wait = Max(1, Min(5, answer.retry_after));
		if (time(NULL) + wait > deadline)
			break;
		pg_usleep(wait * 1000000L);
	}
	if (answer.status >= 200 && answer.status <= 299)
	{
		close(fd);
		return true;
	}
refused:
	warn_answer(file, &answer);
	close(fd);
	return false;
unreachable:
	ereport(WARNING,
			(errmsg("fleet_archive: %s: cannot ask the WAL service at %s: %m",
					file, socket_path)));
	close(fd);
	return false;
}

void
_PG_archive_module_init(ArchiveModuleCallbacks *cb)
{
	cb->check_configured_cb = check_configured;
	cb->archive_file_cb = archive_file;
}
