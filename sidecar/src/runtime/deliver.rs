//! Calling the app (SPEC §4) and classifying its answer.

use std::time::Duration;

use bytes::Bytes;
use repair_rules::headers::MEND_ACTION;
use repair_rules::{FailureError, problem};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, RETRY_AFTER};

use crate::runtime::config::BindingConfig;

/// How much of an error answer is read (problem+json is parsed from it; text is cut further).
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Answers that mean "the app or its dependencies are unwell", not "this message is bad".
const TRANSIENT_STATUSES: [u16; 6] = [408, 425, 429, 502, 503, 504];

/// What the app made of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 2xx: processed.
    Processed,
    /// Try again later, in place.
    Transient {
        status: Option<u16>,
        retry_after: Option<Duration>,
        cause: String,
    },
    /// The app rejected the message: delegate it.
    Rejected(FailureError),
    /// `Mend-Action: drop`.
    Drop,
    /// `Mend-Action: park`: straight to the dashboard.
    Park(FailureError),
}

impl Answer {
    /// Whether the app is done with the message (processed, or asked to drop it).
    pub fn is_success(&self) -> bool {
        matches!(self, Answer::Processed | Answer::Drop)
    }

    /// What it is, in a word (a span's status description).
    pub fn kind(&self) -> &'static str {
        match self {
            Answer::Processed => "processed",
            Answer::Transient { .. } => "transient",
            Answer::Rejected(_) => "rejected",
            Answer::Drop => "drop",
            Answer::Park(_) => "park",
        }
    }
}

/// The HTTP client of one binding: pooled keep-alive connections to one endpoint.
#[derive(Debug, Clone)]
pub struct App {
    http: reqwest::Client,
    endpoint: reqwest::Url,
}

impl App {
    pub fn new(binding: &BindingConfig) -> reqwest::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(binding.timeout)
            .pool_max_idle_per_host(binding.concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            endpoint: binding.endpoint.clone(),
        })
    }

    /// POSTs one message and classifies the answer; a refused connection or a timeout is transient.
    /// Also the answer's status, when there was one.
    pub async fn call(&self, headers: HeaderMap, body: Bytes) -> (Option<u16>, Answer) {
        match self.post(headers, body, ERROR_BODY_LIMIT).await {
            Ok(Reply {
                status,
                unread: Some(cause),
                ..
            }) if !status.is_success() => (
                Some(status.as_u16()),
                Answer::Transient {
                    status: Some(status.as_u16()),
                    retry_after: None,
                    cause,
                },
            ),
            Ok(reply) => (
                Some(reply.status.as_u16()),
                classify(reply.status, &reply.headers, &reply.body),
            ),
            Err(answer) => (None, answer),
        }
    }

    /// POSTs `body` and reads the answer: its status, the headers classification reads, and at most
    /// `limit` bytes of its body (`truncated` says there was more). What kept an answer from coming
    /// (a refused connection, a timeout) is the transient answer.
    pub async fn post(
        &self,
        headers: HeaderMap,
        body: Bytes,
        limit: usize,
    ) -> Result<Reply, Answer> {
        let response = match self
            .http
            .post(self.endpoint.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let cause = if e.is_timeout() {
                    "app call timed out".to_owned()
                } else if e.is_connect() {
                    "app refused the connection".to_owned()
                } else {
                    format!("app call failed: {e}")
                };
                return Err(Answer::Transient {
                    status: None,
                    retry_after: None,
                    cause,
                });
            }
        };
        let status = response.status();
        // Only what classification reads, not a copy of the whole map.
        let mut headers = HeaderMap::with_capacity(3);
        for name in [
            CONTENT_TYPE,
            RETRY_AFTER,
            HeaderName::from_static(repair_rules::headers::http::MEND_ACTION),
        ] {
            if let Some(v) = response.headers().get(&name) {
                headers.insert(name, v.clone());
            }
        }
        let (body, truncated, unread) = match read_capped(response, limit).await {
            Ok((body, truncated)) => (body, truncated, None),
            Err(e) => {
                tracing::debug!(%e, %status, "reading the app's answer failed");
                let cause = format!("reading the app's answer failed: {e}");
                (Vec::new(), false, Some(cause))
            }
        };
        Ok(Reply {
            status,
            headers,
            body,
            truncated,
            unread,
        })
    }
}

