//! Framing of client requests: a RESP array of bulk strings (`*N\r\n$len\r\n...`), or an
//! inline command (`PING\r\n`, a line of words, which redis-benchmark and telnet users
//! send).
//!
//! Requests are framed here rather than by `redis-protocol`'s decoder, which decodes any
//! RESP frame, nested arrays included, by recursion: a hostile client sending
//! `*1\r\n` a million times would overflow the stack of the thread that decodes it. A
//! command is only ever a flat array of bulk strings (Redis's own server accepts nothing
//! else), so that is all this accepts, with limits on the count and on each length. Replies
//! are encoded with `redis-protocol` (`crate::reply`).

use bytes::{Bytes, BytesMut};

/// The most arguments a request may have (Redis's limit is 1024 * 1024 * 1024; a batch
/// server has no use for more than this in one command).
pub const MAX_ARGS: usize = 1 << 20;

/// The longest inline request line.
pub const MAX_INLINE: usize = 64 * 1024;

/// A request that cannot be framed: the connection answers the error and closes, as
/// Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Finds the end of the line that starts at `from`: the index of its `\r`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_len(line: &[u8], what: &str) -> Result<i64, ProtocolError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| ProtocolError(format!("invalid {what} length")))
}

/// Takes one complete request from the front of `buf`: its arguments (slices of the
/// frozen request bytes, no copies), or `None` when more bytes are needed. `max_bulk` is
/// the longest argument allowed.
pub fn take(buf: &mut BytesMut, max_bulk: usize) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != b'*' {
        return take_inline(buf);
    }
    let Some(end) = line_end(buf, 1) else {
        if buf.len() > 32 {
            return Err(ProtocolError("invalid multibulk length".into()));
        }
        return Ok(None);
    };
    let n = parse_len(&buf[1..end], "multibulk")?;
    if n > MAX_ARGS as i64 {
        return Err(ProtocolError("invalid multibulk length".into()));
    }
    let mut at = end + 2;
    if n <= 0 {
        let _ = buf.split_to(at);
        return Ok(Some(Vec::new()));
    }
    let mut ranges = Vec::with_capacity(n as usize);
    for _ in 0..n {
        match buf.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&c) => {
                return Err(ProtocolError(format!(
                    "expected '$', got '{}'",
                    char::from(c).escape_default()
                )));
            }
        }
        let Some(end) = line_end(buf, at + 1) else {
            if buf.len() - at > 32 {
                return Err(ProtocolError("invalid bulk length".into()));
            }
            return Ok(None);
        };
        let len = parse_len(&buf[at + 1..end], "bulk")?;
        if len < 0 || len as u64 > max_bulk as u64 {
            return Err(ProtocolError("invalid bulk length".into()));
        }
        let start = end + 2;
        let stop = start + len as usize;
        if buf.len() < stop + 2 {
            return Ok(None);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(ProtocolError("bulk string not ended by CRLF".into()));
        }
        ranges.push((start, stop));
        at = stop + 2;
    }
    let frame = buf.split_to(at).freeze();
    Ok(Some(
        ranges.into_iter().map(|(a, b)| frame.slice(a..b)).collect(),
    ))
}

fn take_inline(buf: &mut BytesMut) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(nl) = buf.iter().position(|&c| c == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err(ProtocolError("too big inline request".into()));
        }
        return Ok(None);
    };
    let line = buf.split_to(nl + 1).freeze();
    let text = line.slice(..nl);
    let text = match text.last() {
        Some(b'\r') => text.slice(..text.len() - 1),
        _ => text,
    };
    let mut args = Vec::new();
    let mut i = 0;
    while i < text.len() {
        while i < text.len() && text[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < text.len() && !text[i].is_ascii_whitespace() {
            i += 1;
        }
        if i > start {
            args.push(text.slice(start..i));
        }
    }
    Ok(Some(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        take(&mut BytesMut::from(input), 1 << 20)
    }

    #[test]
    fn frames_arrays_of_bulk_strings() {
        let mut b = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n*1\r\n$4\r\nPING\r\n"[..]);
        let a = take(&mut b, 100).expect("valid").expect("complete");
        assert_eq!(a, [Bytes::from_static(b"GET"), Bytes::new()]);
        let a = take(&mut b, 100).expect("valid").expect("complete");
        assert_eq!(a, [Bytes::from_static(b"PING")]);
        assert!(b.is_empty());
    }

    #[test]
    fn waits_for_incomplete_requests() {
        for cut in [1, 3, 5, 9, 12, 13] {
            let full = b"*2\r\n$3\r\nSET\r\n$1\r\nk\r\n";
            assert_eq!(one(&full[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn inline_commands() {
        let mut b = BytesMut::from(&b"PING\r\nset  k  v\n"[..]);
        assert_eq!(
            take(&mut b, 10).expect("ok").expect("line"),
            [Bytes::from_static(b"PING")]
        );
        let a = take(&mut b, 10).expect("ok").expect("line");
        assert_eq!(a, [&b"set"[..], b"k", b"v"]);
    }

    #[test]
    fn refuses_nesting_and_bad_lengths() {
        assert!(one(b"*1\r\n*1\r\n$1\r\na\r\n").is_err());
        assert!(one(b"*1\r\n$-5\r\n").is_err());
        assert_eq!(
            one(b"*1\r\n$99\r\n"),
            Ok(None),
            "a long argument still on its way"
        );
        assert!(take(&mut BytesMut::from(&b"*1\r\n$99\r\n"[..]), 10).is_err());
        assert!(one(b"*x\r\n").is_err());
        assert!(one(b"*9999999999\r\n").is_err());
        assert!(one(b"*1\r\n$1\r\nabc\r\n").is_err());
    }
}
