//! Running the host's tools (`ip`, `ctr`) with their output in the error.

use anyhow::{bail, Context as _};

/// Runs `program args`, returns its stdout; fails with its stderr when it exits non-zero.
pub(crate) fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
