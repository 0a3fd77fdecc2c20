//! `listen` and `notify`.

use std::io::Write;

use processor::state::PostgresListener;

use crate::exit::CliError;
use crate::target::Target;

/// `pgstate listen CHANNEL [--count N]`: each payload on a line of its own, flushed at once;
/// `listening on CHANNEL` on stderr once the server has registered the LISTEN. Ends after
/// `count` notifications, or at Ctrl-C.
pub async fn listen(target: &Target, channel: &str, count: Option<u64>) -> Result<(), CliError> {
    let (url, _) = target.resolve()?;
    let mut listener = PostgresListener::new(&url, channel).await?;
    eprintln!("listening on {channel}");
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let payload = tokio::select! {
            p = listener.recv() => p?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{payload}")?;
        out.flush()?;
        seen += 1;
    }
    Ok(())
}

/// `pgstate notify CHANNEL PAYLOAD`.
pub async fn notify(target: &Target, channel: &str, payload: &str) -> Result<(), CliError> {
    let backend = target.backend().await?;
    backend.notify(channel, payload).await?;
    Ok(())
}
