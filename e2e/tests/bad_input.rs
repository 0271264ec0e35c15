//! Hostile and broken input: bad tokens, unknown resources, policy, malformed frames,
//! garbage on the QUIC stream, a target refusing the gateway's credential. Each gets a clear
//! error; nothing else is disturbed.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use custody_e2e::raw::{self, RawPg};
use custody_e2e::*;
use hmac::Mac;

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn claims(iss: &str) -> serde_json::Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    serde_json::json!({"iss": iss, "sub": "mallory", "aud": "urn:custody", "iat": now, "exp": now + 600, "groups": ["dba"]})
}

/// Runs `custody connect` expecting it to refuse; returns its stderr.
fn connect_refused(stack: &Stack, resource: &str, token: &str) -> String {
    let port = free_port();
    let out = custody_cmd(&stack.dir.path().join("home"), Some(token))
        .args(["connect", resource, "--port", &port.to_string(), "--proxy", &stack.proxy.quic.to_string(), "--pin", &stack.proxy.pin, "--server-name", "localhost"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "connect should fail; stderr: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"), "it must not listen");
    assert!(!stderr.contains(token) || token.len() < 8, "the token is never printed");
    stderr
}

#[test]
fn every_bad_token_is_refused_with_the_check_that_failed() {
    let stack = Stack::start().unwrap();
    let r = rt();
    let good = r.block_on(stack.token());

    let err = connect_refused(&stack, "pg", "not-a-jwt");
    assert!(err.contains("not a well-formed JWT"), "{err}");

    let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims(&stack.oidc.issuer).to_string().as_bytes()));
    let err = connect_refused(&stack, "pg", &none);
    assert!(err.contains("unsigned (alg: none)"), "{err}");

    // The classic confusion attack: HS256 keyed with the issuer's published public key.
    let jwks: serde_json::Value = r.block_on(async {
        reqwest::get(format!("{}/jwks", stack.oidc.issuer)).await.unwrap().json().await.unwrap()
    });
    let public_key = jwks["keys"][0].to_string();
    let signing_input = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims(&stack.oidc.issuer).to_string().as_bytes()));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(public_key.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let hs = format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()));
    let err = connect_refused(&stack, "pg", &hs);
    assert!(err.contains("shared-secret algorithm HS256"), "{err}");

    // A real token with its payload changed keeps a signature that no longer matches.
    let parts: Vec<&str> = good.split('.').collect();
    let mut payload: serde_json::Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = "admin".into();
    let forged = format!("{}.{}.{}", parts[0], b64(payload.to_string().as_bytes()), parts[2]);
    let err = connect_refused(&stack, "pg", &forged);
    assert!(err.contains("signature is invalid"), "{err}");

    let other_aud = r.block_on(stack.oidc.client_token("ci-client", "urn:other")).unwrap();
    let err = connect_refused(&stack, "pg", &other_aud);
    assert!(err.contains("audience is wrong") && err.contains("urn:other"), "{err}");

    let other = Oidc::start(stack.dir.path()).unwrap();
    let foreign = r.block_on(other.client_token("ci-client", "urn:custody")).unwrap();
    let err = connect_refused(&stack, "pg", &foreign);
    assert!(err.contains("is not trusted here"), "{err}");

    let short = r.block_on(stack.oidc.client_token("ci-short", "urn:custody")).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let err = connect_refused(&stack, "pg", &short);
    assert!(err.contains("token expired at"), "{err}");

    // No token at all.
    let out = custody_cmd(&stack.dir.path().join("empty-home"), None)
        .args(["connect", "pg", "--port", &free_port().to_string(), "--proxy", &stack.proxy.quic.to_string(), "--pin", &stack.proxy.pin])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("set CUSTODY_TOKEN, pass --token-file, or run `custody login`"));

    // Unknown resource and policy denial.
    let err = connect_refused(&stack, "nope", &good);
    assert!(err.contains("unknown resource \"nope\""), "{err}");
    let nogroups = r.block_on(stack.oidc.client_token("ci-nogroups", "urn:custody")).unwrap();
    let err = connect_refused(&stack, "pg", &nogroups);
    assert!(err.contains("may not reach resource \"pg\""), "{err}");

    // None of them opened a session; the policy denial is on the record.
    let rows = events_json(&stack.dir.path().join("home"), &stack.ledger.flight(), &[]).unwrap();
    assert!(rows.iter().all(|e| e["kind"] == "denied"), "{rows:?}");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["subject"], "ci-nogroups");

    // A token file works like CUSTODY_TOKEN (for CI), and the proxy is still healthy.
    let tf = stack.dir.path().join("token");
    std::fs::write(&tf, &good).unwrap();
    let t = Tunnel::start_with(stack.dir.path(), &stack.proxy, "pg", custody_cmd(&stack.dir.path().join("home"), None), &["--token-file", tf.to_str().unwrap()]).unwrap();
    assert!(t.psql(&["-c", "select 1"]).status.success());
}

