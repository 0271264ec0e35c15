//! The jepsen suite as the test command runs it: a short seeded campaign that must find no
//! anomaly, and the proof that the checker catches loss.

use std::path::Path;
use std::process::Command;

fn jepsen() -> Command {
    // Integration tests run from target/<profile>/deps; the binary sits in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    Command::new(dir.join("custody-jepsen"))
}

fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn a_seeded_campaign_with_every_fault_loses_and_duplicates_nothing() {
    let out = tempfile::Builder::new().prefix("custody-jepsen-").tempdir().unwrap();
    // About three minutes in all: 140 s of faults, then healing, convergence and the check.
    let run = jepsen()
        .args(["--nodes", "3", "--seconds", "140", "--seed", "20261203", "--proxy", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "the campaign found anomalies:\n{stderr}");
    let s = summary(out.path());
    assert_eq!(s["lost"], 0);
    assert_eq!(s["duplicated"], 0);
    assert_eq!(s["anomalies"], 0);
    assert!(s["faults_injected"].as_u64().unwrap() >= 10, "{s}");
    assert!(s["operations"]["acknowledged"].as_u64().unwrap() > 1000, "{s}");
    assert_eq!(s["proxy"]["sql_lost"], 0);
    assert_eq!(s["proxy"]["rows_unrecorded"], 0);
    assert_eq!(s["proxy"]["sessions_without_end"], 0);
}

#[test]
fn the_checker_catches_a_cluster_that_acknowledges_writes_it_drops() {
    let out = tempfile::Builder::new().prefix("custody-jepsen-neg-").tempdir().unwrap();
    let run = jepsen()
        .args(["--nodes", "3", "--seconds", "10", "--seed", "2", "--faults", "none", "--unsafe-fault", "drop-acked-writes", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(!run.status.success(), "the checker must fail a cluster that loses acknowledged writes");
    let s = summary(out.path());
    assert!(s["lost"].as_u64().unwrap() > 0, "{s}");
    assert!(String::from_utf8_lossy(&run.stderr).contains("LOST:"));
}
