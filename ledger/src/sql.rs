//! Flight SQL over the ledger, planned and run by DataFusion.
//!
//! Two tables, `events` and `sessions`, with the schemas of the Flight tables of the same
//! name ([`crate::table`]). Their [`LedgerTable`] provider turns the filters DataFusion pushes
//! down into a [`TicketQuery`], so that the ledger's own indexes do the selecting: a session id
//! walks the `by_session` index, a commit-time range becomes an index range by binary search,
//! and `index >= N` starts the walk there. Every pushed filter is reported as *inexact*, so
//! DataFusion still applies it to the rows returned: a pushed filter can only narrow the scan,
//! never change the answer.
//!
//! Statements are stateless: the statement handle in a ticket is the SQL text itself, so any
//! node can run any ticket (as with the JSON tickets).

use std::pin::Pin;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
    CommandGetSqlInfo, CommandPreparedStatementQuery, CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::flight::LedgerFlight;
use crate::scan::{scan, ScanError};
use crate::table::{events_schema, sessions_schema, Table, TicketQuery, TimeArg};

/// The authenticated reader of a Flight SQL request (set by `LedgerFlight`).
#[derive(Debug, Clone)]
pub struct Reader(pub custody_proto::Identity);

/// Longest SQL text accepted.
pub const MAX_SQL: usize = 64 * 1024;

/// The Flight SQL half of the ledger's Flight service.
#[derive(Clone)]
pub struct LedgerSql {
    flight: LedgerFlight,
    info: Arc<SqlInfoData>,
}

impl LedgerSql {
    /// Flight SQL over the same store and read rules as `flight`.
    pub fn new(flight: LedgerFlight) -> Result<Self, FlightError> {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "custody-ledger");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        Ok(Self { flight, info: Arc::new(b.build()?) })
    }

    /// A DataFusion context with the ledger's tables.
    fn context(&self) -> Result<SessionContext, Status> {
        let cfg = SessionConfig::new().with_information_schema(true).with_default_catalog_and_schema("custody", "audit");
        let ctx = SessionContext::new_with_config(cfg);
        for t in [Table::Events, Table::Sessions] {
            let name = if t == Table::Events { "events" } else { "sessions" };
            ctx.register_table(name, Arc::new(LedgerTable { table: t, flight: self.flight.clone() })).map_err(df_status)?;
        }
        Ok(ctx)
    }

    /// Plans `sql` (after a read barrier): its DataFrame.
    async fn plan(&self, sql: &str) -> Result<datafusion::dataframe::DataFrame, Status> {
        if sql.len() > MAX_SQL {
            return Err(Status::invalid_argument(format!("SQL of {} bytes exceeds {MAX_SQL}", sql.len())));
        }
        let ctx = self.context()?;
        // Read-only: DDL, DML and statements such as SET are refused before anything runs.
        let options = datafusion::execution::context::SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
        ctx.sql_with_options(sql, options).await.map_err(df_status)
    }

    fn info_for(&self, sql: &str, schema: &SchemaRef, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        let ticket = TicketStatementQuery { statement_handle: sql.as_bytes().to_vec().into() };
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
        FlightInfo::new()
            .try_with_schema(schema.as_ref())
            .map_err(|e| Status::internal(e.to_string()))
            .map(|i| i.with_endpoint(endpoint).with_descriptor(descriptor).with_ordered(true))
    }

    async fn execute(&self, sql: &str) -> Result<Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>, Status> {
        let df = self.plan(sql).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        tracing::info!(sql = %truncate(sql, 512), "flight sql query");
        let stream = df.execute_stream().await.map_err(df_status)?;
        let batches = stream.map_err(|e| FlightError::Tonic(Box::new(df_status(e))));
        let encoded = FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(|e| match e {
            FlightError::Tonic(s) => *s,
            other => Status::internal(other.to_string()),
        });
        Ok(Response::new(Box::pin(encoded) as Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send>>))
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// DataFusion errors as Flight statuses a client can act on: the query's own faults are
/// INVALID_ARGUMENT with DataFusion's message (which names the unknown table or column).
pub fn df_status(e: DataFusionError) -> Status {
    match e {
        DataFusionError::SQL(..) | DataFusionError::Plan(_) | DataFusionError::SchemaError(..) | DataFusionError::NotImplemented(_) => {
            Status::invalid_argument(format!("SQL error: {e}"))
        }
        DataFusionError::External(inner) => match inner.downcast::<ScanStatus>() {
            Ok(s) => s.0,
            Err(other) => Status::internal(other.to_string()),
        },
        DataFusionError::Context(ctx, inner) => {
            let s = df_status(*inner);
            Status::new(s.code(), format!("{ctx}: {}", s.message()))
        }
        other => Status::internal(other.to_string()),
    }
}

/// A Flight status carried through DataFusion as an external error.
#[derive(Debug)]
struct ScanStatus(Status);
impl std::fmt::Display for ScanStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.message())
    }
}
impl std::error::Error for ScanStatus {}

