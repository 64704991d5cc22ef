//! The cluster as the console shows it: one [`Picture`] built from what this session server knows
//! (its cluster view and its own counts), what the meta group answers (`Status`: the Raft group,
//! leases, self-preservation) and what each data server answers (`Status`: the state of every
//! slot it holds). Plain data and a pure [`Picture::build`], so the pages and the event log read
//! the same facts, and tests build pictures without servers.

use std::collections::{BTreeMap, BTreeSet};

use roster_common::proto::{
    ClusterStatus, ClusterView, DataStatus, HeldState, LeaseStatus, Role, SlotTable,
};
use roster_common::{Epoch, NodeId, SlotId};

/// A voter this many log entries behind the leader is shown as lagging.
pub const LAG_PROBLEM: u64 = 100;
/// A lease with less than this left has missed renewals (they come every second).
pub const LEASE_LOW_MS: u64 = 1_000;

/// This session server, as it counts itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    pub id: NodeId,
    pub addr: String,
    pub version: String,
    pub connections: usize,
    pub subscribers: usize,
    pub publishers: usize,
    pub draining: bool,
    /// Data servers of the slot table, and those with a watch stream up from here.
    pub links_wanted: usize,
    pub links_up: usize,
}

/// What the builder is given.
pub struct Inputs<'a> {
    pub now_ms: u64,
    pub view: Option<&'a ClusterView>,
    pub local: Local,
    pub meta: Result<ClusterStatus, String>,
    /// The answer of each data server asked; `None` when they were not asked this time.
    pub data: Option<&'a BTreeMap<NodeId, Result<DataStatus, String>>>,
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Needs a look: it may pass on its own (a slot moving, a lease running low).
    Warn,
    /// Something does not work now.
    Bad,
}

/// A problem the overview lists at the top.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub text: String,
}

/// A lease as the meta leader reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    Held {
        remaining_ms: u64,
    },
    Lapsed,
    /// The status did not come from the leader, or the member has no lease there yet.
    Unknown,
}

/// One data server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRow {
    pub id: NodeId,
    pub addr: String,
    pub zone: String,
    pub version: String,
    /// Slots the table gives it to lead and to follow.
    pub leads: usize,
    pub follows: usize,
    /// What it answered: slots it is taking over, follower copies it is fetching, publishers
    /// in the slots it leads; `Err` when it did not answer, `None` when not asked.
    pub status: Option<Result<DataCounts, String>>,
    pub lease: Lease,
}

/// What a data server said of its slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataCounts {
    pub moving: usize,
    pub fetching: usize,
    pub publishers: u64,
    pub epoch: Epoch,
}

/// One session server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub id: NodeId,
    pub addr: String,
    pub zone: String,
    pub version: String,
    /// What it last reported to the meta leader (this server: its own counts, now).
    pub connections: Option<u64>,
    pub subscribers: Option<u64>,
    pub lease: Lease,
    pub here: bool,
}

/// What the console makes of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotState {
    /// Its leader serves it.
    Led,
    /// Its leader is taking it over (or has not applied the table that gave it the slot yet).
    Moving,
    /// Its leader does not answer this session server.
    LeaderDown,
    /// The table gives it no leader: no data server is live.
    Leaderless,
    /// The leader was not asked.
    Unknown,
}

impl SlotState {
    pub fn name(self) -> &'static str {
        match self {
            SlotState::Led => "led",
            SlotState::Moving => "moving",
            SlotState::LeaderDown => "leader down",
            SlotState::Leaderless => "no leader",
            SlotState::Unknown => "unknown",
        }
    }

    /// The CSS class of cells in this state.
    pub fn class(self) -> &'static str {
        match self {
            SlotState::Led => "st-led",
            SlotState::Moving => "st-moving",
            SlotState::LeaderDown => "st-down",
            SlotState::Leaderless => "st-none",
            SlotState::Unknown => "st-unknown",
        }
    }
}

