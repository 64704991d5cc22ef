use roster_common::proto::{HeldSlot, Member, MetaNodeStatus};

use super::*;

fn member(role: Role, id: NodeId) -> Member {
    Member {
        role,
        id,
        instance: id * 10,
        addr: format!("127.0.0.1:{}", 7000 + id),
        zone: String::new(),
        joined_at_ms: 0,
        version: "0.1.0".into(),
    }
}

/// Four slots over data servers 1 and 2, each slot on both; one session server.
fn view() -> ClusterView {
    ClusterView {
        cluster_id: "c1".into(),
        members: vec![
            member(Role::Data, 1),
            member(Role::Data, 2),
            member(Role::Session, 1),
        ],
        table: SlotTable {
            epoch: 7,
            slot_count: 4,
            replicas: 2,
            slots: vec![vec![1, 2], vec![2, 1], vec![1, 2], vec![2, 1]],
        },
        meta_leader: None,
        acl: Default::default(),
        persistent: Default::default(),
    }
}

fn lease(role: Role, id: NodeId, remaining_ms: u64) -> LeaseStatus {
    LeaseStatus {
        role,
        id,
        instance: id * 10,
        addr: String::new(),
        remaining_ms,
        connections: Some(4),
        subscribers: Some(9),
    }
}

fn meta(leases: Vec<LeaseStatus>) -> ClusterStatus {
    ClusterStatus {
        cluster_id: "c1".into(),
        answered_by: 1,
        from_leader: true,
        leader: Some(1),
        term: 2,
        nodes: vec![MetaNodeStatus {
            id: 1,
            addr: "m".into(),
            voter: true,
            matched_index: Some(9),
            lag: Some(0),
        }],
        leases,
        table_epoch: 7,
        self_preservation: false,
        last_log_index: Some(9),
        last_applied: Some(9),
        snapshot_index: None,
        purged_index: None,
        snapshots_installed: 0,
        version: "0.1.0".into(),
    }
}

fn status(id: NodeId, slots: &[(SlotId, HeldState)]) -> DataStatus {
    DataStatus {
        id,
        version: "0.1.0".into(),
        epoch: 7,
        slots: slots
            .iter()
            .map(|(slot, state)| HeldSlot {
                slot: *slot,
                state: *state,
                publishers: 1,
            })
            .collect(),
    }
}

fn healthy_leases() -> Vec<LeaseStatus> {
    vec![
        lease(Role::Data, 1, 2_500),
        lease(Role::Data, 2, 2_500),
        lease(Role::Session, 1, 2_500),
    ]
}

fn build(
    view: &ClusterView,
    meta: ClusterStatus,
    data: &BTreeMap<NodeId, Result<DataStatus, String>>,
) -> Picture {
    Picture::build(Inputs {
        now_ms: 1,
        view: Some(view),
        local: Local {
            id: 1,
            links_wanted: 2,
            links_up: 2,
            ..Local::default()
        },
        meta: Ok(meta),
        data: Some(data),
    })
}

use HeldState::{Following, Leading, Moving};

#[test]
fn a_healthy_cluster_has_no_problems() {
    let view = view();
    let data = BTreeMap::from([
        (
            1,
            Ok(status(
                1,
                &[(0, Leading), (1, Following), (2, Leading), (3, Following)],
            )),
        ),
        (
            2,
            Ok(status(
                2,
                &[(0, Following), (1, Leading), (2, Following), (3, Leading)],
            )),
        ),
    ]);
    let p = build(&view, meta(healthy_leases()), &data);
    assert_eq!(p.problems, []);
    assert_eq!(p.count(SlotState::Led), 4);
    assert_eq!(p.slots[1].followers, [(1, Copy::InStep)]);
    assert_eq!((p.data[0].leads, p.data[0].follows), (2, 2));
    assert_eq!(
        p.sessions[0].connections,
        Some(0),
        "this server counts itself"
    );
}