#[test]
fn malformed_frames_and_garbage_streams_close_only_their_session() {
    let stack = Stack::start().unwrap();
    let token = rt().block_on(stack.token());
    let t = stack.tunnel("pg", &token);
    let mut healthy = RawPg::connect(t.port).unwrap();

    // A frame claiming 2 GiB.
    let mut c = RawPg::connect(t.port).unwrap();
    c.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).unwrap();
    let f = c.next().unwrap().expect("an error before close");
    let (sev, code, msg) = raw::error_of(&f).unwrap();
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "54000"), "{msg}");
    assert!(c.next().unwrap().is_none());

    // An unknown message type, and a Bind whose counts lie.
    let mut c = RawPg::connect(t.port).unwrap();
    c.send(&[0u8, 0, 0, 0, 8, 1, 2, 3, 4]).unwrap();
    let (sev, code, _) = raw::error_of(&c.next().unwrap().unwrap()).unwrap();
    assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "08P01"));
    let mut c = RawPg::connect(t.port).unwrap();
    c.send(&raw::msg(b'B', &[0, 0, 0, 0, 0x7f, 0xff])).unwrap();
    let (_, code, msg) = raw::error_of(&c.next().unwrap().unwrap()).unwrap();
    assert_eq!(code, "08P01", "{msg}");

    // A bad startup packet.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    use std::io::{Read, Write};
    s.write_all(&[0, 0, 0, 8, 0, 9, 0, 0]).unwrap();
    let mut buf = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut buf);
    assert!(String::from_utf8_lossy(&buf).contains("unsupported frontend protocol 9.0"));

    // Garbage, and an oversized preamble, straight onto a QUIC stream.
    rt().block_on(async {
        let ep = custody::quic::endpoint(&custody::quic::Trust::pin(&stack.proxy.pin).unwrap()).unwrap();
        let conn = ep.connect(stack.proxy.quic, "localhost").unwrap().await.unwrap();
        for junk in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &b"CSTD\x7f\xff\xff\xff"[..]] {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(junk).await.unwrap();
            let _ = send.finish();
            let reply = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 16)).await.unwrap().unwrap();
            let mut b = bytes::BytesMut::from(&reply[..]);
            let accept: custody_proto::tunnel::StreamAccept = custody_proto::tunnel::decode(&mut b).unwrap().unwrap();
            assert_eq!(accept.status, custody_proto::tunnel::AcceptStatus::BadRequest as i32, "{}", accept.message);
        }
    });

    // The first session never noticed.
    healthy.send(&raw::query("select 1")).unwrap();
    assert_eq!(raw::tags(&healthy.until(|f| f.tag() == b'Z').unwrap()), "TDCZ");
    let ev = events_json(&stack.dir.path().join("home"), &stack.ledger.flight(), &[]).unwrap();
    let reasons: Vec<&str> = ev.iter().filter(|e| e["kind"] == "session_end").filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(reasons.iter().filter(|r| r.starts_with("protocol_error")).count(), 3, "{reasons:?}");
}

#[test]
fn a_target_refusing_the_gateway_credential_is_reported_without_the_credential() {
    let stack = Stack::start().unwrap();
    let t = stack.tunnel("pg-badcred", &rt().block_on(stack.token()));
    let out = t.psql(&["-c", "select 1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused the gateway's login as \"custody_gateway\""), "{stderr}");
    assert!(stderr.contains("28P01"), "{stderr}");
    assert!(!stderr.contains("not-the-password"));
    let log = std::fs::read_to_string(&stack.proxy.proc.log).unwrap();
    assert!(!log.contains("not-the-password") && !log.contains(&stack.pg.password), "no credential in the proxy log");
    let ev = events_json(&stack.dir.path().join("home"), &stack.ledger.flight(), &[]).unwrap();
    let end = ev.iter().find(|e| e["kind"] == "session_end").unwrap();
    assert!(end["reason"].as_str().unwrap().starts_with("target_error"), "{end}");
    assert!(!serde_json::to_string(&ev).unwrap().contains("not-the-password"));
}

