//! Activation and reset, one implementation for every device.
//!
//! The transport activates and resets a device on a vCPU thread, but the device's queue
//! eventfds belong to the VM's event loop. So [`DeviceActivation::activate`] keeps what the
//! driver set up and signals an eventfd; the loop's handler ([`DeviceActivation::on_event`])
//! then registers the queue eventfds. [`DeviceActivation::reset`] drops the active state and
//! retires its registered eventfds, which the next `on_event` removes from the loop: a reset
//! leaves no registration behind, and the driver may activate the device again (a guest
//! driver that re-initialises it, as the virtio spec allows).

use std::io;
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events};
use tracing::error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Activation, GuestMemory, IrqTrigger, Queue};

/// What the driver handed an active device.
pub struct Active {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub irq: IrqTrigger,
}

/// A device's activation state and its event-loop bookkeeping.
pub struct DeviceActivation {
    device: &'static str,
    activate_evt: EventFd,
    activate_data: u32,
    /// Event data for each queue's eventfd; its length is the device's queue count.
    queue_data: &'static [u32],
    pub(crate) active: Option<Active>,
    /// The active queue eventfds are registered in the event loop.
    registered: bool,
    /// Eventfds of an earlier activation still registered in the loop.
    retired: Vec<EventFd>,
}

impl DeviceActivation {
    /// For `device` (a name for logs) whose queue eventfds get `queue_data` as event data,
    /// and whose activation eventfd gets `activate_data`.
    pub fn new(
        device: &'static str,
        activate_data: u32,
        queue_data: &'static [u32],
    ) -> io::Result<DeviceActivation> {
        Ok(DeviceActivation {
            device,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            activate_data,
            queue_data,
            active: None,
            registered: false,
            retired: Vec::new(),
        })
    }

    /// Registers the activation eventfd; the device calls this from its subscriber `init`.
    pub fn init(&self, ops: &mut EventOps) {
        let ev = Events::with_data(&self.activate_evt, self.activate_data, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            error!("{}: cannot register the activate eventfd: {e}", self.device);
        }
    }

