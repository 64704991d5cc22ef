use bytes::Bytes;

use super::*;

pub(crate) fn table(epoch: Epoch, replicas: &[NodeId]) -> SlotTable {
    SlotTable {
        epoch,
        slot_count: 8,
        replicas: replicas.len() as u32,
        slots: vec![replicas.to_vec(); 8],
    }
}

pub(crate) fn publisher(client: &str, reg: &str, data: &str, instance: InstanceId) -> Publisher {
    Publisher {
        check: None,
        health: None,
        persistent: false,
        client_id: client.into(),
        register_id: reg.into(),
        service: "demo".parse().unwrap(),
        data: vec![Bytes::copy_from_slice(data.as_bytes())],
        attributes: Default::default(),
        client_version: 1,
        session: 1,
        session_instance: instance,
        owner: roster_common::ids::owner_of(client, b"the secret of this client"),
        registered_ms: 0,
    }
}

pub(super) fn demo() -> ServiceId {
    "demo".parse().unwrap()
}

pub(super) fn slot_of_demo() -> SlotId {
    roster_common::slot::slot_of(&demo(), 8)
}

/// A leader whose slots are open.
pub(super) fn leader(me: NodeId, epoch: Epoch, replicas: &[NodeId]) -> Store {
    let mut store = Store::new(me);
    let now = Instant::now();
    store.apply_table(&table(epoch, replicas), now);
    store.open_ready(&HashSet::new(), now, Duration::ZERO);
    store
}

pub(super) fn put(p: Publisher) -> WriteOp {
    WriteOp::Put { publisher: p }
}

#[test]
fn versions_grow_with_every_change_and_carry_the_term() {
    let mut store = leader(1, 5, &[1]);
    let a = store.write(put(publisher("c", "r1", "a", 9))).unwrap();
    let v1 = a.changes[0].version;
    assert_eq!(a.changes[0].prev, 0, "a new datum starts from version 0");
    assert_eq!(v1 >> 32, 5);
    assert!(
        store
            .write(put(publisher("c", "r1", "a", 9)))
            .unwrap()
            .ops
            .is_empty(),
        "identical put"
    );
    let second = store.write(put(publisher("c", "r1", "b", 9))).unwrap();
    let v2 = second.changes[0].version;
    assert!(v2 > v1);
    assert_eq!(
        second.changes[0].prev, v1,
        "each change names the version it applies to"
    );
    assert_eq!(
        second.changes[0].change,
        PublisherChange::Put(publisher("c", "r1", "b", 9).view())
    );
    let snap = store.snapshot(&demo()).unwrap();
    assert_eq!(snap.version, v2);
    assert_eq!(snap.publishers[0].data[0], Bytes::from_static(b"b"));
}

#[test]
fn an_older_client_version_does_not_overwrite_a_newer_one() {
    let mut store = leader(1, 1, &[1]);
    let mut newer = publisher("c", "r", "new", 9);
    newer.client_version = 5;
    store.write(put(newer)).unwrap();
    let mut older = publisher("c", "r", "old", 9);
    older.client_version = 4;
    assert!(store.write(put(older)).unwrap().ops.is_empty());
    assert_eq!(
        store.snapshot(&demo()).unwrap().publishers[0].data[0],
        Bytes::from_static(b"new")
    );
}

#[test]
fn a_batch_applies_each_op_on_its_own_and_changes_chain() {
    let now = Instant::now();
    let mut store = Store::new(1);
    let mut t = table(1, &[1]);
    let other: ServiceId = (0..)
        .map(|i| format!("svc{i}").parse::<ServiceId>().unwrap())
        .find(|s| roster_common::slot::slot_of(s, 8) != slot_of_demo())
        .unwrap();
    t.slots[roster_common::slot::slot_of(&other, 8) as usize] = vec![2];
    store.apply_table(&t, now);
    store.open_ready(&HashSet::new(), now, Duration::ZERO);
    let mut elsewhere = publisher("c", "x", "1", 9);
    elsewhere.service = other;
    let (results, applied) = store.write_batch(vec![
        put(publisher("c", "a", "1", 9)),
        put(elsewhere),
        put(publisher("c", "b", "2", 9)),
        put(publisher("c", "a", "1", 9)),
    ]);
    assert!(matches!(results[1], Err(Error::NotLeader { .. })));
    let (v1, v2) = (*results[0].as_ref().unwrap(), *results[2].as_ref().unwrap());
    assert!(v2 > v1);
    assert_eq!(
        results[3].as_ref().unwrap(),
        &v2,
        "an op that changes nothing answers the current version"
    );
    assert_eq!(applied.ops.len(), 2);
    let chain: Vec<(Version, Version)> = applied
        .changes
        .iter()
        .map(|c| (c.prev, c.version))
        .collect();
    assert_eq!(chain, vec![(0, v1), (v1, v2)]);
}

