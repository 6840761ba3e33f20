//! `escrowctl mirror --records`: follows a feed of change events (one JSON object per line,
//! like `tail -f`) and sends them to the cluster in batches.
//!
//! Exactly once, across crashes and leader changes: every event carries its source sequence;
//! the cluster applies a stream's changes only above the stream's applied position, so a batch
//! sent twice is acknowledged twice and applied once. After each acknowledged batch the agent
//! checkpoints the byte offset after it in a local state file (tmp + fsync + rename), so a
//! restart resumes reading exactly there; a crash between the acknowledgement and the
//! checkpoint only causes a resend the cluster recognises.
//!
//! A malformed line stops the feed with its line number: the valid lines before it are sent,
//! nothing after it is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt, BufReader};

use crate::client::{ClientError, EscrowClient};
use crate::domain::{
    validate_value, Collection, RecordKey, INGEST_BYTES_MAX, INGEST_CHANGES_MAX, VALUE_LEN_MAX,
};
use crate::pb;

/// Longest feed line: a value at the record limit, JSON-escaped (up to 6 bytes per byte for
/// control characters is the worst case; common text stays near 1×), plus the other fields.
pub const LINE_BYTES_MAX: usize = 6 * VALUE_LEN_MAX + 64 * 1024;
/// How often a following agent looks for new lines at the end of the feed.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Pause before resending a batch the cluster could not take (no leader, node down).
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Version of the state file layout.
const STATE_VERSION: u32 = 1;

/// One line of the feed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Event {
    collection: String,
    key: String,
    op: Op,
    /// A JSON string is stored as its UTF-8 bytes; any other JSON value as its compact text.
    #[serde(default)]
    value: Option<serde_json::Value>,
    seq: u64,
    /// RFC 3339 text or ms since the Unix epoch.
    time: serde_json::Value,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Op {
    Put,
    Delete,
}

/// Why the feed stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{path} line {line}: {reason}; nothing from this line on was sent")]
    Malformed {
        path: String,
        line: u64,
        reason: String,
    },
    #[error("cannot read the feed {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("the cluster refused the batch ending at line {line}: {cause}")]
    Refused { line: u64, cause: ClientError },
}

/// Where a feed resumes: written after every acknowledged batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedState {
    pub version: u32,
    pub tenant: String,
    pub source: String,
    /// The feed file (absent for stdin).
    pub feed: Option<PathBuf>,
    /// Bytes of the feed consumed and acknowledged.
    pub offset: u64,
    /// Lines consumed and acknowledged.
    pub line: u64,
    /// The source sequence of the last line consumed (lines must increase).
    pub seq: u64,
    /// The stream's applied position the cluster reported last (it may be ahead of `seq` when
    /// a feed is replayed from the start).
    pub position: u64,
}

