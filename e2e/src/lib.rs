//! A harness for custody's end-to-end tests. Everything it starts is real and runs on
//! loopback: PostgreSQL (initdb as an unprivileged user), the `oidc-provider` OpenID provider
//! (Node.js), `custody-ledger`, `custody-proxy` and `custody connect` as child processes.
//! Every process is killed when its handle drops.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub mod cluster;

/// A bare HTTP/1.0 GET on loopback; the tests need nothing more.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The workspace root.
///
/// Found at run time, not baked in at build time: a target directory shared between two
/// clones (CI reuses one) would otherwise send the tests to the other clone's files. It is
/// `CUSTODY_REPO` if set, else the nearest directory above the working directory (cargo runs
/// tests from their package's directory) that holds the workspace, else where this crate was
/// built.
pub fn repo() -> PathBuf {
    if let Some(d) = std::env::var_os("CUSTODY_REPO") {
        return PathBuf::from(d);
    }
    let is_root = |d: &Path| d.join("Cargo.toml").is_file() && d.join("e2e/oidc").is_dir();
    if let Ok(cwd) = std::env::current_dir() {
        if let Some(d) = cwd.ancestors().find(|d| is_root(d)) {
            return d.to_path_buf();
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e sits in the workspace").to_path_buf()
}

/// A built binary of the workspace.
pub fn bin(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("CUSTODY_BIN_DIR") {
        return PathBuf::from(d).join(name);
    }
    // Integration tests run from target/<profile>/deps, binaries (custody-jepsen,
    // custody-bench) from target/<profile>; the others sit in target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("exe dir");
    let dir = if here.ends_with("deps") { here.parent().expect("target dir") } else { here };
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built; run `cargo build --workspace --bins` first", p.display());
    p
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    pick_port(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> u16 {
    pick_port(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// Picks a port that `free` says is free now, below the kernel's ephemeral range, and never
/// the same one twice in this process.
///
/// A port that a test picks and then hands to a child process is free until the child
/// binds it. Picked from the ephemeral range, the kernel could give it meanwhile to any
/// outgoing connection or `bind(0)` (a relay, a client), and the child would fail to listen,
/// or a readiness probe would reach the wrong listener. Below that range only explicit binds
/// land, and this process hands each port out once.
fn pick_port(free: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse::<u32>().ok()))
        .unwrap_or(32768);
    const FLOOR: u32 = 10_000;
    if low < FLOOR + 2_000 {
        // No room below the ephemeral range: let the kernel choose.
        return TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
    }
    let span = low - FLOOR;
    // Spread concurrent test processes over the range.
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FLOOR + (start + n) % span) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free port between {FLOOR} and {low}");
}

/// Waits until something listens on `addr`.
pub fn wait_tcp(addr: SocketAddr, what: &str, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(st)) = proc.child.try_wait() {
            bail!("{what} exited ({st}) before listening; log:\n{}", proc.log_text());
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 60 s; log:\n{}", proc.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process, killed on drop, with its output in a log file.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Name for messages.
    pub name: String,
    /// Combined stdout/stderr.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with output to `dir/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        cmd.stdout(Stdio::from(f.try_clone()?)).stderr(Stdio::from(f));
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Self { child, name: name.into(), log })
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A throwaway PostgreSQL cluster.
pub struct Postgres {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Superuser the gateway logs in as.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Directory holding the data dir.
    pub dir: tempfile::TempDir,
    proc: Proc,
}

impl Postgres {
    /// initdb + start, as an unprivileged user when running as root. Tests run with
    /// `fsync=off`; their subject is the gateway, not PostgreSQL's durability.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&["fsync=off"])
    }

    /// As [`Postgres::start`], with server settings passed as `-c name=value`.
    pub fn start_with(settings: &[&str]) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let initdb = custody::dev::pg_binary("initdb").context("initdb not found")?;
        let postgres = custody::dev::pg_binary("postgres").context("postgres not found")?;
        let ids = if is_root() {
            Some(custody::dev::user_ids("postgres").or_else(|| custody::dev::user_ids("nobody")).context("no unprivileged user to run PostgreSQL")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("custody-pg-").tempdir_in("/tmp")?;
        let data = dir.path().join("data");
        let password = format!("gw-{}", std::process::id());
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, &password)?;
        if let Some((u, g)) = ids {
            for p in [dir.path(), pwfile.as_path()] {
                std::os::unix::fs::chown(p, Some(u), Some(g))?;
            }
        }
        let mut cmd = Command::new(initdb);
        cmd.arg("-D").arg(&data).args(["-U", "custody_gateway", "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-instructions"]);
        cmd.arg(format!("--pwfile={}", pwfile.display())).env("LC_ALL", "C.UTF-8");
        if let Some((u, g)) = ids {
            cmd.uid(u).gid(g).current_dir(dir.path());
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_port();
        let mut cmd = Command::new(postgres);
        cmd.arg("-D").arg(&data).args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "max_connections=200"]);
        for setting in settings {
            cmd.arg("-c").arg(setting);
        }
        if let Some((u, g)) = ids {
            cmd.uid(u).gid(g).current_dir(dir.path());
        }
        let mut proc = Proc::spawn("postgres", cmd, Path::new("/tmp"))?;
        proc.log = dir.path().join("postgres.log");
        wait_tcp(SocketAddr::from(([127, 0, 0, 1], port)), "postgres", &mut proc)?;
        let pg = Self { port, user: "custody_gateway".into(), password, dir, proc };
        // Accepting TCP is not yet accepting logins.
        let deadline = Instant::now() + Duration::from_secs(30);
        while pg.direct_sql("select 1").is_err() {
            if Instant::now() > deadline {
                bail!("postgres never accepted a login");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(pg)
    }

    /// Runs SQL directly (not through custody) and returns psql's unaligned output.
    pub fn direct_sql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", &self.user, "-d", "postgres", "-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()?;
        if !out.status.success() {
            bail!("direct psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Keeps the process handle alive in the struct.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

/// The `oidc-provider` test issuer.
pub struct Oidc {
    /// Issuer URL.
    pub issuer: String,
    /// Port it listens on (reuse it to restart with new keys).
    pub port: u16,
    proc: Proc,
}

impl Oidc {
    /// Starts it on a free port.
    pub fn start(logs: &Path) -> anyhow::Result<Self> {
        Self::start_on(logs, 0)
    }

    /// Starts it on `port` (0 for any).
    pub fn start_on(logs: &Path, port: u16) -> anyhow::Result<Self> {
        let dir = repo().join("e2e/oidc");
        anyhow::ensure!(dir.join("node_modules/oidc-provider").exists(), "run `npm ci` in e2e/oidc (the test command does)");
        let mut cmd = Command::new("node");
        cmd.arg("server.js").current_dir(&dir).env("PORT", port.to_string()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().context("starting node e2e/oidc/server.js")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(line.trim()).with_context(|| format!("oidc-provider said {line:?}"))?;
        let issuer = v["issuer"].as_str().context("no issuer")?.to_string();
        let port = issuer.rsplit(':').next().and_then(|p| p.parse().ok()).context("issuer port")?;
        Ok(Self { issuer, port, proc: Proc { child, name: "oidc".into(), log: logs.join("oidc.log") } })
    }

    /// A client-credentials access token for `client_id` and `resource`.
    pub async fn client_token(&self, client_id: &str, resource: &str) -> anyhow::Result<String> {
        let r: serde_json::Value = reqwest_post(
            &format!("{}/token", self.issuer),
            &[("grant_type", "client_credentials"), ("client_id", client_id), ("client_secret", "ci-secret"), ("resource", resource)],
        )
        .await?;
        Ok(r["access_token"].as_str().with_context(|| format!("no access_token in {r}"))?.to_string())
    }

    /// Stops it and starts a fresh provider, with a new signing key, at the same address.
    pub fn restart(&mut self, logs: &Path) -> anyhow::Result<()> {
        let port = self.port;
        self.proc.kill();
        *self = Self::start_on(logs, port)?;
        Ok(())
    }

    /// Stops it.
    pub fn stop(mut self) {
        self.proc.kill();
    }
}

async fn reqwest_post(url: &str, form: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
    let r = reqwest::Client::new().post(url).form(form).send().await?;
    let text = r.text().await?;
    serde_json::from_str(&text).with_context(|| format!("token endpoint said {text}"))
}

/// A ledger node process.
pub struct Ledger {
    /// gRPC (Append + Flight) address.
    pub grpc: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Data directory.
    pub data: PathBuf,
    logs: PathBuf,
    /// TOML added to its config file (none: flags only).
    extra: Option<String>,
    /// The process, if running.
    pub proc: Option<Proc>,
}

impl Ledger {
    /// Starts a ledger with data in `dir/ledger`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, None)
    }

    /// Starts a ledger from a config file holding `extra` (sections such as `[retention]`).
    pub fn start_with(dir: &Path, extra: Option<&str>) -> anyhow::Result<Self> {
        let mut l = Self {
            grpc: SocketAddr::from(([127, 0, 0, 1], free_port())),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data: dir.join("ledger"),
            logs: dir.to_path_buf(),
            extra: extra.map(str::to_string),
            proc: None,
        };
        l.restart()?;
        Ok(l)
    }

    /// (Re)starts the process on the same addresses and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin("custody-ledger"));
        match &self.extra {
            None => {
                cmd.args(["serve", "--data-dir"]).arg(&self.data).args(["--listen", &self.grpc.to_string(), "--http-listen", &self.http.to_string()]);
            }
            Some(extra) => {
                let path = self.logs.join("ledger.toml");
                let cfg = format!("data_dir = \"{}\"\nlisten = \"{}\"\nhttp_listen = \"{}\"\n{extra}\n", self.data.display(), self.grpc, self.http);
                custody::config::write_private(&path, cfg.as_bytes())?;
                cmd.args(["serve", "--config"]).arg(&path);
            }
        }
        let mut p = Proc::spawn("ledger", cmd, &self.logs)?;
        wait_tcp(self.grpc, "custody-ledger", &mut p)?;
        self.proc = Some(p);
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Flight URL.
    pub fn flight(&self) -> String {
        format!("grpc://{}", self.grpc)
    }
}

/// Options for a proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Accepted issuer.
    pub issuer: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Leeway for exp/nbf.
    pub leeway_secs: u64,
    /// Append deadline.
    pub append_timeout_ms: u64,
    /// Extra TOML appended (resources, policy).
    pub extra: String,
}

/// A proxy process.
pub struct Proxy {
    /// QUIC address.
    pub quic: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Certificate fingerprint.
    pub pin: String,
    /// Its config file.
    pub config: PathBuf,
    /// The process.
    pub proc: Proc,
}

/// TOML for a PostgreSQL resource pointing at `pg`.
pub fn pg_resource(name: &str, pg: &Postgres, dir: &Path, password: Option<&str>) -> anyhow::Result<String> {
    let pwfile = dir.join(format!("{name}.password"));
    custody::config::write_private(&pwfile, password.unwrap_or(&pg.password).as_bytes())?;
    Ok(format!(
        "\n[[resources]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\npassword_file = \"{}\"\n",
        pg.port,
        pg.user,
        pwfile.display()
    ))
}

impl Proxy {
    /// Starts a proxy in front of `ledger`.
    pub fn start(dir: &Path, ledger: &Ledger, o: &ProxyOptions) -> anyhow::Result<Self> {
        Self::start_with_ledgers(dir, &[ledger.grpc.to_string()], o)
    }

    /// SIGKILLs nothing; starts the proxy process again on the same config and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill();
        let dir = self.config.parent().context("config dir")?.to_path_buf();
        let mut cmd = Command::new(bin("custody-proxy"));
        cmd.args(["serve", "--config"]).arg(&self.config);
        let mut proc = Proc::spawn("proxy", cmd, &dir)?;
        wait_tcp(self.http, "custody-proxy", &mut proc)?;
        self.proc = proc;
        Ok(())
    }

    /// Starts a proxy that knows every ledger node in `ledgers` (host:port).
    pub fn start_with_ledgers(dir: &Path, ledgers: &[String], o: &ProxyOptions) -> anyhow::Result<Self> {
        let tls = dir.join("tls");
        let out = Command::new(bin("custody-proxy")).args(["gen-cert", "--dir"]).arg(&tls).output()?;
        anyhow::ensure!(out.status.success(), "gen-cert failed");
        let pin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let quic = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let auds: Vec<String> = o.audiences.iter().map(|a| format!("\"{a}\"")).collect();
        let cfg = format!(
            // `extra` may open with top-level keys, so it comes before the first table here.
            "proxy_id = \"test-proxy\"\nlisten = \"{quic}\"\nhttp_listen = \"{http}\"\nledger = [{}]\nappend_timeout_ms = {}\n{}\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[issuers]]\nissuer = \"{}\"\naudiences = [{}]\nleeway_secs = {}\n",
            ledgers.iter().map(|l| format!("\"http://{l}\"")).collect::<Vec<_>>().join(", "),
            o.append_timeout_ms,
            o.extra,
            tls.join("proxy.pem").display(),
            tls.join("proxy-key.pem").display(),
            o.issuer,
            auds.join(", "),
            o.leeway_secs,
        );
        let config = dir.join("proxy.toml");
        custody::config::write_private(&config, cfg.as_bytes())?;
        let mut cmd = Command::new(bin("custody-proxy"));
        cmd.args(["serve", "--config"]).arg(&config);
        let mut proc = Proc::spawn("proxy", cmd, dir)?;
        wait_tcp(http, "custody-proxy", &mut proc)?;
        Ok(Self { quic, http, pin, config, proc })
    }
}

/// A running `custody connect`.
pub struct Tunnel {
    /// Local port.
    pub port: u16,
    /// The process.
    pub proc: Proc,
}

/// Runs `custody` with an isolated home and the given token.
pub fn custody_cmd(home: &Path, token: Option<&str>) -> Command {
    let mut cmd = Command::new(bin("custody"));
    cmd.env("CUSTODY_HOME", home).env_remove("CUSTODY_TOKEN");
    if let Some(t) = token {
        cmd.env("CUSTODY_TOKEN", t);
    }
    cmd
}

impl Tunnel {
    /// Starts `custody connect RESOURCE` and waits for "listening on".
    pub fn start(dir: &Path, proxy: &Proxy, resource: &str, token: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, proxy, resource, custody_cmd(&dir.join("home"), Some(token)), &[])
    }

    /// As `start`, with a prepared command and extra arguments.
    pub fn start_with(dir: &Path, proxy: &Proxy, resource: &str, mut cmd: Command, extra: &[&str]) -> anyhow::Result<Self> {
        let port = free_port();
        cmd.args(["connect", resource, "--port", &port.to_string(), "--proxy", &proxy.quic.to_string(), "--pin", &proxy.pin, "--server-name", "localhost"]);
        cmd.args(extra);
        let mut proc = Proc::spawn(&format!("connect-{resource}-{port}"), cmd, dir)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = proc.log_text();
            if log.contains("listening on") {
                break;
            }
            if let Ok(Some(st)) = proc.child.try_wait() {
                bail!("custody connect exited ({st}):\n{log}");
            }
            if Instant::now() > deadline {
                bail!("custody connect did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { port, proc })
    }

    /// psql through the tunnel.
    pub fn psql(&self, args: &[&str]) -> Output {
        Command::new("psql")
            .args(["-X", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "someone", "-d", "postgres"])
            .args(args)
            .env_remove("PGPASSWORD")
            .output()
            .expect("running psql")
    }

    /// A tokio-postgres connection string for the tunnel.
    pub fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=someone dbname=postgres application_name=e2e", self.port)
    }
}

/// A whole stack: PostgreSQL, oidc-provider, ledger, proxy.
pub struct Stack {
    /// Scratch directory with every log.
    pub dir: tempfile::TempDir,
    /// PostgreSQL.
    pub pg: Postgres,
    /// OpenID provider.
    pub oidc: Oidc,
    /// Ledger.
    pub ledger: Ledger,
    /// Proxy.
    pub proxy: Proxy,
}

/// The policy and resources most tests use: group `dba` reaches `pg`.
pub fn default_extra(pg: &Postgres, dir: &Path) -> anyhow::Result<String> {
    let mut s = pg_resource("pg", pg, dir, None)?;
    s.push_str(&pg_resource("pg-badcred", pg, dir, Some("not-the-password"))?);
    s.push_str("\n[policy.groups]\ndba = [\"pg\", \"pg-badcred\"]\n");
    Ok(s)
}

impl Stack {
    /// Starts everything with the default policy.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(|_, _| Ok(String::new()), 5000)
    }

    /// Starts everything; `extra` adds TOML to the proxy config.
    pub fn start_with(extra: impl Fn(&Postgres, &Path) -> anyhow::Result<String>, append_timeout_ms: u64) -> anyhow::Result<Self> {
        Self::start_full(extra, append_timeout_ms, |_| None)
    }

    /// Starts everything; `ledger_extra` (given the test directory) adds TOML to the
    /// ledger's config.
    pub fn start_full(
        extra: impl Fn(&Postgres, &Path) -> anyhow::Result<String>,
        append_timeout_ms: u64,
        ledger_extra: impl Fn(&Path) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("custody-e2e-").tempdir()?;
        let pg = Postgres::start()?;
        let oidc = Oidc::start(dir.path())?;
        let ledger = Ledger::start_with(dir.path(), ledger_extra(dir.path()).as_deref())?;
        let mut more = default_extra(&pg, dir.path())?;
        more.push_str(&extra(&pg, dir.path())?);
        let proxy = Proxy::start(
            dir.path(),
            &ledger,
            &ProxyOptions {
                issuer: oidc.issuer.clone(),
                audiences: vec!["urn:custody".into()],
                leeway_secs: 0,
                append_timeout_ms,
                extra: more,
            },
        )?;
        Ok(Self { dir, pg, oidc, ledger, proxy })
    }

    /// A client-credentials token for `ci-client` (groups ci, dba).
    pub async fn token(&self) -> String {
        self.oidc.client_token("ci-client", "urn:custody").await.expect("token")
    }

    /// Opens a tunnel to `resource` with `token`.
    pub fn tunnel(&self, resource: &str, token: &str) -> Tunnel {
        Tunnel::start(self.dir.path(), &self.proxy, resource, token).expect("custody connect")
    }

    /// Runs the Python checker (pyarrow) with `args`; returns stdout on success.
    pub fn python(&self, script: &str, args: &[&str]) -> anyhow::Result<String> {
        let py = python();
        let out = Command::new(&py).arg(repo().join("e2e/py").join(script)).args(args).output()
            .with_context(|| format!("running {} (the test command creates .venv)", py.display()))?;
        if !out.status.success() {
            bail!("{script} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }
}

/// The Python with pyarrow: `$CUSTODY_PYTHON`, else `<repo>/.venv/bin/python`.
pub fn python() -> PathBuf {
    std::env::var_os("CUSTODY_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// A PostgreSQL client speaking raw frames, for behaviour no driver exposes.
pub mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use bytes::BytesMut;
    use custody_proto::pg::{decode_frame, startup_message, Backend, Frame, Side};

    /// A frame with a type byte.
    pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Parse.
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(sql.as_bytes());
        b.push(0);
        b.extend_from_slice(&[0, 0]);
        msg(b'P', &b)
    }

    /// Bind with text parameters.
    pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(portal.as_bytes());
        b.push(0);
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&[0, 0]);
        msg(b'B', &b)
    }

    /// Execute all rows.
    pub fn execute(portal: &str) -> Vec<u8> {
        let mut b = portal.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(&[0, 0, 0, 0]);
        msg(b'E', &b)
    }

    /// Sync.
    pub fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }

    /// Flush.
    pub fn flush() -> Vec<u8> {
        msg(b'H', b"")
    }

    /// Simple query.
    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = sql.as_bytes().to_vec();
        b.push(0);
        msg(b'Q', &b)
    }

    /// A raw connection through a tunnel.
    pub struct RawPg {
        /// The socket.
        pub s: TcpStream,
        buf: BytesMut,
    }

    impl RawPg {
        /// Connects and completes startup (through ReadyForQuery).
        pub fn connect(port: u16) -> anyhow::Result<Self> {
            let s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut c = Self { s, buf: BytesMut::new() };
            c.send(&startup_message(&[("user", "raw"), ("database", "postgres")]))?;
            c.until(|f| f.tag() == b'Z')?;
            Ok(c)
        }

        /// Writes bytes.
        pub fn send(&mut self, b: &[u8]) -> anyhow::Result<()> {
            self.s.write_all(b)?;
            Ok(())
        }

        /// Reads one frame; `None` at EOF.
        pub fn next(&mut self) -> anyhow::Result<Option<Frame>> {
            loop {
                if let Some(f) = decode_frame(&mut self.buf, Side::Backend, 1 << 30)? {
                    return Ok(Some(f));
                }
                let mut chunk = [0u8; 65536];
                let n = self.s.read(&mut chunk)?;
                if n == 0 {
                    return Ok(None);
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        /// Reads frames up to and including the first one `stop` accepts.
        pub fn until(&mut self, stop: impl Fn(&Frame) -> bool) -> anyhow::Result<Vec<Frame>> {
            let mut out = Vec::new();
            loop {
                let f = self.next()?.ok_or_else(|| anyhow::anyhow!("EOF after {:?}", tags(&out)))?;
                let done = stop(&f);
                out.push(f);
                if done {
                    return Ok(out);
                }
            }
        }
    }

    /// The type bytes of frames, as a string.
    pub fn tags(frames: &[Frame]) -> String {
        frames.iter().map(|f| f.tag() as char).collect()
    }

    /// (severity, sqlstate, message) of an ErrorResponse frame.
    pub fn error_of(f: &Frame) -> Option<(String, String, String)> {
        match Backend::parse(f).ok()? {
            Backend::ErrorResponse(e) => Some((e.get(b'V').or_else(|| e.get(b'S')).unwrap_or_default(), e.get(b'C').unwrap_or_default(), e.get(b'M').unwrap_or_default())),
            _ => None,
        }
    }
}

/// A tokio runtime for the async bits of a sync test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Runs `custody events` with JSON output and returns the rows.
pub fn events_json(home: &Path, flight: &str, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = custody_cmd(home, None).args(["events", "--format", "json", "--flight", flight]).args(args).output()?;
    if !out.status.success() {
        bail!("custody events failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(Into::into))
        .collect()
}