#[test]
fn only_the_owner_replaces_a_record_through_any_session() {
    let mut store = leader(1, 1, &[1]);
    let mine = publisher("c", "r1", "mine", 9);
    store.write(put(mine.clone())).unwrap();
    let slot = roster_common::slot::slot_of(&mine.service, store.slot_count);

    // Same ids, another secret: refused as a write and skipped in a sync, on any session.
    let mut impostor = publisher("c", "r1", "theirs", 8);
    impostor.owner = roster_common::ids::owner_of("c", b"not the secret of this client");
    impostor.client_version = u64::MAX;
    for session in [9, 8] {
        impostor.session_instance = session;
        let err = store.write(put(impostor.clone())).unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err:?}");
        let synced = store.session_sync(session, slot, vec![impostor.clone()], &HashSet::new());
        assert!(synced.unwrap().ops.is_empty());
    }
    assert_eq!(
        store.snapshot(&mine.service).unwrap().publishers,
        vec![mine.view()]
    );

    // The owner, moved to another session server, replaces it.
    let mut moved = publisher("c", "r1", "moved", 8);
    moved.client_version = 2;
    assert_eq!(store.write(put(moved.clone())).unwrap().ops.len(), 1);
    assert_eq!(
        store.snapshot(&mine.service).unwrap().publishers,
        vec![moved.view()]
    );

    // A record from a session that predates ownership (owner 0) is anyone's to replace.
    let mut legacy = publisher("c", "r2", "legacy", 9);
    legacy.owner = 0;
    store.write(put(legacy)).unwrap();
    let mut claimed = publisher("c", "r2", "claimed", 9);
    claimed.client_version = 2;
    assert_eq!(store.write(put(claimed)).unwrap().ops.len(), 1);
}

/// Session `instance`'s removal of client `c`'s publisher `r1` in `demo`.
fn remove_r1(instance: InstanceId) -> WriteOp {
    WriteOp::Remove {
        service: demo(),
        client_id: "c".into(),
        register_id: "r1".into(),
        session_instance: instance,
        owner: None,
    }
}

#[test]
fn removes_only_what_the_session_owns() {
    let mut store = leader(1, 1, &[1]);
    store.write(put(publisher("c", "r1", "a", 9))).unwrap();
    assert!(
        store.write(remove_r1(8)).unwrap().ops.is_empty(),
        "another session's remove is ignored"
    );
    assert_eq!(store.write(remove_r1(9)).unwrap().ops.len(), 1);
    assert!(store.snapshot(&demo()).unwrap().publishers.is_empty());
    assert_eq!(store.owners().count(), 0);
}

#[test]
fn a_write_from_the_session_a_client_left_does_not_take_its_record_back() {
    let mut store = leader(1, 1, &[1]);
    // Registered on session 9, which holds the write back (its leader unreachable); the client
    // moves to session 10, whose registration lands first.
    let mut left = publisher("c", "r1", "a", 9);
    left.registered_ms = 1_000;
    let mut moved = publisher("c", "r1", "a", 10);
    moved.registered_ms = 2_000;
    assert_eq!(store.write(put(moved.clone())).unwrap().ops.len(), 1);
    // Session 9's write arrives late: it changes nothing, nor does its removal once the grace of
    // the connection the client left ends.
    assert!(store.write(put(left.clone())).unwrap().ops.is_empty());
    assert!(store.write(remove_r1(9)).unwrap().ops.is_empty());
    assert_eq!(
        store.snapshot(&demo()).unwrap().publishers,
        vec![moved.view()]
    );
    // The client coming back to session 9 claims it anew, later: that takes it.
    left.registered_ms = 3_000;
    assert_eq!(store.write(put(left.clone())).unwrap().ops.len(), 1);
    assert_eq!(store.owners().collect::<Vec<_>>(), vec![9]);
    // A write without a claim time (an older session server) is taken as before.
    let mut old_style = publisher("c", "r1", "b", 10);
    old_style.registered_ms = 0;
    assert_eq!(store.write(put(old_style)).unwrap().ops.len(), 1);
    assert_eq!(store.write(remove_r1(10)).unwrap().ops.len(), 1);
}

