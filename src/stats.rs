//! Counters kept per listener, for the statistics line and the metrics page.

/// TCP counters of one listener.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpStats {
    /// Connections open now.
    pub open: u64,
    /// Connections accepted since start.
    pub total: u64,
    /// Clients turned away (untrusted proxy, per-source limit, access lists).
    pub refused: u64,
    /// Of those, the clients the access lists turned away.
    pub denied: u64,
    /// Backend connects that failed or timed out.
    pub failed: u64,
    /// Backend connects made from the client's address (`--transparent`).
    pub transparent: u64,
    /// Transparent forwards' connections that used the relay's address
    /// because client and backend differ in address family.
    pub transparent_fallbacks: u64,
    /// Bytes client -> backend of closed connections.
    pub bytes_up: u64,
    /// Bytes backend -> client of closed connections.
    pub bytes_down: u64,
}

/// Why a datagram received was not sent on (its label is in `metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Larger than the receive buffer (MSG_TRUNC): never forwarded cut.
    Truncated = 0,
    /// No flow to send it on: its flow socket could not be opened, or the
    /// flow was closed before its batch was sent.
    NoFlow = 1,
    /// The send failed (e.g. EMSGSIZE: too large for the other side's
    /// address family; a pending ICMP error such as ECONNREFUSED).
    SendError = 2,
    /// The socket's send buffer was full (EAGAIN).
    SendBufferFull = 3,
    /// The client is not allowed by the access lists.
    Denied = 4,
    /// A new client of a forward a reload removed: its flows run on, no
    /// new one opens.
    Removed = 5,
}

/// UDP counters of one direction of one listener. Every datagram received
/// is, once its batch is done, either sent or dropped for one reason:
/// `received = sent + dropped` (summed over reasons).
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpDirStats {
    /// Datagrams received (each datagram of a GRO buffer counts).
    pub received: u64,
    /// Datagrams the kernel accepted to send on.
    pub sent: u64,
    /// Payload bytes of the datagrams sent (a PROXY header not included).
    pub bytes_sent: u64,
    /// Datagrams dropped, by `DropReason as usize`.
    pub dropped: [u64; 6],
}

impl UdpDirStats {
    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    /// Counts `n` datagrams dropped for `reason`.
    pub fn add_dropped(&mut self, reason: DropReason, n: usize) {
        self.dropped[reason as usize] += n as u64;
    }
}

/// UDP counters of one listener.
#[derive(Clone, Copy, Debug, Default)]
pub struct UdpStats {
    /// Flows created since start.
    pub flows_total: u64,
    /// Flows whose socket binds the client's address and port (`--transparent`).
    pub flows_transparent: u64,
    /// Flows of a transparent forward that use the relay's address: client
    /// and backend differ in address family.
    pub transparent_fallbacks: u64,
    /// Client -> backend.
    pub up: UdpDirStats,
    /// Backend -> client.
    pub down: UdpDirStats,
}
