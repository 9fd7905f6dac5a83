//! Where a command's output goes, the same for every command: the result as JSON on stdout (one
//! object, or one per line for `score` and `generate`), text for people on stderr. A reader that
//! closes the pipe early (`| head`) ends the command quietly.
use std::io::Write;

/// One line on stdout. Its error, on a closed pipe, is what [`finish`] ends quietly on.
pub fn line(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// The command's result: one JSON line on stdout.
pub fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    line(&serde_json::to_string(value)?)?;
    Ok(())
}

/// Text for people, on stderr; a closed stderr is no reason to stop a command. (In scope in
/// every module declared after this one in `cmd/mod.rs`.)
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Whether an error comes from writing into a pipe whose reader has gone.
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Ends the process with a command's result: status 0 on success or on a closed stdout (the
/// reader took what it wanted, as `head` does), else the error's whole chain and status 1.
pub fn finish(result: anyhow::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if is_closed_pipe(&e) => std::process::exit(0),
        Err(e) => {
            say!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Whether log lines may carry colour codes: only on a terminal, and not with `NO_COLOR` set
/// (<https://no-color.org>: any non-empty value).
pub fn colour_logs() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}
