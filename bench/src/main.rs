//! `custody-bench`: runs custody side by side with what a user would pick instead, in one
//! run, on one machine, and writes the table to `bench/RESULTS.md`.
//!
//! `custody-bench pg`: `pgbench -S -M prepared` at several client counts against
//! - PostgreSQL direct,
//! - pgbouncer in session pooling (the bare proxy),
//! - PostgreSQL with pgaudit logging every statement (the in-database audit),
//! - custody (QUIC tunnel, proxy, single-node ledger with a synced WAL),
//!
//! all against the same PostgreSQL server. It also measures the proxy's memory per open
//! session. Run it with `bench/run pg`, which builds in release mode first.
//!
//! `custody-bench ledger`: a 3-node custody ledger cluster against a 3-node etcd 3.4 cluster at
//! the same concurrency, payload size and fsync durability (`bench/run ledger`).
//!
//! `custody-bench flight`: a million events pulled over Flight SQL against PostgreSQL's
//! `COPY ... TO STDOUT` of the same rows, and one session's events out of them
//! (`bench/run flight`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

mod flight;
mod ledger;
mod pg;

#[derive(Parser)]
#[command(about = "custody benchmarks: side-by-side runs written to bench/RESULTS.md")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// pgbench -S -M prepared: direct vs pgbouncer vs pgaudit vs custody.
    Pg(pg::Args),
    /// Appends to a 3-node custody ledger vs puts to a 3-node etcd 3.4.
    Ledger(ledger::Args),
    /// N events over Flight SQL vs PostgreSQL COPY TO STDOUT; one session out of N.
    Flight(flight::Args),
}

fn main() -> anyhow::Result<()> {
    // Use the binaries built beside this one (release), unless told otherwise.
    if std::env::var_os("CUSTODY_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        std::env::set_var("CUSTODY_BIN_DIR", exe.parent().context("exe dir")?);
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Pg(a) => pg::run(a),
        Cmd::Ledger(a) => ledger::run(a),
        Cmd::Flight(a) => flight::run(a),
    }
}

/// Replaces the section between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in the results
/// file, or appends it, so that each benchmark owns its part of the file.
pub fn write_section(file: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let old = std::fs::read_to_string(file).unwrap_or_else(|_| "# custody benchmark results\n".into());
    let section = format!("{begin}\n{body}\n{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], section, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), section),
    };
    std::fs::write(file, new).with_context(|| format!("writing {}", file.display()))
}

/// The machine, for the results header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} cores ({cpu})")
}

/// Runs a command, failing with its stderr.
pub fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The repository's `bench/RESULTS.md`.
pub fn results_file() -> PathBuf {
    custody_e2e::repo().join("bench/RESULTS.md")
}
