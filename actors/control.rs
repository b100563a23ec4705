//! The console's control commands, with PgBouncer's semantics and error messages: PAUSE,
//! RESUME, SUSPEND, KILL, KILL_CLIENT, DISABLE, ENABLE, RECONNECT, WAIT_CLOSE, RELOAD,
//! SHUTDOWN and SET. Signals reuse them (SIGUSR1 pauses, SIGUSR2 resumes).
//!
//! A held pool ([`Hold`]) queues new transactions in its Routers; transactions under way
//! finish. PAUSE then waits until the pool's servers have all come back and closed; SUSPEND
//! until they are all idle. The holds are kept here per database and globally, so that a pool
//! created while its database is paused starts paused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::actors::census::ServerState;
use crate::actors::messages::{Kill, Reload, Shutdown};
use crate::actors::pool::{Hold, PoolShared};
use crate::actors::registry::Shared;
use crate::actors::supervisor::CancelShutdown;
use crate::admin::command::ShutdownMode;
use crate::config::catalog;
use crate::protocol::error::sqlstate;
use crate::protocol::PgError;

/// The console's own database names.
pub const ADMIN_DATABASES: [&str; 2] = ["pgbouncer", "pgcorral"];

pub fn is_admin_database(name: &str) -> bool {
    ADMIN_DATABASES.contains(&name)
}

/// What the console holds or refuses, globally and per database.
#[derive(Debug, Default)]
pub struct Holds {
    global: Option<Hold>,
    per_database: HashMap<String, Hold>,
    disabled: HashSet<String>,
}

impl Holds {
    /// The hold a pool of `database` is under.
    pub fn of(&self, database: &str) -> Hold {
        self.global.or_else(|| self.per_database.get(database).copied()).unwrap_or(Hold::None)
    }

    pub fn paused(&self, database: &str) -> bool {
        self.of(database) == Hold::Paused
    }

    pub fn disabled(&self, database: &str) -> bool {
        self.disabled.contains(database)
    }

    /// (active, paused, suspended) for `SHOW STATE`.
    pub fn state(&self) -> (bool, bool, bool) {
        match self.global {
            None => (true, false, false),
            Some(Hold::Paused) => (false, true, false),
            Some(_) => (false, false, true),
        }
    }
}

fn console_error(message: impl Into<String>) -> PgError {
    PgError::error(sqlstate::PROTOCOL_VIOLATION, message)
}

/// The pools a command names: every pool, or those of one database (which must exist).
fn pools_of(shared: &Shared, database: Option<&str>, verb: &str) -> Result<Vec<Arc<PoolShared>>, PgError> {
    let pools = shared.all_pools();
    let Some(db) = database else { return Ok(pools) };
    if is_admin_database(db) {
        return Err(console_error(format!("cannot {verb} admin db: {db}")));
    }
    let known =
        shared.config().databases.iter().any(|d| d.name == db) || pools.iter().any(|p| p.key.database == db);
    if !known {
        return Err(console_error(format!("no such database: {db}")));
    }
    Ok(pools.into_iter().filter(|p| p.key.database == db).collect())
}

fn apply_holds(shared: &Shared, pools: &[Arc<PoolShared>]) {
    let holds = shared.holds.lock();
    for pool in pools {
        pool.hold_traffic(holds.of(&pool.key.database));
    }
}

