//! The CRI v1 gRPC edge: protocol types stop here. Each layer's error maps to a gRPC code
//! in this module and nowhere else.

mod containers;
pub mod image;
pub mod runtime;
mod stats;
mod streaming;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::cni::CniError;
use crate::config::Config;
use crate::containers::Containers;
use crate::events::EventsServer;
use crate::image::{ImageError, Puller, Store};
use crate::pods::{PodError, Pods};
use crate::shim_client::ShimLauncher;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("image store {path}: {source}")]
    Store { path: PathBuf, source: ImageError },
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("streaming server: {0}")]
    Streaming(String),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Events(#[from] crate::events::EventsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub(crate) fn pod_status(e: PodError) -> Status {
    let code = match &e {
        PodError::UnknownHandler { .. }
        | PodError::HostNamespace(_)
        | PodError::CgroupParent { .. } => Code::InvalidArgument,
        PodError::Cni(CniError::NoConfig(_) | CniError::BadConfig { .. }) => {
            Code::FailedPrecondition
        }
        PodError::Cni(_) | PodError::Shim(_) => Code::Unknown,
        PodError::Netns(_) | PodError::Bundle { .. } | PodError::Record(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

pub(crate) fn image_status(e: ImageError) -> Status {
    let code = match &e {
        ImageError::NotFound(_) | ImageError::NoPlatform { .. } => Code::NotFound,
        ImageError::InvalidReference { .. } => Code::InvalidArgument,
        ImageError::RegistryRejected(_) => Code::PermissionDenied,
        ImageError::Registry { .. } => Code::Unavailable,
        ImageError::Digest { .. } | ImageError::Verification { .. } => Code::DataLoss,
        ImageError::UnsupportedMediaType(_)
        | ImageError::Malformed { .. }
        | ImageError::UnsafePath { .. } => Code::FailedPrecondition,
        ImageError::Unpack { .. } | ImageError::Io { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// The shim binary: configured, else beside huskd, else `containerd-shim-husk-v2` on PATH.
fn shim_binary(config: &Config) -> PathBuf {
    const NAME: &str = "containerd-shim-husk-v2";
    if !config.shim.as_os_str().is_empty() {
        return config.shim.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(NAME)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| NAME.into())
}

/// Serves CRI on the configured socket until `shutdown` completes; removes the socket then.
/// `config_path` is the file the config came from: the shim reads the same file.
pub async fn serve(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let image_dir = config.image_dir();
    let store = Store::open(&image_dir).map_err(|source| ServeError::Store {
        path: image_dir.clone(),
        source,
    })?;
    let initramfs = config.guest_initramfs();
    if let Err(e) = crate::image::builtin::import(&store, &initramfs) {
        // Pods can still run images pulled from registries; a node whose initramfs is
        // missing cannot boot pods either, and says so then.
        warn!(image = crate::image::builtin::BUILTIN_IMAGE, error = %e, "built-in image not imported");
    }
    let puller = Puller::new(
        &config.registries,
        config.default_registry_policy,
        &config.mirrors,
    );
    let store = Arc::new(store);
    let images = image::Images::new(store.clone(), puller);
    let launcher = ShimLauncher {
        binary: shim_binary(&config),
        namespace: "k8s.io".into(),
        // The shim forwards its task events to `<address>.ttrpc` (crate::events). Its
        // fallback, a publish binary, is a no-op: huskd also learns exits from Wait.
        address: config.socket.display().to_string(),
        publish_binary: "/bin/true".into(),
        config: config_path,
    };
    let pods = Arc::new(Pods::new(&config, launcher.clone()));
    let containers = Arc::new(Containers::new(
        store,
        &config.state_dir,
        &config.data_dir,
        launcher,
    ));
    // The streaming server for Exec and PortForward (and later Attach).
    let stream_server = crate::streaming::server::StreamingServer::start(
        crate::streaming::server::ServerConfig {
            addr: config.stream_address,
            ..Default::default()
        },
        Arc::new(streaming::ShimBackend {
            containers: containers.clone(),
            pods: pods.clone(),
        }),
    )
    .await
    .map_err(|e| ServeError::Streaming(e.to_string()))?;
    // What an earlier huskd left running (its shims outlive it) is taken back first.
    pods.restore().await;
    containers.restore().await;
    if let Some(addr) = config.metrics_address {
        crate::metrics::serve(addr, pods.clone(), containers.clone())
            .await
            .map_err(|source| ServeError::Metrics { addr, source })?;
    }
    let runtime = runtime::Runtime::new(
        config.clone(),
        pods,
        containers.clone(),
        Arc::new(stream_server),
    );

    let socket = config.socket.clone();
    let sock_err = |source| ServeError::Socket {
        path: socket.clone(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
    }
    // After the restore, so an event queued in a shim while huskd was down finds its
    // container (the shim's publisher retries for about 15 s); before the CRI socket, so
    // a CRI socket that answers means huskd is whole.
    let events = EventsServer::start(&crate::events::socket_path(&socket), containers).await?;
    let bound = match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => UnixListener::bind(&socket),
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            events.stop().await;
            return Err(sock_err(e));
        }
    };
    info!(socket = %socket.display(), "huskd serving CRI v1");
    let r = tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(runtime))
        .add_service(ImageServiceServer::new(images))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&socket);
    events.stop().await;
    r?;
    Ok(())
}
