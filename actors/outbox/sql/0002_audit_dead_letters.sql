-- Outbox entries the audit cannot store (PostgreSQL refuses them, or they are not update
-- messages) are kept here, as they were in the stream, instead of being skipped: nothing leaves
-- the outbox without a trace. `kairos_audit_dead_letters_total` counts them; an alert fires on any.

CREATE TABLE IF NOT EXISTS audit_dead_letters (
    stream_id     TEXT PRIMARY KEY,      -- the outbox entry id (a replayed entry is kept once)
    session_id    TEXT,                  -- when the entry says which session it belongs to
    raw           BYTEA,                 -- the entry's `m` field, byte for byte (NULL when absent)
    error         TEXT NOT NULL,         -- why it could not be stored
    recorded_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS audit_dead_letters_session_idx ON audit_dead_letters (session_id);