/// Waits until no server of `pools` is in a state `busy` counts.
async fn settle(shared: &Shared, pools: &[Arc<PoolShared>], busy: impl Fn(ServerState) -> bool) {
    let keys: HashSet<_> = pools.iter().map(|p| p.key.clone()).collect();
    loop {
        let waiting = shared.census.servers().iter().any(|s| keys.contains(&s.pool.key) && busy(s.state()));
        if !waiting {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records a pause of `database` (or of everything), refused while a global hold is on.
fn pause_hold(shared: &Shared, database: Option<&str>) -> Result<(), PgError> {
    let mut holds = shared.holds.lock();
    if holds.global.is_some() {
        return Err(console_error("already suspended/paused"));
    }
    match database {
        None => holds.global = Some(Hold::Paused),
        Some(db) => {
            holds.per_database.insert(db.to_string(), Hold::Paused);
        }
    }
    Ok(())
}

/// PAUSE [db]: new transactions wait; returns once every server of the database (or of all)
/// has come back from its client and closed.
pub async fn pause(shared: &Shared, database: Option<&str>) -> Result<(), PgError> {
    let pools = pools_of(shared, database, "pause")?;
    pause_hold(shared, database)?;
    log::info!("PAUSE{} command issued", database.map(|d| format!(" '{d}'")).unwrap_or_default());
    apply_holds(shared, &pools);
    settle(shared, &pools, |_| true).await;
    Ok(())
}

/// A graceful shutdown's pause: like PAUSE, whatever was held before.
pub fn hold_all_for_shutdown(shared: &Shared) {
    shared.holds.lock().global = Some(Hold::Paused);
    apply_holds(shared, &shared.all_pools());
}

/// RESUME [db] from the console or SIGUSR2: as [`resume`], and a RESUME of everything also
/// cancels a graceful shutdown under way, as PgBouncer's does.
pub async fn resume_all(shared: &Shared, database: Option<&str>) -> Result<(), PgError> {
    resume(shared, database)?;
    if database.is_some() || !shared.shutting_down.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    let supervisor = shared.supervisor().ok_or_else(|| console_error("the daemon is not running"))?;
    match supervisor.send(CancelShutdown).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(reason)) => Err(console_error(reason)),
        Err(_) => Err(console_error("the daemon is shutting down")),
    }
}

/// RESUME [db]: undoes PAUSE, SUSPEND and KILL; queued clients get servers.
pub fn resume(shared: &Shared, database: Option<&str>) -> Result<(), PgError> {
    let pools = match database {
        None => {
            let mut holds = shared.holds.lock();
            if holds.global.is_none() && holds.per_database.is_empty() {
                return Err(console_error("pooler is not paused/suspended"));
            }
            holds.global = None;
            holds.per_database.clear();
            shared.all_pools()
        }
        Some(db) => {
            let pools = pools_of(shared, Some(db), "resume")?;
            let mut holds = shared.holds.lock();
            if holds.per_database.remove(db).is_none() {
                return Err(console_error(format!("database {db} is not paused")));
            }
            pools
        }
    };
    log::info!("RESUME{} command issued", database.map(|d| format!(" '{d}'")).unwrap_or_default());
    apply_holds(shared, &pools);
    Ok(())
}

/// SUSPEND: new transactions wait and servers stay open; returns once no server is lent.
pub async fn suspend(shared: &Shared) -> Result<(), PgError> {
    {
        let mut holds = shared.holds.lock();
        if holds.global.is_some() {
            return Err(console_error("already suspended/paused"));
        }
        if !holds.per_database.is_empty() {
            return Err(console_error("cannot suspend with paused databases"));
        }
        holds.global = Some(Hold::Suspended);
    }
    log::info!("SUSPEND command issued");
    let pools = shared.all_pools();
    apply_holds(shared, &pools);
    settle(shared, &pools, |state| matches!(state, ServerState::Active | ServerState::Tested)).await;
    Ok(())
}

/// KILL [db]: disconnects the database's clients (or every pooled client) at once, closes its
/// servers, and pauses it until RESUME.
pub fn kill(shared: &Shared, database: Option<&str>) -> Result<(), PgError> {
    let pools = pools_of(shared, database, "kill")?;
    pause_hold(shared, database)?;
    log::info!("KILL{} command issued", database.map(|d| format!(" '{d}'")).unwrap_or_default());
    apply_holds(shared, &pools);
    let removed = PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "database removed");
    for client in shared.census.clients() {
        let Some(login) = client.login() else { continue };
        if is_admin_database(&login.database) || database.is_some_and(|db| db != login.database) {
            continue;
        }
        client.session.do_send(Kill(removed.clone()));
    }
    Ok(())
}

