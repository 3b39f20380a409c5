//! The sessions and the administration on PostgreSQL ([`SessionStore`], [`Admin`]): each
//! change one statement or one transaction, each revocation with its row in `changes` and a
//! `NOTIFY` on [`CHANGES_CHANNEL`] in the same transaction, so that every instance learns of
//! it (the notification is delivered when, and only if, the transaction commits).
//!
//! Names and roles are ordered byte-wise (`COLLATE "C"`), as in every store, whatever the
//! database's locale.

use deadpool_postgres::GenericClient;
use portcullis_core::{
    Admin, DeviceFingerprint, DeviceRecord, LockState, Need, RegistryError, SessionId, SessionNeed,
    SessionRecord, SessionStore, TotpConfig, UserRecord, check_name, normalize_roles,
};
use portcullis_store::rows::{SessionRow, db_ms, lock_state};

use crate::PgRegistry;
use crate::gate::{SESSION_COLUMNS, device_at, is_unique_violation, session_at, user_at};
use crate::schema::{CHANGES_LOCK, CHANGES_RETENTION_MS};

/// The channel every revocation notifies, with the sequence number of its `changes` row.
pub const CHANGES_CHANNEL: &str = "portcullis_changes";

const USER_COLUMNS: &str =
    "name, totp_secret, digits::bigint, algorithm, period::bigint, created_ms, service";
const DEVICE_COLUMNS: &str = "name, user_name, fingerprint, created_ms, revoked_ms";

/// What a row of `changes` says was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Device,
    User,
    Session,
    Roles,
}

impl ChangeKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::User => "user",
            Self::Session => "session",
            Self::Roles => "roles",
        }
    }
}

