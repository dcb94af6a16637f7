//! One client connection: read what the client sent, frame and parse every complete
//! request in it, answer the connection's own commands, hand the table commands to the
//! executor as one job, and write every reply back in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::command::{self, Cmd, Local};
use crate::exec::Job;
use crate::reply::Reply;
use crate::{Shared, request};

/// The most requests one read's worth of pipeline is split into before they are run.
const MAX_PIPELINE: usize = 1 << 16;

struct State {
    id: u64,
    resp3: bool,
    authed: bool,
    name: Option<Bytes>,
}

enum Item {
    /// A reply known at parse time, and the protocol it goes out in.
    Done(Reply, bool),
    /// The next reply of the executor's answer.
    Table(bool),
}

/// Counts the connection while it lives.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection until the client quits or closes, or sends what cannot be
/// framed (answered with an error first, as Redis does).
pub async fn serve(mut sock: TcpStream, sh: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    sh.stats.connections.fetch_add(1, Ordering::Relaxed);
    sh.stats.connected.fetch_add(1, Ordering::Relaxed);
    let _open = Open(sh.clone());
    let mut st = State {
        id: sh.next_client.fetch_add(1, Ordering::Relaxed) + 1,
        resp3: false,
        authed: sh.config.requirepass.is_none(),
        name: None,
    };
    let mut rbuf = BytesMut::with_capacity(1 << 16);
    let mut wbuf = BytesMut::with_capacity(1 << 16);
    loop {
        let mut items = Vec::new();
        let mut table = Vec::new();
        let mut closing = false;
        while items.len() < MAX_PIPELINE {
            match request::take(&mut rbuf, sh.config.max_value_bytes) {
                Ok(Some(args)) if args.is_empty() => {}
                Ok(Some(args)) => match command::parse(args) {
                    Cmd::Local(l) => {
                        let quit = matches!(l, Local::Quit);
                        let r = local(l, &mut st, &sh);
                        items.push(Item::Done(r, st.resp3));
                        if quit {
                            closing = true;
                            break;
                        }
                    }
                    Cmd::Table(_) if !st.authed => {
                        items.push(Item::Done(noauth(), st.resp3));
                    }
                    Cmd::Table(t) => {
                        table.push(t);
                        items.push(Item::Table(st.resp3));
                    }
                    Cmd::Refused(r) => items.push(Item::Done(r, st.resp3)),
                },
                Ok(None) => break,
                Err(request::ProtocolError(msg)) => {
                    items.push(Item::Done(
                        Reply::err(format!("Protocol error: {msg}")),
                        st.resp3,
                    ));
                    closing = true;
                    break;
                }
            }
        }
        if items.is_empty() {
            match sock.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
        sh.stats
            .commands
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        let mut replies = if table.is_empty() {
            Vec::new()
        } else if sh.config.direct_reads && table.iter().all(|c| c.reads_only()) {
            // Reads alone: run them here. This connection's earlier writes were answered
            // before it read on, so they are in the table already.
            let cmds: Vec<&command::Table> = table.iter().collect();
            sh.exec.execute(&cmds)
        } else {
            let (tx, rx) = oneshot::channel();
            let job = Job {
                cmds: table,
                reply: tx,
            };
            if sh.jobs.send(job).is_err() {
                return; // the server is shutting down
            }
            match rx.await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
        .into_iter();
        for item in items {
            match item {
                Item::Done(r, resp3) => r.encode(&mut wbuf, resp3),
                Item::Table(resp3) => replies
                    .next()
                    .unwrap_or_else(|| Reply::err("internal: a reply is missing"))
                    .encode(&mut wbuf, resp3),
            }
        }
        if sock.write_all(&wbuf).await.is_err() {
            return;
        }
        wbuf.clear();
        if closing {
            let _ = sock.shutdown().await;
            return;
        }
    }
}

fn noauth() -> Reply {
    Reply::Error("NOAUTH Authentication required.".into())
}

fn wrongpass() -> Reply {
    Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
}

/// Checks `AUTH [user] pass` against the configured password; the reply if it fails.
fn auth(sh: &Shared, user: Option<&Bytes>, pass: &Bytes, st: &mut State) -> Option<Reply> {
    let Some(want) = &sh.config.requirepass else {
        return Some(Reply::err(
            "AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        ));
    };
    let user_ok = user.is_none_or(|u| u.as_ref() == b"default");
    if user_ok && pass.as_ref() == want.as_bytes() {
        st.authed = true;
        None
    } else {
        Some(wrongpass())
    }
}

fn local(l: Local, st: &mut State, sh: &Shared) -> Reply {
    if !st.authed && !matches!(l, Local::Auth(..) | Local::Hello { .. } | Local::Quit) {
        return noauth();
    }
    match l {
        Local::Ping(None) => Reply::Simple("PONG"),
        Local::Ping(Some(m)) | Local::Echo(m) => Reply::Bulk(m),
        Local::Quit => Reply::Ok,
        Local::Select(0) => Reply::Ok,
        Local::Select(_) => Reply::err("DB index is out of range"),
        Local::Auth(user, pass) => auth(sh, user.as_ref(), &pass, st).unwrap_or(Reply::Ok),
        Local::Hello {
            version,
            auth: creds,
            setname,
        } => {
            let v = version.unwrap_or(if st.resp3 { 3 } else { 2 });
            if v != 2 && v != 3 {
                return Reply::Error("NOPROTO unsupported protocol version".into());
            }
            if let Some((u, p)) = creds
                && let Some(r) = auth(sh, Some(&u), &p, st)
            {
                return r;
            }
            if !st.authed {
                return noauth();
            }
            if let Some(n) = setname {
                st.name = Some(n);
            }
            st.resp3 = v == 3;
            Reply::Map(vec![
                (Reply::text("server"), Reply::text("redis")),
                (Reply::text("version"), Reply::text(crate::REDIS_VERSION)),
                (Reply::text("proto"), Reply::Int(v)),
                (Reply::text("id"), Reply::Int(st.id as i64)),
                (Reply::text("mode"), Reply::text("standalone")),
                (Reply::text("role"), Reply::text("master")),
                (Reply::text("modules"), Reply::Array(Vec::new())),
            ])
        }
        Local::ClientSetName(n) => {
            if n.iter().any(|c| *c == b' ' || *c == b'\n') {
                return Reply::err(
                    "Client names cannot contain spaces, newlines or special characters.",
                );
            }
            st.name = (!n.is_empty()).then_some(n);
            Reply::Ok
        }
        Local::ClientGetName => st.name.clone().map_or(Reply::Null, Reply::Bulk),
        Local::ClientId => Reply::Int(st.id as i64),
        Local::Command(None) => Reply::Array(Vec::new()),
        Local::Command(Some(sub)) => match sub.to_ascii_uppercase().as_slice() {
            b"COUNT" => Reply::Int(crate::COMMANDS.len() as i64),
            b"DOCS" => Reply::Map(Vec::new()),
            b"INFO" | b"LIST" => Reply::Array(Vec::new()),
            _ => Reply::err("unknown subcommand"),
        },
        Local::ConfigGet(patterns) => {
            let mut pairs = Vec::new();
            for p in &patterns {
                for (k, v) in sh.config_pairs() {
                    if glob(p, k.as_bytes())
                        && !pairs
                            .iter()
                            .any(|(n, _): &(Reply, Reply)| *n == Reply::text(k))
                    {
                        pairs.push((Reply::text(k), Reply::string(v)));
                    }
                }
            }
            Reply::Map(pairs)
        }
        Local::Info(sections) => Reply::string(sh.info(&sections)),
    }
}

/// Redis's glob for CONFIG GET, as far as parameter names need it: `*` and `?`.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pat[1..], s) || (!s.is_empty() && glob(pat, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&pat[1..], &s[1..]),
        (Some(p), Some(c)) if p.eq_ignore_ascii_case(c) => glob(&pat[1..], &s[1..]),
        _ => false,
    }
}
