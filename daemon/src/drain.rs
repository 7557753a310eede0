//! The hand-over behind HAProxy (docs/architecture.md, "Draining"): each
//! department has its port and a standby port; HAProxy lists both as servers
//! with `check` and `agent-check`, and this node's agent listener tells it,
//! per port, `ready` (takes new connections when its health check passes) or
//! `drain` (finishes what it has, takes nothing new). The pure pieces live
//! here (the standby port, the agent's answer, counting established
//! connections from /proc/net/tcp text, the backend lines `agentctl
//! haproxy-config` prints) beside the listener task, which only reads the
//! status board: HAProxy keeps the last answer when the listener is away
//! ("Failure to connect to the agent is not considered an error", HAProxy's
//! configuration manual, agent-check), so traffic never depends on the daemon.

use crate::supervisor::board::{Board, DeptView};
use fleet_model::config::{Config, HaproxyConfig};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the department core needs to know of `[haproxy]` and the standby pool.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainConfig {
    pub range_low: u16,
    pub range_high: u16,
    pub standby_low: u16,
    /// From a replacement answering its probe until HAProxy surely has it up.
    pub settle: Duration,
    /// How long HAProxy may take to ask the agent again.
    pub agent_inter: Duration,
}

impl DrainConfig {
    /// `None` unless `[haproxy]` and `[ports] standby_range` are both set
    /// (`Config::validate` refuses one without the other).
    pub fn from_config(config: &Config) -> Option<Self> {
        let haproxy = config.haproxy.as_ref()?;
        let (range_low, range_high) = config.ports.parsed_range().ok()?;
        let (standby_low, _) = config.ports.parsed_standby_range().ok()??;
        Some(DrainConfig {
            range_low,
            range_high,
            standby_low,
            settle: haproxy.settle(),
            agent_inter: haproxy.agent_inter,
        })
    }

    /// A department's standby port: its port's offset in `range`, applied to
    /// `standby_range`. Derived, not leased: it is as sticky as the port
    /// itself and survives a lost store with the `fleet-agent.host-port` label.
    /// An explicit `host_port` outside the range has none.
    pub fn standby_for(&self, port: u16) -> Option<u16> {
        if port < self.range_low || port > self.range_high {
            return None;
        }
        self.standby_low.checked_add(port - self.range_low)
    }

    /// How long after the agent's answer changed the old server surely gets
    /// no new connection: one agent interval, and a margin for the check itself.
    pub fn noticed(&self) -> Duration {
        self.agent_inter + Duration::from_millis(500)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Primary,
    Standby,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Primary => "primary",
            Slot::Standby => "standby",
        }
    }
}

/// The agent's answers, as the department core decided them: a slot drains
/// from its instant on, otherwise it is `ready` (its health check decides).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentSlots {
    pub primary_drain_from: Option<Instant>,
    pub standby_drain_from: Option<Instant>,
}

/// The line the agent listener answers for `<department>/<slot>`. `None`: no
/// answer (an unknown department or slot); HAProxy then changes nothing.
pub fn agent_answer(view: Option<&DeptView>, slot: &str, now: Instant) -> Option<&'static str> {
    let view = view?;
    let from = match slot {
        "primary" => view.agent.primary_drain_from,
        "standby" if view.standby_port.is_some() => view.agent.standby_drain_from,
        _ => return None,
    };
    Some(match from {
        Some(t) if now >= t => "drain\n",
        _ => "ready\n",
    })
}

/// Counts of one port in the text of /proc/net/tcp or /proc/net/tcp6.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortSockets {
    pub listening: bool,
    pub established: u32,
}

/// Sockets whose local port is `port`: LISTEN (state 0A) and ESTABLISHED (01).
pub fn count_sockets(proc_net_tcp: &str, port: u16) -> PortSockets {
    let mut out = PortSockets::default();
    for line in proc_net_tcp.lines().skip(1) {
        let mut fields = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some(local_port) = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if local_port != port {
            continue;
        }
        match state {
            "0A" => out.listening = true,
            "01" => out.established += 1,
            _ => {}
        }
    }
    out
}

