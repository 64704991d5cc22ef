use super::*;

/// How many slots data server `id` leads.
fn leads(state: &MetaState, id: NodeId) -> usize {
    state.table.led_by(id).count()
}

fn member(role: Role, id: NodeId, instance: InstanceId) -> Member {
    Member {
        role,
        id,
        instance,
        addr: format!("127.0.0.1:{}", 7000 + id),
        zone: String::new(),
        joined_at_ms: 0,
        version: String::new(),
    }
}

#[test]
fn data_joins_and_leaves_bump_the_epoch() {
    let mut state = MetaState::new("c".into(), 16, 3);
    assert!(state.apply(Command::Join {
        member: member(Role::Data, 1, 11)
    }));
    assert_eq!(state.table.epoch, 1);
    assert!(state.table.slots.iter().all(|r| r == &vec![1]));

    assert!(state.apply(Command::Join {
        member: member(Role::Session, 1, 21)
    }));
    assert_eq!(state.table.epoch, 1, "sessions do not move slots");

    assert!(
        !state.apply(Command::Join {
            member: member(Role::Data, 1, 11)
        }),
        "re-register is a no-op"
    );
    assert!(state.apply(Command::Join {
        member: member(Role::Data, 2, 12)
    }));
    assert_eq!(state.table.epoch, 2);

    assert!(
        !state.apply(Command::Remove {
            key: MemberKey {
                role: Role::Data,
                id: 2
            },
            instance: 99
        }),
        "wrong instance"
    );
    assert!(state.apply(Command::Remove {
        key: MemberKey {
            role: Role::Data,
            id: 2
        },
        instance: 12
    }));
    assert_eq!(state.table.epoch, 3);
    assert!(state.table.slots.iter().all(|r| r == &vec![1]));
}

#[test]
fn a_restarted_member_replaces_its_old_instance() {
    let mut state = MetaState::new("c".into(), 16, 3);
    state.apply(Command::Join {
        member: member(Role::Session, 5, 1),
    });
    assert!(state.apply(Command::Join {
        member: member(Role::Session, 5, 2)
    }));
    let view = state.view(None);
    assert_eq!(view.members.len(), 1);
    assert_eq!(view.members[0].instance, 2);
    assert!(
        !state.apply(Command::Remove {
            key: MemberKey {
                role: Role::Session,
                id: 5
            },
            instance: 1
        }),
        "the old instance's expiry is ignored"
    );

    state.apply(Command::Join {
        member: member(Role::Data, 1, 1),
    });
    let epoch = state.table.epoch;
    assert!(state.apply(Command::Join {
        member: member(Role::Data, 1, 2)
    }));
    assert_eq!(
        state.table.epoch,
        epoch + 1,
        "a restarted data server gets a new epoch"
    );
}

#[test]
fn a_restarted_data_server_first_follows_then_leads_after_a_rebalance() {
    let mut state = MetaState::new("c".into(), 256, 3);
    for id in 1..=3 {
        state.apply(Command::Join {
            member: member(Role::Data, id, id),
        });
    }
    state.apply(Command::Rebalance {});
    assert!(leads(&state, 2) > 0);
    let follows = |s: &MetaState, id| {
        s.table
            .slots
            .iter()
            .filter(|r| r.iter().skip(1).any(|n| *n == id))
            .count()
    };

    // Data server 2 restarts (a new instance) before its lease lapsed.
    assert!(state.apply(Command::Join {
        member: member(Role::Data, 2, 22)
    }));
    assert_eq!(
        leads(&state, 2),
        0,
        "it came back empty: it leads nothing yet"
    );
    assert!(
        follows(&state, 2) > 0,
        "it gets follower seats to copy into"
    );
    assert!(
        state.table.slots.iter().all(|r| r.len() == 3),
        "every slot keeps its replicas"
    );
    assert!(state.needs_rebalance());
    state.apply(Command::Rebalance {});
    assert!(
        (80..=90).contains(&leads(&state, 2)),
        "its share after the rebalance: {}",
        leads(&state, 2)
    );
}

#[test]
fn a_restarted_sole_data_server_leads_its_empty_slots() {
    let mut state = MetaState::new("c".into(), 16, 3);
    state.apply(Command::Join {
        member: member(Role::Data, 1, 1),
    });
    let epoch = state.table.epoch;
    state.apply(Command::Join {
        member: member(Role::Data, 1, 2),
    });
    assert_eq!(state.table.epoch, epoch + 1);
    assert!(
        state.table.slots.iter().all(|r| r == &vec![1]),
        "nobody else holds them"
    );
}

/// Data servers 1, 2 and 3 joined, and their leaderships balanced.
fn three_balanced_data_servers() -> MetaState {
    let mut state = MetaState::new("c".into(), 256, 3);
    for id in 1..=3 {
        state.apply(Command::Join {
            member: member(Role::Data, id, id),
        });
    }
    state.apply(Command::Rebalance {});
    assert!(!state.needs_rebalance());
    state
}

