//! The VMM's side of the control API: the socket server and the trait the VMM implements
//! behind it. The protocol, its types and the client are in `husk_vmm_api` (re-exported
//! here), which the VMM's parent links without linking the VMM.
//!
//! [`ApiServer`] owns the socket and the protocol: framing, fds, JSON, argument checks
//! ([`Request::validate`]). The VMM owns the logic: it implements [`ApiHandler`], and the server
//! calls it once per well-formed request, on the event-loop thread (the server is an
//! `event_manager::MutEventSubscriber`, so it never blocks the loop).
//!
//! The server never removes its socket file (under seccomp and in a jail it could not): register
//! the path with `crate::cleanup`, or let the next `ApiServer::bind` replace it as stale.

mod server;
#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;

pub use husk_vmm_api::*;
pub use server::ApiServer;

/// The VMM's side of the API: called once per well-formed request, on the event-loop thread.
///
/// `fds` are the descriptors passed with the request (only `add_net` with `tap_fd` gets any;
/// [`Request::validate`] has checked the index). Whatever the handler does not keep is closed
/// when it returns. The handler should answer quickly: the event loop waits for it.
pub trait ApiHandler {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response;
}

impl<T: ApiHandler + ?Sized> ApiHandler for Box<T> {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response {
        (**self).handle(req, fds)
    }
}

impl<T: ApiHandler + ?Sized> ApiHandler for &mut T {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response {
        (**self).handle(req, fds)
    }
}

/// For a VMM shared with other event-loop subscribers or threads.
impl<T: ApiHandler + ?Sized> ApiHandler for std::sync::Arc<std::sync::Mutex<T>> {
    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Response {
        match self.lock() {
            Ok(mut handler) => handler.handle(req, fds),
            Err(_) => Response::error(
                "internal error: the VMM's state is poisoned by an earlier panic; stop this VM",
            ),
        }
    }
}
