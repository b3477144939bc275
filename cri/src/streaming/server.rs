//! The streaming HTTP server: hands out URLs for Exec/Attach/PortForward requests and
//! serves them (kubelet's `pkg/kubelet/cri/streaming` server semantics).
//!
//! Routes `/exec/{token}`, `/attach/{token}`, `/portforward/{token}`, GET or POST. The
//! token is taken (single use) before anything else; an unknown, used or expired token is a
//! 404. Then the upgrade: `Upgrade: SPDY/3.1` with `X-Stream-Protocol-Version` negotiation,
//! or `Upgrade: websocket` with `Sec-WebSocket-Protocol` negotiation; no common protocol is
//! a 403 naming what the server accepts.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderValue, CONNECTION, UPGRADE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::backend::{AttachRequest, ExecRequest, StreamBackend};
use super::portforward;
use super::remotecommand::{self, Command, Protocol};
use super::spdy::{Session, SessionConfig};
use super::tokens::{TokenCache, TokenError};
use super::websocket::{self, WsProtocol};
use super::ws_tunnel;

const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen; the default, 127.0.0.1 port 0, takes a free port on loopback.
    pub addr: SocketAddr,
    /// Host[:port] put in the URLs instead of the bound address (for a node IP).
    pub advertise: Option<String>,
    /// How long a client has to open its streams after the upgrade (kubelet: 30 s).
    pub stream_timeout: Duration,
    /// How long a token stays valid (kubelet: 1 min).
    pub token_ttl: Duration,
    /// Tokens in flight at most (kubelet: 1000).
    pub max_in_flight: usize,
    pub session: SessionConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            stream_timeout: Duration::from_secs(30),
            token_ttl: Duration::from_secs(60),
            max_in_flight: 1000,
            session: SessionConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// What a token stands for.
#[derive(Debug, Clone)]
enum Pending {
    Command(Command),
    PortForward { pod_sandbox_id: String },
}

struct State {
    tokens: TokenCache<Pending>,
    backend: Arc<dyn StreamBackend>,
    cfg: ServerConfig,
}

