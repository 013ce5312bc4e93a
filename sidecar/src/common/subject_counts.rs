//! The subjects of a stream with their message counts, read without a map of them.
//!
//! async-nats's `Stream::info_with_subjects` deserializes each page of `$JS.API.STREAM.INFO` into a
//! `HashMap<String, usize>` (the server puts up to 100,000 subjects in a page): at 100k held keys,
//! the two such reads of a sidecar's start (its hold entries' names, its hold queues' counts) left
//! its peak memory ~35 MiB higher, which a service's 80 MiB budget cannot spare. Here each page is
//! read into one string of the subjects end to end and their counts, and handed out from there.

use async_nats::jetstream;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// Subjects and their counts, packed: `text` holds the subjects end to end; each of `ends` is where
/// one ends in `text`, with its count.
#[derive(Default)]
pub struct SubjectCounts {
    text: String,
    ends: Vec<(usize, u64)>,
}

impl SubjectCounts {
    /// How many subjects were read.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`th subject with its message count.
    pub fn get(&self, i: usize) -> Option<(&str, u64)> {
        let (end, count) = *self.ends.get(i)?;
        let start = i.checked_sub(1).map_or(0, |before| self.ends[before].0);
        Some((&self.text[start..end], count))
    }

    /// Each subject with its message count, in the order the server gave them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|(end, _)| *end));
        starts
            .zip(&self.ends)
            .map(|(start, (end, count))| (&self.text[start..*end], *count))
    }
}

impl<'de> Deserialize<'de> for SubjectCounts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Packing;
        impl<'de> Visitor<'de> for Packing {
            type Value = SubjectCounts;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of subjects to message counts")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SubjectCounts, A::Error> {
                let mut packed = SubjectCounts::default();
                // Borrowed where the JSON has no escapes (subjects never need them).
                while let Some(subject) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let count: u64 = map.next_value()?;
                    packed.text.push_str(&subject);
                    packed.ends.push((packed.text.len(), count));
                }
                Ok(packed)
            }
        }
        d.deserialize_map(Packing)
    }
}

/// One page of `$JS.API.STREAM.INFO` with subjects, with nothing else of the answer kept.
#[derive(serde::Deserialize)]
struct Page {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    total: usize,
    #[serde(default)]
    state: PageState,
}

#[derive(serde::Deserialize, Default)]
struct PageState {
    #[serde(default)]
    subjects: Option<SubjectCounts>,
}

#[derive(serde::Deserialize, Debug)]
struct ApiError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(serde::Serialize)]
struct Request<'a> {
    subjects_filter: &'a str,
    offset: usize,
}

/// Every subject of `stream` matching `filter`, with its message count, read page by page from the
/// stream's leader (stream info is answered by the leader).
pub async fn read(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> anyhow::Result<SubjectCounts> {
    let subject = format!("STREAM.INFO.{stream}");
    let mut all = SubjectCounts::default();
    loop {
        let request = Request {
            subjects_filter: filter,
            offset: all.len(),
        };
        let page: Page = js
            .request(subject.clone(), &request)
            .await
            .map_err(|e| anyhow::anyhow!("reading the subjects of {stream}: {e}"))?;
        if let Some(error) = page.error {
            anyhow::bail!(
                "reading the subjects of {stream}: {} (status {}, error code {})",
                error.description,
                error.code,
                error.err_code
            );
        }
        let Some(subjects) = page.state.subjects.filter(|s| !s.is_empty()) else {
            return Ok(all);
        };
        if all.is_empty() {
            all = subjects;
        } else {
            let base = all.text.len();
            all.text.push_str(&subjects.text);
            all.ends.extend(
                subjects
                    .ends
                    .iter()
                    .map(|(end, count)| (base + end, *count)),
            );
        }
        if all.len() >= page.total {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_packed_and_handed_out_in_order() {
        let page: Page = serde_json::from_str(
            r#"{"total":3,"offset":0,"limit":100000,"config":{"name":"X","subjects":["a.>"]},
                "state":{"messages":6,"subjects":{"a.one":1,"a.two":2,"a.x\u0079z":3}}}"#,
        )
        .unwrap();
        assert_eq!(page.total, 3);
        let subjects = page.state.subjects.unwrap();
        let listed: Vec<(&str, u64)> = subjects.iter().collect();
        assert_eq!(listed, vec![("a.one", 1), ("a.two", 2), ("a.xyz", 3)]);
    }

    #[test]
    fn an_api_error_is_read() {
        let page: Page = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.api.v1.stream_info_response","error":{"code":404,"err_code":10059,"description":"stream not found"}}"#,
        )
        .unwrap();
        let error = page.error.unwrap();
        assert_eq!(
            (error.code, error.description.as_str()),
            (404, "stream not found")
        );
        assert!(page.state.subjects.is_none());
    }
}
