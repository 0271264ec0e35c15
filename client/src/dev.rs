//! `custody dev`: the whole system on loopback for a first run. Starts a single-node ledger
//! and a proxy as child processes, a dev-only OpenID issuer in this process, and a throwaway
//! PostgreSQL (when `initdb` is installed) registered as resource `demo-pg`; logs the local
//! user in; writes the client config; prints what to type next; stops everything on Ctrl-C.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::{write_private, ClientConfig};
use crate::dev_issuer::{DevIssuer, DevIssuerConfig};
use crate::login::{login, LoginOptions};

/// `custody dev` options.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// State directory.
    pub data_dir: PathBuf,
    /// Skip PostgreSQL even if installed.
    pub no_postgres: bool,
    /// Ledger nodes: 1 (a single node), or 3 or 5 (a Raft cluster on loopback).
    pub nodes: u64,
}

/// The audience dev tokens carry and the dev proxy accepts.
pub const DEV_AUDIENCE: &str = "urn:custody";
const DEV_CI_CLIENT: &str = "dev-ci";

fn free_tcp(preferred: u16) -> u16 {
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return preferred;
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(preferred)
}

fn free_udp(preferred: u16) -> u16 {
    if UdpSocket::bind(("127.0.0.1", preferred)).is_ok() {
        return preferred;
    }
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(preferred)
}

