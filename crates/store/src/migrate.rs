//! Numbered migrations from `migrations/`, applied at open (PRAGMA user_version).

use rusqlite::Connection;

use crate::Result;

const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/0001_init.sql"),
    include_str!("../../../migrations/0002_access_lists.sql"),
    include_str!("../../../migrations/0003_outbound.sql"),
    include_str!("../../../migrations/0004_filters.sql"),
    include_str!("../../../migrations/0005_dsn.sql"),
    include_str!("../../../migrations/0006_message_model.sql"),
    include_str!("../../../migrations/0007_hostauth_tls.sql"),
    include_str!("../../../migrations/0008_deny_list.sql"),
    include_str!("../../../migrations/0009_auth_sender_remote_mta.sql"),
    include_str!("../../../migrations/0010_dkim_keys.sql"),
    include_str!("../../../migrations/0011_forward_due_index.sql"),
    include_str!("../../../migrations/0012_smime.sql"),
    include_str!("../../../migrations/0013_user_display_name.sql"),
    include_str!("../../../migrations/0014_user_admin.sql"),
    include_str!("../../../migrations/0015_greylist.sql"),
];

pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        // Must precede the first table (DESIGN: deleted mail is reclaimed in the background).
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
    }
    // A migration may rebuild a table that others reference (SQLite's way to add a CHECK):
    // with foreign keys on, dropping the old table would cascade. They are off while migrations
    // run (the pragma is ignored inside a transaction) and checked before each commit.
    conn.execute_batch("PRAGMA foreign_keys = OFF")?;
    let result = apply(conn, version);
    conn.execute_batch("PRAGMA foreign_keys = ON")?;
    result
}

fn apply(conn: &mut Connection, version: i64) -> Result<()> {
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        let broken: i64 = tx.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| r.get(0))?;
        if broken > 0 {
            return Err(crate::StoreError::Invalid(format!("migration {} would leave {broken} dangling reference(s)", i + 1)));
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
