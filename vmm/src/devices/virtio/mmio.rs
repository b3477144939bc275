//! MMIO transport: arrives next.