/// Established connections to a published host port, where that can be
/// known: Docker's userland proxy (`docker-proxy`) accepts them in the host's
/// network namespace, the daemon's own, so `/proc/self/net/tcp{,6}` shows them
/// to an unprivileged user under `ProtectProc=invisible`. Without a listener
/// of that port there (the proxy off, or traffic arriving by DNAT from another
/// host) the count is unknown: `None`.
pub fn connections_to(port: u16) -> Option<u32> {
    let mut total = PortSockets::default();
    for file in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            let c = count_sockets(&text, port);
            total.listening |= c.listening;
            total.established += c.established;
        }
    }
    total.listening.then_some(total.established)
}

/// One department as the HAProxy side needs it.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: String,
    pub port: u16,
    pub standby_port: Option<u16>,
    /// `None`: health probing is off; HAProxy checks TCP only.
    pub health_path: Option<String>,
}

/// The backend sections for this node's departments, as `agentctl
/// haproxy-config` prints them. `bind` is `[ports] bind` (an unspecified
/// address is shown as loopback: HAProxy on this host).
pub fn haproxy_backends(
    node: &str,
    bind: IpAddr,
    haproxy: &HaproxyConfig,
    backends: &[Backend],
) -> String {
    let host = if bind.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        bind
    };
    let agent = haproxy
        .agent_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8099)));
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut out = format!(
        "# fleet-agent node {node}: one backend per department (agentctl haproxy-config).\n\
         # Two servers each: the department's port and its standby (hand-over) port.\n\
         # The agent-check says which takes new connections; a failed agent connection\n\
         # is no news to HAProxy, so traffic does not depend on fleet-agentd being up.\n"
    );
    for b in backends {
        out.push_str(&format!(
            "\nbackend fleet_{}\n    mode http\n    balance roundrobin\n",
            b.id
        ));
        match &b.health_path {
            Some(path) => out.push_str(&format!(
                "    option httpchk GET {path}\n    http-check expect status 200\n"
            )),
            None => {
                out.push_str("    # health probing is off for this department: TCP checks only\n")
            }
        }
        out.push_str(&format!(
            "    # one request per server connection, so a draining server's connections are its requests\n\
             \x20   option http-server-close\n\
             \x20   option redispatch 1\n\
             \x20   retries 3\n\
             \x20   retry-on conn-failure empty-response\n\
             \x20   timeout connect 2s\n\
             \x20   timeout server 1h\n\
             \x20   timeout tunnel 1h\n\
             \x20   timeout check 2s\n\
             \x20   default-server inter {inter} rise {rise} fall {fall} agent-check agent-addr {aip} agent-port {aport} agent-inter {ainter}\n",
            inter = ms(haproxy.check_inter),
            rise = haproxy.rise,
            fall = haproxy.fall,
            aip = agent.ip(),
            aport = agent.port(),
            ainter = ms(haproxy.agent_inter),
        ));
        out.push_str(&format!(
            "    server primary {}:{} check agent-send \"{}/primary\\n\"\n",
            socket_host(host),
            b.port,
            b.id
        ));
        match b.standby_port {
            Some(standby) => out.push_str(&format!(
                "    server standby {}:{} check agent-send \"{}/standby\\n\"\n",
                socket_host(host),
                standby,
                b.id
            )),
            None => out.push_str(
                "    # no standby port (host_port outside [ports] range): restarts of this department have a gap\n",
            ),
        }
    }
    out
}

fn socket_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Connections answered at once; more wait in the kernel's backlog.
const AGENT_CONCURRENCY: usize = 64;

