//! The overview, services, slots and events pages: HTML from a [`Picture`], a service listing
//! or the event log. Plain functions of their input, so the page a browser loads and every live
//! update of it are the same rendering.

use std::collections::BTreeMap;
use std::fmt::Write;

use roster_common::NodeId;
use roster_common::proto::{ClusterStatus, ServiceSummary};

use super::events::EventLog;
use super::html::{duration, esc, live_region, service_href, utc};
use super::picture::{Copy, DataRow, Lease, Picture, Severity, SlotState};

/// The services of every data server that answered, and those that did not.
#[derive(Debug, Default)]
pub struct Listing {
    pub services: Vec<ServiceSummary>,
    pub missing: Vec<(NodeId, String)>,
}

/// Leader colours the style sheet defines (`l0` … `l7`): a data server's is its id modulo this.
const COLOURS: u64 = 8;

/// The CSS class colouring what data server `id` leads.
pub fn colour(id: NodeId) -> String {
    format!("l{}", id % COLOURS)
}

fn lease_cell(lease: Lease) -> String {
    match lease {
        Lease::Held { remaining_ms } if remaining_ms < super::picture::LEASE_LOW_MS => {
            format!("<td class=\"warn\">{}</td>", duration(remaining_ms))
        }
        Lease::Held { remaining_ms } => format!("<td>{}</td>", duration(remaining_ms)),
        Lease::Lapsed => "<td class=\"bad\">lapsed</td>".to_owned(),
        Lease::Unknown => "<td class=\"muted\">—</td>".to_owned(),
    }
}

fn opt(n: Option<u64>) -> String {
    n.map_or_else(|| "—".to_owned(), |n| n.to_string())
}

fn or_unknown(text: &str) -> &str {
    if text.is_empty() { "—" } else { text }
}

