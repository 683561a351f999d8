//! Numbered migrations from `migrations/`, applied at open (PRAGMA user_version).

use rusqlite::Connection;

use crate::Result;

const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/0001_init.sql"),
    include_str!("../../../migrations/0002_access_lists.sql"),
    include_str!("../../../migrations/0003_outbound.sql"),
    include_str!("../../../migrations/0004_filters.sql"),
    include_str!("../../../migrations/0005_dsn.sql"),
];

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        // Must precede the first table (DESIGN: deleted mail is reclaimed in the background).
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