/// The agent-check listener: reads `<department>/<slot>\n`, answers from the
/// status board, closes. Never waits on a department task or on Docker.
pub async fn serve_agent(listener: TcpListener, board: Board) {
    let permits = Arc::new(tokio::sync::Semaphore::new(AGENT_CONCURRENCY));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (mut stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Agent listener accept failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let board = board.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = [0u8; 128];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while len < buf.len() {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            len += n;
                            if buf[..len].contains(&b'\n') {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let request = request.trim();
            let Some((department, slot)) = request.split_once('/') else {
                return;
            };
            let view = board.get(department);
            if let Some(answer) = agent_answer(view.as_ref(), slot, Instant::now()) {
                let _ = stream.write_all(answer.as_bytes()).await;
            }
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DrainConfig {
        DrainConfig {
            range_low: 8001,
            range_high: 8010,
            standby_low: 8101,
            settle: Duration::from_secs(4),
            agent_inter: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_standby_port_keeps_the_offset_and_none_outside_the_range() {
        assert_eq!(cfg().standby_for(8001), Some(8101));
        assert_eq!(cfg().standby_for(8010), Some(8110));
        assert_eq!(cfg().standby_for(8011), None);
        assert_eq!(cfg().standby_for(7000), None);
    }

    #[test]
    fn sockets_of_one_port_are_counted_by_state() {
        // 1F41 = 8001; 0100007F = 127.0.0.1.
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:1F41 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
   2: 0100007F:1F41 0100007F:D432 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n\
   3: 0100007F:1F41 0100007F:D433 06 00000000:00000000 00:00000000 00000000     0        0 0 3 0 0 0 0 0 0\n\
   4: 0100007F:D431 0100007F:1F41 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0 20 4 30 10 -1\n";
        assert_eq!(
            count_sockets(text, 8001),
            PortSockets {
                listening: true,
                established: 2
            }
        );
        assert_eq!(count_sockets(text, 8002), PortSockets::default());
        // tcp6 addresses have the port after the last colon too.
        let six = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:1F42 00000000000000000000000000000000:0000 0A 0\n";
        assert!(count_sockets(six, 8002).listening);
    }

    #[test]
    fn the_agent_drains_a_slot_from_its_instant_on() {
        let now = Instant::now();
        assert_eq!(agent_answer(None, "primary", now), None);
        let mut view = crate::supervisor::board::tests::view();
        view.standby_port = Some(8101);
        assert_eq!(agent_answer(Some(&view), "primary", now), Some("ready\n"));
        assert_eq!(agent_answer(Some(&view), "standby", now), Some("ready\n"));
        assert_eq!(agent_answer(Some(&view), "other", now), None);
        view.agent.primary_drain_from = Some(now + Duration::from_secs(2));
        assert_eq!(agent_answer(Some(&view), "primary", now), Some("ready\n"));
        assert_eq!(
            agent_answer(Some(&view), "primary", now + Duration::from_secs(2)),
            Some("drain\n")
        );
        view.standby_port = None;
        assert_eq!(agent_answer(Some(&view), "standby", now), None);
    }

    #[test]
    fn the_backends_name_both_ports_and_the_agent() {
        let haproxy: HaproxyConfig =
            toml::from_str("agent_listen = \"127.0.0.1:43199\"\n").expect("haproxy config");
        let text = haproxy_backends(
            "n1",
            IpAddr::from([127, 0, 0, 1]),
            &haproxy,
            &[Backend {
                id: "hr".into(),
                port: 8001,
                standby_port: Some(8101),
                health_path: Some("/health".into()),
            }],
        );
        for want in [
            "backend fleet_hr",
            "option httpchk GET /health",
            "agent-check agent-addr 127.0.0.1 agent-port 43199 agent-inter 1000ms",
            "inter 1000ms rise 2 fall 2",
            "server primary 127.0.0.1:8001 check agent-send \"hr/primary\\n\"",
            "server standby 127.0.0.1:8101 check agent-send \"hr/standby\\n\"",
            "option redispatch",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