/// One of the ledger's tables as a DataFusion table.
#[derive(Debug, Clone)]
pub struct LedgerTable {
    table: Table,
    flight: LedgerFlight,
}

/// The column and literal of `col OP lit` (or `lit OP col`, with the operator turned round).
fn column_op_literal(e: &Expr) -> Option<(&str, Operator, &ScalarValue)> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else { return None };
    match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) => Some((c.name.as_str(), *op, v)),
        (Expr::Literal(v, _), Expr::Column(c)) => Some((c.name.as_str(), op.swap()?, v)),
        _ => None,
    }
}

fn string_of(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => Some(s.clone()),
        _ => None,
    }
}

fn nanos_of(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampNanosecond(Some(n), _) => Some(*n),
        ScalarValue::TimestampMicrosecond(Some(n), _) => n.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(n), _) => n.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(n), _) => n.checked_mul(1_000_000_000),
        _ => None,
    }
}

fn u64_of(v: &ScalarValue) -> Option<u64> {
    match v {
        ScalarValue::UInt64(Some(n)) => Some(*n),
        ScalarValue::Int64(Some(n)) => u64::try_from(*n).ok(),
        ScalarValue::UInt32(Some(n)) => Some(u64::from(*n)),
        ScalarValue::Int32(Some(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// Folds one filter into `q` if the ledger can use it to narrow the scan. Returns whether
/// it did.
pub fn push_filter(table: Table, q: &mut TicketQuery, e: &Expr) -> bool {
    let Some((col, op, v)) = column_op_literal(e) else { return false };
    let eq = op == Operator::Eq;
    match (table, col) {
        (_, "session_id") if eq => string_of(v).map(|s| q.session_id = Some(s)).is_some(),
        (_, "resource") if eq => string_of(v).map(|s| q.resource = Some(s)).is_some(),
        (_, "subject" | "email") if eq => string_of(v).map(|s| q.identity = Some(s)).is_some(),
        (Table::Events, "kind") if eq => match string_of(v) {
            Some(k) if crate::table::kind_from_name(&k).is_some() => {
                q.kind = Some(k);
                true
            }
            _ => false,
        },
        (Table::Events, "commit_time") => {
            let Some(t) = nanos_of(v) else { return false };
            // [since, until) on commit time; keep the tightest of several bounds.
            let (lo, hi) = match op {
                Operator::Gt => (t.checked_add(1), None),
                Operator::GtEq => (Some(t), None),
                Operator::Lt => (None, Some(t)),
                Operator::LtEq => (None, t.checked_add(1)),
                Operator::Eq => (Some(t), t.checked_add(1)),
                _ => return false,
            };
            let (since, until) = q.time_range().unwrap_or((i64::MIN, i64::MAX));
            if let Some(lo) = lo {
                q.since = Some(TimeArg::Nanos(lo.max(since)));
            }
            if let Some(hi) = hi {
                q.until = Some(TimeArg::Nanos(hi.min(until)));
            }
            lo.is_some() || hi.is_some()
        }
        (Table::Events, "index") => {
            let Some(n) = u64_of(v) else { return false };
            let from = match op {
                Operator::Gt => n.checked_add(1),
                Operator::GtEq | Operator::Eq => Some(n),
                _ => None,
            };
            match from {
                Some(f) => {
                    q.from_index = Some(q.from_index.map_or(f, |old| old.max(f)));
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

#[tonic::async_trait]
impl TableProvider for LedgerTable {
    fn schema(&self) -> SchemaRef {
        if self.table == Table::Sessions {
            sessions_schema()
        } else {
            events_schema()
        }
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                let mut probe = TicketQuery::default();
                if push_filter(self.table, &mut probe, f) {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(&self, _state: &dyn Session, projection: Option<&Vec<usize>>, filters: &[Expr], limit: Option<usize>) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let mut q = TicketQuery { table: self.table, ..Default::default() };
        for f in filters {
            push_filter(self.table, &mut q, f);
        }
        // A limit may cut the scan only when nothing is left for DataFusion to filter.
        if filters.is_empty() {
            q.limit = limit.map(|l| l as u64);
        }
        tracing::debug!(table = ?self.table, ?q, "flight sql scan");
        let part = LedgerPartition { schema: self.schema(), q, flight: self.flight.clone() };
        let exec = StreamingTableExec::try_new(self.schema(), vec![Arc::new(part)], projection, Vec::new(), false, limit)?;
        Ok(Arc::new(exec))
    }
}

/// The rows of one ticket query, produced by the ledger's scan on a blocking thread.
#[derive(Debug)]
struct LedgerPartition {
    schema: SchemaRef,
    q: TicketQuery,
    flight: LedgerFlight,
}

impl PartitionStream for LedgerPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (tx, rx) = tokio::sync::mpsc::channel::<datafusion::error::Result<arrow::array::RecordBatch>>(2);
        let flight = self.flight.clone();
        let q = self.q.clone();
        tokio::spawn(async move {
            if let Err(s) = flight.read_barrier_for_sql().await {
                let _ = tx.send(Err(DataFusionError::External(Box::new(ScanStatus(s))))).await;
                return;
            }
            let (store, size, damage) = match flight.scan_inputs() {
                Ok(x) => x,
                Err(s) => {
                    let _ = tx.send(Err(DataFusionError::External(Box::new(ScanStatus(s))))).await;
                    return;
                }
            };
            let _ = tokio::task::spawn_blocking(move || {
                let r = scan(&store, size, &q, damage.as_ref(), |b| tx.blocking_send(Ok(b)).is_ok());
                if let Err(e) = r {
                    let status = match &e {
                        ScanError::Corrupt { .. } | ScanError::Damaged(_) => Status::data_loss(e.to_string()),
                        ScanError::Store(_) => Status::internal(e.to_string()),
                    };
                    let _ = tx.blocking_send(Err(DataFusionError::External(Box::new(ScanStatus(status)))));
                }
            })
            .await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

#[tonic::async_trait]
impl FlightSqlService for LedgerSql {
    type FlightService = LedgerSql;

    async fn get_flight_info_statement(&self, query: CommandStatementQuery, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let df = self.plan(&query.query).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        Ok(Response::new(self.info_for(&query.query, &schema, request.into_inner())?))
    }

    async fn do_get_statement(&self, ticket: TicketStatementQuery, request: Request<Ticket>) -> Result<Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>, Status> {
        let sql = String::from_utf8(ticket.statement_handle.to_vec()).map_err(|_| Status::invalid_argument("the statement handle is not UTF-8 SQL"))?;
        self.flight.record_query(request.extensions().get::<Reader>().map(|r| &r.0), "sql", &sql).await?;
        self.execute(&sql).await
    }

    async fn do_action_create_prepared_statement(&self, query: ActionCreatePreparedStatementRequest, _request: Request<arrow_flight::Action>) -> Result<ActionCreatePreparedStatementResult, Status> {
        let df = self.plan(&query.query).await?;
        let schema = df.schema().as_arrow().clone();
        let message: IpcMessage = SchemaAsIpc::new(&schema, &IpcWriteOptions::default()).try_into().map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        let IpcMessage(schema_bytes) = message;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: schema_bytes,
            parameter_schema: Default::default(),
        })
    }

    async fn do_action_close_prepared_statement(&self, _query: ActionClosePreparedStatementRequest, _request: Request<arrow_flight::Action>) -> Result<(), Status> {
        Ok(())
    }

    async fn get_flight_info_prepared_statement(&self, cmd: CommandPreparedStatementQuery, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let sql = String::from_utf8(cmd.prepared_statement_handle.to_vec()).map_err(|_| Status::invalid_argument("the prepared statement handle is not UTF-8 SQL"))?;
        let df = self.plan(&sql).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        Ok(Response::new(self.info_for(&sql, &schema, request.into_inner())?))
    }

    async fn do_get_prepared_statement(&self, cmd: CommandPreparedStatementQuery, request: Request<Ticket>) -> Result<Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>, Status> {
        let sql = String::from_utf8(cmd.prepared_statement_handle.to_vec()).map_err(|_| Status::invalid_argument("the prepared statement handle is not UTF-8 SQL"))?;
        self.flight.record_query(request.extensions().get::<Reader>().map(|r| &r.0), "sql", &sql).await?;
        self.execute(&sql).await
    }

    async fn get_flight_info_sql_info(&self, query: CommandGetSqlInfo, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(query.as_any().encode_to_vec()));
        let info = FlightInfo::new()
            .try_with_schema(query.into_builder(&self.info).schema().as_ref())
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(endpoint)
            .with_descriptor(request.into_inner());
        Ok(Response::new(info))
    }

    async fn do_get_sql_info(&self, query: CommandGetSqlInfo, _request: Request<Ticket>) -> Result<Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>, Status> {
        let batch = query.into_builder(&self.info).build().map_err(|e| Status::internal(e.to_string()))?;
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(batch.schema())
            .build(futures::stream::once(async { Ok(batch) }))
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn do_get_fallback(&self, _request: Request<Ticket>, message: Any) -> Result<Response<<Self as arrow_flight::flight_service_server::FlightService>::DoGetStream>, Status> {
        Err(Status::unimplemented(format!("this ledger does not serve Flight SQL {}", message.type_url)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col, lit};

    #[test]
    fn filters_the_ledger_can_use_narrow_the_ticket_and_others_are_left_to_datafusion() {
        let mut q = TicketQuery::default();
        assert!(push_filter(Table::Events, &mut q, &col("session_id").eq(lit("s-1"))));
        assert!(push_filter(Table::Events, &mut q, &lit("pg-prod").eq(col("resource"))));
        assert!(push_filter(Table::Events, &mut q, &col("kind").eq(lit("request"))));
        assert!(push_filter(Table::Events, &mut q, &col("subject").eq(lit("alice"))));
        assert!(push_filter(Table::Events, &mut q, &col("index").gt_eq(lit(100u64))));
        let t = |n: i64| lit(ScalarValue::TimestampNanosecond(Some(n), Some("UTC".into())));
        assert!(push_filter(Table::Events, &mut q, &col("commit_time").gt_eq(t(1_000))));
        assert!(push_filter(Table::Events, &mut q, &col("commit_time").lt(t(5_000))));
        assert!(push_filter(Table::Events, &mut q, &col("commit_time").lt_eq(t(3_000))));
        assert_eq!(q.session_id.as_deref(), Some("s-1"));
        assert_eq!(q.resource.as_deref(), Some("pg-prod"));
        assert_eq!(q.kind.as_deref(), Some("request"));
        assert_eq!(q.identity.as_deref(), Some("alice"));
        assert_eq!(q.from_index, Some(100));
        assert_eq!(q.time_range().unwrap(), (1_000, 3_001), "the tightest bounds, until exclusive");
        // Not usable: left to DataFusion, the ticket unchanged.
        let before = q.clone();
        for e in [col("kind").eq(lit("no-such-kind")), col("sql").like(lit("%drop%")), col("session_id").not_eq(lit("x")), col("seq").gt(lit(3u64))] {
            assert!(!push_filter(Table::Events, &mut q, &e), "{e}");
        }
        assert_eq!(q, before);
        // Sessions have no commit time or kind.
        let mut s = TicketQuery { table: Table::Sessions, ..Default::default() };
        assert!(!push_filter(Table::Sessions, &mut s, &col("kind").eq(lit("request"))));
        assert!(push_filter(Table::Sessions, &mut s, &col("resource").eq(lit("pg"))));
    }
}
