//! The PostgreSQL registry against a real PostgreSQL server (a throwaway cluster): the schema is
//! created on open and left alone on the next open, several instances opening a new database at
//! once migrate it once, a newer schema is refused, and connection failures are one line naming
//! the host, never the password.

use portcullis_postgres::testkit::PgCluster;
use portcullis_postgres::{PgError, PgRegistry, SCHEMA_VERSION};
use portcullis_store::SecretKey;

fn key() -> SecretKey {
    SecretKey::from_bytes([7; SecretKey::LEN])
}

#[tokio::test]
async fn the_schema_is_made_once_and_a_newer_one_is_refused() {
    let Some(cluster) = PgCluster::start("postgres schema") else {
        return;
    };
    let url = cluster.database().await;
    // Eight instances open a new database at once: one migrates, the others find it done.
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgRegistry::open(&url, key(), &[]).await })
        })
        .collect();
    for open in opens {
        let registry = open.await.unwrap().unwrap();
        assert_eq!(registry.schema_version().await.unwrap(), SCHEMA_VERSION);
    }
    let again = PgRegistry::open(&url, key(), &[]).await.unwrap();
    assert_eq!(again.schema_version().await.unwrap(), SCHEMA_VERSION);

    // A schema from a newer Portcullis: refused at open, naming the host and both versions.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(connection);
    client
        .execute(
            "UPDATE portcullis_schema SET version = $1",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
    let err = PgRegistry::open(&url, key(), &[]).await.unwrap_err();
    assert!(matches!(err, PgError::TooNew { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{}", cluster.port()))
            && text.contains(&format!("version {}", SCHEMA_VERSION + 1)),
        "{text}"
    );
}

#[tokio::test]
async fn a_bad_url_a_wrong_password_and_a_server_that_is_down_are_one_line() {
    let Some(cluster) = PgCluster::start("postgres connection errors") else {
        return;
    };
    let url = cluster.database().await;
    let one_line = |e: &PgError| {
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            !text.contains(cluster.password()),
            "the password leaked: {text}"
        );
        text
    };

    let bad = PgRegistry::open("postgres://[nope", key(), &[])
        .await
        .unwrap_err();
    assert!(one_line(&bad).starts_with("registry URL:"), "{bad}");

    let db = url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let refused = PgRegistry::open(&cluster.url_with_wrong_password(&db), key(), &[])
        .await
        .unwrap_err();
    let text = one_line(&refused);
    assert!(
        text.starts_with(&format!("PostgreSQL at 127.0.0.1:{}:", cluster.port()))
            && text.contains("password authentication failed"),
        "{text}"
    );

    // A port where nothing listens.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down_url = format!(
        "postgres://postgres:secret-pw@127.0.0.1:{free}/x?sslmode=disable&connect_timeout=5"
    );
    let down = PgRegistry::open(&down_url, key(), &[]).await.unwrap_err();
    let text = down.to_string();
    assert!(!text.contains("secret-pw"), "{text}");
    assert!(
        text.starts_with(&format!("PostgreSQL at 127.0.0.1:{free}:")) && !text.contains('\n'),
        "{text}"
    );
}
