//! The overview's live figures (SPEC §9), the same for the page and `GET /api/overview`: per
//! service, the messages parked, repaired, resolved and held in each hour of the last 24; the
//! failure groups with the most parked messages and the trend of their parkings; the oldest hold.
//! And the geometry of the page's SVG charts, computed here so that the template only writes it out
//! (askama escapes every name in it).
//!
//! `held` counts keys put on hold (the `held` announcement of the first message to wait behind a
//! failed head), not the messages that wait. Hours are UTC hours: the window is the current hour and the 23 before it, so a chart's last
//! point grows until the hour ends. The counts come from the announcements on MEND_EVENTS (the
//! `events` table): a repair is counted at the time the processor made it, even though the
//! dashboard learns of it with the lineage's next announcement.

use serde::Serialize;
use utoipa::ToSchema;

use crate::app::{ApiError, Shared};
use crate::store::{Group, now_ms};

/// Hours in the window.
pub const HOURS: usize = 24;
/// One hour in milliseconds (as `events.at`).
pub const HOUR_MS: i64 = 3_600_000;
/// The series of each service's chart, in drawing order.
pub const SERIES: [&str; 4] = ["parked", "repaired", "resolved", "held"];
/// Failure groups shown with their trend.
pub const TOP_GROUPS: usize = 5;
// `Store::group_parkings` has five places.
const _: () = assert!(TOP_GROUPS <= 5);

/// Counts per hour over the window, per service.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Hourly {
    /// The start of the window's first hour (epoch milliseconds, UTC).
    pub from: i64,
    /// The length of one entry of each series (one hour).
    pub hour_ms: i64,
    /// One entry per service that had any of these announcements in the window, by name.
    pub services: Vec<ServiceHours>,
}

/// A service's counts, one entry per hour of the window, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ServiceHours {
    pub service: String,
    pub parked: Vec<i64>,
    pub repaired: Vec<i64>,
    pub resolved: Vec<i64>,
    pub held: Vec<i64>,
}

impl ServiceHours {
    fn new(service: String) -> Self {
        Self {
            service,
            parked: vec![0; HOURS],
            repaired: vec![0; HOURS],
            resolved: vec![0; HOURS],
            held: vec![0; HOURS],
        }
    }

    /// Everything counted in the window.
    pub fn total(&self) -> i64 {
        [&self.parked, &self.repaired, &self.resolved, &self.held]
            .iter()
            .flat_map(|v| v.iter())
            .fold(0i64, |a, b| a.saturating_add(*b))
    }

    /// The series named `kind` (one of [`SERIES`]).
    pub fn series(&self, kind: &str) -> Option<&[i64]> {
        match kind {
            "parked" => Some(&self.parked),
            "repaired" => Some(&self.repaired),
            "resolved" => Some(&self.resolved),
            "held" => Some(&self.held),
            _ => None,
        }
    }

    fn series_mut(&mut self, kind: &str) -> Option<&mut Vec<i64>> {
        match kind {
            "parked" => Some(&mut self.parked),
            "repaired" => Some(&mut self.repaired),
            "resolved" => Some(&mut self.resolved),
            "held" => Some(&mut self.held),
            _ => None,
        }
    }
}

/// A failure group among those with the most parked messages, and how its parkings go.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct GroupTrend {
    pub id: String,
    pub service: String,
    pub subject: String,
    pub error_kind: String,
    pub error_code: Option<String>,
    pub error_title: Option<String>,
    /// Its messages parked now.
    pub parked: i64,
    /// Parkings of its messages in each hour of the window, oldest first.
    pub parkings_per_hour: Vec<i64>,
    /// `rising` when the last 12 hours had more parkings than the 12 before, `falling` when
    /// fewer, `steady` otherwise.
    pub trend: String,
}

/// The key held longest.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct OldestHold {
    pub service: String,
    pub key: String,
    /// The lineage whose resolution releases the key.
    pub head: String,
    pub since: String,
    pub age_seconds: u64,
    /// Messages waiting in its hold queue.
    pub count: u64,
}

