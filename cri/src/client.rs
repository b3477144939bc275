//! A CRI v1 client of a Unix socket (the generated `k8s-cri` stubs on a tonic channel): what
//! `huskctl` and the tests use to talk to huskd as kubelet and crictl do.

use std::path::Path;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub struct CriClient {
    pub rt: RuntimeServiceClient<Channel>,
    pub img: ImageServiceClient<Channel>,
}

/// A client of the CRI socket at `socket`; the connection is made at the first call (and
/// again after it breaks), so a server that restarts is reached again.
pub fn connect(socket: &Path) -> CriClient {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::]").connect_with_connector_lazy(
        tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }),
    );
    CriClient {
        rt: RuntimeServiceClient::new(channel.clone()),
        img: ImageServiceClient::new(channel),
    }
}