/// The overview: problems first, then the cluster, the meta group, data and session servers.
pub fn overview(p: &Picture) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<h1>Overview <span class=\"sub\">cluster {}</span></h1>",
        esc(p.cluster_id.as_deref().unwrap_or("(not known yet)"))
    );
    if p.problems.is_empty() {
        out.push_str(
            "<p class=\"problem ok\" role=\"status\">No problems: the meta group has a leader, \
             every server answers, every slot is led.</p>",
        );
    } else {
        out.push_str("<ul class=\"problems\" role=\"alert\">");
        for problem in &p.problems {
            let class = match problem.severity {
                Severity::Bad => "bad",
                Severity::Warn => "warn",
            };
            let _ = write!(
                out,
                "<li class=\"problem {class}\">{}</li>",
                esc(&problem.text)
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("<div class=\"cards\">");
    cluster_card(&mut out, p);
    meta_card(&mut out, &p.meta);
    data_card(&mut out, p);
    sessions_card(&mut out, p);
    out.push_str("</div>");
    out
}

fn cluster_card(out: &mut String, p: &Picture) {
    let led = p.count(SlotState::Led);
    let preservation = match &p.meta {
        Ok(s) if s.self_preservation => {
            "<dd class=\"bad\">ON: lapsed session servers are kept</dd>"
        }
        Ok(_) => "<dd>off</dd>",
        Err(_) => "<dd class=\"muted\">unknown</dd>",
    };
    let versions: Vec<String> = p
        .versions
        .iter()
        .map(|(v, who)| {
            format!(
                "{} <span class=\"muted\">({})</span>",
                esc(v),
                esc(&who.join(", "))
            )
        })
        .collect();
    let _ = write!(
        out,
        "<section class=\"card\"><h2>Cluster</h2><dl class=\"facts\">\
         <dt>Cluster id</dt><dd><code>{id}</code></dd>\
         <dt>Slot table</dt><dd>epoch {epoch}, {slots} slots, {replicas} copies each</dd>\
         <dt>Slots led</dt><dd class=\"{led_class}\">{led} of {slots}</dd>\
         <dt>Self-preservation</dt>{preservation}\
         <dt>Authentication</dt><dd>{auth}</dd>\
         <dt>Versions</dt><dd>{versions}</dd>\
         <dt>Seen from</dt><dd>session {me} ({addr}) at {at} UTC</dd></dl></section>",
        id = esc(p.cluster_id.as_deref().unwrap_or("—")),
        epoch = p.epoch,
        slots = p.slots.len(),
        replicas = p.replicas,
        led_class = if led == p.slots.len() && led > 0 {
            ""
        } else {
            "warn"
        },
        auth = if p.auth {
            "tokens checked"
        } else {
            "OFF (--insecure-no-auth)"
        },
        versions = versions.join("<br>"),
        me = p.local.id,
        addr = esc(&p.local.addr),
        at = utc(p.at_ms),
    );
}

fn meta_card(out: &mut String, meta: &Result<ClusterStatus, String>) {
    out.push_str("<section class=\"card\"><h2>Meta group</h2>");
    let status = match meta {
        Ok(status) => status,
        Err(e) => {
            let _ = write!(out, "<p class=\"bad\">No answer: {}</p></section>", esc(e));
            return;
        }
    };
    let _ = write!(
        out,
        "<dl class=\"facts\"><dt>Leader</dt><dd class=\"{}\">{}</dd><dt>Term</dt><dd>{}</dd>\
         <dt>Log</dt><dd>last index {}, applied {}</dd></dl>",
        if status.leader.is_some() { "" } else { "bad" },
        status
            .leader
            .map_or_else(|| "none".to_owned(), |l| format!("meta {l}")),
        status.term,
        opt(status.last_log_index),
        opt(status.last_applied),
    );
    out.push_str(
        "<div class=\"scroll\"><table><thead><tr><th>Node</th><th>Address</th><th>Role</th>\
         <th>Matched</th><th>Lag</th></tr></thead><tbody>",
    );
    for node in &status.nodes {
        let role = match (status.leader == Some(node.id), node.voter) {
            (true, _) => "leader",
            (false, true) => "voter",
            (false, false) => "learner",
        };
        let lag = match node.lag {
            Some(lag) if lag >= super::picture::LAG_PROBLEM => {
                format!("<td class=\"warn\">{lag} behind</td>")
            }
            Some(lag) => format!("<td>{lag}</td>"),
            None => "<td class=\"muted\">—</td>".to_owned(),
        };
        let _ = write!(
            out,
            "<tr><td>meta {}</td><td><code>{}</code></td><td>{role}</td><td>{}</td>{lag}</tr>",
            node.id,
            esc(&node.addr),
            opt(node.matched_index),
        );
    }
    out.push_str("</tbody></table></div>");
    if !status.from_leader {
        let _ = write!(
            out,
            "<p class=\"muted\">Answered by meta {}, not the leader: lag and leases unknown.</p>",
            status.answered_by
        );
    }
    out.push_str("</section>");
}

fn data_state(d: &DataRow) -> String {
    match &d.status {
        None => "<td class=\"muted\">not asked</td>".to_owned(),
        Some(Err(e)) => format!("<td class=\"bad\" title=\"{}\">not answering</td>", esc(e)),
        Some(Ok(c)) if c.moving > 0 => "<td class=\"warn\">taking slots over</td>".to_owned(),
        Some(Ok(c)) if c.fetching > 0 => "<td class=\"warn\">fetching copies</td>".to_owned(),
        Some(Ok(_)) => "<td class=\"good\">serving</td>".to_owned(),
    }
}

fn data_card(out: &mut String, p: &Picture) {
    out.push_str(
        "<section class=\"card wide\"><h2>Data servers</h2><div class=\"scroll\"><table class=\"stack\">\
         <thead><tr><th>Server</th><th>Address</th><th>Zone</th><th>Version</th>\
         <th>Leads</th><th>Follows</th><th>Moving</th><th>Fetching</th><th>Publishers</th>\
         <th>Lease left</th><th>State</th></tr></thead><tbody>",
    );
    if p.data.is_empty() {
        out.push_str("<tr><td colspan=\"11\" class=\"bad\">No data server is a member.</td></tr>");
    }
    for d in &p.data {
        let counts = d.status.as_ref().and_then(|s| s.as_ref().ok());
        let moving = counts.map_or(0, |c| c.moving);
        let fetching = counts.map_or(0, |c| c.fetching);
        let cell = |n: usize, class: &str| {
            if counts.is_none() {
                "<td class=\"muted\">—</td>".to_owned()
            } else if n > 0 {
                format!("<td class=\"{class}\">{n}</td>")
            } else {
                "<td>0</td>".to_owned()
            }
        };
        let _ = write!(
            out,
            "<tr><td><span class=\"sw {colour}\"></span>data {id}</td><td><code>{addr}</code></td>\
             <td>{zone}</td><td>{version}</td><td>{leads}</td><td>{follows}</td>{moving}{fetching}\
             <td>{publishers}</td>{lease}{state}</tr>",
            colour = colour(d.id),
            id = d.id,
            addr = esc(&d.addr),
            zone = esc(or_unknown(&d.zone)),
            version = esc(or_unknown(&d.version)),
            leads = d.leads,
            follows = d.follows,
            moving = cell(moving, "warn"),
            fetching = cell(fetching, "warn"),
            publishers = counts.map_or_else(|| "—".to_owned(), |c| c.publishers.to_string()),
            lease = lease_cell(d.lease),
            state = data_state(d),
        );
    }
    out.push_str("</tbody></table></div></section>");
}

fn sessions_card(out: &mut String, p: &Picture) {
    out.push_str(
        "<section class=\"card wide\"><h2>Session servers</h2><div class=\"scroll\"><table class=\"stack\">\
         <thead><tr><th>Server</th><th>Address</th><th>Zone</th><th>Version</th>\
         <th>Connections</th><th>Subscribers</th><th>Lease left</th></tr></thead><tbody>",
    );
    for s in &p.sessions {
        let here = if s.here {
            " <span class=\"badge\">this one</span>"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<tr><td>session {id}{here}</td><td><code>{addr}</code></td><td>{zone}</td>\
             <td>{version}</td><td>{connections}</td><td>{subscribers}</td>{lease}</tr>",
            id = s.id,
            addr = esc(&s.addr),
            zone = esc(or_unknown(&s.zone)),
            version = esc(or_unknown(&s.version)),
            connections = opt(s.connections),
            subscribers = opt(s.subscribers),
            lease = lease_cell(s.lease),
        );
    }
    let _ = write!(
        out,
        "</tbody></table></div><p class=\"muted\">This server holds {} publishers of its clients; \
         watch streams to {} of {} data servers are up. Other servers' counts are what they last \
         reported to the meta leader.</p></section>",
        p.local.publishers, p.local.links_up, p.local.links_wanted
    );
}

/// The slot grid: every slot coloured by its leader, marked by its state, with its followers in
/// a tip shown on hover or focus.
pub fn slots(p: &Picture) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<h1>Slots <span class=\"sub\">table epoch {}, {} slots, {} copies each</span></h1>",
        p.epoch,
        p.slots.len(),
        p.replicas
    );
    let mut led_by: BTreeMap<NodeId, usize> = BTreeMap::new();
    for cell in &p.slots {
        if let Some(leader) = cell.leader {
            *led_by.entry(leader).or_default() += 1;
        }
    }
    out.push_str("<div class=\"legend\"><span class=\"legend-title\">Leaders</span>");
    for d in &p.data {
        let _ = write!(
            out,
            "<span class=\"key\"><span class=\"sw {}\"></span>data {} · {}</span>",
            colour(d.id),
            d.id,
            led_by.get(&d.id).copied().unwrap_or(0)
        );
    }
    for (leader, n) in led_by
        .iter()
        .filter(|(id, _)| !p.data.iter().any(|d| d.id == **id))
    {
        let _ = write!(
            out,
            "<span class=\"key\"><span class=\"sw {}\"></span>data {leader} (gone) · {n}</span>",
            colour(*leader)
        );
    }
    out.push_str("</div><div class=\"legend\"><span class=\"legend-title\">States</span>");
    for state in [
        SlotState::Led,
        SlotState::Moving,
        SlotState::LeaderDown,
        SlotState::Leaderless,
        SlotState::Unknown,
    ] {
        let _ = write!(
            out,
            "<span class=\"key\"><span class=\"sw state {}\"></span>{} · {}</span>",
            state.class(),
            state.name(),
            p.count(state)
        );
    }
    out.push_str("</div>");
    if p.slots.is_empty() {
        out.push_str("<p class=\"muted\">No slot table yet.</p>");
        return out;
    }
    out.push_str("<div class=\"slots\">");
    for cell in &p.slots {
        let leader = cell
            .leader
            .map_or_else(|| "none".to_owned(), |l| format!("data {l}"));
        let colour_class = cell.leader.map_or_else(|| "none".to_owned(), colour);
        let followers: Vec<String> = cell
            .followers
            .iter()
            .map(|(id, copy)| {
                let class = match copy {
                    Copy::InStep => "",
                    Copy::Down => "bad",
                    _ => "warn",
                };
                format!("<span class=\"{class}\">data {id} ({})</span>", copy.name())
            })
            .collect();
        let _ = write!(
            out,
            "<div class=\"slot {colour_class} {state_class}\" tabindex=\"0\" data-slot=\"{slot}\" \
             data-leader=\"{leader_id}\" data-state=\"{state}\"><span class=\"n\">{slot}</span>\
             <span class=\"tip\" role=\"tooltip\"><b>Slot {slot}</b> · {state}<br>leader {leader}\
             <br>followers: {followers}{publishers}</span></div>",
            state_class = cell.state.class(),
            slot = cell.slot,
            leader_id = cell.leader.map_or_else(String::new, |l| l.to_string()),
            state = cell.state.name(),
            followers = if followers.is_empty() {
                "none".to_owned()
            } else {
                followers.join(", ")
            },
            publishers = cell
                .publishers
                .map_or_else(String::new, |n| format!("<br>{n} publishers")),
        );
    }
    out.push_str("</div>");
    out
}