impl PgRegistry {
    /// Records a change in `changes` and notifies [`CHANGES_CHANNEL`], inside the caller's
    /// transaction: under [`CHANGES_LOCK`] (held to the end of the transaction) the record
    /// takes the next number, so numbers follow the order of commit without gaps; records older
    /// than [`CHANGES_RETENTION_MS`] are dropped in the same statement.
    async fn record_change(
        &self,
        tx: &impl GenericClient,
        kind: ChangeKind,
        fingerprint: Option<&[u8]>,
        user: Option<&str>,
        session: Option<&[u8]>,
        at_ms: u64,
    ) -> Result<(), RegistryError> {
        tx.execute("SELECT pg_advisory_xact_lock($1::bigint)", &[&CHANGES_LOCK])
            .await
            .map_err(|e| self.backend(&e))?;
        let cutoff = db_ms(at_ms.saturating_sub(CHANGES_RETENTION_MS));
        tx.execute(
            "WITH c AS (
                 INSERT INTO changes (seq, kind, fingerprint, user_name, session_id, at_ms)
                 SELECT coalesce(max(seq), 0) + 1, $1::text, $2::bytea, $3::text, $4::bytea,
                        $5::bigint
                 FROM changes RETURNING seq
             ), pruned AS (
                 DELETE FROM changes WHERE at_ms < $7::bigint AND seq < (SELECT seq FROM c)
             )
             SELECT pg_notify($6::text, seq::text) FROM c",
            &[
                &kind.as_str(),
                &fingerprint,
                &user,
                &session,
                &db_ms(at_ms),
                &CHANGES_CHANNEL,
                &cutoff,
            ],
        )
        .await
        .map_err(|e| self.backend(&e))?;
        Ok(())
    }

    /// `NotFound` unless the user exists; locks the user's row for the transaction.
    async fn require_user(&self, tx: &impl GenericClient, user: &str) -> Result<(), RegistryError> {
        let found = tx
            .query_opt(
                "SELECT 1 FROM users WHERE name = $1::text FOR UPDATE",
                &[&user],
            )
            .await
            .map_err(|e| self.backend(&e))?;
        match found {
            Some(_) => Ok(()),
            None => Err(RegistryError::NotFound(format!("user {user}"))),
        }
    }

    /// Every row of `rows` read by `read` (its first column may be NULL only in a bad row,
    /// named by `missing`) and decoded by `decode`.
    fn records<R, T>(
        &self,
        rows: &[tokio_postgres::Row],
        read: fn(&tokio_postgres::Row, usize) -> Result<Option<R>, tokio_postgres::Error>,
        missing: &str,
        decode: impl Fn(R) -> Result<T, portcullis_store::rows::Damaged>,
    ) -> Result<Vec<T>, RegistryError> {
        rows.iter()
            .map(|row| {
                let found = read(row, 0).map_err(|e| self.backend(&e))?.ok_or_else(|| {
                    RegistryError::Backend(format!("PostgreSQL at {}: {missing}", self.host))
                })?;
                decode(found).map_err(|e| self.damaged(e))
            })
            .collect()
    }

    fn sessions(&self, rows: &[tokio_postgres::Row]) -> Result<Vec<SessionRecord>, RegistryError> {
        self.records(
            rows,
            session_at,
            "a session without an id",
            SessionRow::decode,
        )
    }

    fn devices(&self, rows: &[tokio_postgres::Row]) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.records(rows, device_at, "a device without a name", |d| d.decode())
    }

    fn users(&self, rows: &[tokio_postgres::Row]) -> Result<Vec<UserRecord>, RegistryError> {
        self.records(rows, user_at, "a user without a name", |u| {
            u.decode(&self.sealer)
        })
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, RegistryError> {
        let client = self.conn().await?;
        client
            .query(sql, params)
            .await
            .map_err(|e| self.backend(&e))
    }

    async fn revoke_device_async(
        &self,
        name: &str,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        let mut client = self.conn().await?;
        let tx = client.transaction().await.map_err(|e| self.backend(&e))?;
        let rows = tx
            .query(
                &format!(
                    "UPDATE devices SET revoked_ms = $2::bigint
                     WHERE name = $1::text AND revoked_ms IS NULL RETURNING {DEVICE_COLUMNS}"
                ),
                &[&name, &db_ms(now_ms)],
            )
            .await
            .map_err(|e| self.backend(&e))?;
        let Some(device) = self.devices(&rows)?.into_iter().next() else {
            return Err(RegistryError::NotFound(format!("active device {name}")));
        };
        let fingerprint = device.fingerprint.as_bytes().as_slice();
        tx.execute(
            "UPDATE sessions SET revoked_ms = $2::bigint
             WHERE fingerprint = $1::bytea AND revoked_ms IS NULL",
            &[&fingerprint, &db_ms(now_ms)],
        )
        .await
        .map_err(|e| self.backend(&e))?;
        self.record_change(
            &tx,
            ChangeKind::Device,
            Some(fingerprint),
            Some(&device.user),
            None,
            now_ms,
        )
        .await?;
        tx.commit().await.map_err(|e| self.backend(&e))?;
        Ok(device)
    }

    async fn revoke_user_async(
        &self,
        user: &str,
        now_ms: u64,
    ) -> Result<Vec<DeviceRecord>, RegistryError> {
        let mut client = self.conn().await?;
        let tx = client.transaction().await.map_err(|e| self.backend(&e))?;
        self.require_user(&tx, user).await?;
        let rows = tx
            .query(
                &format!(
                    "UPDATE devices SET revoked_ms = $2::bigint
                     WHERE user_name = $1::text AND revoked_ms IS NULL RETURNING {DEVICE_COLUMNS}"
                ),
                &[&user, &db_ms(now_ms)],
            )
            .await
            .map_err(|e| self.backend(&e))?;
        let mut devices = self.devices(&rows)?;
        tx.execute(
            "UPDATE sessions SET revoked_ms = $2::bigint
             WHERE user_name = $1::text AND revoked_ms IS NULL",
            &[&user, &db_ms(now_ms)],
        )
        .await
        .map_err(|e| self.backend(&e))?;
        self.record_change(&tx, ChangeKind::User, None, Some(user), None, now_ms)
            .await?;
        tx.commit().await.map_err(|e| self.backend(&e))?;
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(devices)
    }

    async fn revoke_session_async(
        &self,
        id: &SessionId,
        now_ms: u64,
    ) -> Result<SessionRecord, RegistryError> {
        let mut client = self.conn().await?;
        let tx = client.transaction().await.map_err(|e| self.backend(&e))?;
        // One statement: a session revoked before keeps its first revocation time.
        let rows = tx
            .query(
                &format!(
                    "UPDATE sessions SET revoked_ms = coalesce(revoked_ms, $2::bigint)
                     WHERE id = $1::bytea RETURNING {SESSION_COLUMNS}"
                ),
                &[&id.0.as_slice(), &db_ms(now_ms)],
            )
            .await
            .map_err(|e| self.backend(&e))?;
        let Some(session) = self.sessions(&rows)?.into_iter().next() else {
            return Err(RegistryError::NotFound(format!("session {id}")));
        };
        self.record_change(
            &tx,
            ChangeKind::Session,
            Some(session.fingerprint.as_bytes()),
            Some(&session.user),
            Some(&id.0),
            now_ms,
        )
        .await?;
        tx.commit().await.map_err(|e| self.backend(&e))?;
        Ok(session)
    }

    async fn set_user_roles_async(
        &self,
        user: &str,
        roles: &[String],
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        let roles = normalize_roles(roles)?;
        let mut client = self.conn().await?;
        let tx = client.transaction().await.map_err(|e| self.backend(&e))?;
        self.require_user(&tx, user).await?;
        tx.execute(
            "DELETE FROM user_roles WHERE user_name = $1::text",
            &[&user],
        )
        .await
        .map_err(|e| self.backend(&e))?;
        tx.execute(
            "INSERT INTO user_roles (user_name, role) SELECT $1::text, unnest($2::text[])",
            &[&user, &roles],
        )
        .await
        .map_err(|e| self.backend(&e))?;
        self.record_change(&tx, ChangeKind::Roles, None, Some(user), None, now_ms)
            .await?;
        tx.commit().await.map_err(|e| self.backend(&e))
    }

    async fn bind_device_async(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        check_name("device", name)?;
        let created_ms = db_ms(now_ms);
        let fp = fingerprint.as_bytes().as_slice();
        let mut client = self.conn().await?;
        // The checks and the insert in one transaction, so that the error names the conflict
        // exactly; the partial unique indexes enforce the same rules underneath (two instances
        // binding at once).
        let tx = client.transaction().await.map_err(|e| self.backend(&e))?;
        self.require_user(&tx, user).await?;
        let taken = tx
            .query_opt(
                "SELECT 1 FROM devices WHERE name = $1::text AND revoked_ms IS NULL",
                &[&name],
            )
            .await
            .map_err(|e| self.backend(&e))?;
        if taken.is_some() {
            return Err(RegistryError::AlreadyExists(format!("device {name}")));
        }
        let holder = tx
            .query_opt(
                "SELECT name FROM devices WHERE fingerprint = $1::bytea AND revoked_ms IS NULL",
                &[&fp],
            )
            .await
            .map_err(|e| self.backend(&e))?;
        if let Some(holder) = holder {
            let holder: String = holder.get(0);
            return Err(RegistryError::AlreadyExists(format!(
                "a device with fingerprint {fingerprint} (bound as {holder})"
            )));
        }
        let inserted = tx
            .execute(
                "INSERT INTO devices (name, user_name, fingerprint, created_ms)
                 VALUES ($1::text, $2::text, $3::bytea, $4::bigint)",
                &[&name, &user, &fp, &created_ms],
            )
            .await;
        if let Err(e) = &inserted {
            return Err(if is_unique_violation(e) {
                RegistryError::AlreadyExists(format!(
                    "device {name} or a device with fingerprint {fingerprint}"
                ))
            } else {
                self.backend(e)
            });
        }
        tx.commit().await.map_err(|e| {
            if is_unique_violation(&e) {
                RegistryError::AlreadyExists(format!(
                    "device {name} or a device with fingerprint {fingerprint}"
                ))
            } else {
                self.backend(&e)
            }
        })?;
        Ok(DeviceRecord {
            name: name.to_owned(),
            user: user.to_owned(),
            fingerprint: *fingerprint,
            created_ms: created_ms as u64,
            revoked_ms: None,
        })
    }

    async fn insert_user(
        &self,
        name: &str,
        totp: Option<&TotpConfig>,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        check_name("user", name)?;
        let result = match totp {
            Some(totp) => {
                let period = i32::try_from(totp.period()).map_err(|_| {
                    RegistryError::Invalid(format!("TOTP period: at most {} seconds", i32::MAX))
                })?;
                let sealed = self.sealer.seal(name, totp.secret()).map_err(|e| {
                    RegistryError::Backend(format!("cannot seal the TOTP secret of {name}: {e}"))
                })?;
                let client = self.conn().await?;
                client
                    .execute(
                        "INSERT INTO users (name, totp_secret, digits, algorithm, period, created_ms)
                         VALUES ($1::text, $2::bytea, $3::smallint, $4::text, $5::integer,
                                 $6::bigint)",
                        &[
                            &name,
                            &sealed.as_slice(),
                            &i16::from(totp.digits()),
                            &totp.algorithm().name(),
                            &period,
                            &db_ms(now_ms),
                        ],
                    )
                    .await
            }
            None => {
                let client = self.conn().await?;
                client
                    .execute(
                        "INSERT INTO users (name, created_ms, service)
                         VALUES ($1::text, $2::bigint, TRUE)",
                        &[&name, &db_ms(now_ms)],
                    )
                    .await
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(RegistryError::AlreadyExists(format!("user {name}")))
            }
            Err(e) => Err(self.backend(&e)),
        }
    }
}

