//! The meta tier: cluster membership, leases and the slot table
