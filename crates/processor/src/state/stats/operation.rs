//! The operations the backend times and traces: each named by what it runs (the name in the
//! slow-operation log and in its `tracing` span), and grouped into the kinds the statistics
//! keep percentiles for.

/// The kinds of operation the statistics count and time separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Get,
    Put,
    Delete,
    Scan,
    Count,
    Clear,
    Batch,
    Copy,
    Query,
}

impl Kind {
    /// Every kind, in the order of the statistics' histograms.
    pub const ALL: [Kind; 9] = [
        Kind::Get,
        Kind::Put,
        Kind::Delete,
        Kind::Scan,
        Kind::Count,
        Kind::Clear,
        Kind::Batch,
        Kind::Copy,
        Kind::Query,
    ];

    /// This kind's place in [`Kind::ALL`].
    pub fn index(self) -> usize {
        match self {
            Kind::Get => 0,
            Kind::Put => 1,
            Kind::Delete => 2,
            Kind::Scan => 3,
            Kind::Count => 4,
            Kind::Clear => 5,
            Kind::Batch => 6,
            Kind::Copy => 7,
            Kind::Query => 8,
        }
    }

    /// The kind's name in statistics and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Get => "get",
            Kind::Put => "put",
            Kind::Delete => "delete",
            Kind::Scan => "scan",
            Kind::Count => "count",
            Kind::Clear => "clear",
            Kind::Batch => "batch_put",
            Kind::Copy => "batch_copy",
            Kind::Query => "query",
        }
    }
}

/// One operation, named by the statement it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Get,
    GetEntry,
    Contains,
    GetMany,
    Count,
    ListKeys,
    KeysPage,
    EntriesPage,
    QueryByMetadata,
    Upsert,
    PutWithVersion,
    CompareAndSet,
    Delete,
    DeleteWithVersion,
    Clear,
    BatchPut,
    BatchCopy,
    Savepoint,
    CheckFence,
    TransactionLock,
    Notify,
    /// An epoch claim's statements.
    Claim,
    /// An epoch commit's compare-and-set on its claim.
    EpochCheck,
    /// An epoch commit's buffered puts and deletes.
    EpochWrite,
    /// An epoch commit's source offsets.
    SourceOffsets,
    /// An epoch commit's outbox rows.
    OutboxWrite,
    /// A page of the outbox.
    OutboxRead,
    /// An outbox reader's acknowledgement.
    OutboxAck,
}

impl Op {
    /// The kind the statistics count this operation under.
    pub fn kind(self) -> Kind {
        match self {
            Op::Get | Op::GetEntry | Op::Contains | Op::GetMany => Kind::Get,
            Op::Count => Kind::Count,
            Op::ListKeys | Op::KeysPage | Op::EntriesPage | Op::OutboxRead => Kind::Scan,
            Op::Upsert | Op::PutWithVersion | Op::CompareAndSet => Kind::Put,
            Op::Delete | Op::DeleteWithVersion => Kind::Delete,
            Op::Clear => Kind::Clear,
            Op::BatchPut | Op::EpochWrite => Kind::Batch,
            Op::BatchCopy => Kind::Copy,
            Op::QueryByMetadata
            | Op::Savepoint
            | Op::CheckFence
            | Op::TransactionLock
            | Op::Notify
            | Op::Claim
            | Op::EpochCheck
            | Op::SourceOffsets
            | Op::OutboxWrite
            | Op::OutboxAck => Kind::Query,
        }
    }

    /// The statement's name: in the slow-operation log, and the span's `db.operation.name`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::GetEntry => "get_entry",
            Op::Contains => "contains",
            Op::GetMany => "get_many",
            Op::Count => "count",
            Op::ListKeys => "list_keys",
            Op::KeysPage => "list_keys_page",
            Op::EntriesPage => "entries_page",
            Op::QueryByMetadata => "query_by_metadata",
            Op::Upsert => "upsert",
            Op::PutWithVersion => "put_with_version",
            Op::CompareAndSet => "compare_and_set",
            Op::Delete => "delete",
            Op::DeleteWithVersion => "delete_with_version",
            Op::Clear => "clear",
            Op::BatchPut => "batch_put",
            Op::BatchCopy => "batch_copy",
            Op::Savepoint => "savepoint",
            Op::CheckFence => "check_fence",
            Op::TransactionLock => "advisory_xact_lock",
            Op::Notify => "notify",
            Op::Claim => "claim",
            Op::EpochCheck => "epoch_check",
            Op::EpochWrite => "epoch_write",
            Op::SourceOffsets => "source_offsets",
            Op::OutboxWrite => "outbox_write",
            Op::OutboxRead => "outbox_read",
            Op::OutboxAck => "outbox_ack",
        }
    }

    /// The operation's `tracing` span, following OpenTelemetry's database conventions: the
    /// system, the operation's name and the table (never keys, values or connection secrets).
    /// Its `error.type` is recorded when the operation fails. At DEBUG level (target
    /// `pgstate`), so an application logging at INFO pays one check of the subscriber's
    /// interest per operation and no formatting.
    pub fn span(self, table: &str) -> tracing::Span {
        // Field values are computed only when the span is enabled: nothing here runs for an
        // application not recording it. (`table` is `schema.table`: the schema is the
        // namespace.)
        tracing::debug_span!(
            target: "pgstate",
            "pgstate.operation",
            "otel.name" = tracing::field::display(format_args!("{} {table}", self.name())),
            "otel.kind" = "client",
            "db.system.name" = "postgresql",
            "db.namespace" = table.split_once('.').map_or("", |(schema, _)| schema),
            "db.operation.name" = self.name(),
            "db.collection.name" = table,
            "pgstate.operation.kind" = self.kind().name(),
            "db.response.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_place() {
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
    }
}
