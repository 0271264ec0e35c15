//! `custody-bench pg`: pgbench -S -M prepared through four paths to one PostgreSQL server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use custody_e2e::{free_port, http_get, pg_resource, wait_tcp, Ledger, Oidc, Postgres, Proc, Proxy, ProxyOptions, Tunnel};

use crate::{machine, results_file, run_ok, write_section};

/// Options for the PostgreSQL benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// pgbench client counts, each run against every path.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    clients: Vec<u32>,
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// pgbench scale factor (100 000 accounts per unit).
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Idle sessions opened through the proxy to measure memory per session.
    #[arg(long, default_value_t = 100)]
    idle_sessions: usize,
    /// Print the table without writing bench/RESULTS.md.
    #[arg(long)]
    no_write: bool,
    /// Only these paths (direct, pgbouncer, pgaudit, custody), for profiling one of them;
    /// implies --no-write.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path4 {
    Direct,
    Pgbouncer,
    Pgaudit,
    Custody,
}

impl Path4 {
    const ALL: [Path4; 4] = [Path4::Direct, Path4::Pgbouncer, Path4::Pgaudit, Path4::Custody];

    fn name(self) -> &'static str {
        match self {
            Path4::Direct => "PostgreSQL direct",
            Path4::Pgbouncer => "pgbouncer (session pooling)",
            Path4::Pgaudit => "pgaudit (pgaudit.log = all)",
            Path4::Custody => "custody (QUIC tunnel + proxy + ledger)",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Path4::Direct => "direct",
            Path4::Pgbouncer => "pgbouncer",
            Path4::Pgaudit => "pgaudit",
            Path4::Custody => "custody",
        }
    }
}

/// One pgbench run's figures.
struct Run {
    tps: f64,
    transactions: u64,
    failed: u64,
    avg_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Where pgbench connects, and as whom.
struct Target {
    port: u16,
    user: String,
    password: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!a.clients.is_empty(), "--clients needs at least one count");
    let dir = tempfile::Builder::new().prefix("custody-bench-").tempdir_in("/tmp")?;
    let d = dir.path();
    eprintln!("bench: scratch directory {}", d.display());

    // One server for every path. Default durability (fsync on); pgaudit loaded but only
    // active for the role `audited`, so the other paths pay nothing for it.
    let pg = Postgres::start_with(&["shared_preload_libraries=pgaudit", "max_connections=300", "shared_buffers=256MB"])?;
    let pg_version = pg.direct_sql("show server_version")?;
    eprintln!("bench: PostgreSQL {pg_version} on port {}; pgbench -i -s {}", pg.port, a.scale);
    run_ok(
        Command::new("pgbench").args(["-i", "-q", "-s", &a.scale.to_string(), "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", &pg.user, "postgres"]).env("PGPASSWORD", &pg.password),
        "pgbench -i",
    )?;
    pg.direct_sql(
        "create extension if not exists pgaudit; \
         create role audited login password 'audited'; \
         grant select on all tables in schema public to audited; \
         alter role audited set pgaudit.log = 'all'; \
         alter role audited set pgaudit.log_parameter = on",
    )?;

    let bouncer = Pgbouncer::start(d, &pg)?;
    let pgb_version = run_ok(Command::new("pgbouncer").arg("--version"), "pgbouncer --version")?.lines().next().unwrap_or("").to_string();

    let rt = custody_e2e::rt();
    let oidc = Oidc::start(d)?;
    let ledger = Ledger::start(d)?;
    let mut extra = pg_resource("pg", &pg, d, None)?;
    extra.push_str("\n[policy.groups]\ndba = [\"pg\"]\n");
    let proxy = Proxy::start(
        d,
        &ledger,
        &ProxyOptions { issuer: oidc.issuer.clone(), audiences: vec!["urn:custody".into()], leeway_secs: 5, append_timeout_ms: 5000, extra },
    )?;

    let direct = Target { port: pg.port, user: pg.user.clone(), password: Some(pg.password.clone()) };
    let via_bouncer = Target { port: bouncer.port, user: pg.user.clone(), password: Some(pg.password.clone()) };
    let audited = Target { port: pg.port, user: "audited".into(), password: Some("audited".into()) };

