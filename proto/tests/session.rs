//! End-to-end plumbing test: a tonic Dispatcher server and client in one
//! process over loopback TCP, exchanging hello → accepted, heartbeats, and an
//! assignment set down the same session stream. Plain TCP on 127.0.0.1; mTLS
//! is exercised once the controller issues certificates.

use std::pin::Pin;
use std::time::Duration;

use gantry_proto::PROTOCOL_VERSION;
use gantry_proto::v1::dispatcher_client::DispatcherClient;
use gantry_proto::v1::dispatcher_server::{Dispatcher, DispatcherServer};
use gantry_proto::v1::{
    AgentMessage, AssignmentSet, ControllerMessage, Heartbeat, Hello, Platform, Resources,
    SessionAccepted, agent_message, controller_message,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Every wait in this test is bounded, so a broken stream fails the test
/// instead of hanging it.
const LIMIT: Duration = Duration::from_secs(10);

/// A toy dispatcher: accepts a hello with the right protocol version, and
/// after the third heartbeat sends a full, empty assignment set.
struct ToyDispatcher;

type ControllerStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Dispatcher for ToyDispatcher {
    type SessionStream = ControllerStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("session closed before hello"))?;
        let hello = match first.message {
            Some(agent_message::Message::Hello(hello)) => hello,
            _ => return Err(Status::invalid_argument("first message must be hello")),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} not supported",
                hello.protocol_version
            )));
        }
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let send = |m| ControllerMessage { message: Some(m) };
            let accepted = controller_message::Message::Accepted(SessionAccepted {
                session_id: format!("s-{}", hello.node_id),
                heartbeat_period_ms: 100,
                lease_ms: 500,
                protocol_version: PROTOCOL_VERSION,
                controllers: Vec::new(),
            });
            if tx.send(Ok(send(accepted))).await.is_err() {
                return;
            }
            while let Ok(Some(msg)) = inbound.message().await {
                if let Some(agent_message::Message::Heartbeat(Heartbeat { sequence: 3 })) =
                    msg.message
                {
                    let set = controller_message::Message::Assignments(AssignmentSet {
                        generation: 1,
                        full: true,
                        changes: vec![],
                    });
                    if tx.send(Ok(send(set))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn start_server() -> (String, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(DispatcherServer::new(ToyDispatcher))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            })
            .await
            .expect("server runs");
    });
    (format!("http://{addr}"), stop_tx, server)
}

fn hello(protocol_version: u32) -> AgentMessage {
    AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            node_id: "n1".into(),
            hostname: "host-1".into(),
            address: "127.0.0.1:7946".into(),
            resources: Some(Resources {
                nano_cpus: 2_000_000_000,
                memory_bytes: 1 << 30,
            }),
            labels: [("zone".to_string(), "eu".to_string())].into(),
            platform: Some(Platform {
                os: "linux".into(),
                arch: "amd64".into(),
            }),
            protocol_version,
            last_generation: 0,
        })),
    }
}

#[tokio::test]
async fn session_exchanges_hello_accept_heartbeats_and_assignments() {
    let (url, stop, server) = start_server().await;
    let mut client = tokio::time::timeout(LIMIT, DispatcherClient::connect(url))
        .await
        .expect("connects in time")
        .expect("connects");

    let (tx, rx) = mpsc::channel(8);
    tx.send(hello(PROTOCOL_VERSION)).await.expect("queue hello");
    let mut inbound = tokio::time::timeout(LIMIT, client.session(ReceiverStream::new(rx)))
        .await
        .expect("session opens in time")
        .expect("session opens")
        .into_inner();

    let first = tokio::time::timeout(LIMIT, inbound.message())
        .await
        .expect("accepted in time")
        .expect("stream ok")
        .expect("a message");
    match first.message {
        Some(controller_message::Message::Accepted(a)) => {
            assert_eq!(a.session_id, "s-n1");
            assert_eq!((a.heartbeat_period_ms, a.lease_ms), (100, 500));
            assert_eq!(a.protocol_version, PROTOCOL_VERSION);
        }
        other => panic!("expected accepted, got {other:?}"),
    }

    for sequence in 1..=3 {
        let beat = AgentMessage {
            message: Some(agent_message::Message::Heartbeat(Heartbeat { sequence })),
        };
        tx.send(beat).await.expect("queue heartbeat");
    }
    let second = tokio::time::timeout(LIMIT, inbound.message())
        .await
        .expect("assignments in time")
        .expect("stream ok")
        .expect("a message");
    assert_eq!(
        second.message,
        Some(controller_message::Message::Assignments(AssignmentSet {
            generation: 1,
            full: true,
            changes: vec![],
        }))
    );

    // The agent hangs up: the server's side of the stream ends too.
    drop(tx);
    let end = tokio::time::timeout(LIMIT, inbound.message())
        .await
        .expect("end in time")
        .expect("stream ends cleanly");
    assert_eq!(end, None);

    let _ = stop.send(());
    tokio::time::timeout(LIMIT, server)
        .await
        .expect("server stops in time")
        .expect("server task");
}

#[tokio::test]
async fn session_with_wrong_protocol_version_is_refused_by_status() {
    let (url, stop, server) = start_server().await;
    let mut client = tokio::time::timeout(LIMIT, DispatcherClient::connect(url))
        .await
        .expect("connects in time")
        .expect("connects");
    let outbound = tokio_stream::iter(vec![hello(PROTOCOL_VERSION + 1)]);
    let status = tokio::time::timeout(LIMIT, client.session(outbound))
        .await
        .expect("answer in time")
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("protocol version 2"), "{status}");

    let _ = stop.send(());
    tokio::time::timeout(LIMIT, server)
        .await
        .expect("server stops in time")
        .expect("server task");
}

#[tokio::test]
async fn session_must_start_with_hello() {
    let (url, stop, server) = start_server().await;
    let mut client = tokio::time::timeout(LIMIT, DispatcherClient::connect(url))
        .await
        .expect("connects in time")
        .expect("connects");
    let beat = AgentMessage {
        message: Some(agent_message::Message::Heartbeat(Heartbeat { sequence: 1 })),
    };
    let status = tokio::time::timeout(LIMIT, client.session(tokio_stream::iter(vec![beat])))
        .await
        .expect("answer in time")
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let _ = stop.send(());
    tokio::time::timeout(LIMIT, server)
        .await
        .expect("server stops in time")
        .expect("server task");
}
