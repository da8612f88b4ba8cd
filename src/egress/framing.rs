//! Where a forwarded plain-HTTP request ends: the length of its body as its
//! head declares it, and the end of a chunked body as its bytes arrive.
//!
//! The HTTP proxy forwards exactly one request per connection (its head names
//! the one host the decision was made for); whatever the client sends after
//! that request's last byte is never forwarded, so a second request, pipelined
//! or hidden in a body, cannot name another host to the same server. That
//! needs the request's end found the way the server will find it, so a head
//! whose framing two parsers could read differently is refused rather than
//! guessed at: `Content-Length` together with `Transfer-Encoding`, two
//! lengths, a transfer coding other than `chunked`, a header name with
//! whitespace before its colon, a folded header line, a bare CR or LF.

/// How the request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`: ends with the last chunk and trailers.
    Chunked,
}

/// The body framing of a request head (request line and header lines, without
/// the blank line), or why the proxy refuses to guess it.
pub fn request_body(head: &str) -> Result<Body, &'static str> {
    let mut length: Option<u64> = None;
    let mut chunked = false;
    // A lone CR or LF ends a line for a lenient server and not here: a header
    // hidden behind one would frame the request differently there.
    if head.split("\r\n").any(|l| l.contains(['\r', '\n'])) {
        return Err("a bare CR or LF in the head");
    }
    for line in head.split("\r\n").skip(1) {
        if line.starts_with([' ', '\t']) {
            return Err("a folded header line");
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err("a header line without a colon");
        };
        if name.is_empty() || name.ends_with([' ', '\t']) {
            return Err("whitespace before a header's colon");
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err("a Content-Length that is not a number");
            }
            let n: u64 = value.parse().map_err(|_| "a Content-Length too large")?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Length headers");
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Err("a Transfer-Encoding other than one `chunked`");
            }
            chunked = true;
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err("both Content-Length and Transfer-Encoding"),
        (_, true) => Ok(Body::Chunked),
        (n, false) => Ok(Body::Length(n.unwrap_or(0))),
    }
}

/// Trailer lines of a chunked body: at most this many bytes in all.
const MAX_TRAILERS: usize = 16 << 10;

/// Follows a chunked body as its bytes arrive (RFC 9112 §7.1, strictly: CRLF
/// line ends, hex sizes, extensions skipped, trailers bounded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    trailers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk size: its value and digit count so far.
    Size(u64, u32),
    /// After the size: an extension, up to CR.
    Extension(u64),
    /// After the size line's CR.
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// In a trailer line (or the final blank one): its length so far.
    Trailer(usize),
    TrailerLf(usize),
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size(0, 0),
            trailers: 0,
        }
    }
}