#[test]
fn two_data_servers_restarting_in_turn_lead_nothing_while_the_third_kept_every_slot() {
    let mut state = three_balanced_data_servers();

    // Both killed together: 1 comes back first and is placed to copy; then 2 comes back. The
    // slots 2 led must go to 3, which holds them, not to 1, which is still copying.
    state.apply(Command::Join {
        member: member(Role::Data, 1, 11),
    });
    assert_eq!(leads(&state, 1), 0);
    state.apply(Command::Join {
        member: member(Role::Data, 2, 22),
    });
    assert_eq!(leads(&state, 1), 0, "still copying: leads nothing");
    assert_eq!(leads(&state, 2), 0, "just restarted: leads nothing");
    assert_eq!(leads(&state, 3), 256);
    assert!(state.table.slots.iter().all(|r| r.len() == 3));

    // Once the table settled, a rebalance hands both their share again, and ends their
    // copying even where the table had nothing left to change.
    assert!(state.needs_rebalance());
    state.apply(Command::Rebalance {});
    assert!(leads(&state, 1) > 0 && leads(&state, 2) > 0);
    assert!(state.copying.is_empty());
    assert!(!state.needs_rebalance());
}

#[test]
fn a_copying_server_left_alone_keeps_its_slots_when_others_come_back() {
    let mut state = three_balanced_data_servers();

    // 2 restarts and copies; 1 and 3 die meanwhile: 2, holding nothing yet, is given every
    // slot and takes them over from the sessions.
    state.apply(Command::Join {
        member: member(Role::Data, 2, 22),
    });
    for id in [1, 3] {
        state.apply(Command::Remove {
            key: MemberKey {
                role: Role::Data,
                id,
            },
            instance: id,
        });
    }
    assert_eq!(leads(&state, 2), 256);
    assert!(state.copying.contains(&2));

    // 3 and 1 come back empty: 2 still leads every slot it took over, they only copy.
    state.apply(Command::Join {
        member: member(Role::Data, 3, 33),
    });
    state.apply(Command::Join {
        member: member(Role::Data, 1, 11),
    });
    assert_eq!(
        leads(&state, 2),
        256,
        "kept by the server that took them over"
    );
    assert!(state.table.slots.iter().all(|r| r.len() == 3));

    state.apply(Command::Rebalance {});
    assert!(leads(&state, 1) > 0 && leads(&state, 3) > 0);
    assert!(!state.needs_rebalance());
}

#[test]
fn a_joiner_gets_its_leaderships_on_rebalance() {
    let mut state = three_balanced_data_servers();
    state.apply(Command::Join {
        member: member(Role::Data, 4, 4),
    });
    assert_eq!(leads(&state, 4), 0, "a joiner first only follows");
    assert!(state.needs_rebalance());
    let epoch = state.table.epoch;
    assert!(state.apply(Command::Rebalance {}));
    assert_eq!(state.table.epoch, epoch + 1);
    for id in 1..=4 {
        let n = leads(&state, id);
        assert!(
            (57..=71).contains(&n),
            "data server {id} leads {n} of 256 slots"
        );
    }
    assert!(!state.needs_rebalance());
    assert!(
        !state.apply(Command::Rebalance {}),
        "a balanced table stays"
    );
}

#[test]
fn tokens_are_created_and_revoked_by_commands_and_kept_in_snapshots() {
    use roster_common::acl::{Permission, generate_token};
    let admin = generate_token();
    let admin_record =
        TokenRecord::of_token(&admin, vec!["*".into()], Permission::ALL.to_vec(), None).unwrap();
    let mut state = MetaState::default();
    state.apply(Command::Init {
        cluster_id: "c".into(),
        slot_count: 16,
        replicas: 1,
        min_data_servers: 0,
        admin_token: Some(admin_record.clone()),
    });
    assert!(state.acl.enabled);
    assert!(state.view(None).acl.authenticate(Some(&admin), 0).is_ok());

    let token = generate_token();
    let record =
        TokenRecord::of_token(&token, vec!["prod".into()], vec![Permission::Publish], None)
            .unwrap();
    assert!(state.apply(Command::CreateToken {
        record: record.clone()
    }));
    assert!(
        !state.apply(Command::CreateToken {
            record: record.clone()
        }),
        "an id is created once"
    );
    let ids: Vec<&str> = state.acl.tokens.iter().map(|t| t.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "tokens stay ordered by id");

    // What a snapshot holds comes back whole.
    let bytes = rmp_serde::to_vec_named(&state).unwrap();
    let back: MetaState = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, state);

    let revoke = |id: &str| Command::RevokeToken {
        id: id.into(),
        by: "test".into(),
    };
    assert!(state.apply(revoke(&record.id)));
    assert!(!state.apply(revoke(&record.id)), "already gone");
    assert!(state.view(None).acl.authenticate(Some(&token), 0).is_err());
    assert!(state.view(None).acl.authenticate(Some(&admin), 0).is_ok());
}

#[test]
fn a_cluster_created_without_an_admin_token_checks_none() {
    let state = MetaState::new("c".into(), 16, 1);
    assert!(!state.acl.enabled);
    assert!(state.view(None).acl.authenticate(None, 0).is_ok());
}
