-- Exactly-once processing (the `exactly_once` layer): each operator's epoch, the claims that
-- hold its key groups, the source offsets committed with its state, and the transactional
-- outbox with the positions its readers acknowledged. Rows name their state table (its
-- unquoted name; the schema is this one).

-- The latest epoch handed out for an operator: a claim raises it (under this row's lock), so
-- epochs never repeat.
CREATE TABLE IF NOT EXISTS {{schema}}.state_operators (
    state_table text   NOT NULL,
    operator    text   NOT NULL,
    epoch       bigint NOT NULL,
    PRIMARY KEY (state_table, operator)
);

-- The current claims: a claim of an operator's key groups deletes every claim overlapping
-- them, so an old instance's commit (a compare-and-set on its own row) finds nothing and is
-- refused, whether or not its session is still connected.
CREATE TABLE IF NOT EXISTS {{schema}}.state_claims (
    state_table  text        NOT NULL,
    operator     text        NOT NULL,
    epoch        bigint      NOT NULL,
    first_group  bigint      NOT NULL,
    last_group   bigint      NOT NULL,
    commits      bigint      NOT NULL DEFAULT 0,
    claimed_at   timestamptz NOT NULL,
    committed_at timestamptz,
    PRIMARY KEY (state_table, operator, epoch),
    CONSTRAINT state_claims_groups CHECK (0 <= first_group AND first_group <= last_group)
);

-- The input position each operator's state is as of, per source partition.
CREATE TABLE IF NOT EXISTS {{schema}}.state_source_offsets (
    state_table  text        NOT NULL,
    operator     text        NOT NULL,
    source       text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    epoch        bigint      NOT NULL,
    committed_at timestamptz NOT NULL,
    PRIMARY KEY (state_table, operator, source, partition)
);

-- The outbox's last position per state table: a commit raises it under this row's lock,
-- held until the commit ends, so positions follow commit order.
CREATE TABLE IF NOT EXISTS {{schema}}.state_outbox_heads (
    state_table text   PRIMARY KEY,
    position    bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS {{schema}}.state_outbox (
    state_table  text        NOT NULL,
    position     bigint      NOT NULL,
    operator     text        NOT NULL,
    epoch        bigint      NOT NULL,
    topic        text        NOT NULL,
    key          bytea       NOT NULL,
    payload      bytea       NOT NULL,
    committed_at timestamptz NOT NULL,
    PRIMARY KEY (state_table, position)
);

-- How far each named reader acknowledged the outbox.
CREATE TABLE IF NOT EXISTS {{schema}}.state_outbox_readers (
    state_table     text        NOT NULL,
    reader          text        NOT NULL,
    position        bigint      NOT NULL,
    acknowledged_at timestamptz NOT NULL,
    PRIMARY KEY (state_table, reader)
);
