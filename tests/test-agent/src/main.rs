//! A stand-in for a department container: a tiny HTTP/1.1 server whose failure
//! modes are chosen by environment variables (see README.md), so the acceptance
//! tests can make a "department" crash, hang, go unhealthy or run out of memory
//! on demand. Static, no runtime, no dependencies beyond `libc` for the signal
//! handler: it must run `FROM scratch` and never be the flaky part of a test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Set by SIGTERM/SIGINT: stop taking requests, exit once the in-flight ones are done.
static TERMINATING: AtomicBool = AtomicBool::new(false);
/// Requests being served right now.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

struct Settings {
    port: u16,
    version: String,
    never_healthy: bool,
    unhealthy_after: Option<Duration>,
    redirect_health_to: Option<String>,
}

fn main() {
    let started = Instant::now();
    install_sigterm_handler(flag("IGNORE_SIGTERM"));

    let settings = Settings {
        port: match env("PORT") {
            Some(p) => p.parse().unwrap_or_else(|_| die(&format!("PORT={p} is not a port number"))),
            None => 8080,
        },
        version: env("AGENT_VERSION").unwrap_or_else(|| "1".into()),
        never_healthy: flag("NEVER_HEALTHY"),
        unhealthy_after: duration_var("UNHEALTHY_AFTER"),
        redirect_health_to: env("REDIRECT_HEALTH_TO"),
    };

    if let Some(after) = duration_var("CRASH_AFTER") {
        let code = match env("EXIT_CODE") {
            Some(c) => c.parse().unwrap_or_else(|_| die(&format!("EXIT_CODE={c} is not a number"))),
            None => 1,
        };
        thread::spawn(move || {
            thread::sleep(after);
            say(&format!("CRASH_AFTER elapsed; exiting with code {code}"));
            exit(code);
        });
    }

    if let Some(mb) = env("ALLOC_MB") {
        let mb: usize = mb.parse().unwrap_or_else(|_| die(&format!("ALLOC_MB={mb} is not a number")));
        let after = duration_var("ALLOC_AFTER").unwrap_or_default();
        thread::spawn(move || {
            thread::sleep(after);
            say(&format!("allocating {mb} MiB"));
            // Filling with a non-zero byte touches every page, so the memory is
            // really resident and a cgroup limit really bites.
            let block = vec![0x5au8; mb * 1024 * 1024];
            say(&format!("allocated {mb} MiB"));
            loop {
                thread::sleep(Duration::from_secs(3600));
                std::hint::black_box(&block);
            }
        });
    }

    if let Some(delay) = duration_var("SLOW_START") {
        say(&format!("SLOW_START: listening in {delay:?}"));
        thread::sleep(delay);
    }

    let addr = SocketAddr::from(([0, 0, 0, 0], settings.port));
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("cannot listen on {addr}: {e}")));
    say(&format!("test-agent version {} listening on {addr}", settings.version));

    let settings: &'static Settings = Box::leak(Box::new(settings));
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if TERMINATING.load(Ordering::SeqCst) {
                    // Graceful stop: new connections are refused (closed unanswered).
                    drop(stream);
                    continue;
                }
                IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
                // Under a PID limit (after /spawn) a thread may not be had:
                // the connection is dropped, the server lives on.
                if let Err(e) = thread::Builder::new().spawn(move || {
                    serve(stream, settings, started);
                    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                }) {
                    IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
                    say(&format!("cannot serve a connection: {e}"));
                }
            }
            Err(e) => say(&format!("accept failed: {e}")),
        }
    }
}