impl FeedState {
    fn load(path: &Path) -> Result<Option<Self>, FeedError> {
        let err = |reason: String| FeedError::State {
            path: path.to_path_buf(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let state: FeedState =
                    serde_json::from_slice(&bytes).map_err(|e| err(format!("corrupt: {e}")))?;
                if state.version != STATE_VERSION {
                    return Err(err(format!("unknown version {}", state.version)));
                }
                Ok(Some(state))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Replaces the state file atomically: a crash leaves the old state or the new one.
    fn save(&self, path: &Path) -> Result<(), FeedError> {
        let bytes = serde_json::to_vec_pretty(self).expect("state serialises");
        crate::store::write_atomically(path, &bytes).map_err(|e| FeedError::State {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// How to run a feed.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// The feed file; `None` reads stdin (no byte offset to resume from: a restarted agent
    /// relies on the cluster's sequence check alone).
    pub feed: Option<PathBuf>,
    pub tenant: String,
    pub source: String,
    pub state_file: PathBuf,
    /// Read to the end and exit instead of following.
    pub once: bool,
    /// Changes per batch (at most [`INGEST_CHANGES_MAX`]).
    pub batch_changes: usize,
}

/// What a feed run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FeedReport {
    pub tenant: String,
    pub source: String,
    pub lines: u64,
    pub applied: u64,
    pub duplicates: u64,
    pub batches: u64,
    pub position: u64,
    pub offset: u64,
}

/// Progress callbacks (a progress bar, or nothing).
pub trait Progress {
    fn update(&self, report: &FeedReport);
}

impl Progress for () {
    fn update(&self, _: &FeedReport) {}
}

fn parse_time(v: &serde_json::Value) -> Result<u64, String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("time {n} is not a whole number of ms since 1970")),
        serde_json::Value::String(s) => {
            crate::domain::parse_rfc3339_ms(s).map_err(|e| format!("time {e}"))
        }
        other => Err(format!(
            "time must be RFC 3339 text or ms since 1970, not {other}"
        )),
    }
}

/// One whole feed line, by the feed's rules: too long is an error, blank is skipped (`None`),
/// anything else must parse as an event after `previous_seq`.
pub fn feed_line(line: &[u8], previous_seq: u64) -> Result<Option<pb::Change>, String> {
    if line.len() > LINE_BYTES_MAX {
        Err(format!("longer than {LINE_BYTES_MAX} bytes"))
    } else if line.iter().all(u8::is_ascii_whitespace) {
        Ok(None)
    } else {
        parse_line(line, previous_seq).map(Some)
    }
}

/// Parses and validates one feed line into a change; `previous_seq` enforces order.
fn parse_line(line: &[u8], previous_seq: u64) -> Result<pb::Change, String> {
    let event: Event =
        serde_json::from_slice(line).map_err(|e| format!("not a valid event: {e}"))?;
    Collection::parse(&event.collection).map_err(|e| e.to_string())?;
    RecordKey::parse(&event.key).map_err(|e| e.to_string())?;
    if event.seq == 0 {
        return Err("seq must be ≥ 1".into());
    }
    if event.seq <= previous_seq {
        return Err(format!(
            "seq {} does not increase (the previous event had {previous_seq})",
            event.seq
        ));
    }
    let source_ms = parse_time(&event.time)?;
    let (delete, value) = match (event.op, event.value) {
        (Op::Delete, None) => (true, Vec::new()),
        (Op::Delete, Some(_)) => return Err("a delete carries no value".into()),
        (Op::Put, None) => return Err("a put needs a value".into()),
        (Op::Put, Some(serde_json::Value::String(s))) => (false, s.into_bytes()),
        (Op::Put, Some(v)) => (false, v.to_string().into_bytes()),
    };
    if !delete {
        validate_value(&value).map_err(|e| e.to_string())?;
    }
    Ok(pb::Change {
        collection: event.collection,
        key: event.key,
        delete,
        value,
        seq: event.seq,
        source_ms,
    })
}

/// Reads one line (without its newline) of at most [`LINE_BYTES_MAX`] bytes. Returns the bytes
/// consumed, and whether the line was complete (ended by a newline).
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
) -> std::io::Result<(usize, bool)> {
    buf.clear();
    let n = (&mut *reader)
        .take(LINE_READ_BYTES_MAX)
        .read_until(b'\n', buf)
        .await?;
    Ok((n, end_line(buf)))
}

/// The most one line read takes from a feed: a line may hold [`LINE_BYTES_MAX`] bytes and its
/// newline, so a read that ends without one is a line too long (or the feed's unfinished end).
pub(crate) const LINE_READ_BYTES_MAX: u64 = LINE_BYTES_MAX as u64 + 1;

/// Takes the line ending ("\n" or "\r\n") off a line read of at most [`LINE_READ_BYTES_MAX`]
/// bytes; returns whether there was one (the line is complete).
pub(crate) fn end_line(buf: &mut Vec<u8>) -> bool {
    let complete = buf.last() == Some(&b'\n');
    if complete {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    complete
}

struct Batch {
    changes: Vec<pb::Change>,
    bytes: usize,
    /// Offset, line number and sequence of the batch's last line.
    end_offset: u64,
    end_line: u64,
    end_seq: u64,
}

/// Runs a feed until its end (`once`), a malformed line, a refusal, or `stop` resolving.
pub async fn run_feed(
    client: &EscrowClient,
    options: &FeedOptions,
    progress: &dyn Progress,
    stop: impl std::future::Future<Output = ()>,
) -> Result<FeedReport, FeedError> {
    let feed_name = options
        .feed
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "stdin".into());
    let feed_path = match &options.feed {
        Some(p) => Some(std::fs::canonicalize(p).map_err(|cause| FeedError::Read {
            path: feed_name.clone(),
            cause,
        })?),
        None => None,
    };
    let mut state = match FeedState::load(&options.state_file)? {
        Some(s) => {
            if s.tenant != options.tenant || s.source != options.source || s.feed != feed_path {
                return Err(FeedError::State {
                    path: options.state_file.clone(),
                    reason: format!(
                        "it belongs to another feed (tenant {}, source {}, feed {:?}); give this feed its own --state file",
                        s.tenant, s.source, s.feed
                    ),
                });
            }
            if s.feed.is_none() {
                // stdin starts over: no offset to resume from and no line order to continue;
                // the cluster's sequence check skips what it already applied.
                FeedState {
                    offset: 0,
                    line: 0,
                    seq: 0,
                    ..s
                }
            } else {
                s
            }
        }
        None => FeedState {
            version: STATE_VERSION,
            tenant: options.tenant.clone(),
            source: options.source.clone(),
            feed: feed_path.clone(),
            ..Default::default()
        },
    };
    let read_err = |cause| FeedError::Read {
        path: feed_name.clone(),
        cause,
    };
    let input: Box<dyn AsyncRead + Unpin + Send> = match &feed_path {
        Some(path) => {
            let mut f = tokio::fs::File::open(path).await.map_err(read_err)?;
            let len = f.metadata().await.map_err(read_err)?.len();
            if len < state.offset {
                return Err(FeedError::State {
                    path: options.state_file.clone(),
                    reason: format!(
                        "the feed is {len} bytes, shorter than the {} bytes already sent (was it truncated or replaced?)",
                        state.offset
                    ),
                });
            }
            f.seek(std::io::SeekFrom::Start(state.offset))
                .await
                .map_err(read_err)?;
            Box::new(f)
        }
        None => Box::new(tokio::io::stdin()),
    };
    let mut reader = BufReader::with_capacity(256 * 1024, input);
    let batch_changes = options.batch_changes.clamp(1, INGEST_CHANGES_MAX);
    let mut report = FeedReport {
        tenant: options.tenant.clone(),
        source: options.source.clone(),
        position: state.position,
        offset: state.offset,
        ..Default::default()
    };
    let mut batch = Batch {
        changes: Vec::new(),
        bytes: 0,
        end_offset: state.offset,
        end_line: state.line,
        end_seq: state.seq,
    };
    let mut line = Vec::new();
    // Bytes of an incomplete last line seen while following; re-read once more arrives.
    let mut partial: Vec<u8> = Vec::new();
    let mut sender = Sender {
        client,
        options,
        progress,
        stop: super::Stop::new(stop),
    };
    loop {
        let Some(read) = sender.stop.until(read_line(&mut reader, &mut line)).await else {
            // Stopped while waiting for input (an idle pipe): what was read and not yet
            // acknowledged is not checkpointed; a file feed's next run reads it again.
            return Ok(report);
        };
        let (n, complete) = read.map_err(read_err)?;
        // A line is taken whole once it ends, at the end of a `--once` run, or once it is
        // over the limit, counting what earlier reads kept of it (a line that never ends, such
        // as a feed with CR-only line endings, is then refused instead of growing without end).
        if n > 0 && (complete || options.once || partial.len() + line.len() > LINE_BYTES_MAX) {
            let mut whole = std::mem::take(&mut partial);
            whole.extend_from_slice(&line);
            // Bytes actually read (a CRLF line ending is two of them).
            let consumed = (whole.len() - line.len() + n) as u64;
            let number = batch.end_line + 1;
            match feed_line(&whole, batch.end_seq) {
                Ok(change) => {
                    if let Some(change) = change {
                        let size = change.key.len() + change.value.len();
                        if batch.bytes + size > INGEST_BYTES_MAX {
                            // Send what came before; this change opens the next batch.
                            if !sender.send(&mut state, &mut batch, &mut report).await? {
                                // This line was not sent: the next run reads it again.
                                return Ok(report);
                            }
                        }
                        batch.bytes += size;
                        batch.end_seq = change.seq;
                        batch.changes.push(change);
                    }
                    batch.end_offset += consumed;
                    batch.end_line = number;
                    report.lines += 1;
                    if batch.changes.len() >= batch_changes
                        && !sender.send(&mut state, &mut batch, &mut report).await?
                    {
                        return Ok(report);
                    }
                    continue;
                }
                Err(reason) => {
                    if !sender.transmit(&mut state, &mut batch, &mut report).await? {
                        return Ok(report);
                    }
                    return Err(FeedError::Malformed {
                        path: feed_name,
                        line: number,
                        reason,
                    });
                }
            }
        }
        if n > 0 {
            // An incomplete last line while following: keep it and wait for the rest.
            partial.extend_from_slice(&line);
        }
        // End of the available data: send what is pending.
        if !sender.send(&mut state, &mut batch, &mut report).await? || options.once {
            return Ok(report);
        }
        // A stop while waiting ends the feed at the top of the loop; what arrived meanwhile
        // is read by the next run.
        sender.stop.within(FOLLOW_POLL).await;
    }
}

/// What sending a batch needs besides the batch: the cluster, the feed's options, where its
/// progress shows, and the stop request.
struct Sender<'a, F: std::future::Future<Output = ()>> {
    client: &'a EscrowClient,
    options: &'a FeedOptions,
    progress: &'a dyn Progress,
    stop: super::Stop<F>,
}

