//! The node's embedded DNS responder, on the bridge's gateway address
//! (`<node subnet>.1:53`, UDP and TCP), for the containers of this node.
//!
//! Answers are scoped by the asking container's networks, found from its
//! source address: `<service>`, `<service>.<stack>` and `<stack>_<service>`
//! give the service's VIP (or its ready task addresses for `dnsrr`), and
//! `tasks.<any of those>` the ready task addresses; TTL 2 s, so a change is
//! seen quickly. A name in the cluster's scope (one label, `tasks.…`, or
//! ending in a known stack) that matches nothing is NXDOMAIN; anything else
//! is forwarded to the host's resolvers (from `/etc/resolv.conf`, without
//! loopback ones, which mean nothing from the container's side) with a 2 s
//! timeout, SERVFAIL when none answers.
//!
//! Why the gateway and not Swarm's `127.0.0.11`: Swarm's address lives
//! inside each container's namespace and needs an iptables redirect and a
//! socket per container; the gateway is already reachable from every
//! container of the node, one socket serves them all, and the source
//! address tells who asks.

use super::state::DesiredState;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata::A};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

/// The TTL of every answer, in seconds: short, since endpoints come and go.
pub const TTL: u32 = 2;

/// How long a forwarded query may take, all upstreams together.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// What a name resolves to for one asker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A cluster name: these addresses (possibly none: a dnsrr service with
    /// no ready task).
    Addresses(Vec<Ipv4Addr>),
    /// In the cluster's scope but unknown (or not on the asker's networks).
    NxDomain,
    /// Not the cluster's: ask the host's resolvers.
    Forward,
}