impl Chunked {
    /// Takes the next bytes of the body: `Ok(Some(n))` when the body ends
    /// after `bytes[..n]`, `Ok(None)` when all of `bytes` belongs to it and
    /// more is to come, `Err` for a malformed body.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Size(n, digits) => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits == 15 {
                            return Err("a chunk size too large");
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        State::Size(n * 16 + d, digits + 1)
                    }
                    b';' | b' ' | b'\t' if digits > 0 => State::Extension(n),
                    b'\r' if digits > 0 => State::SizeLf(n),
                    _ => return Err("a malformed chunk size"),
                },
                State::Extension(n) => match b {
                    b'\r' => State::SizeLf(n),
                    b'\n' => return Err("a bare LF in a chunk extension"),
                    _ => State::Extension(n),
                },
                State::SizeLf(n) => match (b, n) {
                    (b'\n', 0) => State::Trailer(0),
                    (b'\n', n) => State::Data(n),
                    _ => return Err("a chunk size line not ended by CRLF"),
                },
                State::Data(left) => {
                    let take = (left as usize).min(bytes.len() - i) as u64;
                    i += take as usize;
                    self.state = if take == left {
                        State::DataCr
                    } else {
                        State::Data(left - take)
                    };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size(0, 0),
                State::DataCr | State::DataLf => return Err("chunk data not ended by CRLF"),
                State::Trailer(len) => match b {
                    b'\r' => State::TrailerLf(len),
                    b'\n' => return Err("a bare LF in the trailers"),
                    _ => {
                        self.trailers += 1;
                        if self.trailers > MAX_TRAILERS {
                            return Err("trailers too long");
                        }
                        State::Trailer(len + 1)
                    }
                },
                State::TrailerLf(len) => match (b, len) {
                    (b'\n', 0) => {
                        self.state = State::Done;
                        return Ok(Some(i + 1));
                    }
                    (b'\n', _) => State::Trailer(0),
                    _ => return Err("a trailer line not ended by CRLF"),
                },
                State::Done => return Ok(Some(i)),
            };
            i += 1;
        }
        Ok(if self.state == State::Done {
            Some(i)
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "POST http://a.test/ HTTP/1.1";

    fn body(headers: &[&str]) -> Result<Body, &'static str> {
        let mut head = LINE.to_string();
        for h in headers {
            head.push_str("\r\n");
            head.push_str(h);
        }
        request_body(&head)
    }

    #[test]
    fn framing_from_the_head() {
        assert_eq!(body(&["Host: a.test"]), Ok(Body::Length(0)));
        assert_eq!(body(&["Content-Length: 12"]), Ok(Body::Length(12)));
        assert_eq!(
            body(&["content-length: 7", "Content-Length: 7"]),
            Ok(Body::Length(7))
        );
        assert_eq!(body(&["Transfer-Encoding: Chunked"]), Ok(Body::Chunked));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for (headers, why) in [
            (
                &["Content-Length: 5", "Transfer-Encoding: chunked"][..],
                "both Content-Length and Transfer-Encoding",
            ),
            (
                &["Content-Length: 5", "Content-Length: 6"][..],
                "two different Content-Length headers",
            ),
            (
                &["Content-Length: +5"][..],
                "a Content-Length that is not a number",
            ),
            (
                &["Content-Length: 5, 5"][..],
                "a Content-Length that is not a number",
            ),
            (
                &["Content-Length:"][..],
                "a Content-Length that is not a number",
            ),
            (
                &["Content-Length: 99999999999999999999999"][..],
                "a Content-Length too large",
            ),
            (
                &["Transfer-Encoding: gzip, chunked"][..],
                "a Transfer-Encoding other than one `chunked`",
            ),
            (
                &["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"][..],
                "a Transfer-Encoding other than one `chunked`",
            ),
            (
                &["Transfer-Encoding : chunked"][..],
                "whitespace before a header's colon",
            ),
            (
                &["X-A: 1", " Transfer-Encoding: chunked"][..],
                "a folded header line",
            ),
            (
                &["Transfer-Encoding chunked"][..],
                "a header line without a colon",
            ),
            (
                &["X-A: 1\nContent-Length: 5"][..],
                "a bare CR or LF in the head",
            ),
            (
                &["X-A: 1\rTransfer-Encoding: chunked"][..],
                "a bare CR or LF in the head",
            ),
        ] {
            assert_eq!(body(headers), Err(why), "{headers:?}");
        }
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_do() {
        let msg = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next HTTP/1.1\r\n";
        let end = msg.len() - b"GET /next HTTP/1.1\r\n".len();
        assert_eq!(Chunked::default().feed(msg), Ok(Some(end)));
        // Byte by byte: the same end.
        let mut c = Chunked::default();
        let mut at = None;
        for (i, b) in msg.iter().enumerate() {
            if let Some(n) = c.feed(std::slice::from_ref(b)).unwrap() {
                assert_eq!(n, 1);
                at = Some(i + 1);
                break;
            }
        }
        assert_eq!(at, Some(end));
        // In two pieces cut inside the data.
        let mut c = Chunked::default();
        assert_eq!(c.feed(&msg[..6]), Ok(None));
        assert_eq!(c.feed(&msg[6..]), Ok(Some(end - 6)));
        // No trailers.
        assert_eq!(Chunked::default().feed(b"0\r\n\r\nrest"), Ok(Some(5)));
    }

    #[test]
    fn a_malformed_chunked_body_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"1234567890abcdef0\r\n",
            b"0\r\nX: 1\n\r\n",
            b"5;e\n",
        ] {
            assert!(Chunked::default().feed(bad).is_err(), "{bad:?}");
        }
        let mut long = b"0\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_TRAILERS + 1));
        assert_eq!(Chunked::default().feed(&long), Err("trailers too long"));
    }
}
