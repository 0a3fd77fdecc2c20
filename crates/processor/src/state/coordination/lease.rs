//! Lease locks: a resource held by one token until its lease runs out on the server's clock
//! (`statement_timestamp()`), whether or not its holder is still alive; then any other token
//! may take it. Each new holder gets the next fencing token of the resource (the row outlives
//! releases, so fences never repeat). A token whose lease expired or was taken over can
//! neither release nor extend the new holder's lease: every statement names the token.
//! The seed project's `DistributedLock` is built on these (`postgres_lock`).

use std::time::{Duration, SystemTime};

use tokio_postgres::types::Type;

use super::{check_lock_name, Coordinator};
use crate::state::error::{StateError, StateResult};
use crate::state::limits::check_ttl;

/// A lease taken: its fencing token and when it was granted (the server's clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Granted {
    pub fence: i64,
    pub at: SystemTime,
}

impl Coordinator {
    /// Takes the lease on `resource` for `token`, for `ttl`, unless another token holds a
    /// lease that has not run out; `Err(remaining)` says how long that one has left.
    pub async fn take_lease(
        &self,
        resource: &str,
        token: &str,
        ttl: Duration,
    ) -> StateResult<Result<Granted, Duration>> {
        check_lock_name(resource)?;
        let micros = check_ttl(ttl)?;
        let take = format!(
            "INSERT INTO {leases} AS l (resource, token, fence, acquired_at, expires_at)
             VALUES ($1, $2, 1, statement_timestamp(),
                     statement_timestamp() + $3::bigint * interval '1 microsecond')
             ON CONFLICT (resource) DO UPDATE
                 SET token = EXCLUDED.token, fence = l.fence + 1,
                     acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at
                 WHERE l.token IS NULL OR l.expires_at <= statement_timestamp()
             RETURNING fence, acquired_at",
            leases = self.ctx.names.leases
        );
        let left = format!(
            "SELECT greatest(extract(epoch FROM expires_at - statement_timestamp()), 0)::float8
             FROM {} WHERE resource = $1",
            self.ctx.names.leases
        );
        self.ctx
            .on_primary(async |c| {
                let taken = c
                    .client
                    .query_typed_opt(
                        &take,
                        &[
                            (&resource, Type::TEXT),
                            (&token, Type::TEXT),
                            (&micros, Type::INT8),
                        ],
                    )
                    .await?;
                if let Some(row) = taken {
                    return Ok(Ok(Granted {
                        fence: row.try_get(0)?,
                        at: row.try_get(1)?,
                    }));
                }
                let row = c
                    .client
                    .query_typed_opt(&left, &[(&resource, Type::TEXT)])
                    .await?;
                let secs: f64 = match row {
                    Some(r) => r.try_get(0)?,
                    None => 0.0,
                };
                Ok(Err(Duration::try_from_secs_f64(secs).unwrap_or_default()))
            })
            .await
    }

    /// Ends `token`'s lease on `resource` (also one that has run out but was not taken over).
    /// [`StateError::LockNotHeld`] when `token` does not hold it: it was taken over, or
    /// released already.
    pub async fn release_lease(&self, resource: &str, token: &str) -> StateResult<()> {
        check_lock_name(resource)?;
        let sql = format!(
            "UPDATE {} SET token = NULL, expires_at = statement_timestamp()
             WHERE resource = $1 AND token = $2",
            self.ctx.names.leases
        );
        let n = self
            .ctx
            .on_primary(async |c| {
                Ok(c.client
                    .execute_typed(&sql, &[(&resource, Type::TEXT), (&token, Type::TEXT)])
                    .await?)
            })
            .await?;
        if n == 0 {
            return Err(not_held(resource));
        }
        Ok(())
    }

    /// Makes `token`'s lease on `resource` run for `ttl` from now; when it was granted. The
    /// lease must not have run out: [`StateError::LockNotHeld`] otherwise (or when another
    /// token holds it).
    pub async fn extend_lease(
        &self,
        resource: &str,
        token: &str,
        ttl: Duration,
    ) -> StateResult<SystemTime> {
        check_lock_name(resource)?;
        let micros = check_ttl(ttl)?;
        let sql = format!(
            "UPDATE {} SET expires_at = statement_timestamp() + $3::bigint * interval '1 microsecond'
             WHERE resource = $1 AND token = $2 AND expires_at > statement_timestamp()
             RETURNING statement_timestamp()",
            self.ctx.names.leases
        );
        let row = self
            .ctx
            .on_primary(async |c| {
                Ok(c.client
                    .query_typed_opt(
                        &sql,
                        &[
                            (&resource, Type::TEXT),
                            (&token, Type::TEXT),
                            (&micros, Type::INT8),
                        ],
                    )
                    .await?)
            })
            .await?;
        match row {
            Some(r) => Ok(r.try_get(0)?),
            None => Err(not_held(resource)),
        }
    }

    /// The token holding a lease on `resource` that has not run out, if any.
    pub async fn lease_holder(&self, resource: &str) -> StateResult<Option<String>> {
        check_lock_name(resource)?;
        let sql = format!(
            "SELECT token FROM {} WHERE resource = $1 AND token IS NOT NULL
               AND expires_at > statement_timestamp()",
            self.ctx.names.leases
        );
        let row = self
            .ctx
            .on_primary(async |c| {
                Ok(c.client
                    .query_typed_opt(&sql, &[(&resource, Type::TEXT)])
                    .await?)
            })
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }
}

/// The error for a token that does not hold the lease on `resource`.
fn not_held(resource: &str) -> StateError {
    StateError::LockNotHeld {
        lock: format!(
            "lease on {resource:?}: this token does not hold it (it ran out and was taken \
             over, ran out before this call, or was released)"
        ),
    }
}