    /// Keeps what the driver set up and wakes the event loop. A second activation without a
    /// reset is refused (the transport only activates once per DRIVER_OK).
    pub fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::Backend(format!(
                "{}: already active (reset first)",
                self.device
            )));
        }
        let expected = self.queue_data.len();
        let got = [activation.queues.len(), activation.queue_evts.len()];
        if let Some(&got) = got.iter().find(|&&n| n != expected) {
            return Err(ActivateError::QueueCount { expected, got });
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            queue_evts: activation.queue_evts,
            irq: activation.irq,
        });
        self.registered = false;
        if let Err(e) = self.activate_evt.write(1) {
            self.active = None;
            return Err(ActivateError::Signal(e));
        }
        Ok(())
    }

    /// Stops the device; returns whether it was active. Its queue eventfds leave the loop
    /// at the next [`Self::on_event`], which this signals.
    pub fn reset(&mut self) -> bool {
        let Some(active) = self.active.take() else {
            return false;
        };
        if self.registered {
            self.retired.extend(active.queue_evts);
        }
        self.registered = false;
        if !self.retired.is_empty() {
            if let Err(e) = self.activate_evt.write(1) {
                // The stale registrations then go at the next activation's event.
                error!(
                    "{}: cannot signal the reset to the event loop: {e}",
                    self.device
                );
            }
        }
        true
    }

    /// Whether `data` is this state's activation event.
    pub fn is_activation_event(&self, data: u32) -> bool {
        data == self.activate_data
    }

    /// Unregisters the eventfd behind `events` if it belongs to an earlier activation (it
    /// fired before the loop got to the reset's signal); returns whether it did. Devices
    /// call this first in `process`, so a stale queue kick never reaches their queues.
    pub fn drop_if_retired(&mut self, events: &Events, ops: &mut EventOps) -> bool {
        let Some(pos) = self
            .retired
            .iter()
            .position(|e| e.as_raw_fd() == events.fd())
        else {
            return false;
        };
        let evt = self.retired.swap_remove(pos);
        if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
            error!("{}: cannot unregister a queue eventfd: {e}", self.device);
        }
        true
    }

    /// Handles the activation eventfd: removes retired eventfds from the loop and registers
    /// the active ones. Returns true when this made the device live (the device then
    /// registers its own back-end fds and looks at its queues once).
    pub fn on_event(&mut self, ops: &mut EventOps) -> bool {
        let _ = self.activate_evt.read();
        for evt in self.retired.drain(..) {
            if let Err(e) = ops.remove(Events::new(&evt, EventSet::IN)) {
                error!("{}: cannot unregister a queue eventfd: {e}", self.device);
            }
        }
        let Some(active) = self.active.as_ref() else {
            return false;
        };
        if self.registered {
            return false;
        }
        for (evt, &data) in active.queue_evts.iter().zip(self.queue_data) {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                error!("{}: cannot register a queue eventfd: {e}", self.device);
            }
        }
        self.registered = true;
        true
    }

    /// Clears the eventfd of the queue whose event data is `data` (level-triggered: it
    /// would wake the loop again).
    pub fn clear_queue_event(&self, data: u32) {
        let Some(active) = &self.active else { return };
        if let Some(i) = self.queue_data.iter().position(|&d| d == data) {
            // Nothing to read is fine: a spurious wake, or a test calling in directly.
            let _ = active.queue_evts[i].read();
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The queue eventfds registered in the loop right now (for tests).
    #[cfg(test)]
    pub fn registered_evts(&self) -> usize {
        let live = match (&self.active, self.registered) {
            (Some(a), true) => a.queue_evts.len(),
            _ => 0,
        };
        live + self.retired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_queue::QueueT;

    const EV_ACTIVATE: u32 = 7;
    const QUEUES: &[u32] = &[1, 2];

    /// A device that only activates, counting queue events by data.
    struct Dev {
        state: DeviceActivation,
        went_live: usize,
        kicks: Vec<u32>,
    }

    impl MutEventSubscriber for Dev {
        fn init(&mut self, ops: &mut EventOps) {
            self.state.init(ops);
        }
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            let data = events.data();
            if self.state.is_activation_event(data) {
                self.went_live += usize::from(self.state.on_event(ops));
            } else {
                self.state.clear_queue_event(data);
                self.kicks.push(data);
            }
        }
    }

    fn activation(n: usize) -> (Activation, Vec<EventFd>) {
        let evts: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let a = Activation {
            mem: guest_memory(0x10000),
            queues: (0..n).map(|_| Queue::new(16).unwrap()).collect(),
            queue_evts: evts,
            irq: IrqTrigger::new().unwrap(),
        };
        (a, kicks)
    }

    #[test]
    fn activate_reset_activate_leaves_only_the_live_registrations() {
        let mut em = EventManager::<Dev>::new().unwrap();
        let id = em.add_subscriber(Dev {
            state: DeviceActivation::new("test", EV_ACTIVATE, QUEUES).unwrap(),
            went_live: 0,
            kicks: Vec::new(),
        });
        let (a, first_kicks) = activation(2);
        em.subscriber_mut(id).unwrap().state.activate(a).unwrap();
        em.run_with_timeout(100).unwrap();
        let dev = em.subscriber_mut(id).unwrap();
        assert_eq!(dev.went_live, 1);
        assert_eq!(dev.state.registered_evts(), 2);
        first_kicks[1].write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        assert_eq!(em.subscriber_mut(id).unwrap().kicks, vec![2]);

        assert!(em.subscriber_mut(id).unwrap().state.reset());
        em.run_with_timeout(100).unwrap();
        let dev = em.subscriber_mut(id).unwrap();
        assert_eq!(dev.state.registered_evts(), 0, "a reset left registrations");
        assert!(!dev.state.is_active());
        assert!(!dev.state.reset(), "a second reset finds nothing active");

        let (a, kicks) = activation(2);
        dev.state.activate(a).unwrap();
        em.run_with_timeout(100).unwrap();
        // The old eventfds no longer reach the device; the new ones do.
        first_kicks[0].write(1).unwrap();
        kicks[0].write(1).unwrap();
        em.run_with_timeout(100).unwrap();
        let dev = em.subscriber_mut(id).unwrap();
        assert_eq!(dev.went_live, 2);
        assert_eq!(dev.kicks, vec![2, 1]);
        assert_eq!(dev.state.registered_evts(), 2);
    }

    #[test]
    fn wrong_queue_counts_and_double_activation_are_refused() {
        let mut state = DeviceActivation::new("test", EV_ACTIVATE, QUEUES).unwrap();
        let (mut a, _) = activation(2);
        a.queue_evts.pop();
        let err = state.activate(a).unwrap_err();
        assert!(
            matches!(
                err,
                ActivateError::QueueCount {
                    expected: 2,
                    got: 1
                }
            ),
            "{err}"
        );
        assert!(!state.is_active());
        state.activate(activation(2).0).unwrap();
        assert!(state.active.as_ref().unwrap().queues[0].max_size() == 16);
        let err = state.activate(activation(2).0).unwrap_err();
        assert!(err.to_string().contains("already active"), "{err}");
    }
}