/// What the overview shows beyond the counts.
#[derive(Debug, Clone)]
pub struct Live {
    pub hourly: Hourly,
    pub top_groups: Vec<GroupTrend>,
    pub oldest_hold: Option<OldestHold>,
}

/// The start of the window that ends with the hour holding `now`.
pub fn window_start(now: i64) -> i64 {
    (now.div_euclid(HOUR_MS) - (HOURS as i64 - 1)) * HOUR_MS
}

/// The entry of the window starting at `from` for `hour` (epoch hours); an hour after the window
/// (an announcer's clock ahead of ours) counts in the last one.
fn slot(from: i64, hour: i64) -> Option<usize> {
    let i = hour.checked_sub(from.div_euclid(HOUR_MS))?;
    usize::try_from(i).ok().map(|i| i.min(HOURS - 1))
}

/// Builds the series from the store's rows (service, kind, epoch hour, count).
pub fn hourly(from: i64, rows: &[(String, String, i64, i64)]) -> Hourly {
    let mut services: Vec<ServiceHours> = Vec::new();
    for (service, kind, hour, n) in rows {
        let Some(i) = slot(from, *hour) else { continue };
        let at = match services.binary_search_by(|s| s.service.as_str().cmp(service)) {
            Ok(at) => at,
            Err(at) => {
                services.insert(at, ServiceHours::new(service.clone()));
                at
            }
        };
        if let Some(series) = services[at].series_mut(kind) {
            series[i] = series[i].saturating_add(*n);
        }
    }
    Hourly {
        from,
        hour_ms: HOUR_MS,
        services,
    }
}

/// `rising`, `falling` or `steady`: the second half of `per_hour` against the first.
pub fn trend(per_hour: &[i64]) -> &'static str {
    let (before, after) = per_hour.split_at(per_hour.len() / 2);
    let (before, after) = (before.iter().sum::<i64>(), after.iter().sum::<i64>());
    match after.cmp(&before) {
        std::cmp::Ordering::Greater => "rising",
        std::cmp::Ordering::Less => "falling",
        std::cmp::Ordering::Equal => "steady",
    }
}

/// The groups' trends from the store's rows (group, epoch hour, count).
pub fn group_trends(from: i64, groups: Vec<Group>, rows: &[(String, i64, i64)]) -> Vec<GroupTrend> {
    groups
        .into_iter()
        .map(|g| {
            let mut per_hour = vec![0; HOURS];
            for (_, hour, n) in rows.iter().filter(|(id, _, _)| *id == g.id) {
                if let Some(i) = slot(from, *hour) {
                    per_hour[i] += n;
                }
            }
            GroupTrend {
                trend: trend(&per_hour).to_owned(),
                id: g.id,
                service: g.service,
                subject: g.subject,
                error_kind: g.error_kind,
                error_code: g.error_code,
                error_title: g.error_title,
                parked: g.count,
                parkings_per_hour: per_hour,
            }
        })
        .collect()
}

/// Reads the live figures: two queries on the store and the oldest held key.
pub async fn live(s: &Shared) -> Result<Live, ApiError> {
    let from = window_start(now_ms());
    let rows = s.store.hourly(from).await?;
    let groups = s.store.largest_groups(TOP_GROUPS as i64).await?;
    let ids: Vec<String> = groups.iter().map(|g| g.id.clone()).collect();
    let parkings = s.store.group_parkings(&ids, from).await?;
    // The held keys are read apart (the page shows the rest while they cannot be: its caller
    // says so; the API answers 503 for them before this).
    let oldest = match s.holds.page(&s.js, None, 1, None).await {
        Ok(page) => page.items,
        Err(error) => {
            tracing::warn!(%error, "Cannot read the oldest hold for the overview.");
            Vec::new()
        }
    };
    Ok(Live {
        hourly: hourly(from, &rows),
        top_groups: group_trends(from, groups, &parkings),
        oldest_hold: oldest.into_iter().next().map(|h| OldestHold {
            service: h.service,
            key: h.key,
            head: h.head,
            since: h.since,
            age_seconds: h.age_seconds,
            count: h.count,
        }),
    })
}