/// What a follower does with its copy of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    InStep,
    Fetching,
    /// The table gives it the slot; it does not hold it yet.
    NotYet,
    /// It does not answer.
    Down,
    Unknown,
}

impl Copy {
    pub fn name(self) -> &'static str {
        match self {
            Copy::InStep => "in step",
            Copy::Fetching => "fetching",
            Copy::NotYet => "not yet held",
            Copy::Down => "not answering",
            Copy::Unknown => "unknown",
        }
    }
}

/// One slot of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotCell {
    pub slot: SlotId,
    pub leader: Option<NodeId>,
    pub followers: Vec<(NodeId, Copy)>,
    pub state: SlotState,
    pub publishers: Option<u64>,
}

/// The cluster at one moment.
#[derive(Clone, Debug)]
pub struct Picture {
    pub at_ms: u64,
    pub cluster_id: Option<String>,
    pub epoch: Epoch,
    pub replicas: u32,
    pub auth: bool,
    pub local: Local,
    pub meta: Result<ClusterStatus, String>,
    pub data: Vec<DataRow>,
    pub sessions: Vec<SessionRow>,
    pub slots: Vec<SlotCell>,
    pub problems: Vec<Problem>,
    /// Every software version running, with who runs it.
    pub versions: BTreeMap<String, Vec<String>>,
    /// How many events the log has recorded so far (set by the observer; a change means the
    /// events page has something new).
    pub events_logged: u64,
    /// The data servers were asked too (the observer asks only the meta group when nobody
    /// looks): slot states and data servers' counts are known.
    pub complete: bool,
}

impl Picture {
    /// The picture before anything is known.
    pub fn empty(local: Local) -> Self {
        Picture::build(Inputs {
            now_ms: 0,
            view: None,
            local,
            meta: Err("not asked yet".into()),
            data: None,
        })
    }

