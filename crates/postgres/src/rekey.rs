//! `PgRegistry::rekey`: every TOTP secret re-sealed under a new registry key in one
//! transaction.

use portcullis_core::RegistryError;
use portcullis_store::{Sealer, SecretKey};
use zeroize::Zeroizing;

use crate::PgRegistry;

impl PgRegistry {
    /// Re-seals every TOTP secret under `key` in one transaction, and returns how many.
    /// `progress` is called after each row with (rows done, rows in all).
    ///
    /// The rows are locked (`FOR UPDATE`) and the transaction commits every row or none:
    /// interrupted anywhere (an error, the connection or the process gone), the database holds
    /// each secret sealed under the key this registry was opened with, and after the commit
    /// each secret sealed under `key`. Every member of a fleet must then be given `key`: a
    /// member still holding the old key refuses connections that need a secret (its reads fail).
    /// The registry is consumed: open it again with `key`.
    pub fn rekey(
        self,
        key: SecretKey,
        progress: impl FnMut(usize, usize) + Send,
    ) -> Result<usize, RegistryError> {
        let next = Sealer::new(Some(key)).map_err(|_| {
            RegistryError::Backend("AES-256-GCM refused the new registry key".to_owned())
        })?;
        self.wait(self.rekey_async(next, progress))
    }

    async fn rekey_async(
        &self,
        next: Sealer,
        mut progress: impl FnMut(usize, usize) + Send,
    ) -> Result<usize, RegistryError> {
        let mut client = self.conn().await?;
        let tx = client.transaction().await.map_err(|e| self.backend(&e))?;
        let rows = tx
            .query(
                "SELECT name, totp_secret FROM users WHERE totp_secret IS NOT NULL
                 ORDER BY name COLLATE \"C\" FOR UPDATE",
                &[],
            )
            .await
            .map_err(|e| self.backend(&e))?;
        let update = tx
            .prepare("UPDATE users SET totp_secret = $2::bytea WHERE name = $1::text")
            .await
            .map_err(|e| self.backend(&e))?;
        let total = rows.len();
        for (done, row) in rows.iter().enumerate() {
            let name: String = row.get(0);
            let stored = Zeroizing::new(row.get::<_, Vec<u8>>(1));
            let secret = Zeroizing::new(self.sealer.open(&name, stored).map_err(|e| {
                RegistryError::Backend(format!(
                    "PostgreSQL at {}: user {name}: its TOTP secret does not open ({e}); nothing was re-sealed",
                    self.host
                ))
            })?);
            let sealed = next.seal(&name, &secret).map_err(|e| {
                RegistryError::Backend(format!("PostgreSQL at {}: user {name}: {e}", self.host))
            })?;
            tx.execute(&update, &[&name, &&sealed[..]])
                .await
                .map_err(|e| self.backend(&e))?;
            progress(done + 1, total);
        }
        tx.commit().await.map_err(|e| self.backend(&e))?;
        Ok(total)
    }
}