// ---- Chart geometry -------------------------------------------------------------------------

/// A chart's size in SVG user units.
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 210.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 30.0;

/// One service's chart: four lines over 24 hours, the axes, and the same numbers as a table.
#[derive(Debug, Clone)]
pub struct Chart {
    pub service: String,
    /// A unique, markup-safe id stem for this chart's title and description.
    pub dom_id: String,
    pub title: String,
    /// The text alternative: totals and the busiest hour.
    pub desc: String,
    pub width: f64,
    pub height: f64,
    pub plot_left: f64,
    pub plot_right: f64,
    pub plot_top: f64,
    pub plot_bottom: f64,
    pub y_ticks: Vec<Tick>,
    pub x_ticks: Vec<Tick>,
    pub lines: Vec<Line>,
    /// The hours, newest first, with their four counts.
    pub rows: Vec<HourRow>,
}

#[derive(Debug, Clone)]
pub struct Tick {
    /// The position along its axis.
    pub at: f64,
    pub label: String,
}

/// One series: its line and a point per hour (each with its count as a tooltip and data
/// attributes).
#[derive(Debug, Clone)]
pub struct Line {
    pub kind: &'static str,
    pub total: i64,
    /// `x,y x,y …`
    pub points: String,
    pub dots: Vec<Dot>,
}

#[derive(Debug, Clone)]
pub struct Dot {
    pub x: f64,
    pub y: f64,
    pub hour: usize,
    pub label: String,
    pub count: i64,
}

#[derive(Debug, Clone)]
pub struct HourRow {
    pub label: String,
    pub parked: i64,
    pub repaired: i64,
    pub resolved: i64,
    pub held: i64,
}

/// A small line of a group's parkings per hour.
#[derive(Debug, Clone)]
pub struct Sparkline {
    pub points: String,
    pub label: String,
}

/// The hour of day (UTC) an epoch-millisecond time falls in, as `HH:00`.
fn clock(at: i64) -> String {
    format!("{:02}:00", at.div_euclid(HOUR_MS).rem_euclid(24))
}

/// The smallest of 1, 2, 5 × 10ⁿ at or above `max` (at least 1).
pub fn nice_max(max: i64) -> i64 {
    let mut step = 1i64;
    loop {
        for m in [1, 2, 5] {
            let candidate = step.saturating_mul(m);
            if candidate >= max || candidate == i64::MAX {
                return candidate.max(1);
            }
        }
        step = step.saturating_mul(10);
    }
}