    pub fn build(inputs: Inputs<'_>) -> Self {
        let Inputs {
            now_ms,
            view,
            local,
            meta,
            data,
        } = inputs;
        let empty_table = SlotTable::empty(0, 0);
        let table = view.map_or(&empty_table, |v| &v.table);
        let leases: BTreeMap<(Role, NodeId), &LeaseStatus> = match &meta {
            Ok(status) if status.from_leader => {
                status.leases.iter().map(|l| ((l.role, l.id), l)).collect()
            }
            _ => BTreeMap::new(),
        };
        let lease_of = |role, id| match leases.get(&(role, id)) {
            Some(l) if l.remaining_ms == 0 => Lease::Lapsed,
            Some(l) => Lease::Held {
                remaining_ms: l.remaining_ms,
            },
            None => Lease::Unknown,
        };
        let members = view.map_or(&[][..], |v| &v.members[..]);

        let data_rows: Vec<DataRow> = members
            .iter()
            .filter(|m| m.role == Role::Data)
            .map(|m| DataRow {
                id: m.id,
                addr: m.addr.clone(),
                zone: m.zone.clone(),
                version: m.version.clone(),
                leads: table.led_by(m.id).count(),
                follows: table
                    .slots
                    .iter()
                    .filter(|r| r.iter().skip(1).any(|n| *n == m.id))
                    .count(),
                status: data.map(|answers| match answers.get(&m.id) {
                    Some(Ok(s)) => Ok(counts(s)),
                    Some(Err(e)) => Err(e.clone()),
                    None => Err("not asked".into()),
                }),
                lease: lease_of(Role::Data, m.id),
            })
            .collect();

        let sessions: Vec<SessionRow> = members
            .iter()
            .filter(|m| m.role == Role::Session)
            .map(|m| {
                let here = m.id == local.id;
                let reported = leases.get(&(Role::Session, m.id));
                SessionRow {
                    id: m.id,
                    addr: m.addr.clone(),
                    zone: m.zone.clone(),
                    version: m.version.clone(),
                    connections: if here {
                        Some(local.connections as u64)
                    } else {
                        reported.and_then(|l| l.connections)
                    },
                    subscribers: if here {
                        Some(local.subscribers as u64)
                    } else {
                        reported.and_then(|l| l.subscribers)
                    },
                    lease: lease_of(Role::Session, m.id),
                    here,
                }
            })
            .collect();

        let held: BTreeMap<NodeId, BTreeMap<SlotId, (HeldState, u64)>> = data
            .into_iter()
            .flatten()
            .filter_map(|(id, answer)| answer.as_ref().ok().map(|s| (*id, s)))
            .map(|(id, s)| {
                let slots = s.slots.iter().map(|h| (h.slot, (h.state, h.publishers)));
                (id, slots.collect())
            })
            .collect();
        let answered = |id: NodeId| data.and_then(|d| d.get(&id)).map(Result::is_ok);
        let slots: Vec<SlotCell> = table
            .slots
            .iter()
            .enumerate()
            .map(|(slot, holders)| {
                let slot = slot as SlotId;
                let leader = holders.first().copied();
                let held_by = |id: NodeId| held.get(&id).and_then(|s| s.get(&slot)).copied();
                let state = match leader {
                    None => SlotState::Leaderless,
                    Some(l) => match (answered(l), held_by(l)) {
                        (None, _) => SlotState::Unknown,
                        (Some(false), _) => SlotState::LeaderDown,
                        (Some(true), Some((HeldState::Leading, _))) => SlotState::Led,
                        (Some(true), _) => SlotState::Moving,
                    },
                };
                let followers = holders
                    .iter()
                    .skip(1)
                    .map(|f| {
                        let copy = match (answered(*f), held_by(*f)) {
                            (None, _) => Copy::Unknown,
                            (Some(false), _) => Copy::Down,
                            (Some(true), Some((HeldState::Following, _))) => Copy::InStep,
                            (Some(true), Some((HeldState::Fetching, _))) => Copy::Fetching,
                            (Some(true), _) => Copy::NotYet,
                        };
                        (*f, copy)
                    })
                    .collect();
                SlotCell {
                    slot,
                    leader,
                    followers,
                    state,
                    publishers: leader.and_then(held_by).map(|(_, n)| n),
                }
            })
            .collect();

        let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in members {
            let version = if m.version.is_empty() {
                "unknown".to_owned()
            } else {
                m.version.clone()
            };
            versions
                .entry(version)
                .or_default()
                .push(format!("{} {}", m.role, m.id));
        }
        if let Ok(status) = &meta
            && !status.version.is_empty()
        {
            versions
                .entry(status.version.clone())
                .or_default()
                .push(format!("meta {}", status.answered_by));
        }

        let mut picture = Picture {
            at_ms: now_ms,
            cluster_id: view.map(|v| v.cluster_id.clone()),
            epoch: table.epoch,
            replicas: table.replicas,
            auth: view.is_some_and(|v| v.acl.enabled),
            local,
            meta,
            data: data_rows,
            sessions,
            slots,
            problems: Vec::new(),
            versions,
            events_logged: 0,
            complete: data.is_some(),
        };
        picture.problems = problems(&picture, view.is_some());
        picture
    }

    /// How many slots are in `state`.
    pub fn count(&self, state: SlotState) -> usize {
        self.slots.iter().filter(|s| s.state == state).count()
    }
}

fn counts(status: &DataStatus) -> DataCounts {
    let of = |state| status.slots.iter().filter(|s| s.state == state).count();
    DataCounts {
        moving: of(HeldState::Moving),
        fetching: of(HeldState::Fetching),
        publishers: status
            .slots
            .iter()
            .filter(|s| matches!(s.state, HeldState::Leading | HeldState::Moving))
            .map(|s| s.publishers)
            .sum(),
        epoch: status.epoch,
    }
}

