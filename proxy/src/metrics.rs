//! Prometheus metrics of a proxy, served at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The proxy's metrics.
pub struct ProxyMetrics {
    registry: Registry,
    /// Sessions open now.
    pub sessions_active: Gauge,
    /// Sessions accepted since start.
    pub sessions_total: Counter,
    /// Streams refused for a bad or missing token.
    pub auth_failures: Counter,
    /// Streams refused by policy.
    pub policy_denials: Counter,
    /// Statements refused because the ledger missed its deadline.
    pub refused_ledger: Counter,
    /// Failed appends (each may be retried).
    pub ledger_failures: Counter,
}

impl ProxyMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("custody_proxy");
        let m = Self {
            sessions_active: Gauge::default(),
            sessions_total: Counter::default(),
            auth_failures: Counter::default(),
            policy_denials: Counter::default(),
            refused_ledger: Counter::default(),
            ledger_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("sessions_active", "Sessions open now", m.sessions_active.clone());
        registry.register("sessions", "Sessions accepted", m.sessions_total.clone());
        registry.register("auth_failures", "Streams refused for a bad or missing token", m.auth_failures.clone());
        registry.register("policy_denials", "Streams refused by policy", m.policy_denials.clone());
        registry.register("refused_ledger_unavailable", "Statements refused because the ledger was unavailable", m.refused_ledger.clone());
        registry.register("ledger_append_failures", "Ledger appends that failed", m.ledger_failures.clone());
        Self { registry, ..m }
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