/// Finds a sibling binary of this executable, else one on PATH.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let p = dir.join(name);
            if p.exists() {
                return Ok(p);
            }
        }
    }
    which(name).with_context(|| format!("cannot find the {name} binary next to custody or on PATH (build it with `cargo build --workspace`)"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Finds a PostgreSQL server binary (initdb, postgres, pg_ctl).
pub fn pg_binary(name: &str) -> Option<PathBuf> {
    if let Some(p) = which(name) {
        return Some(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// uid and gid of a local user, from /etc/passwd.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    }).unwrap_or(false)
}

struct Children(Vec<(&'static str, Child)>);

impl Children {
    fn stop(&mut self) {
        for (_, c) in self.0.iter_mut().rev() {
            // SIGTERM, so the ledger drains and the proxy closes sessions cleanly.
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, c) in self.0.iter_mut().rev() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        eprintln!("custody dev: {name} did not stop; killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .with_context(|| format!("opening {name}.log"))?;
    Ok(Stdio::from(f))
}

async fn wait_tcp(addr: SocketAddr, what: &str, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited during start-up ({status}); see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!("{what} did not start listening on {addr} within 60 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Postgres {
    port: u16,
    password_file: PathBuf,
}

fn random_hex(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(n);
    s
}

/// Makes (once) and starts a throwaway PostgreSQL owned by an unprivileged user.
async fn start_postgres(dir: &Path, secrets: &Path, logs: &Path, children: &mut Children) -> anyhow::Result<Option<Postgres>> {
    let (Some(initdb), Some(postgres)) = (pg_binary("initdb"), pg_binary("postgres")) else {
        return Ok(None);
    };
    use std::os::unix::process::CommandExt;
    let ids = if is_root() {
        // PostgreSQL refuses to run as root: run it as the `postgres` (or `nobody`) user, in a
        // directory that user can reach.
        Some(user_ids("postgres").or_else(|| user_ids("nobody")).context("running as root, but there is no postgres or nobody user to run PostgreSQL as")?)
    } else {
        None
    };
    let pg_root = match ids {
        Some(_) => std::env::temp_dir().join("custody-dev-pg"),
        None => dir.to_path_buf(),
    };
    let data = pg_root.join("data");
    let sock = pg_root.join("sock");
    let password_file = secrets.join("demo-pg.password");
    std::fs::create_dir_all(&pg_root)?;
    std::fs::create_dir_all(&sock)?;
    let chown = |p: &Path| -> anyhow::Result<()> {
        if let Some((u, g)) = ids {
            std::os::unix::fs::chown(p, Some(u), Some(g)).with_context(|| format!("chown {}", p.display()))?;
        }
        Ok(())
    };
    chown(&pg_root)?;
    chown(&sock)?;
    if !data.join("PG_VERSION").exists() || !password_file.exists() {
        let _ = std::fs::remove_dir_all(&data);
        let password = random_hex(32);
        let pwfile = pg_root.join("initdb.pw");
        write_private(&pwfile, password.as_bytes())?;
        chown(&pwfile)?;
        let mut cmd = Command::new(&initdb);
        cmd.args(["-D"]).arg(&data).args([
            "-U",
            "custody_gateway",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-instructions",
        ]);
        cmd.arg(format!("--pwfile={}", pwfile.display()));
        cmd.env("LC_ALL", "C.UTF-8").stdout(log_file(logs, "initdb")?).stderr(log_file(logs, "initdb")?);
        if let Some((u, g)) = ids {
            cmd.uid(u).gid(g).current_dir(&pg_root);
        }
        let st = cmd.status().context("running initdb")?;
        let _ = std::fs::remove_file(&pwfile);
        if !st.success() {
            bail!("initdb failed; see {}", logs.join("initdb.log").display());
        }
        write_private(&password_file, password.as_bytes())?;
    }
    let port = free_tcp(55432);
    let mut cmd = Command::new(&postgres);
    cmd.arg("-D")
        .arg(&data)
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
        .arg(format!("unix_socket_directories={}", sock.display()))
        .args(["-c", "fsync=off"])
        .stdout(log_file(logs, "postgres")?)
        .stderr(log_file(logs, "postgres")?);
    if let Some((u, g)) = ids {
        cmd.uid(u).gid(g).current_dir(&pg_root);
    }
    let mut child = cmd.spawn().context("starting postgres")?;
    wait_tcp(SocketAddr::from(([127, 0, 0, 1], port)), "postgres", &mut child, &logs.join("postgres.log")).await?;
    children.0.push(("postgres", child));
    Ok(Some(Postgres { port, password_file }))
}

/// Drives the dev issuer's auto-approving authorization endpoint as a browser would.
async fn follow_login(url: String) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let r = http.get(&url).send().await?;
    let loc = r
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("dev issuer did not redirect")?
        .to_string();
    http.get(&loc).send().await?;
    Ok(())
}

/// Starts `n` ledger nodes; returns each one's (gRPC, HTTP) address.
/// The `[readers]` section of a dev ledger's config: the dev issuer's tokens of the `dev`
/// group (the developer and the dev CI client) may read the audit log, and every read is
/// recorded in it.
fn dev_readers(issuer: &str) -> String {
    format!("\n[readers]\ngroups = [\"dev\"]\nissuers = [{{ issuer = \"{issuer}\", audiences = [\"{DEV_AUDIENCE}\"] }}]\n")
}

async fn start_ledgers(bin: &Path, dir: &Path, logs: &Path, n: u64, issuer: &str, children: &mut Children) -> anyhow::Result<Vec<(SocketAddr, SocketAddr)>> {
    if n == 1 {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_tcp(7400)));
        let http = SocketAddr::from(([127, 0, 0, 1], free_tcp(7401)));
        let path = dir.join("ledger.toml");
        let cfg = format!(
            "# Written by `custody dev`. Development only.\ndata_dir = \"{}\"\nlisten = \"{grpc}\"\nhttp_listen = \"{http}\"\n{}",
            dir.join("ledger").display(),
            dev_readers(issuer)
        );
        std::fs::write(&path, cfg)?;
        let mut ledger = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(log_file(logs, "ledger")?)
            .stderr(log_file(logs, "ledger")?)
            .spawn()
            .context("starting custody-ledger")?;
        wait_tcp(grpc, "custody-ledger", &mut ledger, &logs.join("ledger.log")).await?;
        children.0.push(("custody-ledger", ledger));
        return Ok(vec![(grpc, http)]);
    }
    if n != 3 && n != 5 {
        bail!("--nodes must be 1, 3 or 5");
    }
    let certs = dir.join("ledger-certs");
    let ids: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    if !certs.join("ca.pem").exists() {
        let st = Command::new(bin).args(["gen-certs", "--dir"]).arg(&certs).args(["--nodes", &ids.join(",")]).output().context("running custody-ledger gen-certs")?;
        if !st.status.success() {
            bail!("custody-ledger gen-certs failed: {}", String::from_utf8_lossy(&st.stderr));
        }
    }
    let mut addrs = Vec::new();
    for i in 0..n {
        let base = 7400 + 20 * i as u16;
        addrs.push((
            SocketAddr::from(([127, 0, 0, 1], free_tcp(base))),
            SocketAddr::from(([127, 0, 0, 1], free_tcp(base + 1))),
            SocketAddr::from(([127, 0, 0, 1], free_tcp(base + 10))),
        ));
    }
    let members: Vec<String> = addrs.iter().enumerate().map(|(i, (g, _, p))| format!("{{ id = {}, peer = \"{p}\", client = \"{g}\" }}", i + 1)).collect();
    let mut out = Vec::new();
    let first_child = children.0.len();
    for (i, (grpc, http, peer)) in addrs.iter().enumerate() {
        let id = i as u64 + 1;
        let data = dir.join(format!("ledger-{id}"));
        let cfg = format!(
            "# Written by `custody dev --nodes {n}`. Development only.\nnode_id = \"ledger-{id}\"\ndata_dir = \"{}\"\nlisten = \"{grpc}\"\nhttp_listen = \"{http}\"\n\n[cluster]\nid = {id}\nname = \"custody-dev\"\npeer_listen = \"{peer}\"\nstate = \"new\"\ninitial_members = [{}]\n\n[cluster.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
            data.display(),
            members.join(", "),
            certs.join("ca.pem").display(),
            certs.join(format!("ledger-{id}.pem")).display(),
            certs.join(format!("ledger-{id}-key.pem")).display(),
            dev_readers(issuer),
        );
        let path = dir.join(format!("ledger-{id}.toml"));
        std::fs::write(&path, cfg)?;
        let name = format!("ledger-{id}");
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(log_file(logs, &name)?)
            .stderr(log_file(logs, &name)?)
            .spawn()
            .context("starting custody-ledger")?;
        children.0.push(("custody-ledger", child));
        out.push((*grpc, *http));
    }
    for (i, (grpc, _)) in out.iter().enumerate() {
        let log = logs.join(format!("ledger-{}.log", i + 1));
        let (_, child) = &mut children.0[first_child + i];
        wait_tcp(*grpc, "custody-ledger", child, &log).await?;
    }
    Ok(out)
}

/// Runs until Ctrl-C.
pub async fn run(opts: DevOptions) -> anyhow::Result<()> {
    let dir = &opts.data_dir;
    let logs = dir.join("logs");
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&logs)?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&secrets)?;
    }
    let ledger_bin = sibling_binary("custody-ledger")?;
    let proxy_bin = sibling_binary("custody-proxy")?;
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "developer".into());
    let mut children = Children(Vec::new());

    // 1. dev issuer (in this process)
    let ci_secret_file = secrets.join("dev-ci.secret");
    let ci_secret = match std::fs::read_to_string(&ci_secret_file) {
        Ok(s) => s.trim().to_string(),
        Err(_) => {
            let s = random_hex(32);
            write_private(&ci_secret_file, s.as_bytes())?;
            s
        }
    };
    let issuer = DevIssuer::start(
        SocketAddr::from(([127, 0, 0, 1], free_tcp(7480))),
        DevIssuerConfig {
            user: user.clone(),
            groups: vec!["dev".into()],
            audience: DEV_AUDIENCE.into(),
            ci_client: (DEV_CI_CLIENT.into(), ci_secret),
            lifetime: Duration::from_secs(12 * 3600),
        },
    )
    .await?;

    // 2. ledger: one node, or a Raft cluster with mutual TLS between its nodes.
    let ledgers = start_ledgers(&ledger_bin, dir, &logs, opts.nodes, &issuer.url, &mut children).await?;
    let ledger_grpc = ledgers[0].0;
    let ledger_http = ledgers[0].1;

    // 3. postgres
    let pg = if opts.no_postgres {
        None
    } else {
        start_postgres(dir, &secrets, &logs, &mut children).await?
    };

    // 4. proxy
    let tls_dir = dir.join("tls");
    let st = Command::new(&proxy_bin)
        .args(["gen-cert", "--dir"])
        .arg(&tls_dir)
        .stderr(Stdio::inherit())
        .output()
        .context("generating the dev certificate")?;
    if !st.status.success() {
        bail!("custody-proxy gen-cert failed");
    }
    let fingerprint = String::from_utf8_lossy(&st.stdout).trim().to_string();
    let quic = SocketAddr::from(([127, 0, 0, 1], free_udp(7443)));
    let proxy_http = SocketAddr::from(([127, 0, 0, 1], free_tcp(7444)));
    let mut cfg = format!(
        r#"# Written by `custody dev`. Development only.
proxy_id = "dev-proxy"
listen = "{quic}"
http_listen = "{proxy_http}"
ledger = [{ledger_urls}]

[tls]
cert = "{cert}"
key = "{key}"

[[issuers]]
issuer = "{issuer}"
audiences = ["{DEV_AUDIENCE}"]

[policy.groups]
dev = ["*"]
"#,
        ledger_urls = ledgers.iter().map(|(g, _)| format!("\"http://{g}\"")).collect::<Vec<_>>().join(", "),
        cert = tls_dir.join("proxy.pem").display(),
        key = tls_dir.join("proxy-key.pem").display(),
        issuer = issuer.url,
    );
    if let Some(pg) = &pg {
        cfg.push_str(&format!(
            r#"
[[resources]]
name = "demo-pg"
host = "127.0.0.1"
port = {}
user = "custody_gateway"
password_file = "{}"
"#,
            pg.port,
            pg.password_file.display()
        ));
    }
    let proxy_cfg = dir.join("proxy.toml");
    write_private(&proxy_cfg, cfg.as_bytes())?;
    let mut proxy = Command::new(&proxy_bin)
        .args(["serve", "--config"])
        .arg(&proxy_cfg)
        .stdout(log_file(&logs, "proxy")?)
        .stderr(log_file(&logs, "proxy")?)
        .spawn()
        .context("starting custody-proxy")?;
    wait_tcp(proxy_http, "custody-proxy", &mut proxy, &logs.join("proxy.log")).await?;
    children.0.push(("custody-proxy", proxy));

    // 5. client config (with the ledger nodes' checkpoint keys pinned) and login
    let ledger_flight = format!("grpc://{ledger_grpc}");
    let ledger_keys = ledger_keys(&ledger_flight, opts.nodes as usize).await;
    let client = ClientConfig {
        proxy: Some(quic.to_string()),
        server_name: Some("localhost".into()),
        pin: Some(fingerprint.clone()),
        ca_file: None,
        flight: Some(format!("grpc://{ledger_grpc}")),
        issuer: Some(issuer.url.clone()),
        client_id: Some("custody-cli".into()),
        audience: Some(DEV_AUDIENCE.into()),
        note: Some("written by custody dev".into()),
        ledger_keys,
    };
    let cfg_path = client.save()?;
    let opts_login = LoginOptions {
        issuer: issuer.url.clone(),
        client_id: "custody-cli".into(),
        audience: DEV_AUDIENCE.into(),
        no_browser: true,
        offline: false,
        timeout: Duration::from_secs(30),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    let driver = tokio::spawn(async move {
        if let Ok(url) = rx.await {
            follow_login(url).await
        } else {
            Ok(())
        }
    });
    let token = login(&opts_login, move |u| {
        let _ = tx.send(u.to_string());
    })
    .await
    .context("logging in against the dev issuer")?;
    driver.await??;
    token.save()?;

    println!();
    println!("custody dev is running. DEVELOPMENT ONLY: the issuer below logs anyone in as {user:?} without a password.");
    println!();
    println!("  proxy (QUIC)   {quic}   certificate {fingerprint}");
    println!("  ledger Flight  grpc://{ledger_grpc}   (health and metrics: http://{ledger_http}/metrics)");
    if ledgers.len() > 1 {
        println!("  ledger nodes   {} Raft nodes: {}", ledgers.len(), ledgers.iter().map(|(g, _)| g.to_string()).collect::<Vec<_>>().join(", "));
        println!("                 custody-ledger status --endpoint {ledger_grpc}");
    }
    println!("  dev issuer     {}   [dev-only]", issuer.url);
    match &pg {
        Some(p) => println!("  postgres       127.0.0.1:{} registered as resource demo-pg", p.port),
        None => println!("  postgres       not started (initdb not found{})", if opts.no_postgres { ", or --no-postgres" } else { "" }),
    }
    println!("  state, logs    {}", dir.display());
    println!("  client config  {}", cfg_path.display());
    println!();
    println!("Logged in as {user} (token cached with mode 0600). In another shell:");
    println!();
    println!("  custody connect demo-pg --port 5433");
    println!("  psql -h 127.0.0.1 -p 5433 -U {user} postgres");
    println!("  custody events --since 10m");
    println!("  custody sessions");
    println!();
    println!("A CI job gets a token with no prompt:");
    println!(
        "  export CUSTODY_TOKEN=$(curl -s -d grant_type=client_credentials -d client_id={DEV_CI_CLIENT} -d client_secret=$(cat {}) {}/token | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')",
        ci_secret_file.display(),
        issuer.url
    );
    println!();
    println!("Press Ctrl-C to stop.");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut reported: Vec<&'static str> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {
                for (name, c) in children.0.iter_mut() {
                    if !reported.contains(name) {
                        if let Ok(Some(st)) = c.try_wait() {
                            eprintln!("custody dev: {name} exited ({st}); see {}", logs.display());
                            reported.push(name);
                        }
                    }
                }
            }
        }
    }
    eprintln!("custody dev: stopping");
    children.stop();
    Ok(())
}

/// Every ledger node's checkpoint verifier key, read from each member's Flight status. A
/// fresh cluster may not have elected a leader or applied its membership yet, so this
/// retries for a while; without all the keys `custody verify` would not check checkpoints.
async fn ledger_keys(flight: &str, nodes: usize) -> Vec<String> {
    // The key does not need a linearizable read.
    let body = serde_json::json!({"max_staleness_ms": 3_600_000});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut keys = Vec::new();
        if let Ok(st) = crate::query::action(flight, "status", &body).await {
            let members: Vec<String> = st["members"].as_array().into_iter().flatten().filter_map(|m| m["flight"].as_str().map(str::to_string)).collect();
            for m in if members.is_empty() { vec![flight.to_string()] } else { members } {
                if let Ok(s) = crate::query::action(&m, "status", &body).await {
                    keys.extend(s["verifier_key"].as_str().map(str::to_string));
                }
            }
        }
        if keys.len() >= nodes || std::time::Instant::now() > deadline {
            if keys.len() < nodes {
                eprintln!("custody dev: warning: pinned {} of {nodes} ledger keys; custody verify checks checkpoints only against those", keys.len());
            }
            return keys;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
