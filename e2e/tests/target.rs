//! The target side: the gateway logs in to PostgreSQL with its own credential by
//! SCRAM-SHA-256 or md5, over TLS with certificate verification when configured, and a
//! certificate it cannot verify is refused with a clear error.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use custody_e2e::*;

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
fn make_certs(dir: &Path, cn: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &format!("/CN={cn} CA"), "-keyout", "ca.key", "-out", "ca.pem"]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem"]);
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

#[test]
fn gateway_logs_in_over_verified_tls_with_scram_and_md5_and_refuses_an_unverifiable_server() {
    let certs = tempfile::Builder::new().prefix("custody-certs-").tempdir().unwrap();
    let other = tempfile::Builder::new().prefix("custody-other-ca-").tempdir().unwrap();
    make_certs(certs.path(), "target");
    make_certs(other.path(), "someone else");
    // PostgreSQL reads its key as the unprivileged user it runs as, and wants it 0600.
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = certs.path().join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    if running_as_root() {
        let (u, g) = custody::dev::user_ids("postgres").or_else(|| custody::dev::user_ids("nobody")).unwrap();
        std::os::unix::fs::chown(&key, Some(u), Some(g)).unwrap();
    }
    let cert_setting = format!("ssl_cert_file={}", certs.path().join("server.pem").display());
    let key_setting = format!("ssl_key_file={}", key.display());
    let pg = Postgres::start_with(&["fsync=off", "ssl=on", &cert_setting, &key_setting]).unwrap();

    // An md5 role, allowed only with md5 (and only over TLS, so TLS is really in use).
    pg.direct_sql("set password_encryption = 'md5'; create role md5_gateway login superuser password 'md5-secret'").unwrap();
    let hba = pg.dir.path().join("data/pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("hostssl all md5_gateway 127.0.0.1/32 md5\nhost all md5_gateway 127.0.0.1/32 reject\nhostnossl all custody_gateway 127.0.0.1/32 reject\n{old}")).unwrap();
    pg.direct_sql("select pg_reload_conf()").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let direct = |sslmode: &str| {
        Command::new("psql")
            .args(["-X", "-At", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", &pg.user, "-d", "postgres", "-c", "select 1"])
            .env("PGPASSWORD", &pg.password)
            .env("PGSSLMODE", sslmode)
            .output()
            .unwrap()
    };
    assert!(!direct("disable").status.success(), "the gateway role now needs TLS");
    let with_tls = direct("require");
    assert!(with_tls.status.success(), "{}", String::from_utf8_lossy(&with_tls.stderr));

    let ca = certs.path().join("ca.pem");
    let wrong_ca = other.path().join("ca.pem");
    let ca_s = ca.display().to_string();
    let wrong_s = wrong_ca.display().to_string();
    let stack_dir = tempfile::Builder::new().prefix("custody-e2e-target-").tempdir().unwrap();
    let d = stack_dir.path();
    let oidc = Oidc::start(d).unwrap();
    let ledger = Ledger::start(d).unwrap();
    let pw = |name: &str, secret: &str| {
        let p = d.join(format!("{name}.password"));
        custody::config::write_private(&p, secret.as_bytes()).unwrap();
        p.display().to_string()
    };
    let res = |name: &str, user: &str, secret: &str, tls: &str, ca: &str| {
        format!(
            "\n[[resources]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{user}\"\npassword_file = \"{}\"\ntls = \"{tls}\"\nca_file = \"{ca}\"\n",
            pg.port,
            pw(name, secret)
        )
    };
    let mut extra = String::new();
    extra.push_str(&res("pg-scram-tls", &pg.user, &pg.password, "verify-full", &ca_s));
    extra.push_str(&res("pg-md5-tls", "md5_gateway", "md5-secret", "verify-full", &ca_s));
    extra.push_str(&res("pg-wrong-ca", &pg.user, &pg.password, "verify-full", &wrong_s));
    extra.push_str(&res("pg-plain", &pg.user, &pg.password, "disable", &ca_s));
    extra.push_str("\n[policy.groups]\ndba = [\"pg-scram-tls\", \"pg-md5-tls\", \"pg-wrong-ca\", \"pg-plain\"]\n");
    let proxy = Proxy::start(d, &ledger, &ProxyOptions { issuer: oidc.issuer.clone(), audiences: vec!["urn:custody".into()], leeway_secs: 5, append_timeout_ms: 5000, extra }).unwrap();
    let token = rt().block_on(oidc.client_token("ci-client", "urn:custody")).unwrap();

    for (resource, role) in [("pg-scram-tls", pg.user.as_str()), ("pg-md5-tls", "md5_gateway")] {
        let t = Tunnel::start(d, &proxy, resource, &token).unwrap();
        let out = t.psql(&["-At", "-c", "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"]);
        assert!(out.status.success(), "{resource}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{role}|t"), "{resource} logs in as {role} over TLS");
    }

    // A server certificate from a CA the resource does not trust: refused, and said so.
    let t = Tunnel::start(d, &proxy, "pg-wrong-ca", &token).unwrap();
    let out = t.psql(&["-c", "select 1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("TLS") && err.to_lowercase().contains("certificate"), "{err}");
    // Without TLS, the server refuses the gateway's role: the error says it was the target.
    let t = Tunnel::start(d, &proxy, "pg-plain", &token).unwrap();
    let out = t.psql(&["-c", "select 1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refused the gateway's login"), "{err}");

    let log = std::fs::read_to_string(&proxy.proc.log).unwrap();
    assert!(!log.contains("md5-secret") && !log.contains(&pg.password), "no credential in the proxy log");
    let ev = events_json(&d.join("home"), &ledger.flight(), &[]).unwrap();
    let starts: Vec<_> = ev.iter().filter(|e| e["kind"] == "session_start").collect();
    assert_eq!(starts.len(), 4);
    assert!(!serde_json::to_string(&ev).unwrap().contains("md5-secret"));
}