#[test]
fn login_with_authorization_code_and_pkce_then_connect_with_the_cached_token() {
    let stack = Stack::start().unwrap();
    let home = stack.dir.path().join("alice-home");
    let mut child = custody_cmd(&home, None)
        .args(["login", "--issuer", &stack.oidc.issuer, "--client-id", "custody-cli", "--audience", "urn:custody", "--no-browser"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let url = {
        use std::io::BufRead;
        let mut r = std::io::BufReader::new(stderr);
        let mut line = String::new();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "custody login printed no URL");
            if line.trim_start().starts_with("http") {
                break line.trim().to_string();
            }
        }
    };
    // Drive oidc-provider's login and consent pages as a browser would.
    rt().block_on(async {
        let http = reqwest::Client::builder().cookie_store(true).redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let mut next = url::Url::parse(&url).unwrap();
        let mut post: Option<Vec<(String, String)>> = None;
        for _ in 0..20 {
            let resp = match post.take() {
                Some(form) => http.post(next.clone()).form(&form).send().await.unwrap(),
                None => http.get(next.clone()).send().await.unwrap(),
            };
            if resp.status().is_redirection() {
                let loc = resp.headers()["location"].to_str().unwrap().to_string();
                next = next.join(&loc).unwrap();
                if next.path() == "/callback" {
                    let r = http.get(next.clone()).send().await.unwrap();
                    assert!(r.status().is_success());
                    return;
                }
                continue;
            }
            let html = resp.text().await.unwrap();
            let action = html.split("action=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or_else(|| panic!("no form in {html}"));
            let mut form = Vec::new();
            for input in html.split("<input").skip(1) {
                let attr = |n: &str| input.split(&format!("{n}=\"")).nth(1).and_then(|s| s.split('"').next()).map(str::to_string);
                if let Some(name) = attr("name") {
                    let value = match name.as_str() {
                        "login" => "alice".to_string(),
                        "password" => "any".to_string(),
                        _ => attr("value").unwrap_or_default(),
                    };
                    form.push((name, value));
                }
            }
            next = next.join(action).unwrap();
            post = Some(form);
        }
        panic!("login did not reach the callback");
    });
    let status = child.wait().unwrap();
    assert!(status.success());
    let cache = home.join("token.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o600);

    // The cached token is used with no CUSTODY_TOKEN and no prompt.
    let t = Tunnel::start_with(stack.dir.path(), &stack.proxy, "pg", custody_cmd(&home, None), &[]).unwrap();
    let out = t.psql(&["-At", "-c", "select 'as alice'"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ev = events_json(&home, &stack.ledger.flight(), &["--identity", "alice"]).unwrap();
    assert!(!ev.is_empty());
    assert!(ev.iter().all(|e| e["subject"] == "alice" && e["email"] == "alice@example.test" && e["groups"] == serde_json::json!(["dba"])));
    assert!(ev.iter().any(|e| e["sql"] == "select 'as alice'"));
    let _ = Command::new("true").status();
}

#[test]
fn a_rotated_issuer_key_is_fetched_on_first_sight_and_the_retired_key_is_refused() {
    let mut stack = Stack::start().unwrap();
    let old = rt().block_on(stack.token());
    let t = stack.tunnel("pg", &old);
    assert!(t.psql(&["-c", "select 1"]).status.success());
    // The issuer restarts with a new signing key (a new kid) at the same address.
    let dir = stack.dir.path().to_path_buf();
    stack.oidc.restart(&dir).unwrap();
    // The proxy refetches its JWKS at most every 10 s; wait that out so the test asserts the
    // refresh, not the throttle.
    std::thread::sleep(Duration::from_secs(11));
    let new = rt().block_on(stack.token());
    let t2 = stack.tunnel("pg", &new);
    let out = t2.psql(&["-At", "-c", "select 'new key'"]);
    assert!(out.status.success(), "a token under the new key is accepted: {}", String::from_utf8_lossy(&out.stderr));
    // The old key is gone from the JWKS: its tokens no longer verify.
    std::thread::sleep(Duration::from_secs(11));
    let err = connect_refused(&stack, "pg", &old);
    assert!(err.contains("no key in the issuer's JWKS matches"), "{err}");
}

/// A ledger with `[readers]`: the audit log is read only with an auditor's token, while the
/// public face of the log (status, checkpoints) stays open to verifiers.
#[test]
fn reading_the_audit_log_needs_a_token_in_an_auditor_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let oidc = Oidc::start(d).unwrap();
    let (grpc, http) = (std::net::SocketAddr::from(([127, 0, 0, 1], free_port())), std::net::SocketAddr::from(([127, 0, 0, 1], free_port())));
    let cfg = d.join("ledger.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\nlisten = \"{grpc}\"\nhttp_listen = \"{http}\"\n\n[readers]\ngroups = [\"auditors\"]\nissuers = [{{ issuer = \"{}\", audiences = [\"urn:custody-ledger\"] }}]\n",
            d.join("ledger").display(),
            oidc.issuer
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("custody-ledger"));
    cmd.args(["serve", "--config"]).arg(&cfg);
    let mut p = Proc::spawn("ledger", cmd, d).unwrap();
    wait_tcp(grpc, "custody-ledger", &mut p).unwrap();
    let flight = format!("grpc://{grpc}");
    rt().block_on(async {
        let c = custody_proxy::ledger_client::LedgerClient::new(&[grpc.to_string()], Duration::from_secs(10)).unwrap();
        for seq in 0..3u64 {
            let ev = custody_proto::Event { proxy_id: "e2e".into(), session_id: "s".into(), seq, kind: custody_proto::EventKind::Request as i32, ..Default::default() };
            c.append(vec![prost::Message::encode_to_vec(&ev).into()]).await.unwrap();
        }
    });
    let home = d.join("home");
    let events = |token: Option<&str>| {
        let out = custody_cmd(&home, token).args(["events", "--format", "json", "--flight", &flight]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, _, err) = events(None);
    assert!(!ok && err.contains("needs a bearer token of an auditor"), "{err}");
    let dba = rt().block_on(oidc.client_token("ci-client", "urn:custody-ledger")).unwrap();
    let (ok, _, err) = events(Some(&dba));
    assert!(!ok && err.contains("include none of the auditor groups [auditors]"), "{err}");
    let wrong_audience = rt().block_on(oidc.client_token("ci-auditor", "urn:custody")).unwrap();
    let (ok, _, err) = events(Some(&wrong_audience));
    assert!(!ok && err.contains("token refused"), "{err}");
    let auditor = rt().block_on(oidc.client_token("ci-auditor", "urn:custody-ledger")).unwrap();
    let (ok, out, err) = events(Some(&auditor));
    // The three events, and the record of this very read, written before it was served.
    assert!(ok && out.lines().count() == 4 && out.lines().last().unwrap().contains("\"kind\":\"audit_query\""), "{out}{err}");
    assert!(!out.contains(&auditor) && !err.contains(&auditor), "the token is never printed");
    // Each read is itself recorded, before it is served: who asked and what.
    let out = custody_cmd(&home, Some(&auditor)).args(["events", "--format", "json", "--kind", "audit_query", "--flight", &flight]).output().unwrap();
    let reads: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reads.len(), 2, "the earlier read and this one: {reads:?}");
    for r in &reads {
        assert_eq!((r["subject"].as_str(), r["protocol"].as_str(), r["message"].as_str()), (Some("ci-auditor"), Some("flight"), Some("flight ticket")), "{r}");
        assert!(r["sql"].as_str().unwrap().contains("\"table\":\"events\""), "{r}");
    }
    assert!(reads[1]["sql"].as_str().unwrap().contains("audit_query"), "{}", reads[1]);
    // Flight SQL: refused without the token, recorded with it (the statement's text).
    let counted = rt().block_on(async {
        use futures::TryStreamExt;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
        let mut sql = arrow_flight::sql::client::FlightSqlServiceClient::new(ch);
        assert!(sql.execute("SELECT count(*) FROM events".into(), None).await.is_err(), "no token, no SQL");
        sql.set_header("authorization", format!("Bearer {auditor}"));
        let info = sql.execute("SELECT count(*) AS n FROM events WHERE kind = 'request'".into(), None).await.unwrap();
        let batches: Vec<arrow::array::RecordBatch> = sql.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap().try_collect().await.unwrap();
        arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(batches[0].column(0)).value(0)
    });
    assert_eq!(counted, 3);
    let out = custody_cmd(&home, Some(&auditor)).args(["events", "--format", "json", "--kind", "audit_query", "--flight", &flight]).output().unwrap();
    let last: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().rev().nth(1).unwrap()).unwrap();
    assert_eq!((last["message"].as_str(), last["sql"].as_str()), (Some("flight sql"), Some("SELECT count(*) AS n FROM events WHERE kind = 'request'")), "{last}");
    // An inclusion proof hands out an entry's bytes: it needs the auditor and is recorded.
    let out = custody_cmd(&home, None).args(["proof", "inclusion", "1", "--flight", &flight]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("needs a bearer token"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = custody_cmd(&home, Some(&auditor)).args(["proof", "inclusion", "1", "--flight", &flight]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = custody_cmd(&home, Some(&auditor)).args(["events", "--format", "json", "--kind", "audit_query", "--flight", &flight]).output().unwrap();
    let proof_read: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().rev().nth(1).unwrap()).unwrap();
    assert_eq!(proof_read["message"].as_str(), Some("flight proof"), "{proof_read}");
    assert!(proof_read["sql"].as_str().unwrap().starts_with("inclusion_proof {"), "{proof_read}");
    // Audit queries belong to no session.
    let out = custody_cmd(&home, Some(&auditor)).args(["sessions", "--format", "json", "--flight", &flight]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "only the appended session: {}", String::from_utf8_lossy(&out.stdout));
    // Verification: checkpoints are public; pulling the entries needs the auditor.
    let out = custody_cmd(&home, None).args(["checkpoint", "--flight", &flight]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = custody_cmd(&home, Some(&auditor)).args(["verify", "--flight", &flight]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("entries verified"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = custody_cmd(&home, None).args(["verify", "--flight", &flight]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("needs a bearer token"), "{}", String::from_utf8_lossy(&out.stderr));
    // The ledger's log names readers, never their tokens.
    let log = p.log_text();
    assert!(log.contains("audit log read") && !log.contains(&auditor), "{log}");
}

/// A small tmpfs mounted for one test and unmounted when dropped: a full disk, for real.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(path).output().unwrap();
        assert!(out.status.success(), "mounting a {size} tmpfs needs root (the test command runs as root): {}", String::from_utf8_lossy(&out.stderr));
        Self(path.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn an_export_to_a_full_or_unwritable_target_fails_and_marks_nothing_exported() {
    let stack = Stack::start().unwrap();
    let token = rt().block_on(stack.token());
    let tunnel = stack.tunnel("pg", &token);
    // Results that do not compress: a few hundred KiB of recorded rows.
    let mut args = Vec::new();
    for _ in 0..6 {
        args.extend(["-c", "select md5(random()::text) || md5(random()::text) from generate_series(1, 1000)"]);
    }
    assert!(tunnel.psql(&args).status.success());
    let flight = stack.ledger.flight();
    let home = stack.dir.path().join("home");
    let key = rt().block_on(custody::query::action(&flight, "status", &serde_json::json!({}))).unwrap()["verifier_key"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rt().block_on(custody::query::action(&flight, "status", &serde_json::json!({}))).unwrap()["sealed_size"].as_u64().unwrap_or(0) < 10 {
        assert!(std::time::Instant::now() < deadline, "nothing sealed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let export = |target: &std::path::Path| {
        let out = custody_cmd(&home, None).args(["export", "--flight", &flight, "--key", &key]).arg(target).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };

    // A full disk: the first block file does not fit.
    let full = stack.dir.path().join("full");
    let disk = SmallDisk::mount(&full, "48k");
    let (ok, text) = export(&full);
    assert!(!ok && text.contains("No space left on device") && text.contains("nothing was marked as exported"), "{text}");
    assert!(!full.join("manifests").exists() || std::fs::read_dir(full.join("manifests")).unwrap().next().is_none(), "a failed export wrote a manifest: {text}");
    let out = custody_cmd(&home, None).args(["verify", "--key", &key, "--offline"]).arg(&full).output().unwrap();
    assert!(!out.status.success(), "a failed export must not verify as an export");
    drop(disk);

    // Not a directory at all.
    let file = stack.dir.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let (ok, text) = export(&file.join("lake"));
    assert!(!ok && text.contains("cannot create the export directory"), "{text}");

    // Nothing was recorded as exported by the failed runs.
    let out = custody_cmd(&home, None).args(["events", "--kind", "export", "--format", "json", "--flight", &flight]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).trim().is_empty(), "a failed export was recorded: {}", String::from_utf8_lossy(&out.stdout));
    // The ledger lost nothing: the same export to a good directory holds every sealed entry.
    let good = stack.dir.path().join("good");
    let (ok, text) = export(&good);
    assert!(ok && text.contains("read back and verified"), "{text}");
    let out = custody_cmd(&home, None).args(["verify", "--key", &key, "--offline"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
