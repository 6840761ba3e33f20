//! The client side of every gRPC connection a node or a client opens (escrowctl, mirror agents,
//! node-to-node): tonic over TLS, with two changes that make a unary request leave in one
//! socket write instead of three.
//!
//! Unpatched, one request costs three writes, each its own TLS record and TCP segment:
//! 1. The request's HEADERS frame. h2 opens a new stream only in its connection task, and until
//!    then the stream has no flow-control window, so hyper's body pipe waits and the connection
//!    task writes the HEADERS alone.
//! 2. The DATA frame, once the pipe task has run.
//! 3. An empty DATA frame that ends the stream. tonic's request body only learns it is finished
//!    when polled once more after its message, so the message cannot carry END_STREAM.
//!
//! [`EndOnLast`] looks one frame ahead so the last DATA frame ends the stream (write 3 goes).
//! [`CoalescingIo`] buffers the TLS records under the TLS layer and, at a flush, yields to the
//! scheduler once before writing, so the connection task writes the HEADERS and the DATA frame
//! queued meanwhile in one `write` (writes 1 and 2 become one).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::codegen::http::{Request, Uri};
use tonic::codegen::Bytes;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Status;

/// Bytes of TLS records held under the TLS layer until a flush. A larger write passes straight
/// through (after what is buffered), so this bounds the memory per connection.
pub const WRITE_COALESCE_BYTES: usize = 64 * 1024;

type MapBody = fn(Request<Body>) -> Request<Body>;

/// A channel whose requests end their stream with their last DATA frame.
pub type GrpcChannel = tower::util::MapRequest<Channel, MapBody>;

/// How long a [`Channels`] cache's connections wait to connect, and how they notice a peer
/// that vanished without a reset (power loss, partition): an HTTP/2 ping every
/// `keep_alive_interval`, the connection dropped if unanswered after `keep_alive_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    /// Ping idle connections too, not only those with requests in flight.
    pub keep_alive_while_idle: bool,
}

/// What an endpoint said: the status message and the errors behind it.
pub fn said(s: &Status) -> String {
    with_causes(s.message().to_string(), std::error::Error::source(s))
}

