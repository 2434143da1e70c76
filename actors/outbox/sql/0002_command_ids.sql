-- The command id (with its outcome and time) of each audited change, on the change's first event
-- row, so a session restored from the audit copy keeps its idempotency window.
ALTER TABLE sync_events ADD COLUMN IF NOT EXISTS command JSONB;
