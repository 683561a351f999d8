//! Message bodies: stored once per message in chunks, read back chunk by chunk so no reader
//! holds a large message in memory.

use rusqlite::Connection;
use store::StoreError;

/// The chunk row ids of a message's body, in order.
pub fn chunk_ids(c: &Connection, message_id: i64) -> Result<Vec<i64>, StoreError> {
    let mut stmt = c.prepare_cached("SELECT id FROM body_chunks WHERE message_id = ?1 ORDER BY seq")?;
    let rows = stmt.query_map([message_id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// One chunk by its row id; None when the message was freed meanwhile.
pub fn chunk(c: &Connection, chunk_id: i64) -> Result<Option<Vec<u8>>, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(c.prepare_cached("SELECT data FROM body_chunks WHERE id = ?1")?.query_row([chunk_id], |r| r.get(0)).optional()?)
}

/// The first `max` octets of a message (fewer when it is shorter), reading no chunk past them.
pub fn head(c: &Connection, message_id: i64, max: usize) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    let mut stmt = c.prepare_cached("SELECT data FROM body_chunks WHERE message_id = ?1 ORDER BY seq")?;
    let mut rows = stmt.query([message_id])?;
    while out.len() < max {
        let Some(row) = rows.next()? else { break };
        let data = row.get_ref(0)?.as_bytes().map_err(rusqlite::Error::from)?;
        out.extend_from_slice(&data[..data.len().min(max - out.len())]);
    }
    Ok(out)
}

/// Octets stored for a message's body.
pub fn stored_size(c: &Connection, message_id: i64) -> Result<i64, StoreError> {
    Ok(c.prepare_cached("SELECT coalesce(sum(length(data)), 0) FROM body_chunks WHERE message_id = ?1")?.query_row([message_id], |r| r.get(0))?)
}