impl<F: std::future::Future<Output = ()>> Sender<'_, F> {
    /// [`Self::transmit`], then shows the progress. Whether the feed goes on: not when a stop
    /// came first or has come meanwhile.
    async fn send(
        &mut self,
        state: &mut FeedState,
        batch: &mut Batch,
        report: &mut FeedReport,
    ) -> Result<bool, FeedError> {
        let sent = self.transmit(state, batch, report).await?;
        self.progress.update(report);
        Ok(sent && !self.stop.requested())
    }

    /// Sends the batch, retrying while the cluster is unavailable (unless `once`), then
    /// checkpoints the offset after its last line. `false` when a stop came first: the batch is
    /// not checkpointed, so the next run sends it again (the cluster skips what it already
    /// applied).
    async fn transmit(
        &mut self,
        state: &mut FeedState,
        batch: &mut Batch,
        report: &mut FeedReport,
    ) -> Result<bool, FeedError> {
        let options = self.options;
        if batch.changes.is_empty() {
            if batch.end_offset != state.offset {
                // Only blank lines since the last checkpoint.
                checkpoint(state, batch, report, &options.state_file)?;
            }
            return Ok(true);
        }
        let changes = std::mem::take(&mut batch.changes);
        batch.bytes = 0;
        let reply = loop {
            let ingest = self
                .client
                .ingest(&options.tenant, &options.source, changes.clone());
            let Some(sent) = self.stop.until(ingest).await else {
                return Ok(false);
            };
            match sent {
                Ok(r) => break r,
                Err(e) if retry_later(&e) && !options.once => {
                    tracing::warn!(error = %e, "batch not acknowledged; resending");
                    if self.stop.within(RETRY_PAUSE).await {
                        return Ok(false);
                    }
                }
                Err(cause) => {
                    return Err(FeedError::Refused {
                        line: batch.end_line,
                        cause,
                    })
                }
            }
        };
        report.applied += reply.applied;
        report.duplicates += reply.duplicates;
        report.batches += 1;
        report.position = reply.position;
        state.position = reply.position;
        checkpoint(state, batch, report, &options.state_file)?;
        Ok(true)
    }
}

