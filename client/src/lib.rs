//! The Roster client SDK: publish and subscribe over QUIC
