//! The CEL environment of a rule: `subject`, `key`, `headers`, `payload`, `error`, `attempt`, shaped
//! as in the failure envelope (headers map a name to its list of values; absent error fields are null).
//!
//! JSON numbers become CEL `int` when they are integers and `double` otherwise (the CEL crate would
//! make positive integers `uint`, which does not mix with `int` literals). Extra function: `trim()`.

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::Key;
use cel::{Context, Value as Cel};
use serde_json::Value as Json;

use super::file::Uses;
use crate::envelope::FailureEnvelope;

/// A CEL value from JSON.
pub fn to_cel(json: &Json) -> Cel {
    match json {
        Json::Null => Cel::Null,
        Json::Bool(b) => Cel::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Cel::Int(i),
            None => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Cel::String(Arc::new(s.clone())),
        Json::Array(items) => Cel::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(map) => {
            let map: HashMap<Key, Cel> = map
                .iter()
                .map(|(k, v)| (Key::from(k.clone()), to_cel(v)))
                .collect();
            Cel::Map(map.into())
        }
    }
}

/// JSON from a CEL value, for `set`. Timestamps and durations become strings.
pub fn to_json(value: &Cel) -> Result<Json, String> {
    Ok(match value {
        Cel::Null => Json::Null,
        Cel::Bool(b) => Json::Bool(*b),
        Cel::Int(i) => Json::from(*i),
        Cel::UInt(u) => Json::from(*u),
        Cel::Float(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .ok_or_else(|| format!("{f} is not a JSON number"))?,
        Cel::String(s) => Json::String(s.to_string()),
        Cel::List(items) => Json::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Cel::Map(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.map.iter() {
                let key = match k {
                    Key::String(s) => s.to_string(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                out.insert(key, to_json(v)?);
            }
            Json::Object(out)
        }
        other => match other.json() {
            Ok(j) => j,
            Err(e) => return Err(format!("{other:?} has no JSON form: {e}")),
        },
    })
}

thread_local! {
    /// The CEL standard library and mend's functions, built once per thread: building them is
    /// costlier than evaluating a rule.
    static ROOT: Context<'static, 'static> = {
        let mut ctx = Context::default();
        add_functions(&mut ctx);
        ctx
    };
}

/// Runs `f` with the evaluation context of `envelope`, holding the variables in `uses` (the others
/// are never referenced, so they are not built).
pub fn with_context<R>(
    envelope: &FailureEnvelope,
    uses: Uses,
    f: impl FnOnce(&Context<'_, '_>) -> R,
) -> R {
    ROOT.with(|root| {
        let mut ctx = root.new_inner_scope();
        add_variables(&mut ctx, envelope, uses);
        f(&ctx)
    })
}

fn add_variables(ctx: &mut Context<'_, '_>, envelope: &FailureEnvelope, uses: Uses) {
    if uses.subject {
        ctx.add_variable_from_value("subject", Cel::String(Arc::new(envelope.subject.clone())));
    }
    if uses.key {
        ctx.add_variable_from_value(
            "key",
            envelope
                .key
                .as_ref()
                .map_or(Cel::Null, |k| Cel::String(Arc::new(k.clone()))),
        );
    }
    if uses.headers {
        add_headers(ctx, envelope);
    }
    if uses.payload {
        ctx.add_variable_from_value("payload", to_cel(&envelope.payload));
    }
    if uses.error {
        add_error(ctx, envelope);
    }
    if uses.attempt {
        ctx.add_variable_from_value("attempt", Cel::Int(i64::from(envelope.attempt)));
    }
}

fn add_headers(ctx: &mut Context<'_, '_>, envelope: &FailureEnvelope) {
    let headers: HashMap<Key, Cel> = envelope
        .headers
        .iter()
        .map(|(k, vs)| {
            let values = vs
                .iter()
                .map(|v| Cel::String(Arc::new(v.clone())))
                .collect();
            (Key::from(k.clone()), Cel::List(Arc::new(values)))
        })
        .collect();
    ctx.add_variable_from_value("headers", Cel::Map(headers.into()));
}

fn add_error(ctx: &mut Context<'_, '_>, envelope: &FailureEnvelope) {
    // Every documented field is present (null when unknown), so `error.code == "x"` never fails.
    let e = &envelope.error;
    let text = |v: &Option<String>| {
        v.as_ref()
            .map_or(Cel::Null, |s| Cel::String(Arc::new(s.clone())))
    };
    let kind = e.kind.as_str().to_owned();
    let error: HashMap<Key, Cel> = [
        ("kind", Cel::String(Arc::new(kind))),
        (
            "status",
            e.status.map_or(Cel::Null, |s| Cel::Int(i64::from(s))),
        ),
        ("type", text(&e.type_uri)),
        ("code", text(&e.code)),
        ("field", text(&e.field)),
        ("title", text(&e.title)),
        ("detail", text(&e.detail)),
        ("body", text(&e.body)),
    ]
    .into_iter()
    .map(|(k, v)| (Key::from(k.to_owned()), v))
    .collect();
    ctx.add_variable_from_value("error", Cel::Map(error.into()));
}

fn add_functions(ctx: &mut Context<'static, 'static>) {
    use cel::extractors::This;
    // `"  x ".trim()` and `trim("  x ")`.
    let _ = ctx.add_function("trim", |This(s): This<Arc<String>>| s.trim().to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_and_integers_are_int() {
        let j = json!({"a": [1, 2.5, "x", true, null], "b": {"c": -3}});
        let c = to_cel(&j);
        assert_eq!(to_json(&c).unwrap(), j);
        assert!(matches!(to_cel(&json!(7)), Cel::Int(7)));
    }
}