impl SessionStore for PgRegistry {
    fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1::bytea"),
                    &[&id.0.as_slice()],
                )
                .await?;
            Ok(self.sessions(&rows)?.into_iter().next())
        })
    }

    fn live_session_for_device(
        &self,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<Option<SessionRecord>, RegistryError> {
        // The gate's own read, which asks for the same session.
        let need = Need {
            fingerprint: *fingerprint,
            secret: false,
            session: SessionNeed::LiveForDevice,
            now_ms,
        };
        self.wait(async { Ok(self.snapshot_async(&need).await?.session) })
    }

    fn list_sessions(&self, now_ms: u64) -> Result<Vec<SessionRecord>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    &format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions WHERE expires_ms > $1::bigint
                         ORDER BY totp_time_ms DESC, expires_ms DESC, id DESC"
                    ),
                    &[&db_ms(now_ms)],
                )
                .await?;
            self.sessions(&rows)
        })
    }

    fn revoke_session(&self, id: &SessionId, now_ms: u64) -> Result<SessionRecord, RegistryError> {
        self.wait(self.revoke_session_async(id, now_ms))
    }
}

impl Admin for PgRegistry {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    &format!("SELECT {USER_COLUMNS} FROM users WHERE name = $1::text"),
                    &[&name],
                )
                .await?;
            Ok(self.users(&rows)?.into_iter().next())
        })
    }

    fn lock_state(&self, user: &str) -> Result<LockState, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    "SELECT failures::bigint, locked_until_ms FROM users WHERE name = $1::text",
                    &[&user],
                )
                .await?;
            match rows.first() {
                None => Ok(LockState::default()),
                Some(row) => lock_state(user, row.get(0), row.get(1)).map_err(|e| self.damaged(e)),
            }
        })
    }

    fn user_roles(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    "SELECT role FROM user_roles WHERE user_name = $1::text
                     ORDER BY role COLLATE \"C\"",
                    &[&user],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn set_user_roles(&self, user: &str, roles: &[String]) -> Result<(), RegistryError> {
        let now_ms = self.clock.now_ms();
        self.wait(self.set_user_roles_async(user, roles, now_ms))
    }

    fn add_user(&self, name: &str, totp: TotpConfig, now_ms: u64) -> Result<(), RegistryError> {
        self.wait(self.insert_user(name, Some(&totp), now_ms))
    }

    fn add_service_user(&self, name: &str, now_ms: u64) -> Result<(), RegistryError> {
        self.wait(self.insert_user(name, None, now_ms))
    }

    fn device_by_fingerprint(
        &self,
        fingerprint: &DeviceFingerprint,
    ) -> Result<Option<DeviceRecord>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    &format!(
                        "SELECT {DEVICE_COLUMNS} FROM devices WHERE fingerprint = $1::bytea
                         ORDER BY (revoked_ms IS NULL) DESC, created_ms DESC, id DESC LIMIT 1"
                    ),
                    &[&fingerprint.as_bytes().as_slice()],
                )
                .await?;
            Ok(self.devices(&rows)?.into_iter().next())
        })
    }

    fn device_by_name(&self, name: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    &format!(
                        "SELECT {DEVICE_COLUMNS} FROM devices WHERE name = $1::text
                         ORDER BY (revoked_ms IS NULL) DESC, created_ms DESC, id DESC LIMIT 1"
                    ),
                    &[&name],
                )
                .await?;
            Ok(self.devices(&rows)?.into_iter().next())
        })
    }

    fn bind_device(
        &self,
        name: &str,
        user: &str,
        fingerprint: &DeviceFingerprint,
        now_ms: u64,
    ) -> Result<DeviceRecord, RegistryError> {
        self.wait(self.bind_device_async(name, user, fingerprint, now_ms))
    }

    fn revoke_device(&self, name: &str, now_ms: u64) -> Result<DeviceRecord, RegistryError> {
        self.wait(self.revoke_device_async(name, now_ms))
    }

    fn revoke_user(&self, user: &str, now_ms: u64) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.wait(self.revoke_user_async(user, now_ms))
    }

    fn list_users(&self) -> Result<Vec<UserRecord>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    &format!("SELECT {USER_COLUMNS} FROM users ORDER BY name COLLATE \"C\""),
                    &[],
                )
                .await?;
            self.users(&rows)
        })
    }

    fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.wait(async {
            let rows = self
                .query(
                    &format!(
                        "SELECT {DEVICE_COLUMNS} FROM devices
                         ORDER BY name COLLATE \"C\", created_ms, id"
                    ),
                    &[],
                )
                .await?;
            self.devices(&rows)
        })
    }
}