pub struct StreamingServer {
    state: Arc<State>,
    base_url: String,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for StreamingServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl StreamingServer {
    /// Binds and starts serving in the background.
    pub async fn start(
        cfg: ServerConfig,
        backend: Arc<dyn StreamBackend>,
    ) -> Result<Self, StreamingError> {
        let listener = TcpListener::bind(cfg.addr)
            .await
            .map_err(|e| StreamingError::Bind(cfg.addr, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StreamingError::Bind(cfg.addr, e))?;
        let host = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
        let state = Arc::new(State {
            tokens: TokenCache::new(cfg.token_ttl, cfg.max_in_flight),
            backend,
            cfg,
        });
        info!(%addr, "streaming server listening");
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Self {
            state,
            base_url: format!("http://{host}"),
            addr,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL for an ExecRequest (validated as kubelet does).
    pub fn exec_url(&self, req: ExecRequest) -> Result<String, StreamingError> {
        if req.cmd.is_empty() {
            return Err(StreamingError::Invalid("cmd must not be empty"));
        }
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.url("exec", Pending::Command(Command::Exec(req)))
    }

    pub fn attach_url(&self, req: AttachRequest) -> Result<String, StreamingError> {
        check_streams(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.url("attach", Pending::Command(Command::Attach(req)))
    }

    pub fn port_forward_url(&self, pod_sandbox_id: &str) -> Result<String, StreamingError> {
        if pod_sandbox_id.is_empty() {
            return Err(StreamingError::Invalid("pod sandbox id must not be empty"));
        }
        self.url(
            "portforward",
            Pending::PortForward {
                pod_sandbox_id: pod_sandbox_id.to_string(),
            },
        )
    }

    fn url(&self, route: &str, p: Pending) -> Result<String, StreamingError> {
        let token = self.state.tokens.insert(p)?;
        Ok(format!("{}/{route}/{token}", self.base_url))
    }
}

fn check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), StreamingError> {
    if tty && stderr {
        return Err(StreamingError::Invalid(
            "tty and stderr cannot both be true",
        ));
    }
    if !stdin && !stdout && !stderr {
        return Err(StreamingError::Invalid(
            "one of stdin, stdout, or stderr must be specified",
        ));
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "streaming: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, state).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "streaming: connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<String> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    if status.is_client_error() || status.is_server_error() {
        // A refused client gets no second try on this connection (hyper closes it after
        // the response): a token guesser must reconnect for every guess.
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn header_values<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

fn upgrade_kind(h: &HeaderMap) -> Option<String> {
    let conn_upgrade = header_values(h, CONNECTION.as_str())
        .iter()
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !conn_upgrade {
        return None;
    }
    h.get(UPGRADE)?
        .to_str()
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
}

async fn route(mut req: Request<hyper::body::Incoming>, state: Arc<State>) -> Response<String> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST");
    }
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (route, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !matches!(route, "exec" | "attach" | "portforward")
        || token.is_empty()
        || token.contains('/')
    {
        return text(StatusCode::NOT_FOUND, "not found");
    }
    let pending = match state.tokens.take(token) {
        Some(p) => p,
        None => {
            debug!(route, "streaming: unknown, used or expired token");
            return text(StatusCode::NOT_FOUND, "unknown or expired token");
        }
    };
    let route_matches = matches!(
        (&pending, route),
        (Pending::Command(Command::Exec(_)), "exec")
            | (Pending::Command(Command::Attach(_)), "attach")
            | (Pending::PortForward { .. }, "portforward")
    );
    if !route_matches {
        return text(StatusCode::NOT_FOUND, "unknown or expired token");
    }
    let Some(kind) = upgrade_kind(req.headers()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "streaming needs a connection upgrade (SPDY/3.1 or websocket)",
        );
    };
    match kind.as_str() {
        "spdy/3.1" => upgrade_spdy(&mut req, pending, state),
        "websocket" => upgrade_websocket(&mut req, pending, state),
        other => text(
            StatusCode::BAD_REQUEST,
            format!("unsupported upgrade {other:?}"),
        ),
    }
}

fn upgrade_spdy(
    req: &mut Request<hyper::body::Incoming>,
    pending: Pending,
    state: Arc<State>,
) -> Response<String> {
    let offered = header_values(req.headers(), STREAM_PROTOCOL_HEADER);
    // Which version name goes back (None: the client offered nothing, so nothing is echoed).
    let chosen: Result<Option<String>, String> = match &pending {
        Pending::Command(_) => {
            if offered.is_empty() {
                Ok(None)
            } else {
                remotecommand::negotiate(offered.iter().copied())
                    .map(|p| Some(p.name().to_string()))
                    .ok_or_else(|| {
                        Protocol::SPDY
                            .iter()
                            .map(|p| p.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
            }
        }
        Pending::PortForward { .. } => {
            let ok = offered
                .iter()
                .flat_map(|v| v.split(','))
                .any(|v| v.trim() == portforward::PROTOCOL);
            if offered.is_empty() {
                Ok(None)
            } else if ok {
                Ok(Some(portforward::PROTOCOL.to_string()))
            } else {
                Err(portforward::PROTOCOL.to_string())
            }
        }
    };
    let chosen = match chosen {
        Ok(c) => c,
        Err(accepts) => {
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts [{accepts}]"
                ),
            )
        }
    };
    let proto = chosen
        .as_deref()
        .and_then(Protocol::from_name)
        .unwrap_or(Protocol::V1);
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                debug!(error = %e, "streaming: upgrade failed");
                return;
            }
        };
        let session = Session::start(io, state.cfg.session.clone());
        let timeout = state.cfg.stream_timeout;
        match pending {
            Pending::Command(cmd) => {
                if let Err(e) =
                    remotecommand::serve_spdy(session, proto, cmd, state.backend.clone(), timeout)
                        .await
                {
                    debug!(error = %e, "streaming: exec session ended early");
                }
            }
            Pending::PortForward { pod_sandbox_id } => {
                portforward::serve_spdy(session, pod_sandbox_id, state.backend.clone(), timeout)
                    .await
            }
        }
    });
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if let Some(c) = chosen.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(STREAM_PROTOCOL_HEADER, c);
    }
    r
}

fn upgrade_websocket(
    req: &mut Request<hyper::body::Incoming>,
    pending: Pending,
    state: Arc<State>,
) -> Response<String> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    if req
        .headers()
        .get("sec-websocket-version")
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return text(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13");
    }
    let offered: Vec<String> = header_values(req.headers(), "sec-websocket-protocol")
        .into_iter()
        .map(String::from)
        .collect();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let cmd = match pending {
        Pending::Command(cmd) => cmd,
        Pending::PortForward { pod_sandbox_id } => {
            let tunnel = offered
                .iter()
                .flat_map(|v| v.split(','))
                .any(|p| p.trim() == ws_tunnel::PROTOCOL);
            if !tunnel {
                return text(
                    StatusCode::FORBIDDEN,
                    format!(
                        "unable to upgrade: client supports {offered:?}, server accepts [{}]",
                        ws_tunnel::PROTOCOL
                    ),
                );
            }
            let on_upgrade = hyper::upgrade::on(req);
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(u) => {
                        ws_tunnel::serve_port_forward(
                            TokioIo::new(u),
                            pod_sandbox_id,
                            state.backend.clone(),
                            state.cfg.session.clone(),
                            state.cfg.stream_timeout,
                        )
                        .await
                    }
                    Err(e) => debug!(error = %e, "streaming: websocket upgrade failed"),
                }
            });
            return ws_switching(&accept, Some(ws_tunnel::PROTOCOL));
        }
    };
    let Some(proto) = WsProtocol::negotiate(offered.iter().map(String::as_str)) else {
        let accepts: Vec<_> = WsProtocol::ALL.iter().map(|p| p.name()).collect();
        return text(
            StatusCode::FORBIDDEN,
            format!("unable to upgrade: client supports {offered:?}, server accepts {accepts:?}"),
        );
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(u) => {
                websocket::serve_exec(
                    TokioIo::new(u),
                    proto.unwrap_or(WsProtocol::V1),
                    cmd,
                    state.backend.clone(),
                )
                .await
            }
            Err(e) => debug!(error = %e, "streaming: websocket upgrade failed"),
        }
    });
    ws_switching(&accept, proto.map(WsProtocol::name))
}

fn ws_switching(accept: &str, protocol: Option<&'static str>) -> Response<String> {
    let mut r = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let h = r.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert("sec-websocket-accept", v);
    }
    if let Some(p) = protocol {
        h.insert("sec-websocket-protocol", HeaderValue::from_static(p));
    }
    r
}
