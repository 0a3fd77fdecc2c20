//! How a long maintenance call reports its progress: the options argument of the `_with`
//! forms of retention, archive, checkpoints and the conversion to a partitioned table.

/// How far a long maintenance call has come, given to the callback of
/// [`MaintenanceOptions::with_progress`] after each batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Rows handled so far: removed (retention), moved (archive), copied (checkpoint,
    /// conversion to a partitioned table).
    pub done: u64,
    /// The estimated total, when the call knows one (the conversion to a partitioned table
    /// does, from the table's statistics); `None` otherwise.
    pub total: Option<u64>,
}

/// Options of a long maintenance call
/// ([`apply_retention_policy_with`](crate::state::EnhancedPostgresBackend::apply_retention_policy_with),
/// [`archive_old_data_with`](crate::state::EnhancedPostgresBackend::archive_old_data_with),
/// [`create_checkpoint_with`](crate::state::EnhancedPostgresBackend::create_checkpoint_with),
/// [`migrate_to_partitioned_with`](crate::state::EnhancedPostgresBackend::migrate_to_partitioned_with)).
/// The default reports nothing.
///
/// ```
/// use processor::state::MaintenanceOptions;
///
/// let options = MaintenanceOptions::new().with_progress(|p| eprintln!("{} rows so far", p.done));
/// # let _ = options;
/// ```
#[derive(Default)]
pub struct MaintenanceOptions<'a> {
    progress: Option<Box<dyn Fn(Progress) + Send + Sync + 'a>>,
}

impl<'a> MaintenanceOptions<'a> {
    /// Options that report nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `progress` after each batch with how far the call has come (for a progress bar).
    /// It runs on the calling task, between batches: keep it short.
    pub fn with_progress(mut self, progress: impl Fn(Progress) + Send + Sync + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Reports `done` rows of an unknown total.
    pub(crate) fn done(&self, done: u64) {
        self.report(done, None);
    }

    /// Reports `done` rows of an estimated `total`.
    pub(crate) fn report(&self, done: u64, total: Option<u64>) {
        if let Some(progress) = &self.progress {
            progress(Progress { done, total });
        }
    }
}

impl std::fmt::Debug for MaintenanceOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaintenanceOptions")
            .field("progress", &self.progress.is_some())
            .finish()
    }
}