    let mut rows: Vec<(u32, Path4, Run)> = Vec::new();
    let mut ledger_notes = Vec::new();
    for &c in &a.clients {
        for path in Path4::ALL {
            if !a.only.is_empty() && !a.only.iter().any(|o| o == path.slug()) {
                continue;
            }
            let prefix = d.join(format!("log-{}-{c}", path.slug()));
            let r = if path == Path4::Custody {
                // A fresh token per run: the provider's tokens live ten minutes.
                let token = rt.block_on(oidc.client_token("ci-client", "urn:custody"))?;
                let tunnel = Tunnel::start(d, &proxy, "pg", &token)?;
                let before = ledger_metrics(&ledger)?;
                let t = Target { port: tunnel.port, user: "bench".into(), password: None };
                let r = pgbench(&t, c, a.seconds, &prefix)?;
                let after = ledger_metrics(&ledger)?;
                ledger_notes.push(LedgerDelta::between(c, &before, &after, r.transactions));
                drop(tunnel);
                r
            } else {
                let t = match path {
                    Path4::Direct => &direct,
                    Path4::Pgbouncer => &via_bouncer,
                    _ => &audited,
                };
                pgbench(t, c, a.seconds, &prefix)?
            };
            eprintln!(
                "bench: {c:>3} clients  {:<40} {:>9.0} tps  avg {:.3} ms  p99 {:.3} ms  failed {}",
                path.name(),
                r.tps,
                r.avg_ms,
                r.p99_ms,
                r.failed
            );
            rows.push((c, path, r));
        }
    }

    let token = rt.block_on(oidc.client_token("ci-client", "urn:custody"))?;
    let tunnel = Tunnel::start(d, &proxy, "pg", &token)?;
    let per_session = proxy_memory_per_session(&proxy, &tunnel, a.idle_sessions)?;
    drop(tunnel);

    let table = render(&a, &rows, &ledger_notes, per_session, &pg_version, &pgb_version);
    println!("{table}");
    if !a.no_write && a.only.is_empty() {
        write_section(&results_file(), "pg", &table)?;
        eprintln!("bench: wrote {}", results_file().display());
    }
    Ok(())
}

fn pgbench(t: &Target, clients: u32, seconds: u32, log_prefix: &Path) -> anyhow::Result<Run> {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-n", "-S", "-M", "prepared", "-c", &clients.to_string(), "-j", "2", "-T", &seconds.to_string()])
        .args(["-h", "127.0.0.1", "-p", &t.port.to_string(), "-U", &t.user, "-l", "--log-prefix"])
        .arg(log_prefix)
        .arg("postgres")
        .current_dir(log_prefix.parent().context("log dir")?)
        .env_remove("PGPASSWORD");
    if let Some(p) = &t.password {
        cmd.env("PGPASSWORD", p);
    }
    let out = run_ok(&mut cmd, "pgbench")?;
    let field = |key: &str| -> Option<String> {
        out.lines().find(|l| l.trim_start().starts_with(key)).and_then(|l| l.split_once(key)).map(|(_, v)| v.trim().to_string())
    };
    let tps: f64 = field("tps =")
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .with_context(|| format!("no tps in pgbench output:\n{out}"))?;
    let transactions: u64 = field("number of transactions actually processed:")
        .and_then(|v| v.split('/').next().and_then(|n| n.trim().parse().ok()))
        .with_context(|| format!("no transaction count in pgbench output:\n{out}"))?;
    let failed: u64 = field("number of failed transactions:").and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok())).unwrap_or(0);
    let mut lat = read_latencies(log_prefix)?;
    if lat.is_empty() {
        bail!("pgbench wrote no per-transaction log at {}*", log_prefix.display());
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0;
    let avg_ms = lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0;
    Ok(Run { tps, transactions, failed, avg_ms, p50_ms: pct(0.50), p99_ms: pct(0.99) })
}

/// Per-transaction latencies (µs, the third column) from every `PREFIX.*` log file.
fn read_latencies(prefix: &Path) -> anyhow::Result<Vec<u64>> {
    let dir = prefix.parent().context("log dir")?;
    let stem = prefix.file_name().context("log prefix")?.to_string_lossy().into_owned() + ".";
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_name().to_string_lossy().starts_with(&stem) {
            continue;
        }
        for line in std::fs::read_to_string(e.path())?.lines() {
            if let Some(us) = line.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                out.push(us);
            }
        }
    }
    Ok(out)
}

/// pgbouncer in session pooling in front of `pg`, run as PostgreSQL's unprivileged user
/// (pgbouncer refuses to run as root).
struct Pgbouncer {
    port: u16,
    _proc: Proc,
}

impl Pgbouncer {
    fn start(d: &Path, pg: &Postgres) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let bin = which("pgbouncer").context("pgbouncer is not installed (apt install pgbouncer)")?;
        let dir = d.join("pgbouncer");
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        let userlist = dir.join("userlist.txt");
        custody::config::write_private(&userlist, format!("\"{}\" \"{}\"\n", pg.user, pg.password).as_bytes())?;
        let ini = dir.join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {}\npool_mode = session\nmax_client_conn = 400\ndefault_pool_size = 100\nignore_startup_parameters = extra_float_digits\nlogfile = {}\n",
                pg.port,
                userlist.display(),
                dir.join("pgbouncer.log").display()
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg(&ini);
        if running_as_root() {
            let (u, g) = custody::dev::user_ids("postgres").or_else(|| custody::dev::user_ids("nobody")).context("no unprivileged user for pgbouncer")?;
            for p in [dir.as_path(), userlist.as_path(), ini.as_path()] {
                std::os::unix::fs::chown(p, Some(u), Some(g))?;
            }
            cmd.uid(u).gid(g);
        }
        let mut proc = Proc::spawn("pgbouncer", cmd, d)?;
        wait_tcp(([127, 0, 0, 1], port).into(), "pgbouncer", &mut proc)?;
        Ok(Self { port, _proc: proc })
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]).map(|d| d.join(name)).find(|p| p.is_file())
}

