//! Just enough HTTP/1.1 to poll a loopback server (`/healthz`, `/readyz`, `/metrics`) without
//! an HTTP library: one GET per connection, with a deadline, and Prometheus' text format.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// An answer: the status code and the body as text.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub elapsed: Duration,
}

/// Why a GET got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing listening, or the connection was reset or closed: the server is not there.
    Connection,
    /// Connected, but no complete answer in time: the server is there and did not answer.
    NoAnswer,
    /// An answer that is not HTTP.
    Malformed,
}

#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl Failure {
    fn io(what: String, error: &io::Error) -> Self {
        let kind = match error.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FailureKind::NoAnswer,
            _ => FailureKind::Connection,
        };
        Self { kind, message: format!("{what}: {error}") }
    }
}

/// `GET http://{addr}{path}`, failing when there is no complete answer within `timeout`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Failure> {
    let started = Instant::now();
    let deadline = started + timeout;
    let no_answer =
        || Failure { kind: FailureKind::NoAnswer, message: format!("GET {path}: no answer within {timeout:?}") };
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| Failure::io(format!("connecting to {addr}"), &e))?;
    let left = |deadline: Instant| deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let sending = |e: io::Error| Failure::io(format!("sending GET {path}"), &e);
    stream.set_write_timeout(Some(left(deadline))).map_err(sending)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n")
        .map_err(sending)?;
    let mut raw = Vec::new();
    let mut buffer = [0_u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(no_answer());
        }
        let reading = |e: io::Error| Failure::io(format!("reading the answer to GET {path}"), &e);
        stream.set_read_timeout(Some(left(deadline))).map_err(reading)?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buffer[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(no_answer());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(reading(e)),
        }
    }
    if raw.is_empty() {
        return Err(Failure {
            kind: FailureKind::Connection,
            message: format!("GET {path}: closed without an answer"),
        });
    }
    let (status, body) = parse_response(&raw)
        .map_err(|e| Failure { kind: FailureKind::Malformed, message: format!("GET {path}: {e:#}") })?;
    Ok(Response { status, body, elapsed: started.elapsed() })
}

/// Splits a whole HTTP/1.1 response into its status code and (de-chunked) body.
fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("the answer has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().context("the answer is empty")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|line| {
        let lower = line.to_ascii_lowercase();
        lower.starts_with("transfer-encoding:") && lower.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes a chunked body: `size-in-hex\r\n data \r\n ... 0\r\n\r\n`.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").context("a chunk has no size line")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("a chunk is cut short");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

/// The sum of a metric's samples over all its label sets, from Prometheus' text format; `None`
/// when the text has no sample of that name.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    samples(text, name).map(|(_, value)| value).reduce(|a, b| a + b)
}

/// A metric's samples: the text between its braces (empty without labels) and the value.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().map(str::trim).filter(|line| !line.is_empty() && !line.starts_with('#')).filter_map(move |line| {
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        if &line[..name_end] != name {
            return None;
        }
        // The value follows the labels (which may contain spaces inside quotes).
        let rest = &line[name_end..];
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => {
                let end = inner.rfind('}')?;
                (&inner[..end], &inner[end + 1..])
            }
            None => ("", rest),
        };
        let value = match rest.split_whitespace().next()? {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().ok()?,
        };
        Some((labels, value))
    })
}

/// The value of `key` in a label set such as `type="assistant-request",le="0.5"`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// From a histogram's buckets, the smallest bound (`le`, in the histogram's unit) under which
/// every observation with `label_key = label_value` fell; `None` when there is none, infinity
/// when some fell beyond the last finite bucket.
pub fn histogram_bound(text: &str, name: &str, label_key: &str, label_value: &str) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples(text, &bucket)
        .filter(|(labels, _)| label(labels, label_key) == Some(label_value))
        .filter_map(|(labels, count)| {
            let le = match label(labels, "le")? {
                "+Inf" => f64::INFINITY,
                le => le.parse().ok()?,
            };
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|(_, count)| *count)?;
    if total <= 0.0 {
        return None;
    }
    buckets.iter().find(|(_, count)| *count >= total).map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_parsed_with_or_without_chunks() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), (200, "hello".to_string()));
        let chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (503, "hello, world".to_string()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"nonsense\r\n\r\n").is_err());
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "\
# HELP callplane_webhook_events_total VAPI webhook messages by type and outcome.
# TYPE callplane_webhook_events_total counter
callplane_webhook_events_total{type=\"assistant-request\",outcome=\"ok\"} 12
callplane_webhook_events_total{type=\"end-of-call-report\",outcome=\"a b}\"} 3
callplane_webhook_events_total_other 100
# TYPE callplane_inbox_depth gauge
callplane_inbox_depth 0
callplane_events_lost_total 2 1700000000000
callplane_weird{le=\"+Inf\"} +Inf
";
        assert_eq!(metric(text, "callplane_webhook_events_total"), Some(15.0));
        assert_eq!(metric(text, "callplane_inbox_depth"), Some(0.0));
        assert_eq!(metric(text, "callplane_events_lost_total"), Some(2.0));
        assert_eq!(metric(text, "callplane_weird"), Some(f64::INFINITY));
        assert_eq!(metric(text, "callplane_webhook_shed_total"), None);
        assert_eq!(metric(text, "callplane_inbox"), None);
    }

    #[test]
    fn histogram_bounds_cover_every_observation() {
        let text = "\
callplane_webhook_seconds_bucket{type=\"assistant-request\",le=\"0.1\"} 3
callplane_webhook_seconds_bucket{type=\"assistant-request\",le=\"0.25\"} 9
callplane_webhook_seconds_bucket{type=\"assistant-request\",le=\"0.5\"} 10
callplane_webhook_seconds_bucket{type=\"assistant-request\",le=\"+Inf\"} 10
callplane_webhook_seconds_bucket{type=\"tool-calls\",le=\"0.1\"} 1
callplane_webhook_seconds_bucket{type=\"tool-calls\",le=\"0.5\"} 1
callplane_webhook_seconds_bucket{type=\"tool-calls\",le=\"+Inf\"} 2
callplane_webhook_seconds_bucket{type=\"transcript\",le=\"+Inf\"} 0
";
        let bound = |kind| histogram_bound(text, "callplane_webhook_seconds", "type", kind);
        assert_eq!(bound("assistant-request"), Some(0.5));
        assert_eq!(bound("tool-calls"), Some(f64::INFINITY));
        assert_eq!(bound("transcript"), None);
        assert_eq!(bound("end-of-call-report"), None);
    }
}