fn serve(mut stream: TcpStream, settings: &Settings, started: Instant) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let Some(head) = read_head(&mut stream) else {
        return;
    };
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("");

    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, method, 405, "method not allowed", &[]);
    }
    match path {
        "/health" => {
            if settings.never_healthy {
                respond(&mut stream, method, 503, "never healthy", &[])
            } else if let Some(location) = &settings.redirect_health_to {
                respond(&mut stream, method, 302, "redirect", &[("Location", location)])
            } else if settings.unhealthy_after.is_some_and(|d| started.elapsed() >= d) {
                respond(&mut stream, method, 500, "unhealthy", &[])
            } else {
                respond(&mut stream, method, 200, "ok", &[])
            }
        }
        "/version" => respond(&mut stream, method, 200, &settings.version, &[]),
        _ if path.starts_with("/sleep/") => match parse_duration(&path["/sleep/".len()..]) {
            // A long request (a call in progress): answered after the delay,
            // also when SIGTERM came meanwhile.
            Some(d) if d <= Duration::from_secs(600) => {
                thread::sleep(d);
                respond(&mut stream, method, 200, &format!("slept {}", &path["/sleep/".len()..]), &[])
            }
            _ => respond(&mut stream, method, 404, "bad duration", &[]),
        },
        "/" => respond(&mut stream, method, 200, "fleet test-agent", &[]),
        _ if path.starts_with("/connect/") => {
            // A TCP connect from inside the container, for the isolation tests.
            let target = &path["/connect/".len()..];
            match target.parse::<SocketAddr>() {
                Ok(addr) => match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(_) => respond(&mut stream, method, 200, "connected", &[]),
                    Err(e) => respond(&mut stream, method, 502, &format!("failed: {e}"), &[]),
                },
                Err(_) => respond(&mut stream, method, 400, "not an address", &[]),
            }
        }
        _ if path.starts_with("/spawn/") => {
            // A thread bomb bounded by the count asked for: how many tasks
            // the PID limit lets it have. Each lives 3 s, then the agent
            // recovers.
            let wanted: usize = path["/spawn/".len()..].parse().unwrap_or(0);
            let mut got = 0;
            for _ in 0..wanted {
                match thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(|| thread::sleep(Duration::from_secs(3)))
                {
                    Ok(_) => got += 1,
                    Err(_) => break,
                }
            }
            respond(&mut stream, method, 200, &format!("spawned {got} of {wanted}"), &[])
        }
        _ if path.starts_with("/file/") => {
            // The secret file <NAME>_FILE names: its length and FNV-1a hash,
            // so a test checks the content without the value on the wire.
            let name = &path["/file/".len()..];
            match std::env::var(format!("{name}_FILE")).ok().map(|p| std::fs::read(&p)) {
                Some(Ok(bytes)) => {
                    let mut hash: u64 = 0xcbf29ce484222325;
                    for b in &bytes {
                        hash = (hash ^ *b as u64).wrapping_mul(0x100000001b3);
                    }
                    respond(&mut stream, method, 200, &format!("{} {hash:016x}", bytes.len()), &[])
                }
                Some(Err(e)) => respond(&mut stream, method, 403, &format!("unreadable: {e}"), &[]),
                None => respond(&mut stream, method, 404, "no such _FILE variable", &[]),
            }
        }
        _ if path == "/write-root" => {
            // Whether the root file system takes a write (read-only root tests).
            match std::fs::write("/fleet-write-probe", b"x") {
                Ok(()) => respond(&mut stream, method, 200, "written", &[]),
                Err(e) => respond(&mut stream, method, 409, &format!("refused: {e}"), &[]),
            }
        }
        _ => match path.strip_prefix("/env/") {
            // Presence only: the tests prove a secret reached the container
            // without the value ever crossing the wire.
            Some(name) if !name.is_empty() && std::env::var_os(name).is_some() => {
                respond(&mut stream, method, 200, "set", &[])
            }
            Some(_) => respond(&mut stream, method, 404, "unset", &[]),
            None => respond(&mut stream, method, 404, "not found", &[]),
        },
    }
}

/// Reads up to the blank line ending the request head; the body (none expected) is ignored.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 16 * 1024 {
            return None;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn respond(stream: &mut TcpStream, method: &str, status: u16, body: &str, headers: &[(&str, &str)]) {
    let reason = match status {
        200 => "OK",
        302 => "Found",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    if method != "HEAD" {
        out.push_str(body);
    }
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.flush();
}

fn install_sigterm_handler(ignore: bool) {
    extern "C" fn terminate(_signal: libc::c_int) {
        // Only async-signal-safe work here: an atomic store.
        TERMINATING.store(true, Ordering::SeqCst);
    }
    if !ignore {
        // Graceful stop: exit as soon as no request is in flight (at once when idle).
        thread::spawn(|| loop {
            if TERMINATING.load(Ordering::SeqCst) && IN_FLIGHT.load(Ordering::SeqCst) == 0 {
                say("SIGTERM: no request in flight; exiting");
                exit(0);
            }
            thread::sleep(Duration::from_millis(20));
        });
    }
    // PID 1 in a container ignores SIGTERM unless a handler is installed, so the
    // default path must install one for `docker stop` to be prompt.
    let handler = if ignore {
        libc::SIG_IGN
    } else {
        terminate as extern "C" fn(libc::c_int) as libc::sighandler_t
    };
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn flag(name: &str) -> bool {
    matches!(env(name).as_deref(), Some("1" | "true" | "yes"))
}

fn duration_var(name: &str) -> Option<Duration> {
    let text = env(name)?;
    Some(parse_duration(&text).unwrap_or_else(|| {
        die(&format!("{name}={text} is not a duration; write it like 1s, 500ms, 2m"))
    }))
}

/// `500ms`, `1s`, `2m`, `1h`; a bare number is seconds.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

fn say(message: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{message}");
    let _ = out.flush();
}

fn die(message: &str) -> ! {
    eprintln!("test-agent: {message}");
    exit(2);
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
