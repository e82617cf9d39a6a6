//! Small helpers shared by every command: paths, running child processes, Ctrl-C and step timing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Set by the Ctrl-C handler. Children in the same terminal receive SIGINT themselves, so xtask only
/// remembers that the user asked to stop, lets the running child exit, and then cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs a Ctrl-C handler that records the interruption instead of killing xtask, so that the
/// guards which stop Postgres still get to run.
pub fn install_ctrlc_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if !INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nxtask: interrupted, waiting for the running command to exit and cleaning up...");
        }
    })
    .context("could not install the Ctrl-C handler")
}

/// Whether the user pressed Ctrl-C since xtask started.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The workspace root. xtask lives one directory below it, which is known at compile time.
pub fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative paths are taken from the
/// workspace root, as cargo does when run there), otherwise `<root>/target`.
pub fn target_dir() -> PathBuf {
    let root = repo_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// The cargo executable that launched us (cargo sets `CARGO`), falling back to the one on PATH.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(repo_root());
    command
}

/// Whether xtask runs as root, checked with `id -u` so that no libc binding is needed.
pub fn running_as_root() -> Result<bool> {
    let output = Command::new("id").arg("-u").output().context("could not run `id -u` to find the effective user")?;
    if !output.status.success() {
        bail!("`id -u` failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// Reads a boolean switch such as `XTASK_KEEP_PG=1`. Anything but empty, `0` or `false` counts as on.
pub fn env_flag(name: &str) -> bool {
    match std::env::var(name) {
        Ok(value) => !matches!(value.trim(), "" | "0" | "false" | "no"),
        Err(_) => false,
    }
}

/// Reads a port number from the environment, using `default` when the variable is unset or empty.
pub fn env_port(name: &str, default: u16) -> Result<u16> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => {
            value.trim().parse().with_context(|| format!("{name}={value:?} is not a valid port number"))
        }
        _ => Ok(default),
    }
}

/// Renders a command as a shell-like line for messages. The program is shown by its file name only
/// (`cargo`, `pg_ctl`), which is what a reader needs and keeps long absolute paths out of the way.
pub fn describe(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    let mut parts = vec![name.to_string_lossy().into_owned()];
    parts.extend(command.get_args().map(|arg| shell_quote(&arg.to_string_lossy())));
    parts.join(" ")
}

/// Quotes a word for a POSIX shell only when it needs quoting, so printed commands can be pasted.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// Runs a command with inherited stdio and fails when it does not exit successfully.
pub fn run(command: &mut Command) -> Result<()> {
    let line = describe(command);
    eprintln!("xtask: $ {line}");
    let status = command.status().with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command with captured output and fails, showing what it printed, when it does not succeed.
pub fn run_captured(command: &mut Command) -> Result<Output> {
    let line = describe(command);
    let output = command.output().with_context(|| format!("could not start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// Formats a duration the way the summary prints it, e.g. `3.4s` or `2m05s`.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64();
    if seconds < 60.0 {
        format!("{seconds:.1}s")
    } else {
        let whole = duration.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// How one step ended.
enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

/// One finished step with its duration.
struct Step {
    name: String,
    outcome: Outcome,
    elapsed: Duration,
}

/// Times named steps, prints a line as each one finishes and a summary at the end.
#[derive(Default)]
pub struct Report {
    steps: Vec<Step>,
}

impl Report {
    /// Runs one step unless the user already pressed Ctrl-C, and records how it went.
    pub fn step(&mut self, name: &str, body: impl FnOnce() -> Result<()>) {
        if interrupted() {
            self.skip(name, "interrupted");
        } else {
            self.always(name, body);
        }
    }

    /// Runs one step even after Ctrl-C (used for cleanup), and records how it went.
    pub fn always(&mut self, name: &str, body: impl FnOnce() -> Result<()>) {
        eprintln!("\nxtask: ==> {name}");
        let started = Instant::now();
        let outcome = match body() {
            Ok(()) => Outcome::Passed,
            Err(error) => Outcome::Failed(format!("{error:#}")),
        };
        self.record(name, outcome, started.elapsed());
    }

    /// Records a step that did not run, with the reason.
    pub fn skip(&mut self, name: &str, reason: &str) {
        self.record(name, Outcome::Skipped(reason.to_string()), Duration::ZERO);
    }

    /// Whether every step that ran succeeded (skipped steps do not count as failures).
    pub fn all_passed(&self) -> bool {
        !self.steps.iter().any(|step| matches!(step.outcome, Outcome::Failed(_)))
    }

    /// The process exit code: 130 after Ctrl-C (as shells report SIGINT), 1 after a failed step.
    pub fn exit_code(&self) -> ExitCode {
        if interrupted() {
            ExitCode::from(130)
        } else if self.all_passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    /// Prints one line per step; failures repeat their error so it is not lost in the test output.
    pub fn print_summary(&self) {
        eprintln!("\nxtask: summary");
        for step in &self.steps {
            eprintln!("  {}", Self::line(step));
        }
    }

    fn record(&mut self, name: &str, outcome: Outcome, elapsed: Duration) {
        let step = Step { name: name.to_string(), outcome, elapsed };
        eprintln!("xtask: {}", Self::line(&step));
        self.steps.push(step);
    }

    fn line(step: &Step) -> String {
        let time = format_duration(step.elapsed);
        match &step.outcome {
            Outcome::Passed => format!("ok      {} ({time})", step.name),
            Outcome::Failed(error) => format!("FAILED  {} ({time}): {error}", step.name),
            Outcome::Skipped(reason) => format!("skipped {} ({reason})", step.name),
        }
    }
}
