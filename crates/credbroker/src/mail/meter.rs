//! A byte allowance on what an IMAP server sends, between TLS and async-imap: each command is
//! given an allowance ([`Meter::allow`]) and the connection fails as soon as the server sends
//! more, or announces a literal (`{n}`) longer than what is left, before async-imap reserves
//! room for it. FetchMail and WatchMail size their allowance from the sizes the server
//! announced and the caps (see [`super::imap::Caps`]), so an honest server never meets it and a
//! server that sends more than it said is cut off instead of filling the daemon's memory.
//!
//! Invariant: the bytes handed to async-imap since the last [`Meter::allow`] never exceed it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest literal announcement looked for: `{` + 20 digits + `}\r\n`.
const TAIL: usize = 24;

#[derive(Debug, Default)]
struct State {
    /// Bytes the server may still send.
    left: u64,
    /// What this allowance was, for the error.
    allowed: u64,
    /// Bytes of a literal still to pass through (its content is not scanned).
    literal: u64,
    /// The end of the line being read, to spot a literal announcement.
    tail: Vec<u8>,
}

/// The literal a line ending in `{n}\r\n` announces.
fn announced(tail: &[u8]) -> Option<u64> {
    let line = tail.strip_suffix(b"}\r\n")?;
    let open = line.iter().rposition(|b| *b == b'{')?;
    let digits = std::str::from_utf8(&line[open + 1..]).ok()?;
    digits.parse().ok()
}

impl State {
    fn over(&self, what: &str) -> io::Error {
        io::Error::other(format!(
            "the server {what} more than the {} bytes allowed for this command; the message or the response is larger than it announced",
            self.allowed
        ))
    }

    /// Counts what the server just sent; an error ends the connection.
    fn take(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() as u64 > self.left {
            self.left = 0;
            return Err(self.over("sent"));
        }
        let mut i = 0;
        while i < bytes.len() {
            if self.literal > 0 {
                let skip = self.literal.min((bytes.len() - i) as u64);
                self.literal -= skip;
                i += skip as usize;
                continue;
            }
            let b = bytes[i];
            i += 1;
            if self.tail.len() == TAIL {
                self.tail.remove(0);
            }
            self.tail.push(b);
            if b != b'\n' {
                continue;
            }
            if let Some(n) = announced(&self.tail) {
                // What is left after the bytes up to and including this line.
                let left = self.left - i as u64;
                if n > left {
                    self.left = 0;
                    return Err(self.over("announced"));
                }
                self.literal = n;
            }
            self.tail.clear();
        }
        self.left -= bytes.len() as u64;
        Ok(())
    }
}

/// The handle a session sets its allowances through.
#[derive(Debug, Clone, Default)]
pub struct Meter(Arc<Mutex<State>>);