/// The event log, newest first.
pub fn events(log: &EventLog) -> String {
    let mut out = String::new();
    let shown = log.newest_first().count();
    let _ = write!(
        out,
        "<h1>Events <span class=\"sub\">the latest {shown} of {} this session server has seen \
         since it started</span></h1>",
        log.logged()
    );
    if shown == 0 {
        out.push_str("<p class=\"muted\">Nothing yet.</p>");
        return out;
    }
    out.push_str("<ol class=\"events\">");
    for event in log.newest_first() {
        let change = &event.change;
        let detail = change.detail.as_ref().map_or_else(String::new, |d| {
            format!(
                "<details><summary>details</summary><pre>{}</pre></details>",
                esc(d)
            )
        });
        let _ = write!(
            out,
            "<li class=\"event k-{kind}\"><time>{at} UTC</time>\
             <span class=\"kind\">{kind}</span><span class=\"what\">{text}{detail}</span></li>",
            kind = change.kind.name(),
            at = utc(event.at_ms),
            text = esc(&change.text),
        );
    }
    out.push_str("</ol>");
    out
}

/// The services page: a filter box, and the list as [`services_list`] renders it.
pub fn services(listing: &Listing, filter: &str) -> String {
    format!(
        "<h1>Services</h1><div class=\"toolbar\"><form method=\"get\" action=\"/ui/services\" \
         role=\"search\"><input id=\"filter\" name=\"q\" type=\"search\" value=\"{}\" \
         placeholder=\"Filter by name\" aria-label=\"Filter services by name\" autocomplete=\"off\">\
         </form></div>{}",
        esc(filter),
        live_region("/ui/live/services", &services_list(listing, filter))
    )
}

