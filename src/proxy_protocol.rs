//! PROXY protocol (placeholder until the real module lands).
use std::net::SocketAddr;
/// Which header version to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}
/// The transport the header describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}
/// Largest header.
pub const MAX_ENCODED_LEN: usize = 108;
/// Encodes.
pub fn encode(_v: Version, _t: Transport, _s: SocketAddr, _d: SocketAddr, _o: &mut [u8; MAX_ENCODED_LEN]) -> usize {
    0
}
/// Addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addresses {
    /// Local.
    Local,
    /// Proxied.
    Proxied { src: SocketAddr, dst: SocketAddr, transport: Transport },
}
/// Header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub version: Version,
    pub addresses: Addresses,
}
/// Err.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    NotProxy,
}
impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not proxy")
    }
}
/// Parse.
pub fn parse(_b: &[u8]) -> Result<Option<Header>, ParseError> {
    Err(ParseError::NotProxy)
}
