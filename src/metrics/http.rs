//! HTTP/1.0 for the metrics server, with no sockets: where a request head
//! ends, what it asks for, the responses, and reading a head or writing a
//! response over any non-blocking `Read`/`Write`.

use std::io::{self, Read, Write};

/// The longest request head (request line and headers) read; a longer
/// one is answered 400. Prometheus sends about 300 bytes.
pub(super) const MAX_HEAD: usize = 8 << 10;
/// Bytes a client sent past its request head that are read and dropped
/// before a close, so that the close sends FIN rather than RST.
const DRAIN: usize = 16 << 10;

/// What a request head gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answer {
    /// `GET /metrics` or `GET /`: the page.
    Page,
    /// An error response.
    Refuse(Refusal),
}

/// Why a request does not get the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// 400: a malformed or oversized head.
    BadRequest,
    /// 404: a path that is not served.
    NotFound,
    /// 405: a method other than GET on a served path.
    MethodNotAllowed,
}

impl Refusal {
    /// The whole response.
    pub(super) fn response(self) -> Vec<u8> {
        match self {
            Refusal::BadRequest => error_response(400, "Bad Request", ""),
            Refusal::NotFound => error_response(404, "Not Found", ""),
            Refusal::MethodNotAllowed => error_response(405, "Method Not Allowed", "Allow: GET\r\n"),
        }
    }
}

/// What reading a request head came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeadRead {
    /// The head is incomplete; wait for more.
    More,
    /// The head is complete (or too long): answer it.
    Done(Answer),
    /// The client closed or failed before its head was complete.
    Gone,
}

/// What writing a response came to.
pub(super) enum WriteEnd {
    /// All of it is out.
    Done,
    /// The socket is full; its next writable edge continues.
    Blocked,
    /// The turn's budget is spent; the ready list continues.
    Budget,
    /// The socket failed.
    Failed(io::Error),
}