/// What [`PgRegistry::import`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Imported {
    /// Users (with their secrets, lockout and single-use state).
    pub users: usize,
    /// Device bindings, active and revoked.
    pub devices: usize,
    /// Of those, the active ones.
    pub active_devices: usize,
    /// Role grants.
    pub roles: usize,
    /// Session records.
    pub sessions: usize,
}

impl PgRegistry {
    /// Writes everything `export` holds into this registry, in one transaction, and refuses a
    /// registry that is not empty (`AlreadyExists`, nothing written). Every user's sealed
    /// secret is opened under this registry's key first: a copy sealed under another key is
    /// refused before anything is written, so that nothing is lost.
    pub fn import(
        &self,
        export: &portcullis_store::rows::RegistryExport,
    ) -> Result<Imported, RegistryError> {
        for user in &export.users {
            user.row
                .clone()
                .decode(&self.sealer)
                .map_err(|e| self.damaged(e))?;
            lock_state(&user.row.name, user.failures, user.locked_until_ms)
                .map_err(|e| self.damaged(e))?;
        }
        for device in &export.devices {
            device.clone().decode().map_err(|e| self.damaged(e))?;
        }
        for session in &export.sessions {
            session.clone().decode().map_err(|e| self.damaged(e))?;
        }
        self.wait(self.import_async(export))
    }