/// Everything worth an operator's attention, worst first.
fn problems(p: &Picture, have_view: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut say = |severity, text: String| out.push(Problem { severity, text });
    if !have_view {
        say(
            Severity::Bad,
            "This session server has no cluster view yet: it cannot reach the meta group.".into(),
        );
    }
    match &p.meta {
        Err(e) => say(Severity::Bad, format!("The meta group did not answer: {e}")),
        Ok(status) => {
            if status.leader.is_none() {
                say(Severity::Bad, "The meta group has no leader.".into());
            }
            if !status.from_leader {
                say(
                    Severity::Warn,
                    format!(
                        "Meta status came from node {}, not the leader: voter lag and leases are unknown.",
                        status.answered_by
                    ),
                );
            }
            for node in status.nodes.iter().filter(|n| n.voter) {
                match node.lag {
                    Some(lag) if lag >= LAG_PROBLEM => say(
                        Severity::Warn,
                        format!(
                            "Meta voter {} lags the leader by {lag} log entries.",
                            node.id
                        ),
                    ),
                    None if status.from_leader && node.matched_index.is_none() => say(
                        Severity::Warn,
                        format!("Meta voter {} has not acknowledged any log entry.", node.id),
                    ),
                    _ => {}
                }
            }
            if status.self_preservation {
                say(
                    Severity::Bad,
                    "Self-preservation is on: too many session servers lapsed at once, so none is \
                     expired until their leases come back."
                        .into(),
                );
            }
        }
    }
    let leases = p
        .data
        .iter()
        .map(|d| ("data", d.id, d.lease))
        .chain(p.sessions.iter().map(|s| ("session", s.id, s.lease)));
    for (role, id, lease) in leases {
        match lease {
            Lease::Lapsed => say(
                Severity::Bad,
                format!(
                    "The lease of {role} {id} lapsed: the meta leader no longer hears from it."
                ),
            ),
            Lease::Held { remaining_ms } if remaining_ms < LEASE_LOW_MS => say(
                Severity::Warn,
                format!("The lease of {role} {id} is running out ({remaining_ms} ms left)."),
            ),
            _ => {}
        }
    }
    for d in &p.data {
        if let Some(Err(e)) = &d.status {
            say(
                Severity::Bad,
                format!(
                    "Data {} ({}) does not answer this session server: {e}",
                    d.id, d.addr
                ),
            );
        }
    }
    if have_view && p.data.is_empty() {
        say(
            Severity::Bad,
            "No data server is a member: publishes cannot be stored.".into(),
        );
    }
    let plural = |n: usize| if n == 1 { "slot" } else { "slots" };
    for (state, severity, what) in [
        (
            SlotState::LeaderDown,
            Severity::Bad,
            "led by a data server that does not answer",
        ),
        (SlotState::Leaderless, Severity::Bad, "without a leader"),
        (
            SlotState::Moving,
            Severity::Warn,
            "moving: a new leader is taking them over",
        ),
    ] {
        let n = p.count(state);
        if n > 0 {
            say(severity, format!("{n} {} {what}.", plural(n)));
        }
    }
    let fetching: usize = p
        .slots
        .iter()
        .flat_map(|s| &s.followers)
        .filter(|(_, c)| *c == Copy::Fetching)
        .count();
    if fetching > 0 {
        say(
            Severity::Warn,
            format!("{fetching} follower copies are being fetched from their leaders."),
        );
    }
    if p.local.links_up < p.local.links_wanted {
        say(
            Severity::Warn,
            format!(
                "This session server has watch streams to {} of {} data servers.",
                p.local.links_up, p.local.links_wanted
            ),
        );
    }
    if p.local.draining {
        say(
            Severity::Warn,
            "This session server is draining for shutdown.".into(),
        );
    }
    let distinct: BTreeSet<&String> = p.versions.keys().collect();
    if distinct.len() > 1 {
        let list: Vec<String> = p
            .versions
            .iter()
            .map(|(v, who)| format!("{v} ({})", who.join(", ")))
            .collect();
        say(
            Severity::Warn,
            format!("Servers run different versions: {}.", list.join("; ")),
        );
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.severity));
    out
}

#[cfg(test)]
mod tests;
