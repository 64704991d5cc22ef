//! HTML building blocks of the console: escaping, the page shell every page shares, links to
//! services, and how times and durations read.

use std::fmt::Write;

use roster_common::ServiceId;

/// The software version, also used to bust the browser's cache of the assets.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `text` escaped for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // A carriage return would end a server-sent event's line.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// The path of a service's page: its id with every byte outside the unreserved set and `/`
/// percent-encoded.
pub fn service_href(service: &ServiceId) -> String {
    format!("/ui/services/{}", encode_path(service.as_str()))
}

/// `text` percent-encoded for a URL path, keeping `/`.
pub fn encode_path(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The pages of the navigation bar: (key, title, path).
const NAV: &[(&str, &str, &str)] = &[
    ("overview", "Overview", "/ui/"),
    ("services", "Services", "/ui/services"),
    ("slots", "Slots", "/ui/slots"),
    ("events", "Events", "/ui/events"),
];

/// What the page shell says about who is looking.
pub enum Viewer {
    /// The cluster checks no tokens.
    Open,
    /// Signed in with a token (by cookie or `Authorization` header).
    Token(String),
    /// Nobody yet: the sign-in page.
    Anonymous,
}

/// A whole page: `title`, the navigation with `current` marked, and `main` (already HTML). A
/// `live` page holds a [`live_region`] and shows whether its stream is connected.
pub fn page(title: &str, current: &str, viewer: &Viewer, live: bool, main: &str) -> String {
    let mut out = String::with_capacity(main.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Roster</title>\
         <link rel=\"icon\" href=\"/ui/assets/favicon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/ui/assets/console.css?v={VERSION}\">\
         <script src=\"/ui/assets/console.js?v={VERSION}\" defer></script></head>\
         <body><header class=\"top\"><a class=\"brand\" href=\"/ui/\">Roster</a><nav>",
        title = esc(title),
    );
    if !matches!(viewer, Viewer::Anonymous) {
        for (key, name, href) in NAV {
            let mark = if *key == current {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(out, "<a href=\"{href}\"{mark}>{name}</a>");
        }
    }
    out.push_str("</nav><div class=\"who\">");
    if live {
        out.push_str("<span id=\"live-state\" class=\"badge\">connecting</span>");
    }
    match viewer {
        Viewer::Open => out.push_str("<span class=\"badge warn\">authentication off</span>"),
        Viewer::Token(who) => {
            let _ = write!(
                out,
                "<span class=\"muted\">{}</span><form method=\"post\" action=\"/ui/logout\">\
                 <button type=\"submit\">Sign out</button></form>",
                esc(who)
            );
        }
        Viewer::Anonymous => {}
    }
    out.push_str("</div></header><main>");
    out.push_str(main);
    let _ = writeln!(
        out,
        "</main><footer>Roster {VERSION} · read-only console</footer></body></html>"
    );
    out
}

/// The part of a page that the server-sent-event stream at `stream` replaces with each update.
pub fn live_region(stream: &str, inner: &str) -> String {
    format!(
        "<div id=\"live\" data-live=\"{}\">{inner}</div>",
        esc(stream)
    )
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The calendar date of a day counted from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A duration in milliseconds as people read it: `850 ms`, `2.4 s`, `3 min 20 s`, `5 h 2 min`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// How long ago `then_ms` was at `now_ms`.
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return "never".to_owned();
    }
    format!("{} ago", duration(now_ms.saturating_sub(then_ms)))
}

/// A 64-bit datum version as `term.counter`, the way it is built (the term in the high 32 bits).
pub fn version(v: u64) -> String {
    if v == 0 {
        "0".to_owned()
    } else {
        format!("{}.{}", v >> 32, v & 0xffff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn service_paths_keep_slashes_and_encode_the_rest() {
        let service: ServiceId = "ns/g/a b?c#d%e/é".parse().unwrap();
        assert_eq!(
            service_href(&service),
            "/ui/services/ns/g/a%20b%3Fc%23d%25e/%C3%A9"
        );
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_767_225_599_000), "2025-12-31 23:59:59");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(2_400), "2.4 s");
        assert_eq!(duration(200_000), "3 min 20 s");
        assert_eq!(duration(18_120_000), "5 h 2 min");
        assert_eq!(version(0), "0");
        assert_eq!(version((3 << 32) | 7), "3.7");
    }
}
