//! NATS subject wildcards: `*` matches one token, `>` (last) one or more.

/// Whether `subject` matches `filter`.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `filter` is a valid subject filter.
pub fn is_valid_filter(filter: &str) -> bool {
    let tokens: Vec<&str> = filter.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty()
            && !t.chars().any(char::is_whitespace)
            && (!t.contains('*') || *t == "*")
            && (!t.contains('>') || (*t == ">" && i + 1 == tokens.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches("orders.>", "orders.created"));
        assert!(matches("orders.>", "orders.eu.created"));
        assert!(!matches("orders.>", "orders"));
        assert!(matches("orders.*", "orders.created"));
        assert!(!matches("orders.*", "orders.eu.created"));
        assert!(matches("orders.*.created", "orders.eu.created"));
        assert!(matches("orders.created", "orders.created"));
        assert!(!matches("orders.created", "orders.updated"));
        assert!(!matches("orders.created", "orders.created.x"));
        assert!(is_valid_filter("a.*.>"));
        for bad in ["", "a..b", "a.>.b", "a.b*", "a b"] {
            assert!(!is_valid_filter(bad), "{bad}");
        }
    }
}
