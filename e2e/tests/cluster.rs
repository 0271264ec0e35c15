//! The replicated ledger as SREs run it: real `custody-ledger` processes with mutual TLS,
//! real kills, pauses and cut links.

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use custody_e2e::cluster::{ClusterOptions, LedgerCluster};
use custody_e2e::*;
use custody_proto::pb::v1::{event, PgRequest};
use custody_proto::{Event, EventKind};
use custody_proxy::ledger_client::LedgerClient;
use prost::Message;

fn event(session: &str, seq: u64) -> Bytes {
    Event {
        proxy_id: "e2e".into(),
        session_id: session.into(),
        seq,
        kind: EventKind::Request as i32,
        body: Some(event::Body::PgRequest(PgRequest { message: "Query".into(), sql: format!("op {session} {seq}"), ..Default::default() })),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// Appends `n` events of `session` one request at a time through the proxy's ledger client.
fn append_n(urls: &[String], session: &str, from: u64, n: u64) -> Vec<u64> {
    rt().block_on(async {
        let c = LedgerClient::new(urls, Duration::from_secs(10)).unwrap();
        let mut idx = Vec::new();
        for seq in from..from + n {
            let r = c.append(vec![event(session, seq)]).await.unwrap_or_else(|e| panic!("append {session} {seq}: {e}"));
            idx.push(r[0].index);
        }
        idx
    })
}

/// Every node's events as `custody events` would print them, read from that node's copy.
fn node_entries(node: &custody_e2e::cluster::ClusterNode) -> Vec<serde_json::Value> {
    rt().block_on(async {
        let batches = custody::query::fetch(&node.flight(), &serde_json::json!({"table": "events", "max_staleness_ms": 600000})).await.unwrap();
        let mut buf = Vec::new();
        let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
        for b in &batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        String::from_utf8(buf).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    })
}

/// Waits until every running node has sealed exactly `size` entries into blocks, and returns
/// the blocks as `custody blocks --json` prints them (the same on every node).
fn wait_sealed(c: &LedgerCluster, size: u64) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sealed: Vec<u64> = c.running().iter().map(|id| c.status(*id).map(|s| s["sealed_size"].as_u64().unwrap_or(0)).unwrap_or(0)).collect();
        if sealed.iter().all(|s| *s == size) {
            break;
        }
        assert!(Instant::now() < deadline, "nodes did not seal {size} entries: {sealed:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut seen = Vec::new();
    for id in c.running() {
        let out = custody_cmd(&c.dir.join("home"), None).args(["blocks", "--json", "--flight", &c.nodes[&id].flight()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        seen.push(String::from_utf8(out.stdout).unwrap());
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "every node holds the same blocks: {seen:?}");
    seen[0].lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Waits until node `id` follows a leader and has applied everything committed.
fn wait_rejoined(c: &LedgerCluster, id: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(st) = c.status(id) {
            if st["leader_id"].as_u64().unwrap_or(0) != 0 && st["applied_index"] == st["commit_index"] {
                return;
            }
        }
        assert!(Instant::now() < deadline, "node {id} did not rejoin");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every running node's verifier key, as it publishes it.
fn node_keys(c: &LedgerCluster) -> Vec<String> {
    c.running()
        .into_iter()
        .map(|id| rt().block_on(custody::query::action(&c.nodes[&id].flight(), "status", &serde_json::json!({}))).unwrap()["verifier_key"].as_str().unwrap().to_string())
        .collect()
}

/// A scratch directory, kept after the test when `CUSTODY_KEEP_TEST_DIRS` is set (for the logs).
fn scratch(name: &str) -> tempfile::TempDir {
    let mut d = tempfile::Builder::new().prefix(&format!("custody-cluster-{name}-")).tempdir().unwrap();
    if std::env::var_os("CUSTODY_KEEP_TEST_DIRS").is_some() {
        d.disable_cleanup(true);
        eprintln!("keeping {}", d.path().display());
    }
    d
}

#[test]
fn three_nodes_replicate_survive_the_leader_s_death_and_report_health() {
    let dir = scratch("basic");
    let mut c = LedgerCluster::start(dir.path(), 3, ClusterOptions::default()).unwrap();
    let urls = c.urls();
    let first = append_n(&urls, "a", 0, 100);
    assert_eq!(first, (0..100).collect::<Vec<_>>(), "indices are dense and in order");

    let leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    let st = c.status(leader).unwrap();
    assert_eq!(st["voters"].as_array().unwrap().len(), 3);
    let metrics = http_get(c.nodes[&leader].http, "/metrics").unwrap();
    for m in ["custody_ledger_raft_term", "custody_ledger_raft_leader_id", "custody_ledger_raft_commit_index", "custody_ledger_raft_applied_index", "custody_ledger_append_latency_seconds_bucket", "custody_ledger_batch_size_events_bucket"] {
        assert!(metrics.contains(m), "metrics lack {m}");
    }
    assert!(http_get(c.nodes[&leader].http, "/readyz").unwrap().starts_with("ready role=leader"));

    // The leader dies; a new one is elected and appends go on through the same client.
    c.kill(leader);
    let t0 = Instant::now();
    let after = append_n(&urls, "b", 0, 100);
    assert!(t0.elapsed() < Duration::from_secs(15), "an election took {:?}", t0.elapsed());
    assert_eq!(after, (100..200).collect::<Vec<_>>());
    let new_leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    assert_ne!(new_leader, leader);
    assert!(c.status(new_leader).unwrap()["term"].as_u64().unwrap() > st["term"].as_u64().unwrap());

    // The old leader comes back and catches up; every node holds the same 200 events, sealed
    // into the same blocks.
    c.restart(leader).unwrap();
    let (size, _) = c.wait_converged(Duration::from_secs(30)).unwrap();
    assert_eq!(size, 200);
    let blocks = wait_sealed(&c, 200);
    assert!(!blocks.is_empty() && blocks.last().unwrap()["tree_size"] == 200, "{blocks:?}");
    let reference = node_entries(&c.nodes[&new_leader]);
    for id in c.running() {
        let e = node_entries(&c.nodes[&id]);
        assert_eq!(e, reference, "node {id} holds the same log");
    }
    let out = custody_cmd(&dir.path().join("home"), None).args(["verify", "--flight", &c.nodes[&leader].flight()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Every replica has the same Merkle tree: a follower's proof checks out against the
    // leader's root, and the CLI prints the proof hashes it checked.
    let root = c.status(new_leader).unwrap()["tree_root"].as_str().unwrap().to_string();
    let follower = c.running().into_iter().find(|id| *id != new_leader).unwrap();
    let p = rt().block_on(custody::query::inclusion_proof(&c.nodes[&follower].flight(), 137, None)).unwrap();
    assert_eq!(p["size"], 200);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let r: [u8; 32] = b64.decode(p["root"].as_str().unwrap()).unwrap().try_into().unwrap();
    assert_eq!(custody_proto::entry::hex(&r), root);
    let out = custody_cmd(&dir.path().join("home"), None).args(["proof", "inclusion", "137", "--size", "150", "--flight", &c.nodes[&follower].flight()]).output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert!(out.status.success() && lines.len() == 6, "entry 137 of 150: four hashes inside 128..144, then 144..150 and 0..128: {lines:?} {}", String::from_utf8_lossy(&out.stderr));
    let out = custody_cmd(&dir.path().join("home"), None).args(["proof", "consistency", "100", "200", "--json", "--flight", &c.nodes[&follower].flight()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["first"].as_u64(), v["second"].as_u64()), (Some(100), Some(200)));
    // One checkpoint, cosigned by every node with its own key, printed exactly as signed.
    let out = custody_cmd(&dir.path().join("home"), None).args(["checkpoint", "--flight", &c.nodes[&follower].flight()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let note = custody_proto::note::SignedNote::parse(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let cp = custody_proto::note::Checkpoint::parse(&note.text).unwrap();
    assert_eq!((cp.size, custody_proto::entry::hex(&cp.root)), (200, root.clone()));
    assert_eq!(note.signatures.len(), 3, "{note:?}");
    let keys = node_keys(&c);
    let parsed: Vec<custody_proto::note::VerifierKey> = keys.iter().map(|k| custody_proto::note::VerifierKey::parse(k).unwrap()).collect();
    assert_eq!(note.verify(&parsed).unwrap().len(), 3);
    let mut args = vec!["checkpoint".to_string(), "--size".into(), "150".into(), "--flight".into(), c.nodes[&leader].flight()];
    for k in &keys {
        args.extend(["--key".to_string(), k.clone()]);
    }
    let out = custody_cmd(&dir.path().join("home"), None).args(&args).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("3 of 3 pinned keys"), "{}", String::from_utf8_lossy(&out.stderr));
    // custody verify checks the signed head against pinned keys, and remembers it: a later
    // run checks the new head extends it, and a forged memory of another root is a fork.
    let home = dir.path().join("home");
    let mut verify_args = vec!["verify".to_string(), "--flight".into(), c.nodes[&leader].flight()];
    for k in &keys {
        verify_args.extend(["--key".to_string(), k.clone()]);
    }
    let out = custody_cmd(&home, None).args(&verify_args).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("signed checkpoint at size 200 verified"), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    append_n(&urls, "c", 0, 5);
    wait_sealed(&c, 205);
    let out = custody_cmd(&home, None).args(&verify_args).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("at size 205 verified"), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let saved = std::fs::read_dir(home.join("verified")).unwrap().next().unwrap().unwrap().path();
    let forged = custody_proto::note::Checkpoint { root: [7u8; 32], ..custody_proto::note::Checkpoint::parse(&custody_proto::note::SignedNote::parse(&std::fs::read_to_string(&saved).unwrap()).unwrap().text).unwrap() };
    let signer = custody_proto::note::NoteSigner::new("forger", ed25519_dalek::SigningKey::from_bytes(&[2; 32])).unwrap();
    let text = forged.to_text();
    std::fs::write(&saved, custody_proto::note::SignedNote { text: text.clone(), signatures: vec![signer.sign(&text)] }.encode()).unwrap();
    let out = custody_cmd(&home, None).args(&verify_args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && (err.contains("HISTORY REWRITTEN") || err.contains("FORK")), "{err}");
    // A key the ledger does not hold is not a signature.
    let stranger = custody_proto::note::NoteSigner::new("someone/else", ed25519_dalek::SigningKey::from_bytes(&[1; 32])).unwrap().verifier().to_string();
    let out = custody_cmd(&dir.path().join("home"), None).args(["checkpoint", "--key", &stranger, "--flight", &c.nodes[&leader].flight()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no pinned key signed"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = custody_cmd(&dir.path().join("home"), None).args(["proof", "inclusion", "500", "--flight", &c.nodes[&follower].flight()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("index 500 is not in a tree of size 205"), "{}", String::from_utf8_lossy(&out.stderr));

    // The CLI shows it, as an SRE would look.
    let out = Command::new(bin("custody-ledger")).args(["status", "--endpoint", &c.nodes[&leader].url()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("role") && text.contains(&format!("leader {new_leader}")), "{text}");
}

/// Runs `custody` with `args` and pinned `keys`; returns (success, stdout + stderr).
fn custody_keyed(home: &std::path::Path, args: &[&str], keys: &[String]) -> (bool, String) {
    let mut cmd = custody_cmd(home, None);
    cmd.args(args);
    for k in keys {
        cmd.args(["--key", k]);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_tampered_node_is_named_by_verify_and_stops_serving_the_damaged_range_itself() {
    use custody_ledger::store::{cf, Put, Store};
    let dir = scratch("tamper");
    let opts = ClusterOptions { extra: "[blocks]\nmax_entries = 16\nmax_delay_ms = 200\n".into(), ..Default::default() };
    let mut c = LedgerCluster::start(dir.path(), 3, opts).unwrap();
    // One request, so the block boundaries do not depend on how fast appends go on a busy
    // machine: three full blocks at once, the rest after the delay.
    rt().block_on(async {
        let client = LedgerClient::new(&c.urls(), Duration::from_secs(10)).unwrap();
        client.append((0..60).map(|seq| event("t", seq)).collect()).await.unwrap();
    });
    c.wait_converged(Duration::from_secs(30)).unwrap();
    let blocks = wait_sealed(&c, 60);
    assert_eq!(blocks.iter().map(|b| b["count"].as_u64().unwrap()).collect::<Vec<_>>(), vec![16, 16, 16, 12], "blocks of N entries, then the rest after T ms");
    let keys = node_keys(&c);
    let flight3 = c.nodes[&3].flight();
    let (ok, out) = custody_keyed(&dir.path().join("home-honest"), &["verify", "--flight", &flight3], &keys);
    assert!(ok && out.contains("60 entries verified; 4 blocks"), "{out}");

    // Offline: a bundle of the whole log, and one of a range with inclusion proofs.
    let bundle = dir.path().join("bundle");
    let (ok, out) = custody_keyed(&dir.path().join("home-honest"), &["bundle", "--out", bundle.to_str().unwrap(), "--flight", &flight3], &keys);
    assert!(ok, "{out}");
    let (ok, out) = custody_keyed(&dir.path().join("home-offline"), &["verify", "--offline", bundle.to_str().unwrap()], &keys);
    assert!(ok && out.contains("entries 0..60 verified offline") && out.contains("4 blocks checked"), "{out}");
    let part = dir.path().join("bundle-part");
    let (ok, out) = custody_keyed(&dir.path().join("home-honest"), &["bundle", "--out", part.to_str().unwrap(), "--from", "10", "--to", "30", "--flight", &flight3], &keys);
    assert!(ok, "{out}");
    let (ok, out) = custody_keyed(&dir.path().join("home-offline"), &["verify", "--offline", part.to_str().unwrap()], &keys);
    assert!(ok && out.contains("entries 10..30 verified offline (20 with inclusion proofs)"), "{out}");
    // A bundle whose entry was edited after export fails offline, naming it.
    let lines = std::fs::read_to_string(part.join("entries.jsonl")).unwrap();
    let mut l: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut e = b64.decode(l[5]["entry"].as_str().unwrap()).unwrap();
    let n = e.len();
    e[n - 1] ^= 1;
    l[5]["entry"] = b64.encode(&e).into();
    std::fs::write(part.join("entries.jsonl"), l.iter().map(|v| format!("{v}\n")).collect::<String>()).unwrap();
    let (ok, out) = custody_keyed(&dir.path().join("home-offline"), &["verify", "--offline", part.to_str().unwrap()], &keys);
    assert!(!ok && out.contains("index 15: the entry is not in the signed checkpoint"), "{out}");
    // One signature of three pinned is not enough: a majority of the pinned signers is.
    let lone = dir.path().join("bundle-lone");
    assert!(Command::new("cp").arg("-a").arg(&bundle).arg(&lone).status().unwrap().success());
    let note = std::fs::read_to_string(lone.join("checkpoint")).unwrap();
    let (body, sigs) = note.split_once("\n\n").unwrap();
    let first_sig = sigs.lines().next().unwrap();
    std::fs::write(lone.join("checkpoint"), format!("{body}\n\n{first_sig}\n")).unwrap();
    let (ok, out) = custody_keyed(&dir.path().join("home-lone"), &["verify", "--offline", lone.to_str().unwrap()], &keys);
    assert!(!ok && out.contains("only 1 of 3 pinned signers"), "{out}");
    // Without pinned keys a bundle proves nothing, and says so.
    let (ok, out) = custody_keyed(&dir.path().join("home-offline"), &["verify", "--offline", bundle.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("needs pinned ledger keys"), "{out}");
    // events --verify proves what it prints.
    let (ok, out) = custody_keyed(&dir.path().join("home-honest"), &["events", "--verify", "--session", "t", "--flight", &flight3], &keys);
    assert!(ok && out.contains("verified: 60 events are in the checkpoint"), "{out}");

    // Node 3 stops; its state machine's files are kept to restore between the cases (only
    // those: its Raft log must never go back, or it would forget entries it acknowledged).
    c.kill(3);
    let data3 = c.nodes[&3].data.clone();
    let state_dir = data3.join(std::fs::read_to_string(data3.join("STATE")).unwrap().trim());
    let pristine = dir.path().join("node-3-state-pristine");
    assert!(Command::new("cp").arg("-a").arg(&state_dir).arg(&pristine).status().unwrap().success());
    let config3 = std::fs::read_to_string(&c.nodes[&3].config).unwrap();
    type Tamper = Box<dyn Fn(&Store)>;
    let cases: Vec<(&str, u64, Tamper)> = vec![
        (
            "an event's bytes changed",
            20,
            Box::new(|s: &Store| {
                let mut e = s.entry(20).unwrap().unwrap();
                let n = e.len();
                e[n - 1] ^= 1;
                s.raw_put_entry(20, Some(&e)).unwrap();
            }),
        ),
        ("an event deleted", 20, Box::new(|s: &Store| s.raw_put_entry(20, None).unwrap())),
        (
            "two events swapped",
            20,
            Box::new(|s: &Store| {
                let (a, b) = (s.entry(20).unwrap().unwrap(), s.entry(21).unwrap().unwrap());
                s.raw_put_entry(20, Some(&b)).unwrap();
                s.raw_put_entry(21, Some(&a)).unwrap();
            }),
        ),
        (
            "the log truncated to 50 entries, with its recorded end rewritten to match",
            50,
            Box::new(|s: &Store| {
                for i in 50..60 {
                    s.raw_put_entry(i, None).unwrap();
                }
                let last = s.entry(49).unwrap().unwrap();
                let mut state = 50u64.to_be_bytes().to_vec();
                state.extend_from_slice(&custody_proto::entry::entry_hash(&last));
                state.extend_from_slice(&0i64.to_be_bytes());
                s.write(&[Put::new(cf::META, b"state".to_vec(), state)], true).unwrap();
            }),
        ),
    ];
    for (what, index, tamper) in &cases {
        let _ = std::fs::remove_dir_all(&state_dir);
        assert!(Command::new("cp").arg("-a").arg(&pristine).arg(&state_dir).status().unwrap().success());
        {
            let s = Store::open(&state_dir).unwrap();
            tamper(&s);
        }
        // Served as it is (the node's own check off): custody verify names the index.
        std::fs::write(&c.nodes[&3].config, format!("{config3}\n[self_check]\non_start = false\ninterval_s = 0\n")).unwrap();
        c.restart(3).unwrap();
        wait_rejoined(&c, 3);
        let home = dir.path().join(format!("home-{index}-{}", what.len()));
        let (ok, out) = custody_keyed(&home, &["verify", "--flight", &flight3], &keys);
        assert!(!ok && out.contains(&format!("index {index}")), "{what}: custody verify must fail naming index {index}: {out}");
        c.kill(3);
        // With its self-check on (the default), the node finds the damage itself, refuses
        // reads from there, and says so in /readyz, /status and its metrics.
        std::fs::write(&c.nodes[&3].config, &config3).unwrap();
        c.restart(3).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let st = loop {
            let st = c.status(3).unwrap();
            if !st["damage"].is_null() {
                break st;
            }
            assert!(Instant::now() < deadline, "{what}: node 3 did not report damage: {st}");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(st["damage"]["from_index"].as_u64(), Some(*index), "{what}: {st}");
        wait_rejoined(&c, 3);
        let ready = http_get(c.nodes[&3].http, "/readyz").unwrap_or_default();
        assert!(ready.contains("failed this node's self-check"), "{what}: {ready}");
        assert!(http_get(c.nodes[&3].http, "/metrics").unwrap().contains(&format!("custody_ledger_damaged_from_index {index}")), "{what}");
        let refused = rt().block_on(custody::query::fetch(&flight3, &serde_json::json!({"table": "events"})));
        let err = match refused {
            Ok(b) => panic!("{what}: damaged entries are served: {} rows", b.iter().map(|b| b.num_rows()).sum::<usize>()),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(&format!("entries from index {index} failed this node's self-check")), "{what}: {err}");
        let before = rt().block_on(custody::query::fetch(&flight3, &serde_json::json!({"table": "entries", "limit": index}))).unwrap();
        assert_eq!(before.iter().map(|b| b.num_rows() as u64).sum::<u64>(), *index, "{what}: entries before the damage are still served");
        let (ok, out) = custody_keyed(&dir.path().join("home-honest"), &["checkpoint", "--size", "60", "--flight", &flight3], &keys);
        assert!(ok && out.contains("2 of 3 pinned keys"), "{what}: the damaged node does not cosign: {out}");
        c.kill(3);
    }
    // The healthy majority never stopped.
    append_n(&c.urls(), "u", 0, 5);

    // Key rotation: node 3 (its data restored) gets a new key; the old one stays published,
    // old checkpoints still verify with it, and the new key cosigns new ones.
    let _ = std::fs::remove_dir_all(&state_dir);
    assert!(Command::new("cp").arg("-a").arg(&pristine).arg(&state_dir).status().unwrap().success());
    let out = Command::new(bin("custody-ledger")).args(["rotate-key", "--config"]).arg(&c.nodes[&3].config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains(&format!("retired {}", keys[2])), "{text}{}", String::from_utf8_lossy(&out.stderr));
    c.restart(3).unwrap();
    wait_rejoined(&c, 3);
    wait_sealed(&c, 65);
    let st = rt().block_on(custody::query::action(&flight3, "status", &serde_json::json!({}))).unwrap();
    let new3 = st["verifier_key"].as_str().unwrap().to_string();
    assert_ne!(new3, keys[2]);
    assert_eq!(st["retired_keys"], serde_json::json!([keys[2]]));
    let (ok, out) = custody_keyed(&dir.path().join("home-rotated"), &["verify", "--offline", bundle.to_str().unwrap()], &keys);
    assert!(ok, "a checkpoint signed before the rotation verifies with the retired key: {out}");
    let rotated = vec![keys[0].clone(), keys[1].clone(), new3];
    let (ok, out) = custody_keyed(&dir.path().join("home-rotated"), &["checkpoint", "--flight", &flight3], &rotated);
    assert!(ok && out.contains("3 of 3 pinned keys"), "{out}");
    let (ok, out) = custody_keyed(&dir.path().join("home-rotated"), &["verify", "--flight", &flight3], &rotated);
    assert!(ok && out.contains("65 entries verified"), "{out}");
    // An older export still verifies on its own once a newer checkpoint is remembered.
    let (ok, out) = custody_keyed(&dir.path().join("home-rotated"), &["verify", "--offline", bundle.to_str().unwrap()], &keys);
    assert!(ok && out.contains("older than the one this machine verified"), "{out}");
    // A running node's key is not rotated under it.
    let out = Command::new(bin("custody-ledger")).args(["rotate-key", "--config"]).arg(&c.nodes[&1].config).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("stop the node before rotating its key"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_new_node_catches_up_from_a_snapshot_and_a_removed_node_stays_out() {
    let dir = scratch("members");
    let mut c = LedgerCluster::start(dir.path(), 3, ClusterOptions { snapshot_interval: 100, log_retain: 20, ..Default::default() }).unwrap();
    let urls = c.urls();
    append_n(&urls, "s", 0, 300);
    // The leader compacted its log behind a snapshot; node 4 can only catch up from one.
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.status(leader).unwrap()["log_first_index"].as_u64().unwrap() <= 2 {
        assert!(Instant::now() < deadline, "the leader never compacted its log");
        append_n(&urls, "s", 300 + rand_seq(), 1);
    }
    c.add_node(4).unwrap();
    let (size, _) = c.wait_converged(Duration::from_secs(30)).unwrap();
    assert!(size >= 300);
    let log4 = std::fs::read_to_string(&c.nodes[&4].log).unwrap();
    assert!(log4.contains("installed a snapshot from the leader"), "node 4 caught up from a snapshot:\n{log4}");
    assert_eq!(node_entries(&c.nodes[&4]), node_entries(&c.nodes[&leader]));
    assert_eq!(c.status(leader).unwrap()["voters"].as_array().unwrap().len(), 4);

    // Appends keep working while node 4 leaves; it stops itself once removed.
    c.remove_node(4).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = c.nodes.get_mut(&4).and_then(|n| n.proc.as_mut()).and_then(|p| p.child.try_wait().ok().flatten()) {
            break s;
        }
        assert!(Instant::now() < deadline, "node 4 did not stop after its removal");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(3), "a removed node exits with status 3");
    append_n(&urls, "after-removal", 0, 20);

    // Restarted on its old data, node 4 refuses to start: it knows it was removed.
    let out = Command::new(bin("custody-ledger")).args(["serve", "--config"]).arg(&c.nodes[&4].config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("was removed from cluster") && err.contains("new id"), "{err}");
    c.nodes.get_mut(&4).unwrap().proc = None;
    assert_eq!(c.status(leader).unwrap()["voters"].as_array().unwrap().len(), 3);
    // Its id cannot be reused.
    let out = Command::new(bin("custody-ledger"))
        .args(["member", "add", "--endpoint", &c.nodes[&leader].url(), "--id", "4", "--peer-addr", "127.0.0.1:1", "--client-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("cannot be reused"), "{}", String::from_utf8_lossy(&out.stderr));
}

fn rand_seq() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_000
}

#[test]
fn wrong_certificates_other_clusters_data_and_corrupt_files_are_refused() {
    let dir = scratch("bad");
    let mut c = LedgerCluster::start(dir.path(), 3, ClusterOptions::default()).unwrap();
    let urls = c.urls();
    append_n(&urls, "x", 0, 50);

    // A node whose certificate comes from another CA: its peers refuse the TLS handshake.
    let other = dir.path().join("other-ca");
    assert!(Command::new(bin("custody-ledger")).args(["gen-certs", "--dir"]).arg(&other).args(["--nodes", "3"]).status().unwrap().success());
    c.kill(3);
    let cfg3 = std::fs::read_to_string(&c.nodes[&3].config).unwrap();
    let certs = c.certs.display().to_string();
    std::fs::write(&c.nodes[&3].config, cfg3.replace(&format!("{certs}/ledger-3.pem"), &format!("{}/ledger-3.pem", other.display())).replace(&format!("{certs}/ledger-3-key.pem"), &format!("{}/ledger-3-key.pem", other.display()))).unwrap();
    c.restart(3).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    append_n(&urls, "y", 0, 20);
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    assert_ne!(leader, 3);
    let logs: String = [1u64, 2].iter().map(|id| std::fs::read_to_string(&c.nodes[id].log).unwrap()).collect();
    assert!(logs.contains("TLS handshake failed"), "the members say why they refused node 3");
    assert!(c.status(3).unwrap()["size"].as_u64().unwrap() <= 50, "node 3 received nothing new");
    c.kill(3);
    std::fs::write(&c.nodes[&3].config, cfg3).unwrap();
    c.restart(3).unwrap();
    c.wait_converged(Duration::from_secs(20)).unwrap();

    // Another cluster's data under this node's config: refused at start.
    c.kill(2);
    let cfg2 = std::fs::read_to_string(&c.nodes[&2].config).unwrap();
    let foreign = cfg2.replace(&format!("name = \"{}\"", c.name), "name = \"someone-else\"");
    let foreign_cfg = dir.path().join("foreign.toml");
    std::fs::write(&foreign_cfg, foreign).unwrap();
    let out = Command::new(bin("custody-ledger")).args(["serve", "--config"]).arg(&foreign_cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refusing to start rather than join the wrong cluster"), "{err}");

    // A corrupt file in the state machine: refused at start, with where to look.
    let state = std::fs::read_to_string(c.nodes[&2].data.join("STATE")).unwrap();
    let state_dir = c.nodes[&2].data.join(state.trim());
    let current = std::fs::read_to_string(state_dir.join("CURRENT")).unwrap();
    std::fs::write(state_dir.join(current.trim()), b"this is not a rocksdb manifest").unwrap();
    let out = Command::new(bin("custody-ledger")).args(["serve", "--config"]).arg(&c.nodes[&2].config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot be opened") && err.contains("rebuild this node from its peers"), "{err}");
    // The two healthy nodes are still a majority.
    append_n(&urls, "z", 0, 10);
}

#[test]
fn reads_are_linearizable_through_the_leader_and_stale_reads_need_a_bound() {
    let dir = scratch("reads");
    let c = LedgerCluster::start(dir.path(), 3, ClusterOptions { relays: true, ..Default::default() }).unwrap();
    let urls = c.urls();
    append_n(&urls, "r", 0, 30);
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let f = &c.nodes[&follower];
    // A follower serves a linearizable read: ReadIndex through the leader.
    let n = rt().block_on(custody::query::fetch(&f.flight(), &serde_json::json!({"table": "entries"}))).unwrap().iter().map(|b| b.num_rows()).sum::<usize>();
    assert_eq!(n, 30);
    // Cut off, it cannot confirm a read is current, and says how to read anyway.
    c.partition(&[follower]);
    std::thread::sleep(Duration::from_secs(3));
    let err = rt().block_on(custody::query::fetch(&f.flight(), &serde_json::json!({"table": "entries"}))).unwrap_err();
    assert!(format!("{err:#}").contains("max_staleness_ms"), "{err:#}");
    let err = rt().block_on(custody::query::fetch(&f.flight(), &serde_json::json!({"table": "entries", "max_staleness_ms": 500}))).unwrap_err();
    assert!(format!("{err:#}").contains("last heard from the leader"), "{err:#}");
    let stale = rt().block_on(custody::query::fetch(&f.flight(), &serde_json::json!({"table": "entries", "max_staleness_ms": 600000}))).unwrap();
    assert_eq!(stale.iter().map(|b| b.num_rows()).sum::<usize>(), 30);
    c.heal();
}

#[test]
fn the_proxy_follows_the_leader_and_a_dead_proxy_s_sessions_are_closed() {
    let dir = scratch("proxy");
    let d = dir.path();
    let mut c = LedgerCluster::start(d, 3, ClusterOptions::default()).unwrap();
    let pg = Postgres::start().unwrap();
    let oidc = Oidc::start(d).unwrap();
    let ledgers: Vec<String> = c.nodes.values().map(|n| n.grpc.to_string()).collect();
    let mut extra = pg_resource("pg", &pg, d, None).unwrap();
    extra.push_str("\n[policy.groups]\ndba = [\"pg\"]\n");
    let opts = ProxyOptions { issuer: oidc.issuer.clone(), audiences: vec!["urn:custody".into()], leeway_secs: 5, append_timeout_ms: 8000, extra: format!("lease_ttl_ms = 2000\n{extra}") };
    let mut proxy = Proxy::start_with_ledgers(d, &ledgers, &opts).unwrap();
    let token = rt().block_on(oidc.client_token("ci-client", "urn:custody")).unwrap();
    let t = Tunnel::start(d, &proxy, "pg", &token).unwrap();
    pg.direct_sql("create table f(id int)").unwrap();
    assert!(t.psql(&["-c", "insert into f values (1)"]).status.success());

    // The leader dies; the next statements wait out the election and succeed.
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    c.kill(leader);
    let out = t.psql(&["-c", "insert into f values (2)", "-c", "insert into f values (3)"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(pg.direct_sql("select count(*) from f").unwrap(), "3");
    c.restart(leader).unwrap();

    // A session is open when the proxy is killed: the ledger closes it for the dead run.
    let mut open = raw::RawPg::connect(t.port).unwrap();
    open.send(&raw::query("insert into f values (4)")).unwrap();
    open.until(|f| f.tag() == b'Z').unwrap();
    std::thread::sleep(Duration::from_millis(300));
    proxy.proc.kill();
    // Left dead, the lease lapses (2 s) and the leader closes the run's sessions at its next
    // lease check; a loaded machine may take a few seconds more.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (ev, sid, end) = loop {
        let ev = node_entries(&c.nodes[&c.wait_leader(Duration::from_secs(5)).unwrap()]);
        let sid = ev.iter().find(|e| e["sql"] == "insert into f values (4)").expect("the statement before the kill is recorded")["session_id"].clone();
        if let Some(end) = ev.iter().find(|e| e["session_id"] == sid && e["kind"] == "session_end").cloned() {
            break (ev, sid, end);
        }
        assert!(Instant::now() < deadline, "the dead proxy's session was closed");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(end["reason"].as_str().unwrap().starts_with("abandoned: proxy test-proxy stopped renewing its lease"), "{end}");
    let sessions = rt().block_on(custody::query::fetch(&c.nodes[&leader].flight(), &serde_json::json!({"table": "sessions", "session_id": sid}))).unwrap();
    assert_eq!(sessions.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    // Nothing the session did before is lost, and the record says its proxy died.
    assert!(ev.iter().any(|e| e["session_id"] == sid && e["command_tag"] == "INSERT 0 1"));

    // A restarted proxy serves again.
    proxy.restart().unwrap();
    let token = rt().block_on(oidc.client_token("ci-client", "urn:custody")).unwrap();
    let t2 = Tunnel::start(d, &proxy, "pg", &token).unwrap();
    assert!(t2.psql(&["-c", "insert into f values (5)"]).status.success());
}

#[test]
fn a_node_removed_while_cut_off_is_refused_when_it_comes_back() {
    let dir = scratch("removed");
    let mut c = LedgerCluster::start(dir.path(), 3, ClusterOptions { relays: true, ..Default::default() }).unwrap();
    let urls = c.urls();
    c.add_node(4).unwrap();
    c.wait_converged(Duration::from_secs(30)).unwrap();
    append_n(&urls, "before", 0, 10);
    // Node 4 is cut off, and removed while it cannot hear about it.
    c.partition(&[4]);
    c.remove_node(4).unwrap();
    append_n(&urls, "during", 0, 10);
    // Back on the network it still believes it is a member, and keeps trying: the others
    // refuse it, and it cannot disturb their elections or their log.
    let term_before = c.status(c.wait_leader(Duration::from_secs(5)).unwrap()).unwrap()["term"].as_u64().unwrap();
    c.heal();
    std::thread::sleep(Duration::from_secs(5));
    append_n(&urls, "after", 0, 10);
    let leader = c.wait_leader(Duration::from_secs(5)).unwrap();
    assert_ne!(leader, 4);
    // Node 4 tries again at its next election timeout; give a loaded machine time for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refusals: usize = [1u64, 2, 3].iter().map(|id| std::fs::read_to_string(&c.nodes[id].log).unwrap().matches("node 4 was removed from this cluster").count()).sum();
        if refusals > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the members refused the removed node");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c.status(leader).unwrap()["term"].as_u64().unwrap(), term_before, "the removed node caused no election");
    assert_eq!(c.status(leader).unwrap()["size"].as_u64().unwrap(), 30);
}

#[test]
fn a_member_added_before_its_node_starts_joins_after_a_partition_heals() {
    let dir = scratch("late-join");
    let mut c = LedgerCluster::start(dir.path(), 3, ClusterOptions { relays: true, ..Default::default() }).unwrap();
    let urls = c.urls();
    append_n(&urls, "before", 0, 20);
    // Replace node 3 by node 4, but start node 4 only much later: until then the cluster
    // needs both of nodes 1 and 2.
    let leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    let gone = if leader == 3 { 2 } else { 3 };
    c.remove_node(gone).unwrap();
    c.kill(gone);
    c.nodes.remove(&gone);
    c.add_member_only(4).unwrap();
    let urls: Vec<String> = c.urls().into_iter().filter(|u| *u != c.nodes[&4].url()).collect();
    append_n(&urls, "two-of-three", 0, 20);
    // Cut the leader off, then heal: the two live voters must agree on a leader again.
    let leader = c.wait_leader(Duration::from_secs(10)).unwrap();
    c.partition(&[leader]);
    std::thread::sleep(Duration::from_secs(4));
    c.heal();
    c.restart(4).unwrap();
    c.wait_leader(Duration::from_secs(30)).unwrap();
    append_n(&c.urls(), "after", 0, 20);
    let (size, _) = c.wait_converged(Duration::from_secs(30)).unwrap();
    assert_eq!(size, 60);
}
