//! The session tier: client connections, publish forwarding and subscriber push
