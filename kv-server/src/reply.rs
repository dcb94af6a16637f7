//! Replies, encoded in RESP2 or RESP3 (after `HELLO 3`) with `redis-protocol`.

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BorrowedFrame as Frame2;
use redis_protocol::resp3::types::BorrowedFrame as Frame3;

/// A reply to one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`.
    Ok,
    /// A simple string.
    Simple(&'static str),
    /// An error: the text after `-` (it starts with its code, `ERR`, `NOAUTH`, ...).
    Error(String),
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Bytes),
    /// The null reply (a missing key).
    Null,
    /// An array.
    Array(Vec<Reply>),
    /// A map (RESP3), or a flat array of keys and values (RESP2).
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    /// An `ERR` error.
    pub fn err(msg: impl AsRef<str>) -> Reply {
        Reply::Error(format!("ERR {}", msg.as_ref()))
    }

    /// A bulk string of a static text.
    pub fn text(s: &'static str) -> Reply {
        Reply::Bulk(Bytes::from_static(s.as_bytes()))
    }

    /// A bulk string of an owned text.
    pub fn string(s: String) -> Reply {
        Reply::Bulk(Bytes::from(s))
    }

    /// Appends the reply to `out` in RESP2 (`resp3`: false) or RESP3.
    pub fn encode(&self, out: &mut BytesMut, resp3: bool) {
        if resp3 {
            encode3(self, out);
        } else {
            encode2(self, out);
        }
    }
}

/// The bytes of an aggregate's header: `*n` (RESP2 and RESP3 arrays) or `%n` (RESP3 maps).
fn header(out: &mut BytesMut, kind: u8, n: usize) {
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn encode2(r: &Reply, out: &mut BytesMut) {
    let frame = match r {
        Reply::Array(items) => {
            header(out, b'*', items.len());
            return items.iter().for_each(|i| encode2(i, out));
        }
        Reply::Map(pairs) => {
            header(out, b'*', pairs.len() * 2);
            return pairs.iter().for_each(|(k, v)| {
                encode2(k, out);
                encode2(v, out);
            });
        }
        Reply::Ok => Frame2::SimpleString(b"OK"),
        Reply::Simple(s) => Frame2::SimpleString(s.as_bytes()),
        Reply::Error(e) => Frame2::Error(e),
        Reply::Int(i) => Frame2::Integer(*i),
        Reply::Bulk(b) => Frame2::BulkString(b),
        Reply::Null => Frame2::Null,
    };
    // Encoding a scalar frame into a growable buffer cannot fail.
    let _ = redis_protocol::resp2::encode::extend_encode_borrowed(out, &frame, false);
}

fn encode3(r: &Reply, out: &mut BytesMut) {
    let frame = match r {
        Reply::Array(items) => {
            header(out, b'*', items.len());
            return items.iter().for_each(|i| encode3(i, out));
        }
        Reply::Map(pairs) => {
            header(out, b'%', pairs.len());
            return pairs.iter().for_each(|(k, v)| {
                encode3(k, out);
                encode3(v, out);
            });
        }
        Reply::Ok => Frame3::SimpleString {
            data: b"OK",
            attributes: None,
        },
        Reply::Simple(s) => Frame3::SimpleString {
            data: s.as_bytes(),
            attributes: None,
        },
        Reply::Error(e) => Frame3::SimpleError {
            data: e,
            attributes: None,
        },
        Reply::Int(i) => Frame3::Number {
            data: *i,
            attributes: None,
        },
        Reply::Bulk(b) => Frame3::BlobString {
            data: b,
            attributes: None,
        },
        Reply::Null => Frame3::Null,
    };
    // Encoding a scalar frame into a growable buffer cannot fail.
    let _ = redis_protocol::resp3::encode::complete::extend_encode_borrowed(out, &frame, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(r: &Reply, resp3: bool) -> Vec<u8> {
        let mut b = BytesMut::new();
        r.encode(&mut b, resp3);
        b.to_vec()
    }

    #[test]
    fn resp2_and_resp3() {
        assert_eq!(enc(&Reply::Ok, false), b"+OK\r\n");
        assert_eq!(enc(&Reply::Null, false), b"$-1\r\n");
        assert_eq!(enc(&Reply::Null, true), b"_\r\n");
        assert_eq!(enc(&Reply::Int(-3), true), b":-3\r\n");
        assert_eq!(enc(&Reply::err("bad"), false), b"-ERR bad\r\n");
        let a = Reply::Array(vec![Reply::text("a"), Reply::Null]);
        assert_eq!(enc(&a, false), b"*2\r\n$1\r\na\r\n$-1\r\n");
        let m = Reply::Map(vec![(Reply::text("k"), Reply::Int(1))]);
        assert_eq!(enc(&m, false), b"*2\r\n$1\r\nk\r\n:1\r\n");
        assert_eq!(enc(&m, true), b"%1\r\n$1\r\nk\r\n:1\r\n");
    }
}
