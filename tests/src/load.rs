//! A load generator for replicated writes, the same for Gantry's
//! controllers and for etcd, so the two are measured alike: N concurrent
//! clients, each its own HTTP/2 connection, issuing one write after another
//! for a fixed total count, every write's latency recorded.
//!
//! - A **Gantry write** is `Control.UpdateNode` setting the label
//!   `bench.kK=<value>` on one node (a replicated command through the
//!   public API; the node exists once its agent said hello), and the
//!   linearizable read is `Control.InspectNode`.
//! - An **etcd write** is `KV.Put` of the same key and value over etcd's
//!   native gRPC API and the read a `KV.Range` of it. The few etcd messages
//!   needed are declared here with prost's derive (field numbers from etcd's
//!   `rpc.proto`), so no `protoc` and no etcd client crate are needed; both
//!   systems are then driven by the same tonic stack.
//!
//! Clients spread over the endpoints given (client `i` talks to endpoint `i
//! mod n`), as users of either system would; followers forward to the
//! leader in both.

use gantry_proto::tonic;
use gantry_proto::v1 as pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Errors of setting up a load run (a failed operation is counted, not an
/// error).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// An endpoint is not a usable `host:port`.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// What was given.
        endpoint: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The target names no endpoint.
    #[error("target {system} has no endpoints")]
    NoEndpoints {
        /// Which system.
        system: System,
    },
    /// No write was acknowledged in time.
    #[error("no write to {system} acknowledged within {waited:?} (last error: {last})")]
    NoWrite {
        /// Which system.
        system: System,
        /// How long it was tried.
        waited: Duration,
        /// The last failure.
        last: String,
    },
    /// A client task panicked or was cancelled.
    #[error("load client {client} ended abnormally: {reason}")]
    Client {
        /// Which client.
        client: usize,
        /// What happened.
        reason: String,
    },
}

/// Which system a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Gantry's controllers (`Control` service).
    Gantry,
    /// etcd (`etcdserverpb.KV`).
    Etcd,
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            System::Gantry => "gantry",
            System::Etcd => "etcd",
        })
    }
}

/// What to send load to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Which system.
    pub system: System,
    /// Its members' client endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// Gantry only: the node (id or hostname) whose labels are written.
    pub node: String,
}

impl Target {
    /// Gantry controllers at `endpoints`, writing labels of `node`.
    pub fn gantry(endpoints: Vec<String>, node: &str) -> Target {
        Target {
            system: System::Gantry,
            endpoints,
            node: node.to_string(),
        }
    }

    /// etcd members at `endpoints`.
    pub fn etcd(endpoints: Vec<String>) -> Target {
        Target {
            system: System::Etcd,
            endpoints,
            node: String::new(),
        }
    }
}

/// Why one operation failed: the write may or may not have taken effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// No answer within the client's timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The server (or the transport) answered with an error.
    #[error("{0}")]
    Status(String),
}

/// One client: a connection to one endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Conn,
    /// Per-operation timeout; `None` waits as long as the server takes.
    pub timeout: Option<Duration>,
    /// The endpoint it talks to.
    pub endpoint: String,
}

#[derive(Debug, Clone)]
enum Conn {
    Gantry {
        control: pb::control_client::ControlClient<Channel>,
        node: String,
    },
    Etcd(tonic::client::Grpc<Channel>),
}

/// A channel that connects on first use and reconnects after a failure,
/// so a client made for a dead member fails its calls instead of blocking
/// its creation.
fn lazy_channel(endpoint: &str) -> Result<Channel, LoadError> {
    Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| LoadError::Endpoint {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })
        .map(|e| {
            e.connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .connect_lazy()
        })
}

