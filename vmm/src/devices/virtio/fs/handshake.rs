//! Connecting to virtiofsd and the vhost-user handshake that `Fs::new` runs before the
//! worker thread takes the connection over.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;

use super::FsError;
use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// Pause between connection attempts while virtiofsd may still be starting.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// vhost-user protocol features we use when virtiofsd has them: MQ to check it serves enough
/// queues, REPLY_ACK so a failed SET_* is reported instead of silently ignored, RESET_DEVICE to
/// support a guest-driven device reset. CONFIG is not used: the VMM builds config space itself.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Connects with retries: until `limit`, a missing socket file or a refused connection means
/// virtiofsd may still be starting.
pub(super) fn connect(path: &Path, limit: Duration) -> Result<UnixStream, FsError> {
    let deadline = Instant::now() + limit;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) => {
                return Err(FsError::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// SET_OWNER, features and protocol features. Returns virtiofsd's virtio features and the
/// protocol features both sides now use.
pub(super) fn handshake(
    frontend: &mut Frontend,
    num_queues: usize,
    fail: impl Fn(&'static str, vhost::Error) -> FsError,
) -> Result<(u64, VhostUserProtocolFeatures), FsError> {
    frontend.set_owner().map_err(|e| fail("SET_OWNER", e))?;
    let features = frontend
        .get_features()
        .map_err(|e| fail("GET_FEATURES", e))?;
    // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE, and rings would start on the
    // first kick; virtiofsd always offers it.
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(FsError::MissingBackendFeature(
            "VHOST_USER_F_PROTOCOL_FEATURES",
        ));
    }
    // We offer VERSION_1 to the guest, so virtiofsd must accept it in SET_FEATURES.
    if features & VIRTIO_F_VERSION_1 == 0 {
        return Err(FsError::MissingBackendFeature("VIRTIO_F_VERSION_1"));
    }
    let offered = frontend
        .get_protocol_features()
        .map_err(|e| fail("GET_PROTOCOL_FEATURES", e))?;
    let protocol = offered & wanted_protocol_features();
    frontend
        .set_protocol_features(protocol)
        .map_err(|e| fail("SET_PROTOCOL_FEATURES", e))?;
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let max = frontend
            .get_queue_num()
            .map_err(|e| fail("GET_QUEUE_NUM", e))?;
        if num_queues as u64 > max {
            return Err(FsError::TooManyQueues {
                wanted: num_queues,
                max,
            });
        }
    } else if num_queues > 2 {
        // Without MQ a back end serves one request queue (plus hiprio).
        return Err(FsError::TooManyQueues {
            wanted: num_queues,
            max: 2,
        });
    }
    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        // From now on every SET_* waits for virtiofsd's verdict, so activation fails on the
        // message virtiofsd rejected rather than leaving the guest with a dead device.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    Ok((features, protocol))
}
