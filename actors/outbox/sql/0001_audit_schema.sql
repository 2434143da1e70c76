-- Audit trail, session summaries and push devices.
-- Column names follow the SyncKairos audit schema (sync_sessions, sync_events) so existing reports
-- keep working; ids are TEXT holding lower-case UUID strings (the API accepts any case).

CREATE TABLE IF NOT EXISTS sync_sessions (
    session_id          TEXT PRIMARY KEY,
    sync_mode           TEXT,
    owner               TEXT,
    -- the time control as created: total/per-cycle/increment/max, expiry policy, warning, visibility
    config              JSONB,
    time_per_cycle_ms   BIGINT,
    increment_ms        BIGINT,
    max_time_ms         BIGINT,
    status              TEXT,
    final_status        TEXT,
    created_at          TIMESTAMPTZ,
    started_at          TIMESTAMPTZ,
    completed_at        TIMESTAMPTZ,
    deleted_at          TIMESTAMPTZ,
    total_cycles        INTEGER NOT NULL DEFAULT 0,
    total_participants  INTEGER NOT NULL DEFAULT 0,
    last_version        BIGINT NOT NULL DEFAULT 0,
    metadata            JSONB,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS sync_sessions_owner_idx ON sync_sessions (owner);

CREATE TABLE IF NOT EXISTS sync_events (
    id                  BIGSERIAL PRIMARY KEY,
    session_id          TEXT NOT NULL,
    version             BIGINT NOT NULL,
    -- position of the event among the events of one change (one command can emit several)
    seq                 SMALLINT NOT NULL DEFAULT 0,
    event_type          TEXT NOT NULL,
    participant_id      TEXT,
    group_id            TEXT,
    time_remaining_ms   BIGINT,
    time_elapsed_ms     BIGINT,
    cycle_number        INTEGER,
    "timestamp"         TIMESTAMPTZ NOT NULL,
    state_snapshot      JSONB,
    metadata            JSONB,
    recorded_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT sync_events_session_version_type_key UNIQUE (session_id, version, event_type)
);

CREATE TABLE IF NOT EXISTS devices (
    token               TEXT PRIMARY KEY,
    sub                 TEXT NOT NULL,
    platform            TEXT NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at        TIMESTAMPTZ
);

-- push looks tokens up by participant id, which may differ in case from the `sub` it was stored with
CREATE INDEX IF NOT EXISTS devices_sub_idx ON devices (lower(sub));