#[test]
fn an_owner_removes_its_record_through_another_session() {
    let mut store = leader(1, 1, &[1]);
    store.write(put(publisher("c", "r1", "a", 9))).unwrap();
    let remove = |owner: u128| WriteOp::Remove {
        service: demo(),
        client_id: "c".into(),
        register_id: "r1".into(),
        session_instance: 8,
        owner: Some(owner),
    };
    let impostor = roster_common::ids::owner_of("c", b"another secret entirely");
    assert!(
        store.write(remove(impostor)).unwrap().ops.is_empty(),
        "only the owner may"
    );
    let owner = roster_common::ids::owner_of("c", b"the secret of this client");
    assert_eq!(store.write(remove(owner)).unwrap().ops.len(), 1);
    assert!(store.snapshot(&demo()).unwrap().publishers.is_empty());
    assert_eq!(store.owners().count(), 0, "session 9's hold is released");
}

#[test]
fn dropping_an_owner_removes_its_publishers_only() {
    let mut store = leader(1, 1, &[1]);
    store.write(put(publisher("c1", "r", "a", 7))).unwrap();
    store.write(put(publisher("c2", "r", "b", 8))).unwrap();
    let applied = store.drop_owner(7);
    assert_eq!(applied.ops.len(), 1);
    let snap = store.snapshot(&demo()).unwrap();
    assert_eq!(snap.publishers.len(), 1);
    assert_eq!(snap.publishers[0].client_id, "c2");
    assert_eq!(store.owners().collect::<Vec<_>>(), vec![8]);
}

#[test]
fn a_new_slot_leader_is_moving_until_every_session_reported() {
    let now = Instant::now();
    let mut store = Store::new(1);
    let change = store.apply_table(&table(3, &[1]), now);
    assert_eq!(change.took.len(), 8);
    assert!(store.is_moving(&demo()));
    assert!(matches!(
        store.snapshot(&demo()),
        Err(Error::SlotMoving { .. })
    ));
    assert!(matches!(
        store.ready_version(&demo()),
        Err(Error::SlotMoving { .. })
    ));

    let live: HashSet<InstanceId> = [9, 10].into();
    // Session 9 has one publisher in the slot: its digest differs, so it syncs.
    let digests: Vec<SlotDigest> = (0..8)
        .map(|slot| SlotDigest {
            slot,
            digest: if slot == slot_of_demo() {
                Digest::of([&publisher("c", "r", "a", 9)])
            } else {
                Digest::default()
            },
            version: 0,
        })
        .collect();
    assert_eq!(store.session_digests(9, &digests), vec![slot_of_demo()]);
    let applied = store
        .session_sync(
            9,
            slot_of_demo(),
            vec![publisher("c", "r", "a", 9)],
            &HashSet::new(),
        )
        .unwrap();
    assert_eq!(applied.ops.len(), 1);
    assert!(
        store
            .open_ready(&live, now, Duration::from_secs(3))
            .is_empty(),
        "session 10 not heard yet"
    );
    let empty = empty_digests();
    assert!(store.session_digests(10, &empty).is_empty());
    assert_eq!(
        store.open_ready(&live, now, Duration::from_secs(3)).len(),
        8
    );
    assert_eq!(store.snapshot(&demo()).unwrap().publishers.len(), 1);
}

/// A session's digests of every slot of the test table, holding nothing.
fn empty_digests() -> Vec<SlotDigest> {
    (0..8)
        .map(|slot| SlotDigest {
            slot,
            digest: Digest::default(),
            version: 0,
        })
        .collect()
}