/// Records in the state file that the feed is done up to the batch's last line.
fn checkpoint(
    state: &mut FeedState,
    batch: &Batch,
    report: &mut FeedReport,
    state_file: &Path,
) -> Result<(), FeedError> {
    state.offset = batch.end_offset;
    state.line = batch.end_line;
    state.seq = batch.end_seq;
    report.offset = state.offset;
    state.save(state_file)
}

/// Errors worth waiting out: no leader, nodes down, a deadline passed, a voter's disk under
/// its reserve.
fn retry_later(e: &ClientError) -> bool {
    e.is_low_disk()
        || matches!(
            e.code(),
            Some(tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the agent waits out a voter's low disk (the write passes once space is freed)
    // but not a size limit, which the same status code reports.
    #[test]
    fn a_low_disk_is_waited_out_a_size_limit_is_not() {
        let refusal = crate::workers::disk::Refusal {
            node: 3,
            free: Some(10),
            reserve: 20,
        };
        let low = ClientError::Rpc(crate::service::status::low_disk(refusal));
        assert!(low.is_low_disk() && retry_later(&low));
        let too_large = ClientError::Rpc(tonic::Status::resource_exhausted("batch too large"));
        assert!(!too_large.is_low_disk() && !retry_later(&too_large));
    }

    // Goal: each malformed event is refused with a reason that names the problem; valid
    // events of both kinds parse, with either time format.
    #[test]
    fn events_are_validated() {
        let ok = parse_line(
            br#"{"collection":"orders","key":"o-1","op":"put","value":"hi","seq":3,"time":"2026-11-22T10:00:00Z"}"#,
            2,
        )
        .unwrap();
        assert_eq!(ok.value, b"hi");
        assert_eq!(ok.source_ms, 1_795_341_600_000);
        let json = parse_line(
            br#"{"collection":"orders","key":"o-1","op":"put","value":{"a":1},"seq":4,"time":5}"#,
            3,
        )
        .unwrap();
        assert_eq!(json.value, br#"{"a":1}"#);
        let del = parse_line(
            br#"{"collection":"orders","key":"o-1","op":"delete","seq":5,"time":5}"#,
            4,
        )
        .unwrap();
        assert!(del.delete);
        for (line, why) in [
            (&br#"{"collection":"orders""#[..], "not a valid event"),
            (br#"{"collection":"Orders","key":"k","op":"put","value":"v","seq":9,"time":1}"#, "collection"),
            (br#"{"collection":"o","key":"k","op":"put","value":"v","seq":2,"time":1}"#, "does not increase"),
            (br#"{"collection":"o","key":"k","op":"put","seq":9,"time":1}"#, "needs a value"),
            (br#"{"collection":"o","key":"k","op":"put","value":"","seq":9,"time":1}"#, "empty"),
            (br#"{"collection":"o","key":"k","op":"drop","value":"v","seq":9,"time":1}"#, "not a valid event"),
            (br#"{"collection":"o","key":"k","op":"put","value":"v","seq":9,"time":"yesterday"}"#, "RFC 3339"),
            (br#"{"collection":"o","key":"k","op":"put","value":"v","seq":9,"time":1,"x":1}"#, "unknown field"),
        ] {
            let err = parse_line(line, 5).unwrap_err();
            assert!(err.contains(why), "{err} lacks {why}");
        }
    }
}
