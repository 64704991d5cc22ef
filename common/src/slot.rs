//! The slot function: which slot a service lives in.
//!
//! `slot = crc32c(canonical service id text) % slot_count`. CRC-32C (Castagnoli, the iSCSI
//! polynomial) is fixed and documented so every process, version and language agrees.

use crate::ids::{ServiceId, SlotId};

/// The slot count of a new cluster. Fixed when the cluster is created.
pub const DEFAULT_SLOT_COUNT: u32 = 256;

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// The slot `service` lives in, for a cluster of `slot_count` slots.
pub fn slot_of(service: &ServiceId, slot_count: u32) -> SlotId {
    debug_assert!(slot_count > 0);
    crc32c(service.as_str().as_bytes()) % slot_count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check value every CRC-32C implementation publishes.
    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    /// The vector `docs/PROTOCOL.md` gives for implementers in other languages.
    #[test]
    fn documented_slot_vector() {
        let demo: ServiceId = "demo".parse().unwrap();
        assert_eq!(crc32c(b"default/DEFAULT/demo"), DEMO_CRC);
        assert_eq!(slot_of(&demo, 256), DEMO_CRC % 256);
        assert_eq!(slot_of(&demo, 256), DEMO_SLOT);
    }

    const DEMO_CRC: u32 = 0x46BC_136A;
    const DEMO_SLOT: u32 = 106;
}