/// `text` followed by each error in the chain from `cause` on, separated by ": ", each text
/// once (tonic's own text is often only "transport error", and its causes repeat each other).
pub fn with_causes(
    mut text: String,
    mut cause: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// One TLS channel per address, opened lazily on first use and shared by every later call
/// (a channel multiplexes concurrent requests over one HTTP/2 connection and reconnects by
/// itself).
pub struct Channels {
    tls: ClientTlsConfig,
    timeouts: Timeouts,
    open: Mutex<HashMap<String, GrpcChannel>>,
}

impl Channels {
    pub fn new(tls: ClientTlsConfig, timeouts: Timeouts) -> Self {
        Self {
            tls,
            timeouts,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The channel to `addr` (`host:port`, served over TLS), opened lazily on first use; an
    /// error only for an address that does not form a valid URI, naming its causes (tonic's
    /// own text is only "transport error").
    pub fn get(&self, addr: &str) -> Result<GrpcChannel, String> {
        self.open_channel(addr)
            .map_err(|e| with_causes(e.to_string(), std::error::Error::source(&e)))
    }

    fn open_channel(&self, addr: &str) -> Result<GrpcChannel, tonic::transport::Error> {
        let mut open = self.open.lock().expect("lock");
        if let Some(c) = open.get(addr) {
            return Ok(c.clone());
        }
        let t = self.timeouts;
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(self.tls.clone())?
            .connect_timeout(t.connect)
            .http2_keep_alive_interval(t.keep_alive_interval)
            .keep_alive_timeout(t.keep_alive_timeout)
            .keep_alive_while_idle(t.keep_alive_while_idle);
        let c = connect_lazy(&endpoint);
        open.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// Connects lazily to `endpoint` (TLS and timeouts as configured on it) over a TCP connection
/// with `TCP_NODELAY` whose writes are coalesced ([`CoalescingIo`]).
fn connect_lazy(endpoint: &Endpoint) -> GrpcChannel {
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(connect_tcp));
    tower::util::MapRequest::new(channel, end_on_last as MapBody)
}

async fn connect_tcp(
    uri: Uri,
) -> io::Result<hyper_util::rt::TokioIo<CoalescingIo<tokio::net::TcpStream>>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} has no host")))?;
    // An IPv6 literal comes bracketed in a URI; the resolver wants it bare.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    Ok(hyper_util::rt::TokioIo::new(CoalescingIo::new(tcp)))
}

fn end_on_last(request: Request<Body>) -> Request<Body> {
    request.map(|body| Body::new(EndOnLast::new(body)))
}

/// A request body that reports its end as soon as its last frame is taken: after each frame it
/// polls the inner body once more, so HTTP/2 can set END_STREAM on the last DATA frame instead
/// of sending an empty frame after it. At most one frame is held ahead.
struct EndOnLast<B> {
    inner: B,
    ahead: Option<Result<http_body::Frame<Bytes>, Status>>,
    done: bool,
}

impl<B> EndOnLast<B> {
    fn new(inner: B) -> Self {
        Self {
            inner,
            ahead: None,
            done: false,
        }
    }
}

impl<B> http_body::Body for EndOnLast<B>
where
    B: http_body::Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let frame = match this.ahead.take() {
            Some(frame) => frame,
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(frame)) => frame,
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        if frame.is_err() {
            this.done = true;
            return Poll::Ready(Some(frame));
        }
        // Look ahead. If the inner body is not ready, the frame goes now and the end is found
        // by the next poll (an empty frame then ends the stream, as without this wrapper).
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => this.done = true,
            Poll::Ready(Some(next)) => this.ahead = Some(next),
            Poll::Pending => {}
        }
        Poll::Ready(Some(frame))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A connection whose writes are buffered (up to [`WRITE_COALESCE_BYTES`]) until a flush, and
/// whose flush yields to the scheduler once before writing: the connection task is polled
/// again right after the tasks already queued (hyper's body pipe among them), adds what they
/// queued, and the next flush writes it all in one `write`. A flush never completes with
/// bytes still buffered, so nothing waits on data the peer has not been sent; shutdown
/// flushes first.
struct CoalescingIo<T> {
    inner: tokio::io::BufWriter<T>,
    yielded: bool,
}

impl<T: tokio::io::AsyncWrite> CoalescingIo<T> {
    fn new(io: T) -> Self {
        Self {
            inner: tokio::io::BufWriter::with_capacity(WRITE_COALESCE_BYTES, io),
            yielded: false,
        }
    }
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for CoalescingIo<T>
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.yielded && !self.inner.buffer().is_empty() {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() {
            self.yielded = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // BufWriter writes out what it holds before shutting the connection down.
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

    // Goal: an address that is no URI gets an error that says why (it reaches users as "bad
    // endpoint ...").
    #[test]
    fn a_bad_address_is_named_with_its_cause() {
        let channels = Channels::new(
            ClientTlsConfig::new(),
            Timeouts {
                connect: Duration::from_secs(1),
                keep_alive_interval: Duration::from_secs(1),
                keep_alive_timeout: Duration::from_secs(1),
                keep_alive_while_idle: false,
            },
        );
        let Err(err) = channels.get("bad host:1") else {
            panic!("a bad address was accepted");
        };
        assert!(err.contains("invalid uri character"), "{err}");
    }

    fn frames(
        parts: &[&'static [u8]],
    ) -> impl http_body::Body<Data = Bytes, Error = Status> + Unpin {
        let frames: Vec<Result<http_body::Frame<Bytes>, Status>> = parts
            .iter()
            .map(|p| Ok(http_body::Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    async fn next(
        body: &mut (impl http_body::Body<Data = Bytes, Error = Status> + Unpin),
    ) -> Option<Bytes> {
        body.frame()
            .await
            .map(|f| f.expect("frame").into_data().expect("data"))
    }

    #[tokio::test]
    async fn the_last_frame_ends_the_stream() {
        let mut one = EndOnLast::new(frames(&[b"only"]));
        assert!(!one.is_end_stream());
        assert_eq!(next(&mut one).await.as_deref(), Some(&b"only"[..]));
        assert!(
            one.is_end_stream(),
            "a single message must end the stream itself"
        );
        assert_eq!(next(&mut one).await, None);

        let mut two = EndOnLast::new(frames(&[b"a", b"b"]));
        assert_eq!(next(&mut two).await.as_deref(), Some(&b"a"[..]));
        assert!(!two.is_end_stream(), "a frame is still to come");
        assert_eq!(next(&mut two).await.as_deref(), Some(&b"b"[..]));
        assert!(two.is_end_stream());
        assert_eq!(next(&mut two).await, None);

        let mut empty = EndOnLast::new(frames(&[]));
        assert_eq!(next(&mut empty).await, None);
        assert!(empty.is_end_stream());
    }

    #[tokio::test]
    async fn a_body_error_passes_through_and_ends_the_body() {
        let failing = http_body_util::StreamBody::new(futures::stream::iter(vec![Err::<
            http_body::Frame<Bytes>,
            Status,
        >(
            Status::internal("boom"),
        )]));
        let mut body = EndOnLast::new(failing);
        let err = body.frame().await.expect("a frame").expect_err("the error");
        assert_eq!(err.message(), "boom");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_flush_yields_once_then_writes_everything_buffered() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut io = CoalescingIo::new(near);
        io.write_all(b"headers").await.unwrap();
        io.write_all(b"+data").await.unwrap();
        // Nothing reaches the peer before a flush.
        let mut probe = [0u8; 1];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), far.read(&mut probe))
                .await
                .is_err(),
            "bytes left before the flush"
        );
        // The first poll of the flush yields (and wakes itself); the flush still completes.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        io.flush().await.unwrap();
        let mut got = vec![0u8; 12];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headers+data");
    }

    #[tokio::test]
    async fn large_writes_and_shutdown_lose_nothing() {
        let (near, mut far) = tokio::io::duplex(1 << 20);
        let mut io = CoalescingIo::new(near);
        let big: Vec<u8> = (0..(3 * WRITE_COALESCE_BYTES + 17))
            .map(|i| i as u8)
            .collect();
        io.write_all(b"small").await.unwrap();
        io.write_all(&big).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        let mut want = b"small".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tail");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes reordered or lost");
    }
}