/// One decimal, enough for an SVG coordinate.
fn coord(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// The chart of `s` in the window starting at `from`; `n` makes its ids unique in the page.
pub fn chart(from: i64, s: &ServiceHours, n: usize) -> Chart {
    let series: Vec<(&'static str, &[i64])> = SERIES
        .iter()
        .filter_map(|k| s.series(k).map(|v| (*k, v)))
        .collect();
    let most = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(0);
    let y_max = nice_max(most);
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
    let x = |i: usize| coord(x0 + (x1 - x0) * i as f64 / (HOURS - 1) as f64);
    let y = |v: i64| coord(y1 - (y1 - y0) * v as f64 / y_max as f64);
    let hour_label = |i: usize| {
        let start = from + i as i64 * HOUR_MS;
        format!("{}–{} UTC", clock(start), clock(start + HOUR_MS))
    };
    let lines: Vec<Line> = series
        .iter()
        .map(|(kind, values)| {
            let dots: Vec<Dot> = values
                .iter()
                .enumerate()
                .map(|(i, &count)| Dot {
                    x: x(i),
                    y: y(count),
                    hour: i,
                    label: format!("{}: {count} {kind}, {}", s.service, hour_label(i)),
                    count,
                })
                .collect();
            Line {
                kind,
                total: values.iter().sum(),
                points: dots
                    .iter()
                    .map(|d| format!("{},{}", d.x, d.y))
                    .collect::<Vec<_>>()
                    .join(" "),
                dots,
            }
        })
        .collect();
    let mut y_ticks = vec![Tick {
        at: y(0),
        label: "0".into(),
    }];
    if y_max >= 2 && y_max % 2 == 0 {
        y_ticks.push(Tick {
            at: y(y_max / 2),
            label: (y_max / 2).to_string(),
        });
    }
    y_ticks.push(Tick {
        at: y(y_max),
        label: y_max.to_string(),
    });
    let x_ticks = (0..HOURS)
        .filter(|i| (HOURS - 1 - i).is_multiple_of(6))
        .map(|i| Tick {
            at: x(i),
            label: clock(from + i as i64 * HOUR_MS),
        })
        .collect();
    let busiest = (0..HOURS)
        .map(|i| (series.iter().map(|(_, v)| v[i]).sum::<i64>(), i))
        .max_by_key(|&(total, i)| (total, std::cmp::Reverse(i)))
        .filter(|&(total, _)| total > 0);
    let totals = lines
        .iter()
        .map(|l| format!("{} {}", l.total, l.kind))
        .collect::<Vec<_>>()
        .join(", ");
    let desc = match busiest {
        Some((total, i)) => format!(
            "Last 24 hours: {totals}. Busiest hour: {} ({total} in all).",
            hour_label(i)
        ),
        None => format!("Last 24 hours: {totals}."),
    };
    let rows = (0..HOURS)
        .rev()
        .map(|i| HourRow {
            label: hour_label(i),
            parked: s.parked[i],
            repaired: s.repaired[i],
            resolved: s.resolved[i],
            held: s.held[i],
        })
        .collect();
    Chart {
        service: s.service.clone(),
        dom_id: format!("chart-{n}"),
        title: format!(
            "{}: parked, repaired, resolved and held per hour, last 24 hours",
            s.service
        ),
        desc,
        width: WIDTH,
        height: HEIGHT,
        plot_left: x0,
        plot_right: x1,
        plot_top: y0,
        plot_bottom: y1,
        y_ticks,
        x_ticks,
        lines,
        rows,
    }
}

/// The sparkline of a group's parkings per hour (120 × 28).
pub fn sparkline(g: &GroupTrend) -> Sparkline {
    let most = g
        .parkings_per_hour
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let points = g
        .parkings_per_hour
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let x = coord(2.0 + 116.0 * i as f64 / (HOURS - 1) as f64);
            let y = coord(26.0 - 24.0 * v as f64 / most as f64);
            format!("{x},{y}")
        })
        .collect::<Vec<_>>()
        .join(" ");
    let total: i64 = g.parkings_per_hour.iter().sum();
    Sparkline {
        points,
        label: format!(
            "{total} parkings in the last 24 hours, {}; most in one hour: {}",
            g.trend,
            g.parkings_per_hour.iter().copied().max().unwrap_or(0)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = HOUR_MS;

    #[test]
    fn the_window_is_the_current_hour_and_the_23_before() {
        let now = 1_000 * H + 1_234;
        assert_eq!(window_start(now), 977 * H);
        assert_eq!(slot(977 * H, 977), Some(0));
        assert_eq!(slot(977 * H, 1_000), Some(23));
        assert_eq!(slot(977 * H, 976), None);
        assert_eq!(slot(977 * H, 1_005), Some(23), "a clock ahead counts now");
    }

    #[test]
    fn rows_become_series_per_service_by_name() {
        let from = 977 * H;
        let rows = vec![
            ("b".to_owned(), "parked".to_owned(), 977, 2),
            ("a".to_owned(), "held".to_owned(), 1_000, 5),
            ("b".to_owned(), "repaired".to_owned(), 990, 7),
            ("b".to_owned(), "delegated".to_owned(), 990, 9),
            ("b".to_owned(), "parked".to_owned(), 900, 1),
        ];
        let h = hourly(from, &rows);
        assert_eq!(h.from, from);
        let names: Vec<&str> = h.services.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(h.services[0].held[23], 5);
        assert_eq!(h.services[1].parked[0], 2);
        assert_eq!(h.services[1].repaired[13], 7);
        assert_eq!(
            h.services[1].parked.iter().sum::<i64>(),
            2,
            "older rows left out"
        );
        assert!(
            h.services
                .iter()
                .all(|s| SERIES.iter().all(|k| s.series(k).unwrap().len() == HOURS))
        );
    }

    #[test]
    fn trends_compare_the_halves() {
        let mut v = vec![0; HOURS];
        assert_eq!(trend(&v), "steady");
        v[20] = 3;
        assert_eq!(trend(&v), "rising");
        v[2] = 4;
        assert_eq!(trend(&v), "falling");
        v[3] = -1;
        assert_eq!(trend(&v), "steady");
    }

    #[test]
    fn nice_maxima() {
        let got: Vec<i64> = [0, 1, 2, 3, 5, 6, 10, 11, 49, 51, i64::MAX]
            .iter()
            .map(|&m| nice_max(m))
            .collect();
        assert_eq!(got, [1, 1, 2, 5, 5, 10, 10, 20, 50, 100, i64::MAX]);
    }

    #[test]
    fn a_chart_places_every_count_and_says_it_in_words() {
        let from = 977 * H;
        let mut s = ServiceHours::new("orders <&>".into());
        s.parked[0] = 4;
        s.parked[23] = 1;
        s.held[10] = 2;
        s.repaired[10] = 1;
        let c = chart(from, &s, 3);
        assert_eq!(c.dom_id, "chart-3");
        assert_eq!(c.lines.len(), 4);
        let parked = &c.lines[0];
        assert_eq!(parked.kind, "parked");
        assert_eq!(parked.total, 5);
        assert_eq!(parked.dots.len(), HOURS);
        // 4 is the maximum (nice 5): the first point is 4/5 of the way up.
        assert_eq!(
            parked.dots[0].y,
            coord(c.plot_bottom - (c.plot_bottom - c.plot_top) * 0.8)
        );
        assert_eq!(parked.dots[0].x, c.plot_left);
        assert_eq!(parked.dots[23].x, c.plot_right);
        assert_eq!(parked.dots[5].y, c.plot_bottom, "zero on the axis");
        assert_eq!(parked.points.split(' ').count(), HOURS);
        assert_eq!(
            parked.dots[0].label,
            "orders <&>: 4 parked, 17:00–18:00 UTC"
        );
        assert!(
            c.desc.contains("5 parked, 1 repaired, 0 resolved, 2 held"),
            "{}",
            c.desc
        );
        assert!(
            c.desc.contains("Busiest hour: 17:00–18:00 UTC (4 in all)"),
            "{}",
            c.desc
        );
        assert_eq!(c.rows.len(), HOURS);
        assert_eq!(c.rows[0].parked, 1, "newest hour first");
        assert_eq!(c.rows[23].parked, 4);
        let ticks: Vec<&str> = c.x_ticks.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(ticks, ["22:00", "04:00", "10:00", "16:00"]);
        assert_eq!(c.x_ticks.last().map(|t| t.at), Some(c.plot_right));
        let y: Vec<&str> = c.y_ticks.iter().map(|t| t.label.as_str()).collect();
        assert_eq!(y, ["0", "5"]);
    }

    #[test]
    fn an_empty_chart_stays_on_the_axis() {
        let c = chart(0, &ServiceHours::new("quiet".into()), 0);
        assert!(
            c.lines
                .iter()
                .all(|l| l.dots.iter().all(|d| d.y == c.plot_bottom))
        );
        assert_eq!(
            c.desc,
            "Last 24 hours: 0 parked, 0 repaired, 0 resolved, 0 held."
        );
    }
}
