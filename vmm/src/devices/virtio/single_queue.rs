//! The event-loop side of the devices with one queue and an optional rate limiter
//! (virtio-blk, virtio-rng): their activation event, the queue's kick and the limiter's
//! timer are handled the same way, so the two devices share it.

use event_manager::{EventOps, Events};
use tracing::error;
use vmm_sys_util::epoll::EventSet;

use super::activation::DeviceActivation;
use crate::devices::guest_warn::guest_warn;
use crate::devices::rate_limiter::RateLimiter;

/// The event tokens of such a device.
pub const EV_ACTIVATE: u32 = 0;
pub const EV_QUEUE: u32 = 1;
pub const EV_RATE_LIMITER: u32 = 2;

/// A device that serves its one queue in `process_queue`, throttled by an optional limiter.
pub trait SingleQueueDevice {
    /// The device's name in logs ("virtio-blk").
    const NAME: &'static str;
    fn activation(&mut self) -> &mut DeviceActivation;
    fn limiter(&mut self) -> Option<&mut RateLimiter>;
    fn process_queue(&mut self);
}

/// `MutEventSubscriber::init` of such a device.
pub fn init<D: SingleQueueDevice>(dev: &mut D, ops: &mut EventOps) {
    dev.activation().init(ops);
    if let Some(l) = dev.limiter() {
        if let Err(e) = ops.add(Events::with_data(&*l, EV_RATE_LIMITER, EventSet::IN)) {
            error!("{}: cannot register the rate limiter: {e}", D::NAME);
        }
    }
}

/// `MutEventSubscriber::process` of such a device.
pub fn process<D: SingleQueueDevice>(dev: &mut D, events: Events, ops: &mut EventOps) {
    match events.data() {
        EV_ACTIVATE => {
            if dev.activation().on_event(ops) {
                // Requests the driver queued before the loop registered the queue.
                dev.process_queue();
            }
        }
        EV_QUEUE => {
            dev.activation().clear_queue_event(EV_QUEUE);
            dev.process_queue();
        }
        EV_RATE_LIMITER => {
            if let Some(l) = dev.limiter() {
                l.on_timer();
            }
            dev.process_queue();
        }
        other => guest_warn!("{}: unexpected event {other}", D::NAME),
    }
}