#[test]
fn a_publisher_moving_to_another_session_during_a_takeover_stays() {
    let now = Instant::now();
    // The new leader's copy: publisher p held by session 9, as the old leader replicated it.
    let mut store = leader(1, 1, &[1]);
    store.write(put(publisher("c", "p", "a", 9))).unwrap();
    store.apply_table(&table(2, &[2, 1]), now);
    assert_eq!(store.apply_table(&table(3, &[1]), now).took.len(), 8);
    let live: HashSet<InstanceId> = [9, 10].into();
    let slot = slot_of_demo();

    // Session 10 holds nothing in the slot yet: heard at once.
    let empty = empty_digests();
    assert!(store.session_digests(10, &empty).is_empty());
    // p's client moves to session 10, which registers it while the slot is still moving.
    let mut moved = publisher("c", "p", "a", 10);
    moved.registered_ms = 2_000;
    assert_eq!(store.write(put(moved.clone())).unwrap().ops.len(), 1);
    // Session 9, until it notices the move, still lists p as registered there before: its sync
    // does not take p back.
    let mut stale = publisher("c", "p", "a", 9);
    stale.registered_ms = 1_000;
    let synced = store
        .session_sync(9, slot, vec![stale.clone()], &live)
        .unwrap();
    assert!(synced.ops.is_empty(), "{synced:?}");
    // Once it noticed, it lists nothing: its sync removes nothing session 10 holds.
    assert!(
        store
            .session_sync(9, slot, Vec::new(), &live)
            .unwrap()
            .ops
            .is_empty()
    );

    // Both heard in p's slot (session 9 by its syncs): it opens, the others wait for session 9.
    assert_eq!(
        store.open_ready(&live, now, Duration::from_secs(3)),
        vec![slot]
    );
    assert!(!store.is_moving(&demo()));
    assert_eq!(
        store.snapshot(&demo()).unwrap().publishers,
        vec![moved.view()]
    );
    assert_eq!(store.owners().collect::<Vec<_>>(), vec![10]);

    // A sync takes over what a departed session held.
    let gone: HashSet<InstanceId> = [9].into();
    let synced = store.session_sync(9, slot, vec![stale], &gone).unwrap();
    assert_eq!(synced.ops.len(), 1);
    // And, from a live one, a record it holds under an older registration: the client registered
    // it again on the syncing session, and that write never reached this leader.
    let mut newer = publisher("c", "p", "a", 10);
    newer.registered_ms = 3_000;
    let synced = store.session_sync(10, slot, vec![newer], &live).unwrap();
    assert_eq!(synced.ops.len(), 1);
    assert_eq!(store.owners().collect::<Vec<_>>(), vec![10]);
}

#[test]
fn a_silent_session_delays_a_takeover_only_up_to_the_timeout() {
    let now = Instant::now();
    let mut store = Store::new(1);
    store.apply_table(&table(3, &[1]), now);
    let live: HashSet<InstanceId> = [9].into();
    assert!(
        store
            .open_ready(&live, now + Duration::from_secs(1), Duration::from_secs(3))
            .is_empty()
    );
    assert_eq!(
        store
            .open_ready(&live, now + Duration::from_secs(3), Duration::from_secs(3))
            .len(),
        8
    );
}

#[test]
fn a_session_sync_replaces_what_that_session_owns() {
    let mut store = leader(1, 1, &[1]);
    store.write(put(publisher("c", "stale", "x", 9))).unwrap();
    store.write(put(publisher("d", "other", "y", 8))).unwrap();
    let applied = store
        .session_sync(
            9,
            slot_of_demo(),
            vec![publisher("c", "fresh", "z", 9)],
            &HashSet::new(),
        )
        .unwrap();
    assert_eq!(applied.ops.len(), 2, "one removal, one put");
    let snap = store.snapshot(&demo()).unwrap();
    let ids: Vec<&str> = snap
        .publishers
        .iter()
        .map(|p| p.register_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["fresh", "other"],
        "ordered by (client_id, register_id)"
    );
}

#[test]
fn followers_apply_in_order_and_fetch_whole_after_a_gap() {
    let mut lead = leader(1, 1, &[1, 2]);
    let now = Instant::now();
    let mut follow = Store::new(2);
    let change = follow.apply_table(&table(1, &[1, 2]), now);
    assert_eq!(change.to_fetch.len(), 8);

    let first = lead.write(put(publisher("c", "a", "1", 9))).unwrap();
    // Without a copy the follower cannot apply: it must fetch the slot.
    let (_, gaps) = follow.replicate(first.ops.clone());
    assert_eq!(gaps, vec![slot_of_demo()]);
    assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
    let second = lead.write(put(publisher("c", "b", "2", 9))).unwrap();
    let third = lead.write(put(publisher("c", "c", "3", 9))).unwrap();
    // An op already covered by the dump is skipped; the next applies in order.
    let (applied, gaps) = follow.replicate([first.ops, second.ops].concat());
    assert!(gaps.is_empty());
    assert_eq!(applied, 1);
    assert_eq!(follow.slot_digest(slot_of_demo()).unwrap().digest.count, 2);
    // Skipping one op (the third) is a gap.
    let fourth = lead.write(put(publisher("c", "d", "4", 9))).unwrap();
    let (_, gaps) = follow.replicate(fourth.ops);
    assert_eq!(gaps, vec![slot_of_demo()]);
    assert!(follow.out_of_sync().contains(&slot_of_demo()));
    drop(third);
    assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
    assert_eq!(
        follow.slot_digest(slot_of_demo()),
        lead.slot_digest(slot_of_demo())
    );
}

