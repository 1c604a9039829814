-- Linked devices, saved right after each link (DATABASE_URL): one row per
-- phone, the device's whole store (a SQLite database file, as whatsapp-rust
-- writes it) in `device`. A new link of the same phone replaces its row.
CREATE TABLE IF NOT EXISTS linked_devices (
    phone     text        PRIMARY KEY,
    jid       text        NOT NULL,
    device    bytea       NOT NULL,
    linked_at timestamptz NOT NULL DEFAULT now()
);

-- A device row is the keys to a whole WhatsApp account. Where the database
-- serves an API of its own (Supabase's PostgREST), Row Level Security with
-- no policy keeps the table out of it; the service connects as the table's
-- owner, which Row Level Security does not bind.
ALTER TABLE linked_devices ENABLE ROW LEVEL SECURITY;
