//! Reading an app's error answer into a [`FailureError`] (SPEC §4): an RFC 9457
//! `application/problem+json` body gives `type`, `title`, `status`, `detail` and the extension
//! members `code` and `field`; any other body is kept as text, cut at [`BODY_LIMIT`] bytes.

use serde_json::Value;

use crate::envelope::{ErrorKind, FailureError};

/// How much of a non-problem body is kept, in bytes.
pub const BODY_LIMIT: usize = crate::envelope::ERROR_TEXT_LIMIT;

/// The error record for an answer with `status`, `content_type` and `body`.
pub fn from_answer(status: u16, content_type: Option<&str>, body: &[u8]) -> FailureError {
    let mut error = FailureError::bare(ErrorKind::Message, Some(status));
    if is_problem_json(content_type)
        && let Ok(Value::Object(problem)) = serde_json::from_slice::<Value>(body)
    {
        {
            let text = |name: &str| match problem.get(name) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            error.type_uri = text("type");
            error.code = text("code");
            error.field = text("field");
            error.title = text("title");
            error.detail = text("detail");
            error.bound();
            return error;
        }
    }
    if !body.is_empty() {
        error.body = Some(cut_text(body, BODY_LIMIT));
    }
    error
}

fn is_problem_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/problem+json"))
}

/// `body` as text (invalid UTF-8 replaced), at most `limit` bytes, cut on a character boundary.
pub fn cut_text(body: &[u8], limit: usize) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(limit + 4)]);
    if text.len() <= limit {
        return text.into_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_json_members_are_read() {
        let body = br#"{"type":"https://example.com/bad-type","title":"amount must be a number",
            "status":422,"detail":"got a string","code":"bad_type","field":"/amount","extra":1}"#;
        let e = from_answer(422, Some("application/problem+json; charset=utf-8"), body);
        assert_eq!(e.kind, ErrorKind::Message);
        assert_eq!(e.status, Some(422));
        assert_eq!(e.type_uri.as_deref(), Some("https://example.com/bad-type"));
        assert_eq!(e.code.as_deref(), Some("bad_type"));
        assert_eq!(e.field.as_deref(), Some("/amount"));
        assert_eq!(e.title.as_deref(), Some("amount must be a number"));
        assert_eq!(e.detail.as_deref(), Some("got a string"));
        assert_eq!(e.body, None);
    }

    #[test]
    fn broken_problem_json_is_kept_as_text() {
        let e = from_answer(400, Some("application/problem+json"), b"{not json");
        assert_eq!(e.code, None);
        assert_eq!(e.body.as_deref(), Some("{not json"));
    }

    #[test]
    fn other_bodies_are_cut_at_4k_on_a_char_boundary() {
        let body = "é".repeat(3000); // 6000 bytes
        let e = from_answer(500, Some("text/plain"), body.as_bytes());
        let kept = e.body.unwrap();
        assert!(kept.len() <= BODY_LIMIT && kept.len() >= BODY_LIMIT - 1);
        assert!(kept.chars().all(|c| c == 'é'));
        let e = from_answer(500, None, &[0xff, 0xfe, b'a']);
        assert_eq!(e.body.as_deref(), Some("\u{fffd}\u{fffd}a"));
        assert_eq!(from_answer(500, None, b"").body, None);
    }
}
