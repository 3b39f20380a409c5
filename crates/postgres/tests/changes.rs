//! The change log a revocation round tails (`GateStore::changes_since`) on a real PostgreSQL
//! server: every revocation and role change is recorded with what it names, numbered in commit
//! order without gaps also when two instances revoke at once; a gap (a pruned log) or numbers
//! lower than the round's (a failover) ask for a resync, and so does the change feed when it
//! listens again. And a database of schema version 1 is migrated to version 2 on open.

use std::sync::Arc;

use portcullis_core::{
    Admin, Change, ChangeTail, Clock, DeviceFingerprint, Effects, GateStore, LockoutPolicy,
    SessionId, SessionRecord, SessionStore, SystemClock, TotpAlgorithm, TotpConfig,
};
use portcullis_postgres::testkit::PgCluster;
use portcullis_postgres::{PgRegistry, SCHEMA_VERSION};
use portcullis_store::SecretKey;

fn key() -> SecretKey {
    SecretKey::from_bytes([9; SecretKey::LEN])
}

fn totp() -> TotpConfig {
    TotpConfig::new(vec![3; 20], 6, TotpAlgorithm::Sha1, 30).unwrap()
}

fn fp(n: u8) -> DeviceFingerprint {
    DeviceFingerprint::from_bytes([n; 32])
}

/// Runs SQL on the database at `url`.
async fn sql(url: &str, statements: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    client.batch_execute(statements).await.unwrap();
    drop(client);
    let _ = task.await;
}