    async fn import_async(
        &self,
        export: &portcullis_store::rows::RegistryExport,
    ) -> Result<Imported, RegistryError> {
        let mut client = self.conn().await?;
        let tx = client.transaction().await.map_err(|e| self.backend(&e))?;
        let e = |e: tokio_postgres::Error| self.backend(&e);
        // No other writer while the copy checks and fills the tables.
        tx.batch_execute("LOCK TABLE users, devices, sessions, user_roles IN EXCLUSIVE MODE")
            .await
            .map_err(e)?;
        let empty: bool = tx
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM users) AND NOT EXISTS (SELECT 1 FROM devices)
                   AND NOT EXISTS (SELECT 1 FROM sessions)",
                &[],
            )
            .await
            .map_err(e)?
            .get(0);
        if !empty {
            return Err(RegistryError::AlreadyExists(format!(
                "a registry in PostgreSQL at {} (the copy goes to an empty database only)",
                self.host
            )));
        }
        let user = tx
            .prepare(
                "INSERT INTO users (name, totp_secret, digits, algorithm, period, created_ms,
                                    service, failures, locked_until_ms, last_step)
                 VALUES ($1::text, $2::bytea, $3::bigint, $4::text, $5::bigint, $6::bigint,
                         $7::boolean, $8::bigint, $9::bigint, $10::bigint)",
            )
            .await
            .map_err(e)?;
        for u in &export.users {
            let secret = u.row.secret.as_ref().map(|s| s.as_slice());
            tx.execute(
                &user,
                &[
                    &u.row.name,
                    &secret,
                    &u.row.digits,
                    &u.row.algorithm,
                    &u.row.period,
                    &u.row.created_ms,
                    &u.row.service,
                    &u.failures,
                    &u.locked_until_ms,
                    &u.last_step,
                ],
            )
            .await
            .map_err(e)?;
        }
        let device = tx
            .prepare(
                "INSERT INTO devices (name, user_name, fingerprint, created_ms, revoked_ms)
                 VALUES ($1::text, $2::text, $3::bytea, $4::bigint, $5::bigint)",
            )
            .await
            .map_err(e)?;
        for d in &export.devices {
            tx.execute(
                &device,
                &[
                    &d.name,
                    &d.user,
                    &d.fingerprint,
                    &d.created_ms,
                    &d.revoked_ms,
                ],
            )
            .await
            .map_err(e)?;
        }
        let role = tx
            .prepare("INSERT INTO user_roles (user_name, role) VALUES ($1::text, $2::text)")
            .await
            .map_err(e)?;
        for (user, name) in &export.roles {
            tx.execute(&role, &[user, name]).await.map_err(e)?;
        }
        let session = tx
            .prepare(
                "INSERT INTO sessions (id, user_name, fingerprint, totp_time_ms, expires_ms,
                                       revoked_ms)
                 VALUES ($1::bytea, $2::text, $3::bytea, $4::bigint, $5::bigint, $6::bigint)",
            )
            .await
            .map_err(e)?;
        for s in &export.sessions {
            tx.execute(
                &session,
                &[
                    &s.id,
                    &s.user,
                    &s.fingerprint,
                    &s.totp_time_ms,
                    &s.expires_ms,
                    &s.revoked_ms,
                ],
            )
            .await
            .map_err(e)?;
        }
        tx.commit().await.map_err(e)?;
        Ok(Imported {
            users: export.users.len(),
            devices: export.devices.len(),
            active_devices: export
                .devices
                .iter()
                .filter(|d| d.revoked_ms.is_none())
                .count(),
            roles: export.roles.len(),
            sessions: export.sessions.len(),
        })
    }
}