impl Client {
    /// A client of `target`'s endpoint number `index` (modulo their count).
    /// Must be called within a tokio runtime (the channel connects lazily,
    /// on that runtime's reactor).
    pub fn new(target: &Target, index: usize) -> Result<Client, LoadError> {
        if target.endpoints.is_empty() {
            return Err(LoadError::NoEndpoints {
                system: target.system,
            });
        }
        let endpoint = target.endpoints[index % target.endpoints.len()].clone();
        let channel = lazy_channel(&endpoint)?;
        let conn = match target.system {
            System::Gantry => Conn::Gantry {
                control: pb::control_client::ControlClient::new(channel),
                node: target.node.clone(),
            },
            System::Etcd => Conn::Etcd(tonic::client::Grpc::new(channel)),
        };
        Ok(Client {
            conn,
            timeout: None,
            endpoint,
        })
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, OpError> {
        let result = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| OpError::Timeout(limit))?,
            None => call.await,
        };
        result.map_err(|s| OpError::Status(format!("{:?}: {}", s.code(), s.message())))
    }

    /// Writes `value` under `key`.
    pub async fn write(&mut self, key: &str, value: &str) -> Result<(), OpError> {
        match &mut self.conn {
            Conn::Gantry { control, node } => {
                let mut control = control.clone();
                let request = pb::UpdateNodeRequest {
                    node: node.clone(),
                    label_add: [(key.to_string(), value.to_string())].into(),
                    ..Default::default()
                };
                self.bounded(async move { control.update_node(request).await.map(|_| ()) })
                    .await
            }
            Conn::Etcd(grpc) => {
                let mut grpc = grpc.clone();
                let request = etcd::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.as_bytes().to_vec(),
                };
                self.bounded(async move {
                    etcd::unary::<_, etcd::PutResponse>(&mut grpc, etcd::PUT, request)
                        .await
                        .map(|_| ())
                })
                .await
            }
        }
    }

    /// Reads `key`: its value, or `None` when it is absent. Linearizable on
    /// both systems (Gantry's `InspectNode`, etcd's default Range).
    pub async fn read(&mut self, key: &str) -> Result<Option<String>, OpError> {
        match &mut self.conn {
            Conn::Gantry { control, node } => {
                let mut control = control.clone();
                let request = pb::NodeRef { node: node.clone() };
                let key = key.to_string();
                self.bounded(async move {
                    let n = control.inspect_node(request).await?.into_inner();
                    Ok(n.spec.and_then(|s| s.labels.get(&key).cloned()))
                })
                .await
            }
            Conn::Etcd(grpc) => {
                let mut grpc = grpc.clone();
                let request = etcd::RangeRequest {
                    key: key.as_bytes().to_vec(),
                };
                self.bounded(async move {
                    let r = etcd::unary::<_, etcd::RangeResponse>(&mut grpc, etcd::RANGE, request)
                        .await?;
                    Ok(r.kvs
                        .into_iter()
                        .next()
                        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
                })
                .await
            }
        }
    }
}

/// The etcd v3 messages this generator sends, declared with prost's derive
/// from etcd's `api/etcdserverpb/rpc.proto` (only the fields used; prost
/// skips the others when decoding).
pub mod etcd {
    use gantry_proto::tonic;

    /// `/etcdserverpb.KV/Put`.
    pub const PUT: &str = "/etcdserverpb.KV/Put";
    /// `/etcdserverpb.KV/Range`.
    pub const RANGE: &str = "/etcdserverpb.KV/Range";
    /// `/etcdserverpb.Maintenance/Status`.
    pub const STATUS: &str = "/etcdserverpb.Maintenance/Status";

    /// `PutRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        /// The key.
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        /// The value.
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// `PutResponse` (its header only).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        /// The header.
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    /// `RangeRequest` of one key (linearizable: `serializable` unset).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeRequest {
        /// The key.
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
    }

    /// `RangeResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RangeResponse {
        /// The header.
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        /// The pairs found.
        #[prost(message, repeated, tag = "2")]
        pub kvs: Vec<KeyValue>,
    }

    /// `mvccpb.KeyValue` (key and value only).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        /// The key.
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        /// The value.
        #[prost(bytes = "vec", tag = "5")]
        pub value: Vec<u8>,
    }

    /// `ResponseHeader`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        /// The cluster.
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        /// The member that answered.
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        /// The store's revision.
        #[prost(int64, tag = "3")]
        pub revision: i64,
        /// The raft term.
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }

    /// `StatusRequest` (empty).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}

    /// `StatusResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        /// The header (`member_id` is the member answering).
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        /// The leader's member id.
        #[prost(uint64, tag = "4")]
        pub leader: u64,
        /// The raft term.
        #[prost(uint64, tag = "6")]
        pub raft_term: u64,
    }

    /// One unary call by method path.
    pub async fn unary<Req, Resp>(
        grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
        path: &'static str,
        request: Req,
    ) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("etcd not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        grpc.unary(tonic::Request::new(request), path, codec)
            .await
            .map(|r| r.into_inner())
    }

    /// The leader as one member sees it: (this member's id, the leader's id).
    pub async fn status(endpoint: &str) -> Result<(u64, u64), tonic::Status> {
        let channel = super::lazy_channel(endpoint)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        let r: StatusResponse = unary(&mut grpc, STATUS, StatusRequest {}).await?;
        Ok((r.header.map_or(0, |h| h.member_id), r.leader))
    }
}