async fn tail(registry: &PgRegistry, after: Option<u64>) -> ChangeTail {
    registry.changes_since(after).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_revocation_and_role_change_is_logged_with_what_it_names() {
    let Some(cluster) = PgCluster::start("postgres change log") else {
        return;
    };
    let url = cluster.database().await;
    let registry = PgRegistry::open(&url, key(), &[]).await.unwrap();
    // Roles are changed at the system clock's time: the other changes are made at it too (a
    // change prunes the records more than an hour older than itself).
    let now = SystemClock.now_ms();
    assert_eq!(tail(&registry, None).await, ChangeTail::Resync { head: 0 });
    assert_eq!(
        tail(&registry, Some(0)).await,
        ChangeTail::Changes {
            changes: vec![],
            head: 0
        }
    );

    registry.add_user("alice", totp(), now).unwrap();
    registry.add_user("bob", totp(), now).unwrap();
    registry
        .bind_device("laptop", "alice", &fp(1), now)
        .unwrap();
    registry.bind_device("phone", "bob", &fp(2), now).unwrap();
    let session = SessionRecord {
        id: SessionId([7; 16]),
        user: "alice".into(),
        fingerprint: fp(1),
        totp_time_ms: now,
        expires_ms: now + 9_000_000,
        revoked_ms: None,
    };
    let accept = Effects::AcceptStep {
        user: "alice".into(),
        step: 1,
        now_ms: now,
        lockout: LockoutPolicy::default(),
        session: Some(session.clone()),
    };
    registry.commit(&accept).await.unwrap();
    // Adding and binding change nothing a live connection holds: not logged.
    assert_eq!(
        tail(&registry, Some(0)).await,
        ChangeTail::Changes {
            changes: vec![],
            head: 0
        }
    );

    registry.revoke_device("laptop", now).unwrap();
    registry
        .set_user_roles("alice", &["admin".to_owned()])
        .unwrap();
    registry.revoke_session(&session.id, now).unwrap();
    registry.revoke_user("bob", now).unwrap();

    let change =
        |seq, fingerprint: Option<u8>, user: Option<&str>, session: Option<SessionId>| Change {
            seq,
            fingerprint: fingerprint.map(fp),
            user: user.map(str::to_owned),
            session,
        };
    let got = tail(&registry, Some(0)).await;
    let ChangeTail::Changes { changes, head } = got else {
        panic!("a log that holds every change: {got:?}")
    };
    assert_eq!(head, 4);
    assert_eq!(changes[0], change(1, Some(1), Some("alice"), None));
    assert_eq!(changes[1], change(2, None, Some("alice"), None));
    assert_eq!(changes[2].seq, 3);
    assert_eq!(changes[2].session, Some(session.id));
    assert_eq!(changes[3].seq, 4);
    assert_eq!(changes[3].user.as_deref(), Some("bob"));
    // Read from the middle, and from the end.
    let ChangeTail::Changes { changes, head } = tail(&registry, Some(2)).await else {
        panic!()
    };
    assert_eq!((changes.len(), changes[0].seq, head), (2, 3, 4));
    assert_eq!(
        tail(&registry, Some(4)).await,
        ChangeTail::Changes {
            changes: vec![],
            head: 4
        }
    );

    // Numbers above the log's (the database failed over to a replica without them): resync.
    assert_eq!(
        tail(&registry, Some(9)).await,
        ChangeTail::Resync { head: 4 }
    );
    // A gap: the records after 1 are gone.
    sql(&url, "DELETE FROM changes WHERE seq = 2").await;
    assert_eq!(
        tail(&registry, Some(1)).await,
        ChangeTail::Resync { head: 4 }
    );
    assert!(matches!(
        tail(&registry, Some(2)).await,
        ChangeTail::Changes { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_revoking_at_once_number_their_changes_without_gaps() {
    let Some(cluster) = PgCluster::start("postgres change order") else {
        return;
    };
    let url = cluster.database().await;
    let a = Arc::new(PgRegistry::open(&url, key(), &[]).await.unwrap());
    let b = Arc::new(PgRegistry::open(&url, key(), &[]).await.unwrap());
    const N: u8 = 40;
    for i in 0..N {
        a.add_user(&format!("u{i}"), totp(), 1_000).unwrap();
        a.bind_device(&format!("d{i}"), &format!("u{i}"), &fp(i), 1_000)
            .unwrap();
    }
    let mut tasks = Vec::new();
    for i in 0..N {
        let registry = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::task::spawn_blocking(move || {
            registry.revoke_device(&format!("d{i}"), 2_000).unwrap();
        }));
    }
    // A reader tailing while they commit never skips one.
    let mut seen = Vec::new();
    let mut after = 0;
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen.len() < usize::from(N) {
        assert!(
            std::time::Instant::now() < give_up,
            "{} of {N} changes after 30 s",
            seen.len()
        );
        match tail(&a, Some(after)).await {
            ChangeTail::Changes { changes, head } => {
                seen.extend(changes.iter().map(|c| c.fingerprint.unwrap()));
                after = head;
            }
            other => panic!("{other:?} after {after}"),
        }
        if tasks.iter().any(|t| t.is_finished()) {
            // A revocation that failed fails the test now.
            let (done, running): (Vec<_>, Vec<_>) =
                tasks.into_iter().partition(|t| t.is_finished());
            for task in done {
                task.await.unwrap();
            }
            tasks = running;
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(after, u64::from(N));
    seen.sort_by_key(|f| f.as_bytes()[0]);
    seen.dedup();
    assert_eq!(seen.len(), usize::from(N), "every revocation once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_changes_are_pruned_and_a_round_behind_them_resyncs() {
    let Some(cluster) = PgCluster::start("postgres change retention") else {
        return;
    };
    let url = cluster.database().await;
    let registry = PgRegistry::open(&url, key(), &[]).await.unwrap();
    registry.add_user("alice", totp(), 1_000).unwrap();
    for (i, at) in [(1u8, 1_000u64), (2, 2_000)] {
        registry
            .bind_device(&format!("d{i}"), "alice", &fp(i), 500)
            .unwrap();
        registry.revoke_device(&format!("d{i}"), at).unwrap();
    }
    // Two hours later: the records older than an hour go with the next change.
    registry.bind_device("d3", "alice", &fp(3), 500).unwrap();
    registry.revoke_device("d3", 7_202_000).unwrap();
    assert_eq!(
        tail(&registry, Some(0)).await,
        ChangeTail::Resync { head: 3 }
    );
    let ChangeTail::Changes { changes, head } = tail(&registry, Some(2)).await else {
        panic!()
    };
    assert_eq!((changes.len(), head), (1, 3));
    // The newest record is kept, however old: the next number follows it.
    registry.bind_device("d4", "alice", &fp(4), 500).unwrap();
    registry.revoke_device("d4", 99_000_000).unwrap();
    let ChangeTail::Changes { changes, .. } = tail(&registry, Some(3)).await else {
        panic!()
    };
    assert_eq!(changes[0].seq, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_listening_again_asks_for_a_resync() {
    let Some(cluster) = PgCluster::start("postgres change feed resync") else {
        return;
    };
    let url = cluster.database().await;
    let registry = PgRegistry::open(&url, key(), &[]).await.unwrap();
    let wake = Arc::new(tokio::sync::Notify::new());
    let feed = registry.listen_changes(wake.clone());
    tokio::time::timeout(std::time::Duration::from_secs(10), wake.notified())
        .await
        .expect("the feed listens and wakes a round");
    // The round after the feed (re)listened reads everything; the one after that tails.
    assert_eq!(
        tail(&registry, Some(0)).await,
        ChangeTail::Resync { head: 0 }
    );
    assert!(matches!(
        tail(&registry, Some(0)).await,
        ChangeTail::Changes { .. }
    ));
    drop(feed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_migrated_on_open() {
    let Some(cluster) = PgCluster::start("postgres migration 2") else {
        return;
    };
    let url = cluster.database().await;
    let registry = PgRegistry::open(&url, key(), &[]).await.unwrap();
    registry.add_user("alice", totp(), 1_000).unwrap();
    registry.bind_device("d1", "alice", &fp(1), 500).unwrap();
    registry.revoke_device("d1", 2_000).unwrap();
    drop(registry);
    // Back to what version 1 made: numbers from an identity column, no index on time.
    sql(
        &url,
        "ALTER TABLE changes ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (START 2);
         DROP INDEX changes_by_time;
         UPDATE portcullis_schema SET version = 1;",
    )
    .await;

    let registry = PgRegistry::open(&url, key(), &[]).await.unwrap();
    assert_eq!(registry.schema_version().await.unwrap(), SCHEMA_VERSION);
    registry.bind_device("d2", "alice", &fp(2), 500).unwrap();
    registry.revoke_device("d2", 3_000).unwrap();
    let ChangeTail::Changes { changes, head } = tail(&registry, Some(0)).await else {
        panic!()
    };
    assert_eq!(
        head, 2,
        "the record kept from version 1, then the next number"
    );
    assert_eq!(changes.len(), 2);
}