/// Every service with publishers, those whose name contains `filter` (any case) only, with
/// publisher counts and healthy/total where some publisher is checked.
pub fn services_list(listing: &Listing, filter: &str) -> String {
    let mut out = String::new();
    let needle = filter.to_lowercase();
    let shown: Vec<_> = listing
        .services
        .iter()
        .filter(|s| s.service.as_str().to_lowercase().contains(&needle))
        .collect();
    let publishers: u64 = listing.services.iter().map(|s| s.publishers).sum();
    let _ = write!(
        out,
        "<p class=\"summary\">{} services, {publishers} publishers</p>",
        listing.services.len()
    );
    for (id, why) in &listing.missing {
        let _ = write!(
            out,
            "<p class=\"problem bad\">Data {id} did not answer ({}): the services of the slots it \
             leads are missing below.</p>",
            esc(why)
        );
    }
    if listing.services.is_empty() {
        out.push_str(
            "<p class=\"muted\">No service has a publisher. Publish one (<code>roster publish \
             demo 10.0.0.1:8080</code>) and it appears here.</p>",
        );
        return out;
    }
    out.push_str(
        "<div class=\"scroll\"><table class=\"services stack\"><thead><tr><th>Service</th>\
         <th>Namespace</th><th>Group</th><th class=\"num\">Publishers</th>\
         <th class=\"num\">Healthy</th></tr></thead><tbody>",
    );
    for s in &listing.services {
        let hidden = if shown.iter().any(|x| x.service == s.service) {
            ""
        } else {
            " hidden"
        };
        let healthy = match s.healthy {
            Some(h) if h < s.publishers => {
                format!("<td class=\"num warn\">{h}/{}</td>", s.publishers)
            }
            Some(h) => format!("<td class=\"num good\">{h}/{}</td>", s.publishers),
            None => "<td class=\"num muted\">not checked</td>".to_owned(),
        };
        let _ = write!(
            out,
            "<tr data-name=\"{name_lower}\"{hidden}><td><a href=\"{href}\">{name}</a></td>\
             <td>{ns}</td><td>{group}</td><td class=\"num\">{publishers}</td>{healthy}</tr>",
            name_lower = esc(&s.service.as_str().to_lowercase()),
            href = esc(&service_href(&s.service)),
            name = esc(s.service.data_id()),
            ns = esc(s.service.namespace()),
            group = esc(s.service.group()),
            publishers = s.publishers,
        );
    }
    let _ = write!(
        out,
        "</tbody></table></div><p class=\"muted\" id=\"no-match\"{}>No service matches the \
         filter.</p>",
        if shown.is_empty() { "" } else { " hidden" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::picture::{Inputs, Local};

    fn summary(service: &str, publishers: u64, healthy: Option<u64>) -> ServiceSummary {
        ServiceSummary {
            service: service.parse().unwrap(),
            publishers,
            version: 1,
            healthy,
        }
    }

    #[test]
    fn the_services_list_names_every_service_and_hides_what_the_filter_leaves_out() {
        let listing = Listing {
            services: vec![
                summary("payments", 3, Some(2)),
                summary("team/web/<script>", 1, None),
            ],
            missing: vec![(2, "no answer within 2s".into())],
        };
        let html = services_list(&listing, "PAY");
        assert!(html.contains("<tr data-name=\"default/default/payments\"><td>"));
        assert!(html.contains("href=\"/ui/services/default/DEFAULT/payments\""));
        assert!(html.contains("<td class=\"num warn\">2/3</td>"));
        assert!(html.contains("data-name=\"team/web/&lt;script&gt;\" hidden"));
        assert!(html.contains("href=\"/ui/services/team/web/%3Cscript%3E\""));
        assert!(!html.contains("<script>"));
        assert!(html.contains("Data 2 did not answer (no answer within 2s)"));
        assert!(html.contains("2 services, 4 publishers"));
    }

    #[test]
    fn the_slot_grid_has_a_cell_per_slot_with_its_leader_and_state() {
        let picture = Picture::build(Inputs {
            now_ms: 0,
            view: None,
            local: Local::default(),
            meta: Err("not asked".into()),
            data: None,
        });
        assert!(slots(&picture).contains("No slot table yet."));

        let mut picture = picture;
        picture.slots = (0..256)
            .map(|slot| crate::console::picture::SlotCell {
                slot,
                leader: Some(u64::from(slot % 3) + 1),
                followers: vec![(9, Copy::Fetching)],
                state: if slot == 7 {
                    SlotState::Moving
                } else {
                    SlotState::Led
                },
                publishers: Some(2),
            })
            .collect();
        let html = slots(&picture);
        assert_eq!(html.matches("class=\"slot ").count(), 256);
        assert!(html.contains(
            "<div class=\"slot l2 st-moving\" tabindex=\"0\" data-slot=\"7\" data-leader=\"2\" \
             data-state=\"moving\">"
        ));
        assert!(html.contains("followers: <span class=\"warn\">data 9 (fetching)</span>"));
        assert!(html.contains("moving · 1"));
    }
}