/// A write load: how many clients, how many writes in all, what they write.
#[derive(Debug, Clone)]
pub struct WriteLoad {
    /// Concurrent clients.
    pub clients: usize,
    /// Writes in all (shared out as clients become free).
    pub ops: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// Keys written in turn (`bench.k0` …), so the Gantry node's label set
    /// (and etcd's key set) stays small.
    pub keys: usize,
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Writes acknowledged.
    pub ok: usize,
    /// Writes that failed.
    pub errors: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// From the first write sent to the last answer.
    pub elapsed: Duration,
    /// Each acknowledged write's latency, in microseconds.
    pub latencies_us: Vec<u64>,
}

impl LoadResult {
    /// Acknowledged writes per second.
    pub fn writes_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (nearest rank), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        percentile_us(&self.latencies_us, q) as f64 / 1000.0
    }
}

/// The value at quantile `q` of `samples` (nearest rank; 0 when empty).
pub fn percentile_us(samples: &[u64], q: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// A value of `size` bytes, distinct per `seed` (printable, so it is a
/// valid label value and etcd value alike).
pub fn value_of(size: usize, seed: usize) -> String {
    let head = format!("v{seed}-");
    let mut v = head.clone();
    while v.len() < size {
        v.push(char::from(b'a' + (v.len() % 26) as u8));
    }
    v.truncate(size.max(head.len()));
    v
}

/// Runs `load` against `target`: every client is made (and connected, with
/// one write each that is not measured) before the clock starts; then the
/// clients take writes from a shared counter until `load.ops` were sent.
pub async fn run_writes(target: &Target, load: &WriteLoad) -> Result<LoadResult, LoadError> {
    let mut clients = Vec::with_capacity(load.clients);
    for i in 0..load.clients {
        let mut c = Client::new(target, i)?;
        // Warm the connection, so connection set-up is not measured.
        let key = format!("bench.k{}", i % load.keys.max(1));
        if let Err(e) = c.write(&key, &value_of(load.value_size, i)).await {
            return Err(LoadError::NoWrite {
                system: target.system,
                waited: Duration::ZERO,
                last: format!("warm-up write via {}: {e}", c.endpoint),
            });
        }
        c.timeout = Some(Duration::from_secs(10));
        clients.push(c);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(load.clients);
    for mut c in clients {
        let next = next.clone();
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut first_error = None;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= load.ops {
                    break;
                }
                let key = format!("bench.k{}", n % load.keys.max(1));
                let value = value_of(load.value_size, n);
                let t = Instant::now();
                match c.write(&key, &value).await {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("via {}: {e}", c.endpoint));
                    }
                }
            }
            (lat, errors, first_error, Instant::now())
        }));
    }
    let mut result = LoadResult {
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        latencies_us: Vec::with_capacity(load.ops),
    };
    let mut last = start;
    for (i, t) in tasks.into_iter().enumerate() {
        let (lat, errors, first_error, done) = t.await.map_err(|e| LoadError::Client {
            client: i,
            reason: e.to_string(),
        })?;
        result.ok += lat.len();
        result.latencies_us.extend(lat);
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
        last = last.max(done);
    }
    result.elapsed = last - start;
    Ok(result)
}