/// Resolves `name` (any case, trailing dot or not) for the container with
/// address `asker`. Pure.
pub fn resolve(state: &DesiredState, asker: Ipv4Addr, name: &str) -> Answer {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let scope = state.networks_of(asker);
    let (tasks, rest) = match name.strip_prefix("tasks.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    let mut found = false;
    let mut out: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for s in state.services.values() {
        let on_scope = s.networks.iter().any(|n| scope.contains(n.as_str()));
        let (svc, stack) = (s.name.to_ascii_lowercase(), s.stack.to_ascii_lowercase());
        let named =
            rest == svc || rest == format!("{svc}.{stack}") || rest == format!("{stack}_{svc}");
        if !on_scope || !named {
            continue;
        }
        found = true;
        match s.vip {
            Some(vip) if !tasks => {
                out.insert(vip);
            }
            _ => out.extend(s.ready_addresses()),
        }
    }
    if found {
        return Answer::Addresses(out.into_iter().collect());
    }
    let stacks: BTreeSet<String> = state
        .services
        .values()
        .map(|s| s.stack.to_ascii_lowercase())
        .chain(
            state
                .networks
                .values()
                .map(|n| n.stack.to_ascii_lowercase()),
        )
        .collect();
    let last = rest.rsplit('.').next().unwrap_or("");
    if tasks || !rest.contains('.') || stacks.contains(last) {
        Answer::NxDomain
    } else {
        Answer::Forward
    }
}

/// The host's resolvers from `resolv_conf`'s text, without loopback ones.
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = w.next()?.parse().ok()?;
            (!ip.is_loopback()).then_some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The reply to `query` from `asker`: built here, or `None` to forward.
pub fn answer(state: &DesiredState, asker: Ipv4Addr, query: &Message) -> Option<Message> {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = query.queries.clone();
    let q = match (query.metadata.op_code, query.queries.as_slice()) {
        (OpCode::Query, [q]) => q,
        _ => {
            reply.metadata.response_code = ResponseCode::NotImp;
            return Some(reply);
        }
    };
    match resolve(state, asker, &q.name().to_ascii()) {
        Answer::Forward => return None,
        Answer::NxDomain => {
            reply.metadata.authoritative = true;
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        Answer::Addresses(addrs) => {
            reply.metadata.authoritative = true;
            // Other types (AAAA, …) of a known name: no data, not NXDOMAIN,
            // so resolvers do not give up on the A record.
            if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
                for a in addrs {
                    reply
                        .answers
                        .push(Record::from_rdata(q.name().clone(), TTL, RData::A(A(a))));
                }
            }
        }
    }
    Some(reply)
}

/// The reply bytes for one request's bytes: answered, forwarded, or
/// SERVFAIL. `None` for garbage (no reply, as a resolver would do).
async fn handle(
    state: &RwLock<DesiredState>,
    upstreams: &[SocketAddr],
    asker: Ipv4Addr,
    request: &[u8],
) -> Option<Vec<u8>> {
    let query = Message::from_vec(request).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let local = {
        let state = state.read().unwrap_or_else(|p| p.into_inner());
        answer(&state, asker, &query)
    };
    if let Some(reply) = local {
        return reply.to_vec().ok();
    }
    if let Some(bytes) = forward(upstreams, request).await {
        return Some(bytes);
    }
    let mut fail = Message::error_msg(
        query.metadata.id,
        query.metadata.op_code,
        ResponseCode::ServFail,
    );
    fail.queries = query.queries;
    fail.to_vec().ok()
}

/// Sends `request` to each upstream in turn until one answers within
/// [`FORWARD_TIMEOUT`] overall.
async fn forward(upstreams: &[SocketAddr], request: &[u8]) -> Option<Vec<u8>> {
    if upstreams.is_empty() {
        return None;
    }
    let per = FORWARD_TIMEOUT / upstreams.len() as u32;
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(request).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(per, sock.recv(&mut buf)).await {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

/// A running responder; dropping it stops it.
pub struct DnsServer {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    addr: SocketAddr,
}

impl DnsServer {
    /// The address it serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds `addr` (UDP and TCP) and serves `state` there until dropped.
/// Must be called inside a tokio runtime; the sockets are made in the
/// calling thread's network namespace.
pub fn spawn(
    addr: SocketAddr,
    state: Arc<RwLock<DesiredState>>,
    upstreams: Vec<SocketAddr>,
) -> std::io::Result<DnsServer> {
    let udp = std::net::UdpSocket::bind(addr)?;
    udp.set_nonblocking(true)?;
    let udp = Arc::new(UdpSocket::from_std(udp)?);
    let tcp = std::net::TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    let tcp = TcpListener::from_std(tcp)?;
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let udp_task = {
        let (state, upstreams) = (state.clone(), upstreams.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let IpAddr::V4(asker) = peer.ip() else {
                    continue;
                };
                let request = buf[..n].to_vec();
                let (udp, state, upstreams) = (udp.clone(), state.clone(), upstreams.clone());
                // One task per query: a slow forward must not hold up
                // the names answered locally.
                tokio::spawn(async move {
                    if let Some(reply) = handle(&state, &upstreams, asker, &request).await {
                        let _ = udp.send_to(&reply, peer).await;
                    }
                });
            }
        })
    };
    let tcp_task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, peer)) = tcp.accept().await else {
                continue;
            };
            let IpAddr::V4(asker) = peer.ip() else {
                continue;
            };
            let (state, upstreams) = (state.clone(), upstreams.clone());
            tokio::spawn(async move {
                // Bounded: a client that stalls is dropped.
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let len = conn.read_u16().await? as usize;
                        let mut request = vec![0u8; len];
                        conn.read_exact(&mut request).await?;
                        let Some(reply) = handle(&state, &upstreams, asker, &request).await else {
                            return Ok::<(), std::io::Error>(());
                        };
                        conn.write_u16(reply.len() as u16).await?;
                        conn.write_all(&reply).await?;
                    }
                })
                .await;
            });
        }
    });
    Ok(DnsServer {
        tasks: vec![udp_task, tcp_task],
        addr,
    })
}