/// KILL_CLIENT id: disconnects one client, as listed by SHOW CLIENTS.
pub fn kill_client(shared: &Shared, id: u64) -> Result<(), PgError> {
    let client = shared.census.client(id).ok_or_else(|| console_error("client not found"))?;
    log::info!("KILL_CLIENT '{id}' command issued");
    client.session.do_send(Kill(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "admin forced disconnect")));
    Ok(())
}

/// DISABLE db (`disable` true) refuses the database's new clients; ENABLE allows them again.
pub fn disable(shared: &Shared, database: &str, disable: bool) -> Result<(), PgError> {
    let verb = if disable { "disable" } else { "enable" };
    pools_of(shared, Some(database), verb)?;
    let mut holds = shared.holds.lock();
    if disable {
        holds.disabled.insert(database.to_string());
    } else {
        holds.disabled.remove(database);
    }
    log::info!("{} '{database}' command issued", verb.to_ascii_uppercase());
    Ok(())
}

/// RECONNECT [db]: every server open now is closed as it comes back (idle ones at once), and
/// new ones connect afresh.
pub fn reconnect(shared: &Shared, database: Option<&str>) -> Result<(), PgError> {
    let pools = pools_of(shared, database, "reconnect")?;
    log::info!("RECONNECT{} command issued", database.map(|d| format!(" '{d}'")).unwrap_or_default());
    for pool in &pools {
        pool.reconnect();
        for (_, router) in pool.all_routers() {
            router.close_idle(true);
        }
    }
    Ok(())
}

/// WAIT_CLOSE [db]: returns once no server opened before the last RECONNECT or connection
/// change by RELOAD is left.
pub async fn wait_close(shared: &Shared, database: Option<&str>) -> Result<(), PgError> {
    let pools = pools_of(shared, database, "wait in")?;
    let keys: HashSet<_> = pools.iter().map(|p| p.key.clone()).collect();
    loop {
        let outdated = shared
            .census
            .servers()
            .iter()
            .any(|s| keys.contains(&s.pool.key) && s.generation != s.pool.connection_generation());
        if !outdated {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RELOAD: as SIGHUP; a configuration with an error is refused whole, and the caller told why.
pub async fn reload(shared: &Shared) -> Result<(), PgError> {
    log::info!("RELOAD command issued");
    let supervisor = shared.supervisor().ok_or_else(|| console_error("the daemon is not running"))?;
    match supervisor.send(Reload).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err(PgError::error("F0000", format!("RELOAD failed: {reason}"))),
        Err(_) => Err(console_error("the daemon is shutting down")),
    }
}

pub fn shutdown(shared: &Shared, mode: ShutdownMode) -> Result<(), PgError> {
    log::info!("SHUTDOWN command issued");
    let supervisor = shared.supervisor().ok_or_else(|| console_error("the daemon is not running"))?;
    supervisor.do_send(Shutdown(mode));
    Ok(())
}

/// SET key = value: changes a reloadable `[pgbouncer]` key in the running configuration (until
/// the next reload); any other key is refused with the reason.
pub fn set(shared: &Shared, key: &str, value: &str) -> Result<String, PgError> {
    if !catalog::KEYS.iter().any(|(k, _, _)| *k == key) {
        return Err(console_error(format!("SET failed: unknown parameter: {key}")));
    }
    if !catalog::reloadable(key) {
        return Err(console_error(format!("SET failed: {key} can only be changed by restarting pgcorral")));
    }
    let config =
        shared.config().with_setting(key, value).map_err(|e| console_error(format!("SET failed: {e}")))?;
    log::info!("SET {key}={value} command issued");
    shared.set_config(config);
    Ok(format!("SET {key}={value}"))
}