/// Writes until one is acknowledged, each attempt bounded by `attempt` and
/// moving on to the next endpoint after a failure (a client that fails
/// over promptly), for at most `limit`. Returns when the acknowledged
/// write was sent and when it was answered.
pub async fn first_acknowledged_write(
    target: &Target,
    key: &str,
    attempt: Duration,
    limit: Duration,
) -> Result<(Instant, Instant), LoadError> {
    let mut clients = (0..target.endpoints.len())
        .map(|i| {
            Client::new(target, i).map(|mut c| {
                c.timeout = Some(attempt);
                c
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if clients.is_empty() {
        return Err(LoadError::NoEndpoints {
            system: target.system,
        });
    }
    let start = Instant::now();
    let mut last = String::from("none tried");
    let mut i = 0usize;
    let mut seed = 0usize;
    let n = clients.len();
    while start.elapsed() < limit {
        let c = &mut clients[i % n];
        let sent = Instant::now();
        seed += 1;
        match c.write(key, &value_of(16, seed)).await {
            Ok(()) => return Ok((sent, Instant::now())),
            Err(e) => {
                last = format!("via {}: {e}", c.endpoint);
                i += 1;
                // A refused connection fails at once: do not spin on it.
                let spent = sent.elapsed();
                if spent < Duration::from_millis(10) {
                    tokio::time::sleep(Duration::from_millis(10) - spent).await;
                }
            }
        }
    }
    Err(LoadError::NoWrite {
        system: target.system,
        waited: limit,
        last,
    })
}

/// Which of Gantry's `endpoints` is the leader, as the first controller to
/// answer `Cluster.ListControllers` says (each asked for at most 500 ms):
/// its index in `endpoints`. A controller that does not serve the Cluster
/// service (a single, unreplicated one) is its own leader when it is the
/// only endpoint; otherwise `None` until one names a leader.
pub async fn gantry_leader(endpoints: &[String]) -> Option<usize> {
    for endpoint in endpoints {
        let Ok(channel) = lazy_channel(endpoint) else {
            continue;
        };
        let mut client = pb::cluster_client::ClusterClient::new(channel);
        let asked = tokio::time::timeout(
            Duration::from_millis(500),
            client.list_controllers(pb::Empty {}),
        )
        .await;
        match asked {
            Ok(Ok(list)) => {
                let list = list.into_inner();
                let leader = list
                    .controllers
                    .iter()
                    .find(|m| m.raft_id == list.leader_id && list.leader_id != 0);
                if let Some(i) = leader.and_then(|m| endpoints.iter().position(|e| *e == m.address))
                {
                    return Some(i);
                }
            }
            Ok(Err(status))
                if status.code() == tonic::Code::Unimplemented && endpoints.len() == 1 =>
            {
                return Some(0);
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_us(&s, 0.5), 50);
        assert_eq!(percentile_us(&s, 0.99), 99);
        assert_eq!(percentile_us(&s, 1.0), 100);
        assert_eq!(percentile_us(&[7], 0.99), 7);
        assert_eq!(percentile_us(&[], 0.5), 0);
    }

    #[test]
    fn values_have_the_size_asked_and_differ() {
        let a = value_of(256, 1);
        let b = value_of(256, 2);
        assert_eq!(a.len(), 256);
        assert_ne!(a, b);
        assert!(a.is_ascii());
    }

    #[test]
    fn etcd_messages_encode_as_etcd_expects() {
        use prost::Message;
        // PutRequest{key:"k", value:"v"}: field 1 and 2, length-delimited.
        let bytes = etcd::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        }
        .encode_to_vec();
        assert_eq!(bytes, vec![0x0a, 1, b'k', 0x12, 1, b'v']);
        // A RangeResponse with a header and one kv, fields the decoder
        // does not know (create_revision, count) skipped.
        let mut wire = Vec::new();
        wire.extend([0x0a, 2, 0x10, 7]); // header { member_id: 7 }
        wire.extend([0x12, 8, 0x0a, 1, b'k', 0x10, 3, 0x2a, 1, b'v']); // kvs
        wire.extend([0x20, 1]); // count: 1
        let r = etcd::RangeResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(r.header.unwrap().member_id, 7);
        assert_eq!(r.kvs[0].value, b"v");
    }
}
