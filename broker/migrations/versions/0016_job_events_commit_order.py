"""job events: ids handed out at commit by the server (PostgreSQL), not under a client-held lock

Until now the writer took a transaction-wide advisory lock before inserting its
events, and held it — across the client round trips of the insert and the commit —
so that ids grew in commit order. Every transaction that wrote an event (each
submission, each tracker cycle, of every project) queued on that lock.

From here on the row is inserted with a provisional negative id (its own
sequence) and a deferred constraint trigger, which PostgreSQL runs inside COMMIT,
takes the same advisory lock and gives the row its real id from the table's
sequence. The lock is held only from that trigger to the end of the commit,
inside the server; the ``pg_notify`` that wakes the event hubs moves into the
trigger too. Readers are unchanged: committed rows carry ids in commit order
(PostgreSQL makes a commit visible before it releases the transaction's locks).
A row inserted with an explicit positive id (a restore) is left as it is.

SQLite needs none of this: its writers are serialised (``BEGIN IMMEDIATE``).

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30 14:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

# The trigger's lock key is the one broker.events used before (crc32 of
# "aifa:job_events"), its channel broker.events.CHANNEL, its sequence the one
# PostgreSQL made for the column (checked below).
_FUNCTION = """
    CREATE FUNCTION aifa_job_event_commit_order() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.id < 0 THEN
            -- runs inside COMMIT: the lock is released once the commit is visible
            PERFORM pg_advisory_xact_lock(967887172);
            UPDATE job_events SET id = nextval('job_events_id_seq') WHERE id = NEW.id;
            PERFORM pg_notify('aifa_job_events', '');
        END IF;
        RETURN NULL;
    END $$"""
_SEQUENCE_OF_ID = "SELECT pg_get_serial_sequence('job_events', 'id')"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    ids = op.get_bind().execute(sa.text(_SEQUENCE_OF_ID)).scalar_one()
    if ids.rpartition(".")[2] != "job_events_id_seq":
        raise RuntimeError(f"job_events.id takes its values from {ids}, not job_events_id_seq")
    op.execute("CREATE SEQUENCE job_events_provisional_id_seq AS bigint")
    op.execute("ALTER TABLE job_events ALTER COLUMN id SET DEFAULT -nextval('job_events_provisional_id_seq')")
    op.execute(_FUNCTION)
    op.execute("""
        CREATE CONSTRAINT TRIGGER job_events_commit_order AFTER INSERT ON job_events
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION aifa_job_event_commit_order()""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER job_events_commit_order ON job_events")
    op.execute("DROP FUNCTION aifa_job_event_commit_order()")
    op.execute("ALTER TABLE job_events ALTER COLUMN id SET DEFAULT nextval('job_events_id_seq')")
    op.execute("DROP SEQUENCE job_events_provisional_id_seq")