/// What the ledger's /metrics said: events stored, append latency and batch size sums.
#[derive(Default)]
struct LedgerMetrics {
    events: f64,
    latency_sum: f64,
    latency_count: f64,
    batch_sum: f64,
    batch_count: f64,
}

fn ledger_metrics(l: &Ledger) -> anyhow::Result<LedgerMetrics> {
    let text = http_get(l.http, "/metrics")?;
    let get = |name: &str| -> f64 {
        let name = format!("custody_ledger_{name}");
        text.lines()
            .find(|line| line.split_whitespace().next() == Some(name.as_str()))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    Ok(LedgerMetrics {
        events: get("events_appended_total"),
        latency_sum: get("append_latency_seconds_sum"),
        latency_count: get("append_latency_seconds_count"),
        batch_sum: get("batch_size_events_sum"),
        batch_count: get("batch_size_events_count"),
    })
}

struct LedgerDelta {
    clients: u32,
    events_per_tx: f64,
    mean_batch: f64,
    mean_append_ms: f64,
    appends_per_tx: f64,
}

impl LedgerDelta {
    fn between(clients: u32, a: &LedgerMetrics, b: &LedgerMetrics, transactions: u64) -> Self {
        let tx = transactions.max(1) as f64;
        let commits = (b.batch_count - a.batch_count).max(1.0);
        let appends = (b.latency_count - a.latency_count).max(1.0);
        Self {
            clients,
            events_per_tx: (b.events - a.events) / tx,
            mean_batch: (b.batch_sum - a.batch_sum) / commits,
            mean_append_ms: (b.latency_sum - a.latency_sum) / appends * 1000.0,
            appends_per_tx: appends / tx,
        }
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .context("no VmRSS")
}

/// Opens `n` sessions through the tunnel, each past ReadyForQuery, and divides the proxy's
/// resident-memory growth by `n`.
fn proxy_memory_per_session(proxy: &Proxy, tunnel: &Tunnel, n: usize) -> anyhow::Result<(usize, f64)> {
    let pid = proxy.proc.child.id();
    // One session first, so that one-time allocations are not charged to the others.
    let warm = custody_e2e::raw::RawPg::connect(tunnel.port)?;
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(custody_e2e::raw::RawPg::connect(tunnel.port)?);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(pid)?;
    drop(held);
    drop(warm);
    Ok((n, after.saturating_sub(before) as f64 / n as f64))
}

fn render(a: &Args, rows: &[(u32, Path4, Run)], ledger: &[LedgerDelta], mem: (usize, f64), pg_version: &str, pgb: &str) -> String {
    let mut s = String::new();
    let clients: Vec<String> = a.clients.iter().map(u32::to_string).collect();
    s.push_str("## PostgreSQL: `pgbench -S -M prepared`, four paths to one server (issue 2)\n\n");
    s.push_str(&format!(
        "Command: `bench/run pg --clients {} --seconds {} --scale {}` (release build)  \n",
        clients.join(","),
        a.seconds,
        a.scale
    ));
    s.push_str(&format!(
        "Machine: {}; PostgreSQL {pg_version}; {pgb}; everything on loopback; each row is one {} s pgbench run with `-j 2`.\n\n",
        machine(),
        a.seconds
    ));
    s.push_str("| clients | path | TPS | avg ms | p50 ms | p99 ms | failed | TPS vs direct |\n|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for (c, path, r) in rows {
        let direct = rows.iter().find(|(c2, p2, _)| c2 == c && *p2 == Path4::Direct).map(|(_, _, r)| r.tps).unwrap_or(f64::NAN);
        s.push_str(&format!(
            "| {c} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {:.2} |\n",
            path.name(),
            r.tps,
            r.avg_ms,
            r.p50_ms,
            r.p99_ms,
            r.failed,
            r.tps / direct
        ));
    }
    s.push_str("\nThe custody ledger during the custody runs (from its /metrics):\n\n| clients | events per transaction | appends per transaction | mean group commit (events) | mean append latency ms |\n|---:|---:|---:|---:|---:|\n");
    for l in ledger {
        s.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.3} |\n",
            l.clients, l.events_per_tx, l.appends_per_tx, l.mean_batch, l.mean_append_ms
        ));
    }
    s.push_str(&format!(
        "\nProxy memory per open session: {:.0} KiB (resident-set growth of `custody-proxy` with {} idle sessions open past ReadyForQuery).\n",
        mem.1, mem.0
    ));
    s
}
