//! Counters kept per listener, for the statistics line and the metrics page.

/// TCP counters of one listener.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpStats {
    /// Connections open now.
    pub open: u64,
    /// Connections accepted since start.
    pub total: u64,
    /// Clients turned away (untrusted proxy, per-source limit).
    pub refused: u64,
    /// Backend connects that failed or timed out.
    pub failed: u64,
    /// Bytes client -> backend of closed connections.
    pub bytes_up: u64,
    /// Bytes backend -> client of closed connections.
    pub bytes_down: u64,
}

/// UDP counters of one listener.
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpStats {
    /// Datagrams client -> backend.
    pub datagrams_up: u64,
    /// Datagrams backend -> client.
    pub datagrams_down: u64,
    /// Bytes client -> backend.
    pub bytes_up: u64,
    /// Bytes backend -> client.
    pub bytes_down: u64,
    /// Datagrams dropped (truncated, no flow possible, send queue full).
    pub dropped: u64,
    /// Flows created since start.
    pub flows_total: u64,
}