#[test]
fn a_dead_data_server_shows_its_slots_down_then_moving_then_led() {
    let view = view();
    // Data 2 does not answer; its lease has not lapsed yet.
    let data = BTreeMap::from([
        (
            1,
            Ok(status(
                1,
                &[(0, Leading), (1, Following), (2, Leading), (3, Following)],
            )),
        ),
        (2, Err("timed out".into())),
    ]);
    let p = build(&view, meta(healthy_leases()), &data);
    assert_eq!(p.count(SlotState::LeaderDown), 2);
    assert_eq!(p.slots[0].followers, [(2, Copy::Down)]);
    let texts: Vec<&str> = p.problems.iter().map(|x| x.text.as_str()).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("Data 2 (127.0.0.1:7002) does not answer")),
        "{texts:?}"
    );
    assert!(
        texts.contains(&"2 slots led by a data server that does not answer."),
        "{texts:?}"
    );
    assert_eq!(p.problems[0].severity, Severity::Bad);

    // Its lease lapses.
    let mut leases = healthy_leases();
    leases[1].remaining_ms = 0;
    let p = build(&view, meta(leases), &data);
    assert_eq!(p.data[1].lease, Lease::Lapsed);
    assert!(
        p.problems
            .iter()
            .any(|x| x.text.contains("lease of data 2 lapsed"))
    );

    // The new table gives its slots to data 1, which is taking them over.
    let mut after = view.clone();
    after
        .members
        .retain(|m| !(m.role == Role::Data && m.id == 2));
    after.table.epoch = 8;
    after.table.slots = vec![vec![1]; 4];
    let data = BTreeMap::from([(
        1,
        Ok(status(
            1,
            &[(0, Leading), (1, Moving), (2, Leading), (3, Following)],
        )),
    )]);
    let p = build(&after, meta(healthy_leases()), &data);
    assert_eq!(
        p.count(SlotState::Moving),
        2,
        "one moving, one not yet taken"
    );
    assert!(
        p.problems
            .iter()
            .any(|x| x.text == "2 slots moving: a new leader is taking them over.")
    );

    let data = BTreeMap::from([(
        1,
        Ok(status(
            1,
            &[(0, Leading), (1, Leading), (2, Leading), (3, Leading)],
        )),
    )]);
    let p = build(&after, meta(healthy_leases()), &data);
    assert_eq!(p.count(SlotState::Led), 4);
    assert!(p.slots.iter().all(|s| s.leader == Some(1)));
}

#[test]
fn lagging_voters_preservation_and_mixed_versions_are_problems() {
    let mut view = view();
    view.members[0].version = "0.2.0".into();
    let mut status = meta(healthy_leases());
    status.self_preservation = true;
    status.nodes.push(MetaNodeStatus {
        id: 2,
        addr: "m2".into(),
        voter: true,
        matched_index: Some(1),
        lag: Some(LAG_PROBLEM + 5),
    });
    let p = build(&view, status, &BTreeMap::new());
    let texts: Vec<&str> = p.problems.iter().map(|x| x.text.as_str()).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("Self-preservation is on")),
        "{texts:?}"
    );
    assert!(
        texts.contains(&"Meta voter 2 lags the leader by 105 log entries."),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("Servers run different versions: 0.1.0 (")),
        "{texts:?}"
    );
}

#[test]
fn no_meta_answer_is_a_problem_and_leases_are_unknown() {
    let view = view();
    let p = Picture::build(Inputs {
        now_ms: 1,
        view: Some(&view),
        local: Local::default(),
        meta: Err("no quorum".into()),
        data: None,
    });
    assert_eq!(
        p.problems[0].text,
        "The meta group did not answer: no quorum"
    );
    assert_eq!(p.data[0].lease, Lease::Unknown);
    assert_eq!(
        p.count(SlotState::Unknown),
        4,
        "data servers were not asked"
    );
}