/// The head of a 200 response with a metrics page of `len` bytes.
pub(super) fn page_head(len: usize) -> String {
    format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

/// A whole error response, with a one-line body; `extra` holds header lines.
pub(super) fn error_response(code: u16, reason: &str, extra: &str) -> Vec<u8> {
    let body = format!("{code} {reason}\n");
    format!(
        "HTTP/1.0 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads what `sock` has into `buf` until the head is complete, the socket
/// is empty, or `MAX_HEAD` is reached (then the answer is 400).
pub(super) fn read_head(sock: &mut impl Read, buf: &mut Vec<u8>) -> HeadRead {
    let mut chunk = [0u8; 2048];
    loop {
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        if room == 0 {
            return HeadRead::Done(Answer::Refuse(Refusal::BadRequest));
        }
        match sock.read(&mut chunk[..room]) {
            Ok(0) => return HeadRead::Gone,
            Ok(n) => {
                let from = buf.len();
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = head_end(buf, from) {
                    return HeadRead::Done(answer(&buf[..end]));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HeadRead::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return HeadRead::Gone,
        }
    }
}

/// The length of the head in `buf`, through the blank line that ends it
/// (CRLF or bare LF), looking only at the bytes from `from` on (and the two
/// before, which may start the terminator).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    buf[start..].windows(2).enumerate().find_map(|(i, w)| match w {
        b"\n\n" => Some(start + i + 2),
        b"\n\r" if buf.get(start + i + 2) == Some(&b'\n') => Some(start + i + 3),
        _ => None,
    })
}

/// What a complete request head (HTTP/1.0 or 1.1) asks for.
fn answer(head: &[u8]) -> Answer {
    // A server should ignore an empty line before the request line.
    let head = head.strip_prefix(b"\r\n").or_else(|| head.strip_prefix(b"\n")).unwrap_or(head);
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut request = lines.next().unwrap_or_default().split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (request.next(), request.next(), request.next(), request.next())
    else {
        return Answer::Refuse(Refusal::BadRequest);
    };
    let target_ok = target.first() == Some(&b'/') || target.starts_with(b"http://");
    if method.is_empty()
        || !method.iter().all(|&b| is_tchar(b))
        || !target_ok
        || !target.iter().all(u8::is_ascii_graphic)
        || !matches!(version, b"HTTP/1.0" | b"HTTP/1.1")
    {
        return Answer::Refuse(Refusal::BadRequest);
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Answer::Refuse(Refusal::BadRequest);
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) || value.iter().any(|&b| is_ctl(b) && b != b'\t') {
            return Answer::Refuse(Refusal::BadRequest);
        }
    }
    // Absolute form (http://host/path) names the same paths.
    let path = match target.strip_prefix(b"http://") {
        Some(rest) => &rest[rest.iter().position(|&b| b == b'/').unwrap_or(rest.len())..],
        None => target,
    };
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    if !matches!(path, b"/metrics" | b"/" | b"") {
        return Answer::Refuse(Refusal::NotFound);
    }
    if method != b"GET" {
        return Answer::Refuse(Refusal::MethodNotAllowed);
    }
    Answer::Page
}

/// A byte of an HTTP token (a method or a header name).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ctl(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// Writes `resp` from `*sent` until it is all out, the socket is full, or
/// `budget` bytes went out in this call.
pub(super) fn write_some(sock: &mut impl Write, resp: &[u8], sent: &mut usize, budget: usize) -> WriteEnd {
    let stop = resp.len().min(sent.saturating_add(budget));
    while *sent < stop {
        match sock.write(&resp[*sent..stop]) {
            Ok(0) => return WriteEnd::Failed(io::ErrorKind::WriteZero.into()),
            Ok(n) => *sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WriteEnd::Blocked,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return WriteEnd::Failed(e),
        }
    }
    if *sent == resp.len() { WriteEnd::Done } else { WriteEnd::Budget }
}

/// Reads and drops up to `DRAIN` bytes the client sent beyond its head.
pub(super) fn drain(sock: &mut impl Read) {
    let mut buf = [0u8; 4096];
    let mut left = DRAIN;
    while left > 0 {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_the_first_blank_line_however_it_arrives() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nextra";
        let full = req.len() - b"extra".len();
        for step in [1, 2, 3, 7, req.len()] {
            let mut buf = Vec::new();
            let mut end = None;
            for piece in req.chunks(step) {
                let from = buf.len();
                buf.extend_from_slice(piece);
                end = end.or(head_end(&buf, from));
            }
            assert_eq!(end, Some(full), "{step}-byte pieces");
        }
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nA: b\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r", 0), None);
        assert_eq!(head_end(b"", 0), None);
    }

    #[test]
    fn only_get_of_the_metrics_paths_gets_the_page() {
        use Answer::Page;
        const BAD: Answer = Answer::Refuse(Refusal::BadRequest);
        const NOT_FOUND: Answer = Answer::Refuse(Refusal::NotFound);
        const NOT_ALLOWED: Answer = Answer::Refuse(Refusal::MethodNotAllowed);
        let cases: [(&[u8], Answer); 21] = [
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n", Page),
            (b"GET / HTTP/1.0\r\n\r\n", Page),
            (b"\r\nGET /metrics?a=b HTTP/1.0\n\n", Page),
            (b"GET http://x:9100/metrics HTTP/1.1\r\n\r\n", Page),
            (b"GET /metrics HTTP/1.1\r\nX-Obs: caf\xc3\xa9\tok\r\n\r\n", Page),
            (b"GET /metricsx HTTP/1.1\r\n\r\n", NOT_FOUND),
            (b"GET /favicon.ico HTTP/1.1\r\n\r\n", NOT_FOUND),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n", NOT_ALLOWED),
            (b"HEAD / HTTP/1.1\r\n\r\n", NOT_ALLOWED),
            (b"get /metrics HTTP/1.1\r\n\r\n", NOT_ALLOWED),
            (b"GET /metrics\r\n\r\n", BAD),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", BAD),
            (b"GET /metrics HTTP/2.0\r\n\r\n", BAD),
            (b"GET metrics HTTP/1.1\r\n\r\n", BAD),
            (b"GET /met\x00rics HTTP/1.1\r\n\r\n", BAD),
            (b"GET /metrics HTTP/1.1\r\nNo colon\r\n\r\n", BAD),
            (b"GET /metrics HTTP/1.1\r\n Folded: x\r\n\r\n", BAD),
            (b"GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n", BAD),
            (b"GET /metrics HTTP/1.1\r\nA: b\rc\r\n\r\n", BAD),
            (b"\xff\xfe\r\n\r\n", BAD),
            (b"\r\n\r\n", BAD),
        ];
        for (head, want) in cases {
            assert_eq!(answer(head), want, "{:?}", String::from_utf8_lossy(head));
        }
    }

    /// Hands out `data` at most `step` bytes a read, then WouldBlock (or EOF).
    struct Trickle {
        data: Vec<u8>,
        step: usize,
        eof: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return if self.eof { Ok(0) } else { Err(io::ErrorKind::WouldBlock.into()) };
            }
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn a_head_is_read_in_pieces_and_bounded() {
        // Arriving a few bytes per wake-up.
        let mut buf = Vec::new();
        let mut sock = Trickle { data: Vec::new(), step: 1, eof: false };
        for piece in b"GET /metrics HTTP/1.0\r\n\r".chunks(5) {
            sock.data.extend_from_slice(piece);
            assert_eq!(read_head(&mut sock, &mut buf), HeadRead::More);
        }
        sock.data.extend_from_slice(b"\n");
        assert_eq!(read_head(&mut sock, &mut buf), HeadRead::Done(Answer::Page));

        // A head that never ends is cut at MAX_HEAD.
        let mut long = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
        long.resize(3 * MAX_HEAD, b'a');
        let mut sock = Trickle { data: long, step: 1000, eof: false };
        let mut buf = Vec::new();
        assert_eq!(read_head(&mut sock, &mut buf), HeadRead::Done(Answer::Refuse(Refusal::BadRequest)));
        assert_eq!(buf.len(), MAX_HEAD);

        // The client leaves halfway.
        let mut sock = Trickle { data: b"GET /met".to_vec(), step: 3, eof: true };
        assert_eq!(read_head(&mut sock, &mut Vec::new()), HeadRead::Gone);
    }

    /// Takes `room` bytes at most `step` a write, then WouldBlock.
    struct Sink {
        got: Vec<u8>,
        room: usize,
        step: usize,
    }

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let n = data.len().min(self.step).min(self.room - self.got.len());
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.got.extend_from_slice(&data[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_response_goes_out_in_budgeted_pieces_as_the_socket_takes_it() {
        const BUDGET: usize = 64 << 10;
        let resp: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut sink = Sink { got: Vec::new(), room: usize::MAX, step: 10_000 };
        let mut sent = 0;
        let mut turns = 0;
        loop {
            turns += 1;
            match write_some(&mut sink, &resp, &mut sent, BUDGET) {
                WriteEnd::Budget => assert_eq!(sent, turns * BUDGET),
                WriteEnd::Done => break,
                _ => panic!("unexpected end"),
            }
        }
        assert_eq!(turns, resp.len().div_ceil(BUDGET));
        assert_eq!(sink.got, resp);

        let mut sink = Sink { got: Vec::new(), room: 5_000, step: 1_000 };
        let mut sent = 0;
        assert!(matches!(write_some(&mut sink, &resp, &mut sent, BUDGET), WriteEnd::Blocked));
        assert_eq!(sent, 5_000);
        sink.room = 9_000;
        assert!(matches!(write_some(&mut sink, &resp, &mut sent, BUDGET), WriteEnd::Blocked));
        assert_eq!((sent, &sink.got[..]), (9_000, &resp[..9_000]));
    }
}
