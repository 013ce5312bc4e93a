//! Loading any role's TOML config with `MEND_*` environment overrides, with errors that name the
//! file, line and key, or the environment variable.
//!
//! Overrides map `MEND_<KEY>` to a top-level key (`MEND_NATS_URL` → `nats_url`), `MEND_<TABLE>_<KEY>`
//! to a key of a table (`MEND_NATS_TOKEN` → `[nats] token`), and `MEND_<ARRAY>_<NAME>_<KEY>` to a key
//! of the array-table entry with that `name` (`MEND_BINDING_ORDERS_CONCURRENCY`). The value is read as
//! a TOML value when it is one (`8`, `true`, `["a", "b"]`) and as a string otherwise. Variables that
//! fit no key of this role are left alone: the same environment may configure several roles.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", Located { path, line: *line, key, message })]
    File {
        path: PathBuf,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

struct Located<'a> {
    path: &'a Path,
    line: Option<usize>,
    key: &'a Option<String>,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads `path` into `T`, then applies the `MEND_*` overrides found in `env`. `arrays` names the
/// array tables whose entries are addressed by their `name` key.
pub fn load<T: DeserializeOwned>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    arrays: &[&str],
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config: T = toml::from_str(&text).map_err(|e| locate(path, &text, &e))?;
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("MEND_"))
        .collect();
    if overrides.is_empty() {
        return Ok(config);
    }
    overrides.sort();
    let mut table: Table = toml::from_str(&text).map_err(|e| locate(path, &text, &e))?;
    for (var, raw) in overrides {
        let name = var["MEND_".len()..].to_ascii_lowercase();
        if let Some(next) = apply(&table, &name, &raw, arrays, &var)? {
            config = next.1;
            table = next.0;
        }
    }
    Ok(config)
}

/// Tries each place `name` could address; the first that is a key of `T` takes the value.
fn apply<T: DeserializeOwned>(
    table: &Table,
    name: &str,
    raw: &str,
    arrays: &[&str],
    var: &str,
) -> Result<Option<(Table, T)>, ConfigError> {
    for candidate in candidates(table, name, arrays) {
        let mut next = table.clone();
        let Some(slot) = candidate.slot(&mut next) else {
            continue;
        };
        let existing = slot.get(candidate.key());
        let value = env_value(raw, existing);
        slot.insert(candidate.key().to_owned(), value);
        match T::deserialize(Value::Table(next.clone())) {
            Ok(config) => return Ok(Some((next, config))),
            Err(e) if e.message().starts_with("unknown field") => continue,
            Err(e) => {
                return Err(ConfigError::Env {
                    var: var.to_owned(),
                    message: e.message().trim().to_owned(),
                });
            }
        }
    }
    Ok(None)
}

enum Candidate {
    Top(String),
    Table(String, String),
    Entry(String, usize, String),
    /// A key of a table inside an entry of an array of tables (`binding.batch.max_messages`).
    EntryTable(String, usize, String, String),
}

impl Candidate {
    fn key(&self) -> &str {
        match self {
            Candidate::Top(k)
            | Candidate::Table(_, k)
            | Candidate::Entry(_, _, k)
            | Candidate::EntryTable(_, _, _, k) => k,
        }
    }

    fn slot<'t>(&self, table: &'t mut Table) -> Option<&'t mut Table> {
        match self {
            Candidate::Top(_) => Some(table),
            Candidate::Table(t, _) => table
                .entry(t.clone())
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut(),
            Candidate::Entry(a, i, _) => table
                .get_mut(a)?
                .as_array_mut()?
                .get_mut(*i)?
                .as_table_mut(),
            Candidate::EntryTable(a, i, t, _) => table
                .get_mut(a)?
                .as_array_mut()?
                .get_mut(*i)?
                .as_table_mut()?
                .entry(t.clone())
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut(),
        }
    }
}

fn candidates(table: &Table, name: &str, arrays: &[&str]) -> Vec<Candidate> {
    let mut out = vec![Candidate::Top(name.to_owned())];
    for array in arrays {
        let Some(rest) = name.strip_prefix(&format!("{array}_")) else {
            continue;
        };
        let entries = table.get(*array).and_then(Value::as_array);
        for (i, entry) in entries.into_iter().flatten().enumerate() {
            let Some(entry_name) = entry.get("name").and_then(Value::as_str) else {
                continue;
            };
            let prefix = format!("{}_", entry_name.to_ascii_lowercase().replace('-', "_"));
            if let Some(key) = rest.strip_prefix(&prefix) {
                out.push(Candidate::Entry((*array).to_owned(), i, key.to_owned()));
                for (at, _) in key.match_indices('_') {
                    let (t, k) = (&key[..at], &key[at + 1..]);
                    if !k.is_empty() {
                        out.push(Candidate::EntryTable(
                            (*array).to_owned(),
                            i,
                            t.to_owned(),
                            k.to_owned(),
                        ));
                    }
                }
            }
        }
    }
    for (i, _) in name.match_indices('_') {
        let (t, k) = (&name[..i], &name[i + 1..]);
        if !arrays.contains(&t) && !k.is_empty() {
            out.push(Candidate::Table(t.to_owned(), k.to_owned()));
        }
    }
    out
}

/// The TOML value of an environment string: a string where the file has a string, else whatever
/// the text reads as in TOML, else a string.
fn env_value(raw: &str, existing: Option<&Value>) -> Value {
    if matches!(existing, Some(Value::String(_))) {
        return Value::String(raw.to_owned());
    }
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => match t.remove("v") {
            Some(Value::Table(_)) | None => Value::String(raw.to_owned()),
            Some(v) => v,
        },
        Err(_) => Value::String(raw.to_owned()),
    }
}

/// A TOML error with its line and the key it is about.
fn locate(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_owned();
    let (line, key) = match e.span() {
        Some(span) if span.start <= text.len() => {
            let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[span.start..]
                .find('\n')
                .map_or(text.len(), |i| span.start + i);
            let line_text = &text[line_start..line_end];
            let spanned = text.get(span.clone()).unwrap_or("").trim();
            let key = if message.starts_with("unknown field") {
                Some(spanned.trim_matches('"').to_owned())
            } else {
                line_text
                    .split_once('=')
                    .map(|(k, _)| k.trim().trim_matches('"').to_owned())
                    .filter(|k| !k.is_empty() && !k.starts_with('['))
            };
            (Some(text[..span.start].matches('\n').count() + 1), key)
        }
        _ => (None, quoted_name(&message)),
    };
    ConfigError::File {
        path: path.to_path_buf(),
        line,
        key,
        message,
    }
}

/// The first `name` quoted with backticks in a serde message ("missing field `service`").
fn quoted_name(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_owned())
}
