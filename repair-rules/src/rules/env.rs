//! The CEL environment of a rule: `subject`, `key`, `headers`, `payload`, `error`, `attempt`, shaped
//! as in the failure envelope (headers map a name to its list of values; absent error fields are null).
//!
//! JSON numbers become CEL `int` when they are integers and `double` otherwise (the CEL crate would
//! make positive integers `uint`, which does not mix with `int` literals). Extra functions: `trim()`,
//! `lowerAscii()`, `upperAscii()`.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::types::{
    CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString,
};
use cel::common::value::Val;
use cel::objects::Key;
use cel::{Context, Value as Cel};
use serde_json::Value as Json;

use super::file::Uses;
use crate::envelope::FailureEnvelope;

/// A CEL value from JSON, built directly as the interpreter's values (no intermediate `Value`
/// tree) and borrowing the JSON's strings rather than copying them.
pub fn to_cel<'v>(json: &'v Json) -> Box<dyn Val + 'v> {
    match json {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Box::new(CelInt::from(i)),
            None => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        Json::String(s) => Box::new(CelString::from(s.as_str())),
        Json::Array(items) => Box::new(CelList::from(items.iter().map(to_cel).collect::<Vec<_>>())),
        Json::Object(map) => Box::new(CelMap::from(
            map.iter()
                .map(|(k, v)| (CelMapKey::from(k.as_str()), to_cel(v)))
                .collect::<HashMap<_, _>>(),
        )),
    }
}

fn text<'v>(value: Option<&'v str>) -> Box<dyn Val + 'v> {
    match value {
        Some(s) => Box::new(CelString::from(s)),
        None => Box::new(CelNull),
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
/// are never referenced, so they are not built). The variables borrow the envelope's strings.
pub fn with_context<'e, R>(
    envelope: &'e FailureEnvelope,
    uses: Uses,
    f: impl FnOnce(&Context<'_, 'e>) -> R,
) -> R {
    ROOT.with(|root| {
        let root: &Context<'_, 'e> = root;
        let mut ctx = root.new_inner_scope();
        add_variables(&mut ctx, envelope, uses);
        f(&ctx)
    })
}

fn add_variables<'e>(ctx: &mut Context<'_, 'e>, envelope: &'e FailureEnvelope, uses: Uses) {
    if uses.subject {
        ctx.add_variable_as_val("subject", text(Some(&envelope.subject)));
    }
    if uses.key {
        ctx.add_variable_as_val("key", text(envelope.key.as_deref()));
    }
    if uses.headers {
        let headers: HashMap<CelMapKey<'e>, Box<dyn Val + 'e>> = envelope
            .headers
            .iter()
            .map(|(k, vs)| {
                let values: Vec<Box<dyn Val + 'e>> =
                    vs.iter().map(|v| text(Some(v.as_str()))).collect();
                let list: Box<dyn Val + 'e> = Box::new(CelList::from(values));
                (CelMapKey::from(k.as_str()), list)
            })
            .collect();
        ctx.add_variable_as_val("headers", Box::new(CelMap::from(headers)));
    }
    if uses.payload {
        ctx.add_variable_as_val("payload", to_cel(&envelope.payload));
    }
    if uses.error {
        ctx.add_variable_as_val("error", error(envelope));
    }
    if uses.attempt {
        ctx.add_variable_as_val(
            "attempt",
            Box::new(CelInt::from(i64::from(envelope.attempt))),
        );
    }
}

/// `error`: every documented field is present (null when unknown), so `error.code == "x"` never
/// fails.
fn error(envelope: &FailureEnvelope) -> Box<dyn Val + '_> {
    let e = &envelope.error;
    let status: Box<dyn Val> = match e.status {
        Some(s) => Box::new(CelInt::from(i64::from(s))),
        None => Box::new(CelNull),
    };
    let fields: [(&str, Box<dyn Val>); 8] = [
        ("kind", text(Some(e.kind.as_str()))),
        ("status", status),
        ("type", text(e.type_uri.as_deref())),
        ("code", text(e.code.as_deref())),
        ("field", text(e.field.as_deref())),
        ("title", text(e.title.as_deref())),
        ("detail", text(e.detail.as_deref())),
        ("body", text(e.body.as_deref())),
    ];
    let map: HashMap<CelMapKey, Box<dyn Val>> = fields
        .into_iter()
        .map(|(k, v)| (CelMapKey::from(k), v))
        .collect();
    Box::new(CelMap::from(map))
}

fn add_functions(ctx: &mut Context<'static, 'static>) {
    use cel::extractors::This;
    // `"  x ".trim()` and `trim("  x ")`.
    let _ = ctx.add_function("trim", |This(s): This<Arc<String>>| s.trim().to_owned());
    // As CEL's strings extension names them: ASCII letters re-cased, the rest as it is.
    let _ = ctx.add_function("lowerAscii", |This(s): This<Arc<String>>| {
        s.to_ascii_lowercase()
    });
    let _ = ctx.add_function("upperAscii", |This(s): This<Arc<String>>| {
        s.to_ascii_uppercase()
    });
    // Each iteration of a comprehension (see `bounded`).
    let _ = ctx.add_function(super::bounded::TICK, super::bounded::tick);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_and_integers_are_int() {
        let j = json!({"a": [1, 2.5, "x", true, null], "b": {"c": -3}});
        let c = Cel::try_from(to_cel(&j).as_ref()).unwrap();
        assert_eq!(to_json(&c).unwrap(), j);
        assert!(matches!(
            Cel::try_from(to_cel(&json!(7)).as_ref()),
            Ok(Cel::Int(7))
        ));
    }
}