#[test]
fn a_lost_last_batch_is_caught_at_the_second_drift_check_but_lag_is_not() {
    let mut lead = leader(1, 1, &[1, 2]);
    let now = Instant::now();
    let mut follow = Store::new(2);
    follow.apply_table(&table(1, &[1, 2]), now);
    assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
    let check = |follow: &mut Store, lead: &Store| {
        follow.compare_with_leader(&lead.slot_digest(slot_of_demo()).unwrap())
    };
    assert_eq!(check(&mut follow, &lead), None, "the same copy");

    // A write whose replication is merely in flight at one check, and arrives before the next.
    let first = lead.write(put(publisher("c", "a", "1", 9))).unwrap();
    assert_eq!(check(&mut follow, &lead), None, "lag is not drift");
    follow.replicate(first.ops);
    assert_eq!(check(&mut follow, &lead), None, "caught up");

    // The last batch is lost and the leader stays quiet (no later write reveals a gap): the first
    // check notes the leader's version, the second finds the copy still below it.
    let _lost = lead.write(put(publisher("c", "b", "2", 9))).unwrap();
    assert_eq!(
        check(&mut follow, &lead),
        None,
        "one check behind may be lag"
    );
    assert_eq!(
        check(&mut follow, &lead),
        Some("lag"),
        "still behind at the next"
    );
    // `check_drift` then marks the copy out of sync, and it is fetched whole.
    follow.mark_out_of_sync(slot_of_demo());
    assert!(follow.out_of_sync().contains(&slot_of_demo()));

    // Different content at the same version is drift at once.
    assert!(follow.install_dump(lead.dump(slot_of_demo()).unwrap()));
    let mut other = lead.slot_digest(slot_of_demo()).unwrap();
    other.digest.hash ^= 1;
    assert_eq!(follow.compare_with_leader(&other), Some("drift"));
}

#[test]
fn a_promoted_follower_keeps_its_copy_and_versions_keep_growing() {
    let mut lead = leader(1, 1, &[1, 2]);
    let now = Instant::now();
    let mut follow = Store::new(2);
    follow.apply_table(&table(1, &[1, 2]), now);
    follow.install_dump(lead.dump(slot_of_demo()).unwrap());
    let applied = lead.write(put(publisher("c", "a", "1", 9))).unwrap();
    let v1 = applied.changes[0].version;
    follow.replicate(applied.ops);
    // Node 1 is gone: node 2 leads at epoch 2.
    follow.apply_table(&table(2, &[2]), now);
    let digests = [SlotDigest {
        slot: slot_of_demo(),
        digest: Digest::of([&publisher("c", "a", "1", 9)]),
        version: 0,
    }];
    assert!(
        follow.session_digests(9, &digests).is_empty(),
        "the copy matches the session"
    );
    follow.open_ready(&[9].into(), now, Duration::from_secs(3));
    assert_eq!(follow.snapshot(&demo()).unwrap().version, v1);
    let next = follow.write(put(publisher("c", "b", "2", 9))).unwrap();
    let v2 = next.changes[0].version;
    assert!(v2 > v1);
    assert_eq!(v2 >> 32, 2);
    assert_eq!(
        next.changes[0].prev, v1,
        "the promoted copy's versions chain on"
    );
}

#[test]
fn slots_led_elsewhere_refuse_writes_and_old_tables_are_ignored() {
    let now = Instant::now();
    let mut store = Store::new(1);
    assert!(matches!(
        store.snapshot(&demo()),
        Err(Error::Unavailable(_))
    ));
    store.apply_table(&table(2, &[2]), now);
    assert!(matches!(
        store.write(put(publisher("c", "r", "a", 1))),
        Err(Error::NotLeader { .. })
    ));
    assert_eq!(
        store.apply_table(&table(1, &[1]), now),
        TableChange::default()
    );
}
