//! The device's lifecycle as the driver steers it through the Status register: the
//! initialisation sequence (spec 3.1.1), feature acceptance, activation at DRIVER_OK, and
//! reset. Kept apart from the register decoding in the parent module, which only routes
//! Status writes here.

use std::io;
use std::sync::atomic::Ordering;

use tracing::{debug, error, info};
use vmm_sys_util::eventfd::EventFd;

use super::status::*;
use super::{MmioError, MmioTransport, QueueRegs, ACK_DRIVER, ACK_DRIVER_FEATURES};
use crate::devices::guest_warn::guest_warn;
use crate::devices::virtio::{Activation, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

impl MmioTransport {
    /// The Status register: the spec's initialisation sequence (3.1.1), one bit per write,
    /// each write carrying all the bits set before it.
    pub(super) fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            // The driver gave up on the device; it stays unusable until a reset.
            info!(
                status = format_args!("{value:#x}"),
                "virtio-mmio: driver marked the device FAILED"
            );
            self.device_status |= FAILED;
            return;
        }
        let current = self.device_status;
        if value == current {
            return;
        }
        if value & current != current {
            // Only a reset may clear bits.
            guest_warn!(
                current = format_args!("{current:#x}"),
                written = format_args!("{value:#x}"),
                "virtio-mmio: status write clearing bits ignored"
            );
            return;
        }
        let added = value & !current;
        match (current, added) {
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, DRIVER) => self.device_status = value,
            (ACK_DRIVER, FEATURES_OK) => self.features_ok(),
            (ACK_DRIVER_FEATURES, DRIVER_OK) => self.driver_ok(),
            _ => {
                guest_warn!(
                    current = format_args!("{current:#x}"),
                    written = format_args!("{value:#x}"),
                    "virtio-mmio: invalid status transition ignored"
                );
            }
        }
    }

    /// The driver is done choosing features. Accept them only if they are a subset of the
    /// offer and include VERSION_1 (a legacy driver on a modern transport); otherwise leave
    /// FEATURES_OK clear so the driver sees the refusal when it reads Status back.
    fn features_ok(&mut self) {
        let acked = self.acked_features;
        let refusal = match self.lock_device() {
            None => Some("device unavailable"),
            Some(_) if self.acked_unknown_page => Some("acked a feature past bit 63"),
            Some(_) if acked & VIRTIO_F_VERSION_1 == 0 => Some("VERSION_1 not acked"),
            Some(dev) if acked & !dev.avail_features() != 0 => Some("acked unoffered features"),
            Some(mut dev) => {
                dev.set_acked_features(acked);
                None
            }
        };
        match refusal {
            None => self.device_status |= FEATURES_OK,
            Some(reason) => {
                guest_warn!(
                    acked = format_args!("{acked:#x}"),
                    "virtio-mmio: FEATURES_OK refused: {reason}"
                );
            }
        }
    }

    fn driver_ok(&mut self) {
        match self.activate() {
            Ok(()) => {
                self.device_status |= DRIVER_OK;
                debug!(
                    device_type = self.device_type,
                    queues = self.queues.len(),
                    "virtio-mmio: device activated"
                );
            }
            Err(e) => {
                error!(
                    device_type = self.device_type,
                    "virtio-mmio: cannot activate device: {e}"
                );
                self.device_status |= DRIVER_OK;
                self.needs_reset();
            }
        }
    }

    /// Hands the device its queues. Every queue must be set up: the devices here use all
    /// of theirs, and starting one without a queue it expects would only fail later.
    fn activate(&mut self) -> Result<(), MmioError> {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, regs)| regs.to_queue(index, event_idx, &self.mem))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::EventFd)?;
        let mut dev = self.lock_device().ok_or(MmioError::Poisoned)?;
        if dev.is_activated() {
            return Err(MmioError::AlreadyActive);
        }
        dev.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            irq: self.irq.clone(),
        })
        .map_err(MmioError::Activate)
    }

    /// Marks the device broken. Spec 2.1.2: once DRIVER_OK is set, the driver learns about
    /// it through a config change interrupt.
    fn needs_reset(&mut self) {
        self.device_status |= DEVICE_NEEDS_RESET;
        if self.device_status & DRIVER_OK != 0 {
            if let Err(e) = self.irq.signal_config() {
                error!("virtio-mmio: cannot raise config interrupt: {e}");
            }
        }
    }

    /// A 0 written to Status. Linux does this before every probe, so a device that never
    /// ran just gets fresh transport state; a running one must stop first.
    fn reset(&mut self) {
        let stopped = match self.lock_device() {
            None => false,
            Some(mut dev) => !dev.is_activated() || dev.reset(),
        };
        if !stopped {
            // The device still owns the old queues; keep DRIVER_OK so nothing can be set
            // up or activated over them. Another reset attempt retries.
            guest_warn!(
                device_type = self.device_type,
                "virtio-mmio: device cannot be reset"
            );
            self.needs_reset();
            return;
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_page = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        // Kicks from before the reset must not reach the next activation's queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.irq.status.store(0, Ordering::SeqCst);
        self.config_generation = 0;
    }
}