/// An answer the app gave.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// `Content-Type`, `Retry-After` and `Mend-Action`, when present.
    pub headers: HeaderMap,
    /// At most the limit asked for.
    pub body: Vec<u8>,
    /// The body went on past the limit.
    pub truncated: bool,
    /// Why the body could not be read (it is then empty).
    pub unread: Option<String>,
}

async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> reqwest::Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            return Ok((body, true));
        }
    }
    Ok((body, false))
}

/// The class of an answer with `status`, `headers` and (the start of) `body`.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Answer {
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let error = || problem::from_answer(status.as_u16(), content_type, body);
    match headers
        .get(MEND_ACTION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("drop") => return Answer::Drop,
        Some("park") => return Answer::Park(error()),
        Some(other) => {
            tracing::warn!(action = other, "unknown Mend-Action from the app; ignored");
        }
        None => {}
    }
    if status.is_success() {
        Answer::Processed
    } else if TRANSIENT_STATUSES.contains(&status.as_u16()) {
        Answer::Transient {
            status: Some(status.as_u16()),
            retry_after: headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(retry_after),
            cause: format!("app answered {status}"),
        }
    } else {
        Answer::Rejected(error())
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use repair_rules::ErrorKind;

    fn answer(status: u16, headers: &[(&'static str, &str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        classify(StatusCode::from_u16(status).unwrap(), &map, body.as_bytes())
    }

    #[test]
    fn classes() {
        assert_eq!(answer(200, &[], ""), Answer::Processed);
        assert_eq!(answer(204, &[], ""), Answer::Processed);
        for s in [408, 425, 429, 502, 503, 504] {
            assert!(
                matches!(answer(s, &[], ""), Answer::Transient { .. }),
                "{s}"
            );
        }
        for s in [400, 404, 409, 422, 500, 501, 302] {
            assert!(matches!(answer(s, &[], ""), Answer::Rejected(_)), "{s}");
        }
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let Answer::Transient { retry_after, .. } = answer(503, &[("retry-after", "3")], "") else {
            panic!()
        };
        assert_eq!(retry_after, Some(Duration::from_secs(3)));
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let Answer::Transient { retry_after, .. } = answer(429, &[("retry-after", &date)], "")
        else {
            panic!()
        };
        let d = retry_after.unwrap();
        assert!(
            d > Duration::from_secs(50) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        let Answer::Transient { retry_after, .. } = answer(503, &[("retry-after", "soon")], "")
        else {
            panic!()
        };
        assert_eq!(retry_after, None);
    }

    #[test]
    fn problem_json_is_parsed() {
        let a = answer(
            422,
            &[("content-type", "application/problem+json")],
            r#"{"title":"bad","code":"bad_type","field":"/amount","status":422}"#,
        );
        let Answer::Rejected(e) = a else {
            panic!("{a:?}")
        };
        assert_eq!(e.kind, ErrorKind::Message);
        assert_eq!(e.code.as_deref(), Some("bad_type"));
        assert_eq!(e.field.as_deref(), Some("/amount"));
    }

    #[test]
    fn mend_action_wins_over_status() {
        assert_eq!(answer(200, &[("mend-action", "drop")], ""), Answer::Drop);
        assert_eq!(answer(422, &[("mend-action", "DROP")], ""), Answer::Drop);
        let Answer::Park(e) = answer(422, &[("mend-action", "park")], "nope") else {
            panic!()
        };
        assert_eq!(e.body.as_deref(), Some("nope"));
        assert_eq!(
            answer(200, &[("mend-action", "explode")], ""),
            Answer::Processed
        );
    }
}
