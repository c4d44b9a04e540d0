//! Parsing the feed's lines: what a data plane pays per entity when it
//! bootstraps (snapshot lines), restarts (stored entities) and tails (changes),
//! and what the control plane pays per usage event it merges.
//!
//! Run: `cargo bench -p twofold-core --bench feed`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use twofold_core::feed::{
    Change, ChangeLine, Entity, NumberedEvent, Op, SnapshotLine, TotpRecord, UsageEvent,
    UsageReport, UserStateRecord,
};

fn totp() -> Entity {
    Entity::Totp(TotpRecord {
        id: "fa_3k2n4q5r6s7t8v9w".into(),
        tenant: "tn_bench".into(),
        user: "user-000123".into(),
        algorithm: "SHA1".into(),
        digits: 6,
        period: 30,
        sealed: vec![7; 65],
        last_step: Some(56_666_666),
    })
}

fn user_state(i: usize) -> Entity {
    Entity::UserState(UserStateRecord {
        tenant: "tn_bench".into(),
        user: format!("user-{i:06}"),
        failures: 2,
        locked: false,
        throttled_until: None,
    })
}

fn parse(c: &mut Criterion) {
    let stored = totp().canonical_bytes();
    c.bench_function("feed_parse_stored_totp", |b| {
        b.iter(|| serde_json::from_slice::<Entity>(black_box(&stored)).expect("entity"))
    });

    let line = serde_json::to_vec(&SnapshotLine::Entity { entity: totp() }).expect("line");
    c.bench_function("feed_parse_snapshot_line_totp", |b| {
        b.iter(|| serde_json::from_slice::<SnapshotLine>(black_box(&line)).expect("line"))
    });

    // A merged usage report: one change putting 100 users' throttle state.
    let change = ChangeLine::Change(Change {
        seq: 42,
        at_ms: 1_700_000_000_000,
        ops: (0..100)
            .map(|i| Op::Put {
                entity: user_state(i),
            })
            .collect(),
    });
    let change = serde_json::to_vec(&change).expect("change");
    c.bench_function("feed_parse_change_100_user_states", |b| {
        b.iter(|| serde_json::from_slice::<ChangeLine>(black_box(&change)).expect("change"))
    });

    let report = UsageReport {
        node: "node_0123456789abcdef0123".into(),
        events: (0..100)
            .map(|i| NumberedEvent {
                id: i as u64 + 1,
                event: UsageEvent::Failure {
                    tenant: "tn_bench".into(),
                    user: format!("user-{i:06}"),
                    at: 1_700_000_000,
                },
            })
            .collect(),
    };
    let report = serde_json::to_vec(&report).expect("report");
    c.bench_function("feed_parse_usage_report_100_failures", |b| {
        b.iter(|| serde_json::from_slice::<UsageReport>(black_box(&report)).expect("report"))
    });
}

criterion_group!(benches, parse);
criterion_main!(benches);
