//! The backend conformance suite of `portcullis-core` (`portcullis_core::conformance`) against
//! `PgRegistry` on a real PostgreSQL server (a throwaway cluster, one database per check), and
//! what the suite cannot see on one handle: two registries on one database (two instances of a
//! fleet) see each other's changes at once.

use std::sync::Arc;

use portcullis_core::conformance::{self, Runner, Task};
use portcullis_core::{
    Admin, Committed, DeviceFingerprint, Effects, GateStore, LockoutPolicy, Registry,
    RegistryError, SessionStore, TotpAlgorithm, TotpConfig,
};
use portcullis_postgres::PgRegistry;
use portcullis_postgres::testkit::PgCluster;
use portcullis_store::SecretKey;

/// Drives the suite's store futures on a tokio runtime.
struct Tokio(tokio::runtime::Runtime);

impl Runner for Tokio {
    fn run(&self, task: Task<'_>) {
        self.0.block_on(task)
    }
}

fn key() -> SecretKey {
    SecretKey::from_bytes([9; SecretKey::LEN])
}

#[test]
fn postgres_passes_the_conformance_suite() {
    let Some(cluster) = PgCluster::start("postgres conformance") else {
        return;
    };
    let runner = Tokio(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    conformance::run_all(
        &|| {
            let url = cluster.database_blocking();
            Arc::new(PgRegistry::open_blocking(&url, key(), &[]).unwrap()) as Arc<dyn Registry>
        },
        &runner,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_share_every_change() {
    let Some(cluster) = PgCluster::start("postgres two instances") else {
        return;
    };
    let url = cluster.database().await;
    let a = PgRegistry::open(&url, key(), &[]).await.unwrap();
    let b = PgRegistry::open(&url, key(), &[]).await.unwrap();
    let totp = TotpConfig::new(vec![3; 20], 6, TotpAlgorithm::Sha1, 30).unwrap();
    // The synchronous traits work from inside an async runtime too.
    a.add_user("alice", totp, 1_000).unwrap();
    let fp = DeviceFingerprint::from_bytes([4; 32]);
    a.bind_device("laptop", "alice", &fp, 1_000).unwrap();
    assert_eq!(b.device_by_fingerprint(&fp).unwrap().unwrap().user, "alice");
    assert_eq!(
        b.user("alice").unwrap().unwrap().totp.unwrap().secret(),
        &[3; 20],
        "the secret sealed by one instance opens on the other"
    );
    let accept = Effects::AcceptStep {
        user: "alice".into(),
        step: 7,
        now_ms: 2_000,
        lockout: LockoutPolicy::default(),
        session: None,
    };
    assert_eq!(a.commit(&accept).await.unwrap(), Committed::Applied);
    assert!(matches!(
        b.commit(&accept).await.unwrap(),
        Committed::StepTaken(_)
    ));
    b.revoke_device("laptop", 3_000).unwrap();
    assert!(a.device_by_name("laptop").unwrap().unwrap().is_revoked());
    assert!(matches!(
        a.revoke_device("laptop", 3_000),
        Err(RegistryError::NotFound(_))
    ));
    assert!(a.list_sessions(0).unwrap().is_empty());

    // Another registry key: refused at open, naming the host.
    let err = PgRegistry::open(&url, SecretKey::from_bytes([1; SecretKey::LEN]), &[])
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("another registry key") && text.contains("127.0.0.1"),
        "{text}"
    );
}