impl Meter {
    pub fn new(allowance: u64) -> Self {
        let meter = Meter::default();
        meter.allow(allowance);
        meter
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server may send `bytes` from now on (until the next call).
    pub fn allow(&self, bytes: u64) {
        let mut state = self.lock();
        state.left = bytes;
        state.allowed = bytes;
        state.literal = 0;
        state.tail.clear();
    }
}

/// A stream whose reads count against a [`Meter`].
#[derive(Debug)]
pub struct Metered<S> {
    inner: S,
    meter: Meter,
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Meter) -> Self {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let taken = this.meter.lock().take(&buf.filled()[before..]);
        if taken.is_err() {
            // Nothing of a read over the allowance reaches the reader.
            buf.set_filled(before);
        }
        Poll::Ready(taken)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn state(allowance: u64) -> State {
        State {
            left: allowance,
            allowed: allowance,
            ..State::default()
        }
    }

    #[test]
    fn an_honest_fetch_within_the_allowance_passes_whatever_its_literal_holds() {
        let mut s = state(100);
        // The literal's content looks like an announcement itself: it is not scanned.
        let response = b"* 1 FETCH (UID 7 BODY[] {12}\r\nab {999}\r\nxy)\r\nA1 OK done\r\n";
        for chunk in response.chunks(5) {
            s.take(chunk).unwrap();
        }
        assert_eq!(s.left, 100 - response.len() as u64);
        assert_eq!(s.literal, 0);
    }

    #[test]
    fn more_bytes_than_allowed_fail_the_read() {
        let mut s = state(10);
        s.take(b"* OK 12345").unwrap();
        let e = s.take(b"x").unwrap_err();
        assert!(e.to_string().contains("sent more than the 10 bytes"), "{e}");
    }

    #[test]
    fn a_literal_longer_than_what_is_left_fails_before_it_arrives() {
        let mut s = state(1000);
        let e = s.take(b"* 1 FETCH (BODY[] {5000}\r\n").unwrap_err();
        assert!(
            e.to_string().contains("announced more than the 1000"),
            "{e}"
        );
        // Split across reads, the announcement is still seen.
        let mut s = state(1000);
        s.take(b"* 1 FETCH (BODY[] {50").unwrap();
        assert!(s.take(b"00}\r\n").is_err());
    }

    #[tokio::test]
    async fn a_metered_stream_counts_its_reads_and_a_new_allowance_starts_over() {
        let meter = Meter::new(8);
        let mut stream = Metered::new(&b"12345678abcd"[..], meter.clone());
        let mut buf = [0u8; 8];
        stream.read_exact(&mut buf).await.unwrap();
        meter.allow(4);
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"abcd");
        let meter = Meter::new(3);
        let mut stream = Metered::new(&b"12345678"[..], meter);
        assert!(stream.read_to_end(&mut Vec::new()).await.is_err());
    }
}

#[cfg(test)]
mod against_async_imap {
    use super::*;
    use futures::TryStreamExt;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A server that logs in anyone, then answers the first FETCH with a literal of `announced`
    /// bytes of which it sends `sent`.
    async fn lying_server(stream: tokio::io::DuplexStream, announced: usize, sent: usize) {
        let (read, mut write) = tokio::io::split(stream);
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"* OK ready\r\n").await.unwrap();
        let login = lines.next_line().await.unwrap().unwrap();
        let tag = login.split(' ').next().unwrap().to_string();
        write
            .write_all(format!("{tag} OK logged in\r\n").as_bytes())
            .await
            .unwrap();
        let fetch = lines.next_line().await.unwrap().unwrap();
        let tag = fetch.split(' ').next().unwrap().to_string();
        let head = format!("* 1 FETCH (UID 1 BODY[] {{{announced}}}\r\n");
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&vec![b'x'; sent]).await;
        let _ = write
            .write_all(format!(")\r\n{tag} OK done\r\n").as_bytes())
            .await;
    }

    /// What a metered async-imap session gets for that FETCH with `allowance` bytes allowed.
    async fn fetch(announced: usize, sent: usize, allowance: u64) -> Result<usize, String> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(lying_server(server, announced, sent));
        let meter = Meter::new(1 << 20);
        let mut client = async_imap::Client::new(Metered::new(client, meter.clone()));
        client.read_response().await.unwrap().unwrap();
        let mut session = client.login("u", "p").await.map_err(|(e, _)| e).unwrap();
        meter.allow(allowance);
        let fetched: Result<Vec<_>, _> = async {
            session
                .uid_fetch("1", "(UID BODY.PEEK[])")
                .await?
                .try_collect()
                .await
        }
        .await;
        drop(session);
        server.abort();
        let fetched = fetched.map_err(|e| e.to_string())?;
        Ok(fetched
            .iter()
            .map(|f| f.body().map_or(0, <[u8]>::len))
            .sum())
    }

    #[tokio::test]
    async fn a_body_within_the_allowance_is_read() {
        assert_eq!(fetch(1000, 1000, 4096).await, Ok(1000));
    }

    #[tokio::test]
    async fn a_server_announcing_more_than_allowed_is_cut_off_before_sending_it() {
        let e = fetch(50_000_000, 100_000, 64 * 1024).await.unwrap_err();
        assert!(e.contains("announced more than the 65536 bytes"), "{e}");
    }
}