#[cfg(test)]
mod tests {
    use super::super::state::tests::service;
    use super::super::state::{ClusterNetwork, Update};
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn state() -> DesiredState {
        let mut web = service(
            "web",
            Some([10, 43, 0, 2]),
            &[([10, 42, 1, 2], true), ([10, 42, 2, 2], false)],
        );
        web.stack = "shop".into();
        let mut rr = service(
            "rr",
            None,
            &[([10, 42, 1, 5], true), ([10, 42, 2, 5], true)],
        );
        rr.stack = "shop".into();
        let mut client = service("client", None, &[([10, 42, 1, 9], true)]);
        client.stack = "shop".into();
        let mut outsider = service("outsider", None, &[([10, 42, 3, 9], true)]);
        outsider.stack = "other".into();
        outsider.networks = vec!["other_default".into()];
        let mut s = DesiredState::default();
        s.apply(Update {
            full: true,
            services: vec![web, rr, client, outsider],
            networks: vec![ClusterNetwork {
                name: "st_default".into(),
                stack: "shop".into(),
            }],
            ..Update::default()
        });
        s
    }

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 42, 1, 9);

    #[test]
    fn names_resolve_by_network_scope() {
        let s = state();
        let vip = Answer::Addresses(vec![Ipv4Addr::new(10, 43, 0, 2)]);
        assert_eq!(resolve(&s, CLIENT, "web"), vip);
        assert_eq!(resolve(&s, CLIENT, "WEB.shop."), vip);
        assert_eq!(resolve(&s, CLIENT, "shop_web"), vip);
        // tasks.: only the ready one.
        assert_eq!(
            resolve(&s, CLIENT, "tasks.web"),
            Answer::Addresses(vec![Ipv4Addr::new(10, 42, 1, 2)])
        );
        // dnsrr: the ready tasks.
        assert_eq!(
            resolve(&s, CLIENT, "rr"),
            Answer::Addresses(vec![
                Ipv4Addr::new(10, 42, 1, 5),
                Ipv4Addr::new(10, 42, 2, 5)
            ])
        );
        // Another network's service is not visible, and not forwarded.
        assert_eq!(resolve(&s, CLIENT, "outsider"), Answer::NxDomain);
        assert_eq!(resolve(&s, CLIENT, "outsider.other"), Answer::NxDomain);
        assert_eq!(resolve(&s, CLIENT, "tasks.nothing"), Answer::NxDomain);
        assert_eq!(resolve(&s, CLIENT, "example.org"), Answer::Forward);
        // An unknown asker sees no cluster name.
        assert_eq!(
            resolve(&s, Ipv4Addr::new(10, 42, 9, 9), "web"),
            Answer::NxDomain
        );
    }

    #[test]
    fn replies_carry_a_records_with_a_short_ttl() {
        let s = state();
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            Name::from_ascii("tasks.rr.").unwrap(),
            RecordType::A,
        ));
        let reply = answer(&s, CLIENT, &q).unwrap();
        assert_eq!(reply.metadata.id, q.metadata.id);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(reply.answers.len(), 2);
        assert!(reply.answers.iter().all(|r| r.ttl == TTL));
        // Round trip through the wire format.
        let bytes = reply.to_vec().unwrap();
        assert_eq!(Message::from_vec(&bytes).unwrap().answers.len(), 2);
        // AAAA of a known name: no error, no data.
        let mut q6 = Message::query();
        q6.add_query(Query::query(
            Name::from_ascii("web.").unwrap(),
            RecordType::AAAA,
        ));
        let r6 = answer(&s, CLIENT, &q6).unwrap();
        assert_eq!(r6.metadata.response_code, ResponseCode::NoError);
        assert!(r6.answers.is_empty());
        let mut qx = Message::query();
        qx.add_query(Query::query(
            Name::from_ascii("example.org.").unwrap(),
            RecordType::A,
        ));
        assert!(answer(&s, CLIENT, &qx).is_none());
    }

    #[test]
    fn upstreams_skip_loopback() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nsearch a\nnameserver ::1\n";
        assert_eq!(upstreams(conf), ["192.0.2.53:53".parse().unwrap()]);
    }
}
